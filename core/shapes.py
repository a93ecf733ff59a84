"""Export shapes: which of a profile's shapes a run exports, and which input dims vary.

A profile lists several video sizes (``[[shapes]]``); every chunk is planned at each selected
shape. :func:`group_dims` finds the input dimensions that differ across those shapes and
groups dimensions that take the same values at every shape, so a shape-polymorphic capture
(``torch.export`` with ``dynamic_shapes``) ties them to one ``torch.export.Dim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from sora_export.core.errors import UsageError
from sora_export.core.types import DeviceProfile, ExportShape

ALL = "all"
DEFAULT = "default"


def parse_shapes_option(text: str) -> tuple[str, ...]:
    """``--shapes`` value -> request tuple: ``all``, ``default`` or comma-separated names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError("--shapes needs 'all', 'default' or shape names separated by commas")
    return names


def select_shapes(profile: DeviceProfile, requested: Sequence[str]) -> tuple[ExportShape, ...]:
    """The profile shapes a request selects, the bundle's default shape first.

    ``("all",)`` selects every shape, ``("default",)`` the profile's default, otherwise the
    named shapes (``default`` may be mixed with names). The bundle's default is the
    profile's default when selected, else the first selected shape in profile order. An
    unknown name is a :class:`UsageError` listing the profile's shapes.
    """
    shapes = tuple(profile.shapes)
    if not shapes:
        raise UsageError(f"profile {profile.name!r} lists no [[shapes]]")
    requested = tuple(requested) or (ALL,)
    default = profile.default_shape
    if ALL in requested:
        if len(requested) > 1:
            raise UsageError("--shapes all cannot be combined with shape names")
        chosen = list(shapes)
    else:
        by_name = {s.name: s for s in shapes}
        unknown = [n for n in requested if n != DEFAULT and n not in by_name]
        if unknown:
            raise UsageError(
                f"--shapes {','.join(requested)}: profile {profile.name!r} has no shape "
                f"{unknown[0]!r}; its shapes are {', '.join(by_name)} "
                f"(default {default.name}), or use 'all' / 'default'"
            )
        wanted = {default.name if n == DEFAULT else n for n in requested}
        chosen = [s for s in shapes if s.name in wanted]
    if default in chosen:
        chosen.remove(default)
        return (default, *chosen)
    return tuple(chosen)


@attrs.frozen
class DimGroup:
    """Input dimensions that take the same value at every shape, and vary across shapes.

    ``axes`` lists ``(input index, axis)``; ``values`` the size at each shape (in shape
    order); ``name`` is ``<first input name>_<axis>``.
    """

    name: str
    axes: tuple[tuple[int, int], ...]
    values: tuple[int, ...]

    @property
    def min(self) -> int:
        return min(self.values)

    @property
    def max(self) -> int:
        return max(self.values)


def group_dims(
    input_names: Sequence[str], shapes_per_case: Sequence[Sequence[Sequence[int]]]
) -> list[DimGroup]:
    """Group the varying input dims of ``shapes_per_case[case][input]`` by their values.

    A dim varies when its size is not the same at every case (shape); dims of any inputs
    whose sizes agree at every case share one group. Groups come in order of their first
    ``(input, axis)``. Raises ValueError when an input's rank or the input count differs
    between cases (no single function could take them).
    """
    if not shapes_per_case:
        return []
    first = shapes_per_case[0]
    if len(first) != len(input_names):
        raise ValueError(f"{len(input_names)} input names for {len(first)} input shapes")
    for case in shapes_per_case:
        if len(case) != len(first):
            raise ValueError("the number of inputs differs between shapes")
        for name, a, b in zip(input_names, first, case, strict=True):
            if len(a) != len(b):
                raise ValueError(
                    f"input {name!r} has rank {len(a)} at one shape, {len(b)} at another"
                )
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, shape in enumerate(first):
        for axis in range(len(shape)):
            values = tuple(int(case[i][axis]) for case in shapes_per_case)
            if len(set(values)) > 1:
                groups.setdefault(values, []).append((i, axis))
    return [
        DimGroup(f"{input_names[axes[0][0]]}_{axes[0][1]}", tuple(axes), values)
        for values, axes in groups.items()
    ]


def dynamic_shapes(groups: Sequence[DimGroup], ranks: Sequence[int]) -> tuple[Any, ...]:
    """``torch.export`` ``dynamic_shapes`` for positional inputs of ``ranks``: one
    ``torch.export.Dim(name, min, max)`` per group; ``None`` for an input with no varying
    dim."""
    import torch

    spec: list[dict[int, Any] | None] = [None] * len(ranks)
    for group in groups:
        dim = torch.export.Dim(group.name, min=group.min, max=group.max)
        for i, axis in group.axes:
            spec[i] = {**(spec[i] or {}), axis: dim}
    return tuple(spec)


def enumerated_shapes(
    input_names: Sequence[str], shapes_per_case: Sequence[Sequence[Sequence[int]]]
) -> dict[str, list[tuple[int, ...]]]:
    """``{input name: its distinct shapes in case order}`` for inputs whose shape varies;
    the first entry is the default shape's."""
    out: dict[str, list[tuple[int, ...]]] = {}
    for i, name in enumerate(input_names):
        seen = list(dict.fromkeys(tuple(int(d) for d in case[i]) for case in shapes_per_case))
        if len(seen) > 1:
            out[name] = seen
    return out
