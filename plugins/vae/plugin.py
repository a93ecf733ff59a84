"""The ``vae-temporal`` and ``vae-spatial`` component plugins (alias ``vae`` selects both).

Open-Sora v1.2 decodes a video in two steps, and each is one component here:

``vae-temporal`` (order 30)
    One micro-chunk of raw sampler latents ``z`` [1, 4, 5, h, w] (5 latent frames; fewer
    only when the whole video is shorter than 17 frames) -> ``latents`` [1, 4, 17, h, w],
    the spatial VAE's per-frame latents. A runtime runs it once per micro-chunk.
``vae-spatial`` (order 40)
    A micro-batch of 4 frames ``latents`` [4, 4, h, w] -> ``pixels`` [4, 3, 8h, 8w] in
    about [-1, 1]. A runtime moves the frames to the batch axis and runs it once per 4
    frames, zero-padding the last micro-batch (frames are decoded independently).

Each decoder is an ordered list of stages (``temporal_stage_names`` /
``spatial_stage_names``); consecutive stages are grouped greedily into chunks whose
parameters fit the profile's per-chunk budget at the component's quantization policy (a
stage larger than the budget gets a chunk of its own). A chunk is named after the first and
last stage it holds, dots dropped: ``pre-res``, ``up3``, ``up1-out`` (a whole decoder in
one chunk is ``pre-out`` / ``in-out``); ``meta["stages"]`` lists every stage.

Chunk I/O: the first chunk takes the pipeline input (``z`` / ``latents``), the last
returns the component output (``latents`` / ``pixels``), and between chunks the tensor is
``x`` in and ``x_out`` out, wired to the previous chunk's ``x_out`` (Core ML forbids one
name as both input and output of a function).

Weights: ``--weights vae-temporal=PATH`` and/or ``--weights vae-spatial=PATH`` (the same
file may be given to both) take an OpenSora-VAE-v1.2 checkpoint: ``temporal_vae.*`` plus
the top-level ``shift``/``scale`` buffers for the temporal decoder, ``spatial_vae.module.*``
for the spatial one, optionally under one more leading ``module.`` or ``model.``. The
configuration is the known one (``full`` or ``tiny``) whose decoder key shapes the
checkpoint matches best (GroupNorm's group count is not visible in shapes, so no other is
inferred); every decoder key and shape is then checked strictly before anything is built,
with the encoders, ``quant_conv`` and the other decoder's keys ignored. Without weights the
decoders get seeded random weights at ``--size``; the pipeline buffers ``shift``/``scale``
are then seeded like every other tensor (the export is random anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from sora_export.core.checkpoint import CheckpointReader
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import (
    Chunk,
    ComponentBuildContext,
    ComponentSpec,
    ExportShape,
    PipelineLink,
    PlannedComponent,
    TensorSpec,
    bytes_per_param,
)
from sora_export.core.weights import WeightSource
from sora_export.plugins.vae.spatial import (
    SPATIAL_VAE_CONFIGS,
    SpatialVAEConfig,
    build_spatial_chunk,
    spatial_stage_names,
    spatial_stage_param_count,
    spatial_stage_shapes,
)
from sora_export.plugins.vae.temporal import (
    MICRO_FRAME_SIZE,
    TEMPORAL_VAE_CONFIGS,
    TemporalVAEConfig,
    build_temporal_chunk,
    temporal_stage_names,
    temporal_stage_param_count,
    temporal_stage_shapes,
)

TEMPORAL = "vae-temporal"
SPATIAL = "vae-spatial"
ALIAS = "vae"
# Frames the spatial decoder takes per call (upstream's micro_batch_size).
MICRO_BATCH = 4
# Where the VAE pipeline sits in checkpoints: bare, or under a DataParallel/trainer wrapper.
PREFIXES = ("", "module.", "model.")
TEMPORAL_PREFIX = "temporal_vae."
SPATIAL_PREFIX = "spatial_vae.module."
# The pipeline's latent normalisation, top-level buffers of VideoAutoencoderPipeline.
PIPELINE_BUFFERS = ("shift", "scale")
# Parts of the checkpoint that are not the decoders (skipped, never reported).
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
_TEMPORAL_PROBE = "decoder.conv_out.conv.weight"
_SPATIAL_PROBE = "decoder.conv_out.weight"
# Example inputs of a later chunk run the earlier stages (one at a time) while that costs
# at most this many multiply-adds (estimated as parameters x output positions; about a few
# seconds on one laptop core). Every tiny config at the built-in shapes qualifies (about
# 15e9 / 19e9 for a whole decoder at 256x256); at full size only the first stage is that
# cheap (temporal ``pre``, spatial ``in``), and later chunks see noise instead.
WARMUP_MAX_MACS = 25_000_000_000
# Scale of that noise: every stage starts with a GroupNorm or adds to a residual stream of
# about unit scale, and both pipeline inputs (sampler latents, SD latents x 0.18215) are
# about unit-variance too.
ACTIVATION_STD = 1.0

VAEConfig = TemporalVAEConfig | SpatialVAEConfig


# -- descriptions: one per component -------------------------------------------------------
@attrs.frozen
class TemporalVAEDescription:
    """The temporal decoder as planned: config, weights, and the micro-chunk it exports.

    ``latent_frames`` -> ``num_frames`` is one micro-chunk (5 -> 17 for any video of at
    least 17 frames); ``micro_chunks`` is how many of them the export shape's video has.
    """

    cfg: TemporalVAEConfig
    weights: WeightSource
    shape: ExportShape
    latent_frames: int
    num_frames: int

    component: ClassVar[str] = TEMPORAL
    pipeline_input: ClassVar[str] = "z"
    pipeline_output: ClassVar[str] = "latents"

    @property
    def micro_chunks(self) -> int:
        return -(-self.shape.latent_frames // self.latent_frames)

    def stage_names(self) -> list[str]:
        return temporal_stage_names(self.cfg)

    def stage_params(self, name: str) -> int:
        return temporal_stage_param_count(self.cfg, name)

    def stage_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        h, w = self.shape.latent_hw
        latent = (1, self.cfg.latent_channels, self.latent_frames, h, w)
        return temporal_stage_shapes(self.cfg, latent, num_frames=self.num_frames)

    def build(self, stages: Sequence[str]) -> nn.Module:
        return build_temporal_chunk(
            self.cfg, stages, self.latent_frames, num_frames=self.num_frames
        )

    def runtime_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "config": attrs.asdict(self.cfg),
            "micro_chunk": {"latent_frames": self.latent_frames, "num_frames": self.num_frames},
            "micro_chunks_per_video": self.micro_chunks,
        }
        tail_frames = self.shape.num_frames % MICRO_FRAME_SIZE
        if self.shape.num_frames > MICRO_FRAME_SIZE and tail_frames:
            meta["note"] = (
                f"the last micro-chunk of a {self.shape.num_frames}-frame video holds "
                f"{tail_frames} frames; this export decodes full micro-chunks only"
            )
        return meta


@attrs.frozen
class SpatialVAEDescription:
    """The spatial decoder as planned: config, weights, and the micro-batch it exports."""

    cfg: SpatialVAEConfig
    weights: WeightSource
    shape: ExportShape
    micro_batch: int = MICRO_BATCH

    component: ClassVar[str] = SPATIAL
    pipeline_input: ClassVar[str] = "latents"
    pipeline_output: ClassVar[str] = "pixels"

    def stage_names(self) -> list[str]:
        return spatial_stage_names(self.cfg)

    def stage_params(self, name: str) -> int:
        return spatial_stage_param_count(self.cfg, name)

    def stage_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        h, w = self.shape.latent_hw
        return spatial_stage_shapes(self.cfg, (self.micro_batch, self.cfg.latent_channels, h, w))

    def build(self, stages: Sequence[str]) -> nn.Module:
        return build_spatial_chunk(self.cfg, stages)

    def runtime_meta(self) -> dict[str, Any]:
        frames = self.shape.num_frames
        return {
            "config": attrs.asdict(self.cfg),
            "micro_batch": self.micro_batch,
            "micro_batches_per_video": -(-frames // self.micro_batch),
            "padded_frames": -frames % self.micro_batch,
        }


VAEDescription = TemporalVAEDescription | SpatialVAEDescription


# -- describe: config from --size or from the checkpoint's shapes -----------------------
def _expected_shapes(factory: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in factory().state_dict().items()}


def temporal_expected(cfg: TemporalVAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the temporal decoder: the union of its stages' state dicts."""
    out: dict[str, tuple[int, ...]] = {}
    for name in temporal_stage_names(cfg):
        out.update(_expected_shapes(lambda n=name: build_temporal_chunk(cfg, [n])))
    return out


def spatial_expected(cfg: SpatialVAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the spatial decoder: the union of its stages' state dicts."""
    out: dict[str, tuple[int, ...]] = {}
    for name in spatial_stage_names(cfg):
        out.update(_expected_shapes(lambda n=name: build_spatial_chunk(cfg, [n])))
    return out


def _closest_config(
    reader: CheckpointReader,
    prefix: str,
    configs: Mapping[str, VAEConfig],
    expected_of: Callable[[Any], dict[str, tuple[int, ...]]],
    preferred: str,
    skip: Sequence[str] = (),
) -> VAEConfig:
    """The known config whose decoder keys the checkpoint has with the right shapes most
    often (ties go to ``preferred``), so a damaged full checkpoint is checked as full."""

    def misses(cfg: VAEConfig) -> int:
        return sum(
            1
            for key, shape in expected_of(cfg).items()
            if key not in skip
            and (prefix + key not in reader or tuple(reader.shape(prefix + key)) != shape)
        )

    ranked = sorted(configs.items(), key=lambda item: (misses(item[1]), item[0] != preferred))
    return ranked[0][1]


def _check_top_level(
    reader: CheckpointReader, outer: str, own: str, buffers: Mapping[str, tuple[int, ...]]
) -> None:
    """Keys directly under ``outer`` must be the pipeline buffers (checked against
    ``buffers``; the others optional) or belong to one of the two VAEs.

    ``own`` is this component's namespace (e.g. ``spatial_vae.module.``); stray keys in
    the other VAE's namespace are that component's business.
    """
    other = ("spatial_vae.",) if own == TEMPORAL_PREFIX else ("temporal_vae.",)
    reader.validate(
        buffers,
        prefix=outer,
        optional=[k for k in PIPELINE_BUFFERS if k not in buffers],
        ignore_prefixes=(own, *other),
    )


def micro_chunk(cfg: TemporalVAEConfig, shape: ExportShape) -> tuple[int, int]:
    """(latent frames, video frames) of the micro-chunk exported for ``shape``: (5, 17),
    or the whole video when it is shorter than one micro-chunk (upstream's rule)."""
    per_chunk = -(-MICRO_FRAME_SIZE // cfg.time_factor)
    return min(per_chunk, shape.latent_frames), min(MICRO_FRAME_SIZE, shape.num_frames)


def describe_temporal(ctx: ComponentBuildContext) -> TemporalVAEDescription:
    """Config, weights and micro-chunk of the temporal decoder; a checkpoint is validated
    strictly (every decoder key, ``shift``, ``scale``) before anything is built."""
    size = "full" if ctx.size == "full" else "tiny"
    if ctx.weights is None:
        cfg = TEMPORAL_VAE_CONFIGS[size]
        weights = WeightSource(seed=ctx.seed)
    else:
        reader = CheckpointReader(ctx.weights)
        outer = reader.detect_prefix(PREFIXES, TEMPORAL_PREFIX + _TEMPORAL_PROBE)
        prefix = outer + TEMPORAL_PREFIX
        cfg = _closest_config(
            reader, prefix, TEMPORAL_VAE_CONFIGS, temporal_expected, size, PIPELINE_BUFFERS
        )
        expected = temporal_expected(cfg)
        buffers = {k: expected.pop(k) for k in PIPELINE_BUFFERS}
        reader.validate(expected, prefix=prefix, ignore_prefixes=ENCODER_PREFIXES)
        _check_top_level(reader, outer, TEMPORAL_PREFIX, buffers)
        # The buffers sit beside ``temporal_vae.``, so every decoder key is read through an
        # alias under the outer prefix (validation above rules out top-level look-alikes).
        weights = WeightSource(
            path=Path(ctx.weights),
            prefix=outer,
            aliases={k: TEMPORAL_PREFIX + k for k in expected},
        )
    latent_frames, num_frames = micro_chunk(cfg, ctx.shape)
    return TemporalVAEDescription(cfg, weights, ctx.shape, latent_frames, num_frames)


def describe_spatial(ctx: ComponentBuildContext) -> SpatialVAEDescription:
    """Config and weights of the spatial decoder; a checkpoint is validated strictly."""
    size = "full" if ctx.size == "full" else "tiny"
    if ctx.weights is None:
        return SpatialVAEDescription(
            SPATIAL_VAE_CONFIGS[size], WeightSource(seed=ctx.seed), ctx.shape
        )
    reader = CheckpointReader(ctx.weights)
    outer = reader.detect_prefix(PREFIXES, SPATIAL_PREFIX + _SPATIAL_PROBE)
    prefix = outer + SPATIAL_PREFIX
    cfg = _closest_config(reader, prefix, SPATIAL_VAE_CONFIGS, spatial_expected, size)
    reader.validate(spatial_expected(cfg), prefix=prefix, ignore_prefixes=ENCODER_PREFIXES)
    _check_top_level(reader, outer, SPATIAL_PREFIX, {})
    weights = WeightSource(path=Path(ctx.weights), prefix=prefix)
    return SpatialVAEDescription(cfg, weights, ctx.shape)


# -- picklable builders and input makers -------------------------------------------------
@attrs.frozen
class StageBuilder:
    """Builds a run of consecutive decoder stages with only their own weights."""

    description: VAEDescription
    stages: tuple[str, ...] = attrs.field(converter=tuple)

    def __call__(self) -> nn.Module:
        desc, stages = self.description, self.stages
        return desc.weights.build(lambda: desc.build(stages))


def stage_macs(desc: VAEDescription, name: str) -> int:
    """Estimated multiply-adds of one stage: parameters x positions it runs at (for a
    convolution with stride 1 that is exact; attention's own products are left out)."""
    shapes = desc.stage_shapes()[name]
    positions = max(math.prod(s) // s[1] for s in shapes)
    return desc.stage_params(name) * positions


def warmup_stages(desc: VAEDescription, first: str) -> tuple[str, ...]:
    """The stages before ``first`` that its chunk's example inputs run through: all of
    them while they cost at most :data:`WARMUP_MAX_MACS`, else none."""
    names = desc.stage_names()
    before = tuple(names[: names.index(first)])
    return before if sum(stage_macs(desc, n) for n in before) <= WARMUP_MAX_MACS else ()


@attrs.frozen
class StageInputs:
    """Deterministic example input of a chunk starting at stage ``first``.

    The first chunk gets unit-variance noise shaped like the pipeline input. A later chunk
    gets that noise run through the earlier stages (built and freed one at a time) when
    :func:`warmup_stages` allows, so it sees realistic activations; otherwise noise of its
    own input shape with standard deviation :data:`ACTIVATION_STD`.
    """

    description: VAEDescription
    first: str
    seed: int

    def __call__(self) -> tuple[torch.Tensor, ...]:
        desc = self.description
        shapes = desc.stage_shapes()
        names = desc.stage_names()
        g = torch.Generator().manual_seed(self.seed + 31)
        x = torch.randn(shapes[names[0]][0], generator=g)
        if self.first == names[0]:
            return (x,)
        warmup = warmup_stages(desc, self.first)
        if not warmup:
            g.manual_seed(self.seed + 31 + names.index(self.first))
            return (ACTIVATION_STD * torch.randn(shapes[self.first][0], generator=g),)
        with torch.no_grad():
            for name in warmup:
                stage = StageBuilder(desc, (name,))().eval()
                x = stage(x)
                del stage
        return (x,)


# -- chunk plan ---------------------------------------------------------------------------
def group_stages(
    names: Sequence[str], params: Mapping[str, int], max_params: int
) -> list[tuple[str, ...]]:
    """Consecutive stages packed greedily, in order, so each group's parameters are at most
    ``max_params``; a stage larger than that alone is a group of its own."""
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    total = 0
    for name in names:
        if current and total + params[name] > max_params:
            groups.append(tuple(current))
            current, total = [], 0
        current.append(name)
        total += params[name]
    if current:
        groups.append(tuple(current))
    return groups


def chunk_name(stages: Sequence[str]) -> str:
    """``up.3`` -> ``up3``; a run of stages -> ``FIRST-LAST`` (``pre-res``, ``up1-out``)."""
    first, last = (s.replace(".", "") for s in (stages[0], stages[-1]))
    return first if len(stages) == 1 else f"{first}-{last}"


def plan_chunks(desc: VAEDescription, budget_bytes: int, policy: str, seed: int) -> list[Chunk]:
    """The component's chunks in execution order, each within ``budget_bytes`` at
    ``policy`` unless a single stage alone is larger."""
    names = desc.stage_names()
    params = {n: desc.stage_params(n) for n in names}
    shapes = desc.stage_shapes()
    max_params = int(budget_bytes / bytes_per_param(policy))
    groups = group_stages(names, params, max_params)
    chunks: list[Chunk] = []
    previous = ""
    for index, stages in enumerate(groups):
        first, last = index == 0, index == len(groups) - 1
        in_name = desc.pipeline_input if first else "x"
        out_name = desc.pipeline_output if last else "x_out"
        meta: dict[str, Any] = {"stages": list(stages)}
        if first:
            meta.update(desc.runtime_meta())
        count = sum(params[n] for n in stages)
        if count > max_params:
            meta["over_budget"] = True
        chunk = Chunk(
            component=desc.component,
            index=index,
            name=chunk_name(stages),
            build=StageBuilder(desc, stages),
            example_inputs=StageInputs(desc, stages[0], seed),
            inputs=(TensorSpec(in_name, shapes[stages[0]][0]),),
            outputs=(TensorSpec(out_name, shapes[stages[-1]][1]),),
            params=count,
            wiring={in_name: f"pipeline:{in_name}" if first else f"{previous}:x_out"},
            meta=meta,
        )
        chunks.append(chunk)
        previous = chunk.key
    return chunks


# -- hooks ----------------------------------------------------------------------------------
@hookimpl
def sora_export_register_components(register: Callable[[ComponentSpec], None]) -> None:
    register(
        ComponentSpec(
            name=TEMPORAL,
            description="Open-Sora v1.2 temporal VAE decoder: one 5-latent-frame micro-chunk "
            "-> 17 frames of spatial latents",
            order=30,
            describe=describe_temporal,
            aliases=(ALIAS,),
            links={
                "z": PipelineLink(
                    "stdit3:velocity",
                    "sampler output: the denoised latent z0 after the last (or leap) step, "
                    "channels 0-3, one 5-latent-frame micro-chunk at a time",
                )
            },
        )
    )
    register(
        ComponentSpec(
            name=SPATIAL,
            description="Open-Sora v1.2 spatial VAE decoder (SD-style): 4 frames of latents "
            "-> pixels in [-1, 1]",
            order=40,
            describe=describe_spatial,
            aliases=(ALIAS,),
            links={
                "latents": PipelineLink(
                    f"{TEMPORAL}:latents",
                    f"frames to batch: [1,4,17,h,w] -> [17,4,h,w], decoded in micro-batches "
                    f"of {MICRO_BATCH} (pad the last)",
                )
            },
        )
    )


@hookimpl
def sora_export_chunk_component(component: PlannedComponent) -> list[Chunk] | None:
    if component.spec.name not in (TEMPORAL, SPATIAL):
        return None
    desc: VAEDescription = component.description
    ctx = component.context
    return plan_chunks(desc, ctx.chunk_budget_bytes, ctx.policy, ctx.seed)
