"""The ``tdtm`` transform plugin: Temporal Dimension Token Merging on STDiT3 block chunks.

Selecting ``--plugins stdit,tdtm`` exports every STDiT3 block chunk that holds a block pair
in the configured range as one multifunction package: ``plain`` (the unchanged blocks) and
``tdtm`` (frame pairs merged around the attention steps, see
:mod:`sora_export.plugins.tdtm.merge`), sharing one copy of the weights. Chunks outside the
range keep their single ``main`` function. The runtime picks the function per denoising
step; the manifest's ``tdtm`` section says how.

Profile options, ``[plugins.tdtm]``:

- ``merge_steps`` (int >= 0, at most the number of denoising steps; default half of them,
  the paper's 15 of 30): the first ``merge_steps`` steps use ``tdtm``, the rest ``plain``.
  ``0`` exports no ``tdtm`` function at all.
- ``blocks`` (``[start, stop]``, half-open over block-pair indices within the model depth;
  default every pair): which pairs merge.

The number of denoising steps is ``num_steps`` from ``[plugins.lpl]`` or ``[plugins.sampler]``
when the profile has it, else 30 (Open-Sora v1.2's default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import Chunk, DeviceProfile, ExportPlan, RunResult, TransformSpec
from sora_export.plugins.stdit3.model import STDiT3Blocks
from sora_export.plugins.stdit3.plugin import NAME as STDIT3
from sora_export.plugins.stdit3.plugin import PartBuilder
from sora_export.plugins.tdtm.merge import apply_tdtm

NAME = "tdtm"
#: Function names in a block chunk's multifunction package.
MERGED_FUNCTION = "tdtm"
PLAIN_FUNCTION = "plain"
#: Open-Sora v1.2's sampler default, used when no profile option names the step count.
DEFAULT_NUM_STEPS = 30
#: Profile tables that may carry the number of denoising steps, in the order they are read.
STEP_SOURCES = ("lpl", "sampler")
FIELDS = ("merge_steps", "blocks")


@attrs.frozen
class TDTMSettings:
    """Validated ``[plugins.tdtm]`` options.

    ``blocks`` is ``None`` when the profile names no range (every block pair merges).
    """

    merge_steps: int
    num_steps: int
    blocks: tuple[int, int] | None = None

    def block_range(self, depth: int) -> tuple[int, int]:
        """The merged block pairs as ``(start, stop)`` for a model of ``depth`` pairs."""
        return self.blocks if self.blocks is not None else (0, depth)

    def schedule(self) -> list[str]:
        """The function each denoising step ``0..num_steps-1`` uses."""
        return [
            MERGED_FUNCTION if step < self.merge_steps else PLAIN_FUNCTION
            for step in range(self.num_steps)
        ]

    def rule(self) -> str:
        if self.merge_steps == 0:
            return f"use function '{PLAIN_FUNCTION}' for every denoising step"
        return (
            f"use function '{MERGED_FUNCTION}' for denoising steps 0..{self.merge_steps - 1}, "
            f"'{PLAIN_FUNCTION}' after"
        )


def _is_int(value: Any) -> bool:
    # TOML booleans are Python bools, which are ints; `merge_steps = true` is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _num_steps(profile: DeviceProfile) -> int:
    for table in STEP_SOURCES:
        options = profile.options(table)
        if "num_steps" in options:
            value = options["num_steps"]
            if not _is_int(value) or value < 1:
                raise UsageError(
                    f"profile {profile.name!r}: [plugins.{table}] num_steps must be a whole "
                    f"number >= 1, got {value!r}"
                )
            return value
    return DEFAULT_NUM_STEPS


def settings_from_profile(profile: DeviceProfile, depth: int | None = None) -> TDTMSettings:
    """Read and check ``[plugins.tdtm]``; a bad value is a :class:`UsageError` naming it.

    ``depth`` (block pairs of the model), when known, bounds ``blocks``.
    """
    options: Mapping[str, Any] = profile.options(NAME)
    where = f"profile {profile.name!r}: [plugins.{NAME}]"
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise UsageError(f"{where} {unknown[0]}: unknown field; known fields: {', '.join(FIELDS)}")
    num_steps = _num_steps(profile)
    merge_steps = options.get("merge_steps", num_steps // 2)
    if not _is_int(merge_steps) or not 0 <= merge_steps <= num_steps:
        raise UsageError(
            f"{where} merge_steps must be a whole number from 0 to the {num_steps} denoising "
            f"steps, got {merge_steps!r}"
        )
    blocks = options.get("blocks")
    if blocks is not None:
        limit = f"{depth}" if depth is not None else "the model depth"
        valid = (
            isinstance(blocks, list | tuple)
            and len(blocks) == 2
            and all(_is_int(b) for b in blocks)
            and 0 <= blocks[0] < blocks[1]
            and (depth is None or blocks[1] <= depth)
        )
        if not valid:
            raise UsageError(
                f"{where} blocks must be [start, stop] with 0 <= start < stop <= {limit} "
                f"(block pairs, stop excluded), got {blocks!r}"
            )
        blocks = (blocks[0], blocks[1])
    return TDTMSettings(merge_steps=merge_steps, num_steps=num_steps, blocks=blocks)


def _is_block_chunk(chunk: Chunk) -> bool:
    return chunk.component == STDIT3 and "blocks" in chunk.meta


def _depth(chunk: Chunk) -> int | None:
    # The stdit3 plugin's builder knows the model config; a third-party chunker may not.
    return chunk.build.cfg.depth if isinstance(chunk.build, PartBuilder) else None


@hookimpl
def sora_export_register_transforms(register: Callable[[TransformSpec], None]) -> None:
    register(
        TransformSpec(
            name=NAME,
            description=(
                "temporal dimension token merging: STDiT3 attention on frame pairs "
                "(multifunction block chunks 'plain' + 'tdtm')"
            ),
            requires=(STDIT3,),
        )
    )


@hookimpl
def sora_export_chunk_variants(chunk: Chunk, profile: DeviceProfile) -> list[str] | None:
    if not _is_block_chunk(chunk):
        return None
    settings = settings_from_profile(profile, _depth(chunk))
    if settings.merge_steps == 0:
        return None  # the runtime would never call a merged function
    if settings.blocks is None:
        return [MERGED_FUNCTION]
    start, stop = chunk.meta["blocks"]
    first, last = settings.blocks
    return [MERGED_FUNCTION] if max(first, start) < min(last, stop) else None


@hookimpl
def sora_export_patch_module(
    chunk: Chunk, module: Any, variant: str, profile: DeviceProfile
) -> Any | None:
    if variant != MERGED_FUNCTION or not _is_block_chunk(chunk):
        return None
    if not isinstance(module, STDiT3Blocks):
        raise TypeError(
            f"{chunk.key}: expected the STDiT3Blocks module to patch, got {type(module).__name__}"
        )
    apply_tdtm(module, settings_from_profile(profile, _depth(chunk)).blocks)
    return None


@hookimpl
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any] | None:
    component = next((c for c in plan.components if c.spec.name == STDIT3), None)
    if component is None:
        return None
    depth = max(chunk.meta["blocks"][1] for chunk in component.chunks if _is_block_chunk(chunk))
    settings = settings_from_profile(plan.profile, depth)
    start, stop = settings.block_range(depth)
    merged = [c.name for c in component.chunks if MERGED_FUNCTION in c.functions]
    return {
        NAME: {
            "merge_steps": settings.merge_steps,
            "num_steps": settings.num_steps,
            "blocks": [start, stop],
            "functions": {"merged": MERGED_FUNCTION, "plain": PLAIN_FUNCTION},
            "rule": settings.rule(),
            "schedule": settings.schedule(),
            "chunks": merged,
            "other_chunks": "chunks not listed in 'chunks' have one function, 'main', "
            "used at every step",
        }
    }


@hookimpl
def sora_export_check_profile(profile: DeviceProfile) -> None:
    settings_from_profile(profile)  # raises UsageError naming the [plugins.tdtm] field
