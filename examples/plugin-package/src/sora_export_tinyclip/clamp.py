"""The ``clamp-activations`` transform: bound tinyclip's residual stream for fp16 safety.

Selecting ``--plugins tinyclip,clamp-activations`` patches every ``layers-*`` chunk before
it is captured: the output of each encoder layer is clamped to ``[-limit, limit]``
(default 30000, inside fp16's 65504 with room for the next layer's additions). Inputs
whose activations stay inside the limit give exactly the unpatched result; a rare outlier
is held at the limit instead of growing into inf across later layers. The engine's own fp16
guard still measures every submodule before lowering, so the clamp never hides an
overflow from it.

Profile option, ``[plugins.clamp-activations]``: ``limit`` (a number, 0 < limit <= 65504).
The manifest gets a ``clamp-activations`` section naming the limit and the patched chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import Chunk, DeviceProfile, ExportPlan, RunResult, TransformSpec
from torch import nn

from sora_export_tinyclip.model import TinyClipLayers
from sora_export_tinyclip.plugin import NAME as TINYCLIP

NAME = "clamp-activations"
DEFAULT_LIMIT = 30000.0
FP16_MAX = 65504.0


@attrs.frozen
class ClampSettings:
    """Validated ``[plugins.clamp-activations]`` options."""

    limit: float = DEFAULT_LIMIT


def settings_from_profile(profile: DeviceProfile) -> ClampSettings:
    """Read and check the profile's options; a bad one is a UsageError naming the field."""
    options = dict(profile.options(NAME))
    unknown = sorted(set(options) - {"limit"})
    if unknown:
        raise UsageError(
            f"profile {profile.name!r}: unknown field [plugins.{NAME}] {unknown[0]!r}; known: limit"
        )
    limit = options.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise UsageError(
            f"profile {profile.name!r}: [plugins.{NAME}] limit must be a number, got {limit!r}"
        )
    if not 0 < limit <= FP16_MAX:
        raise UsageError(
            f"profile {profile.name!r}: [plugins.{NAME}] limit must be in (0, {FP16_MAX:.0f}], "
            f"got {limit!r}"
        )
    return ClampSettings(limit=float(limit))


class ClampOutput(nn.Module):
    """Runs ``inner`` and clamps its output to ``[-limit, limit]``."""

    def __init__(self, inner: nn.Module, limit: float) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.inner(x), -self.limit, self.limit)


def clamp_layers(module: TinyClipLayers, limit: float) -> list[int]:
    """Wrap every layer of ``module`` in :class:`ClampOutput`, in place.

    Returns the global indices of the layers wrapped; a layer already wrapped is left as
    it is, so applying the patch twice changes nothing.
    """
    wrapped = []
    for index in range(module.start, module.stop):
        layer = module.layer(index)
        if isinstance(layer, ClampOutput):
            continue
        module.encoder.layers[str(index)] = ClampOutput(layer, limit)
        wrapped.append(index)
    return wrapped


def is_layer_chunk(chunk: Chunk) -> bool:
    """True for tinyclip's ``layers-*`` chunks, the ones this transform patches."""
    return chunk.component == TINYCLIP and chunk.meta.get("part") == "layers"


@hookimpl
def sora_export_register_transforms(register: Callable[[TransformSpec], None]) -> None:
    register(
        TransformSpec(
            name=NAME,
            description="clamp tinyclip's layer outputs to +-limit (fp16 headroom)",
            requires=(TINYCLIP,),
        )
    )


@hookimpl
def sora_export_chunk_variants(chunk: Chunk, profile: DeviceProfile) -> list[str] | None:
    # No extra variants: this is the planning-time hook that sees the profile, so a bad
    # [plugins.clamp-activations] table is refused before anything is written.
    if is_layer_chunk(chunk):
        settings_from_profile(profile)
    return None


@hookimpl
def sora_export_patch_module(
    chunk: Chunk, module: Any, variant: str, profile: DeviceProfile
) -> Any | None:
    # A safety patch, not a variant of its own: it applies to whichever function the chunk
    # is exported with ("main", or "plain" and any variant another plugin adds).
    if not is_layer_chunk(chunk):
        return None
    if not isinstance(module, TinyClipLayers):
        raise TypeError(f"{chunk.key}: expected TinyClipLayers, got {type(module).__name__}")
    clamp_layers(module, settings_from_profile(profile).limit)
    return None  # patched in place


@hookimpl
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any] | None:
    component = next((c for c in plan.components if c.spec.name == TINYCLIP), None)
    if component is None:
        return None
    # Derived from the plan, not recorded by the patch hook: with --jobs the patches run
    # in worker processes, whose state never reaches this process.
    patched = [c.name for c in component.chunks if is_layer_chunk(c)]
    return {
        NAME: {
            "component": TINYCLIP,
            "limit": settings_from_profile(plan.profile).limit,
            "chunks": patched,
            "rule": "each encoder layer's output is clamped to [-limit, limit]",
        }
    }
