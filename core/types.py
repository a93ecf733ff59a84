"""Plain data that flows between the stages of an export.

Everything here is an attrs class, frozen where the value does not change after it is
made; stages derive new values with :func:`attrs.evolve` instead of mutating. Validation
happens at the boundaries (CLI, profile TOML, checkpoint loading), not in these classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

TARGETS: tuple[str, ...] = ("coreml", "onnx")
QUANT_POLICIES: tuple[str, ...] = (
    "fp32",
    "fp16",
    "int8",
    "palettize8",
    "palettize6",
    "palettize4",
    "int4-block",
    "auto",
)


_BYTES_PER_PARAM = {
    "fp32": 4.0,
    "fp16": 2.0,
    "int8": 1.0,
    "palettize8": 1.0,
    "palettize6": 0.75,
    "palettize4": 0.5,
    "int4-block": 0.5625,  # 4-bit values plus one fp16 scale per block of 32
    "auto": 2.0,  # sized for fp16; smaller policies only shrink a chunk
}


def bytes_per_param(policy: str) -> float:
    """Stored bytes per weight under a quantization policy (for sizing chunks)."""
    return _BYTES_PER_PARAM[policy]


@attrs.frozen
class TensorSpec:
    """Name, static shape and dtype (numpy name, e.g. ``float32``, ``int32``) of a tensor."""

    name: str
    shape: tuple[int, ...] = attrs.field(converter=tuple)
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@attrs.frozen
class ExportShape:
    """One video size a profile exports for: pixels, frames, and the latent it implies."""

    name: str
    height: int
    width: int
    num_frames: int
    default: bool = False

    @property
    def latent_frames(self) -> int:
        """Latent frames of Open-Sora v1.2's VAE: micro-chunks of 17 frames, each padded to a
        multiple of 4 and compressed 4x in time (17 -> 5, 68 -> 20, 51 -> 15)."""
        full, rest = divmod(self.num_frames, 17)
        return full * 5 + -(-rest // 4)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.height // 8, self.width // 8)

    def to_json(self) -> dict[str, Any]:
        t = self.latent_frames
        h, w = self.latent_hw
        return {
            "name": self.name,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "latent": [4, t, h, w],
            "default": self.default,
        }


@attrs.frozen
class QuantizationPolicy:
    """Precision policy: a profile-wide default, then per component, then per chunk.

    The most specific entry wins (same shape as coremltools' OptimizationConfig: global,
    per op type, per op name).
    """

    default: str = "fp16"
    components: Mapping[str, str] = attrs.field(factory=dict)
    chunks: Mapping[str, str] = attrs.field(factory=dict)  # "component/chunk-name" -> policy

    def for_chunk(self, component: str, chunk_name: str) -> str:
        key = f"{component}/{chunk_name}"
        if key in self.chunks:
            return self.chunks[key]
        return self.components.get(component, self.default)


@attrs.frozen
class DeviceProfile:
    """What a target device can hold and run; every field is documented in docs/profiles.md."""

    name: str
    description: str
    targets: tuple[str, ...] = attrs.field(converter=tuple)
    deployment_target: str  # "iOS18", "macOS15", ... (Core ML); ignored by ONNX
    compute_units: str  # CPU_ONLY | CPU_AND_GPU | CPU_AND_NE | ALL
    memory_budget_bytes: int  # usable by one app
    activation_reserve_bytes: int  # kept free for activations and the runtime
    resident_chunks: int = 2  # chunks kept loaded at once (dynamic loading keeps 2)
    chunk_budget_bytes: int | None = None  # explicit override of the derived budget
    quantization: QuantizationPolicy = attrs.field(factory=QuantizationPolicy)
    psnr_thresholds_db: Mapping[str, float] = attrs.field(factory=dict)
    shapes: tuple[ExportShape, ...] = attrs.field(converter=tuple, factory=tuple)
    onnx_opset: int = 18
    plugin_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    source: str = "built-in"

    @property
    def per_chunk_budget_bytes(self) -> int:
        """Weight bytes one chunk may hold so ``resident_chunks`` of them plus activations fit."""
        if self.chunk_budget_bytes is not None:
            return self.chunk_budget_bytes
        usable = self.memory_budget_bytes - self.activation_reserve_bytes
        return max(1, usable // max(1, self.resident_chunks))

    @property
    def default_shape(self) -> ExportShape:
        for shape in self.shapes:
            if shape.default:
                return shape
        return self.shapes[0]

    def options(self, plugin: str) -> Mapping[str, Any]:
        """Plugin-specific settings from the profile's ``[plugins.NAME]`` table."""
        return self.plugin_options.get(plugin, {})

    def threshold_for(self, policy: str) -> float:
        if policy in self.psnr_thresholds_db:
            return float(self.psnr_thresholds_db[policy])
        return float(self.psnr_thresholds_db.get("default", 35.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "targets": list(self.targets),
            "deployment_target": self.deployment_target,
            "compute_units": self.compute_units,
            "memory_budget_bytes": self.memory_budget_bytes,
            "per_chunk_budget_bytes": self.per_chunk_budget_bytes,
            "quantization": attrs.asdict(self.quantization),
            "psnr_thresholds_db": dict(self.psnr_thresholds_db),
            "shapes": [s.to_json() for s in self.shapes],
            "source": self.source,
        }


class ModuleBuilder(Protocol):
    """Builds a chunk's ``nn.Module`` with its weights (seeded random or from a checkpoint).

    Called only when that chunk runs, so no stage holds more than one chunk's weights.
    Builders should be picklable (module-level classes) so chunks can run in workers.
    """

    def __call__(self) -> Any: ...


class InputMaker(Protocol):
    """Makes deterministic example inputs (a tuple of tensors in ``Chunk.inputs`` order)."""

    def __call__(self) -> tuple[Any, ...]: ...


@attrs.frozen
class Chunk:
    """One exported unit: a piece of a component that becomes one package.

    ``inputs``/``outputs`` name and shape the tensors at the package boundary;
    ``wiring`` maps each input name to where a runtime gets it: ``"pipeline:NAME"`` for a
    pipeline input, or ``"COMPONENT/CHUNK:OUTPUT"`` for an earlier chunk's output.
    """

    component: str
    index: int
    name: str
    build: ModuleBuilder
    example_inputs: InputMaker
    inputs: tuple[TensorSpec, ...] = attrs.field(converter=tuple)
    outputs: tuple[TensorSpec, ...] = attrs.field(converter=tuple)
    params: int
    wiring: Mapping[str, str] = attrs.field(factory=dict)
    functions: tuple[str, ...] = ("main",)
    meta: Mapping[str, Any] = attrs.field(factory=dict)
    # The export shape this chunk was planned at ("" when planned outside engine.plan).
    shape: str = ""
    # Set by engine.plan: shape name -> this chunk as planned at that shape (same name,
    # build and functions; its own example inputs and specs), the bundle's default shape
    # first. The chunk itself is the default shape's. Empty: the chunk has one shape.
    shapes: Mapping[str, Chunk] = attrs.field(factory=dict)
    # Optional: smaller chunks that, run one after another, compute this one (e.g. one
    # block pair each). The engine may convert them separately -- in parallel, cached part
    # by part, with a fraction of the memory -- and stitch the results into this chunk's
    # package. A part's ``wiring`` maps each of its inputs to ``"chunk:NAME"`` (this
    # chunk's input) or ``"previous:NAME"`` (the previous part's output); the last part's
    # outputs are this chunk's outputs. See :func:`chained_parts`.
    parts: tuple[Chunk, ...] = attrs.field(converter=tuple, factory=tuple)
    # Optional, for parts: parts with the same non-empty template trace to one graph and
    # differ only in the values of their parameters (same parameters in the same order and
    # shapes, equal buffers), like the block pairs of a transformer. The engine then lowers
    # the template once (with marker weights, twice, to learn where every parameter lands
    # in the lowered weights) and writes every other part's lowered model by binding its
    # own weights into the template's; anything the check finds weight-dependent makes the
    # parts convert one by one instead. See core/rebind.py.
    template: str = ""

    @property
    def key(self) -> str:
        return f"{self.component}/{self.name}"

    def shape_chunks(self) -> dict[str, Chunk]:
        """Shape name -> the chunk at that shape, default first (at least this chunk)."""
        return dict(self.shapes) if self.shapes else {self.shape: self}

    def function_for(self, variant: str, shape: str, per_shape: bool) -> str:
        """The artifact function that runs ``variant`` at ``shape``.

        A shape-polymorphic artifact (or a chunk with one shape) runs every shape with the
        variant's own function; per-shape artifacts name the non-default shapes' functions
        ``<variant>@<shape>``.
        """
        default = next(iter(self.shape_chunks()))
        return variant if not per_shape or shape == default else f"{variant}@{shape}"


def chained_parts(
    chunk: Chunk,
    pieces: Sequence[tuple[str, ModuleBuilder, int, Mapping[str, Any]]],
    carry: Mapping[str, str],
    template: str = "",
) -> tuple[Chunk, ...]:
    """Parts of ``chunk`` that run in sequence with the chunk's own inputs and outputs.

    ``pieces`` are ``(name, build, params, meta)`` in order. A part's name must be unique
    in its component and independent of the chunk (``pair-03``, not ``blocks-00-14.pair-03``):
    it keys the part's lowered models in the cache, so a chunk planned differently (another
    budget or policy) reuses the parts it shares. Every part takes the chunk's
    inputs (and example inputs: capture only needs their shapes) except that input ``n`` in
    ``carry`` comes from the previous part's output ``carry[n]`` (e.g. ``{"tokens":
    "tokens_out"}``). The parts' params must add up to the chunk's. ``template`` (e.g.
    ``"stdit3-block-pair"``) says the pieces are one architecture with different weights
    (:attr:`Chunk.template`).
    """
    if sum(p for _, _, p, _ in pieces) != chunk.params:
        raise ValueError(f"{chunk.key}: parts hold a different number of weights than the chunk")
    names = {s.name for s in chunk.inputs}
    outputs = {s.name for s in chunk.outputs}
    for src, dst in carry.items():
        if src not in names or dst not in outputs:
            raise ValueError(f"{chunk.key}: carry {src!r} <- {dst!r} names no input/output")
    return tuple(
        Chunk(
            component=chunk.component,
            index=i,
            name=name,
            build=build,
            example_inputs=chunk.example_inputs,
            inputs=chunk.inputs,
            outputs=chunk.outputs,
            params=params,
            wiring={
                s.name: f"previous:{carry[s.name]}" if i and s.name in carry else f"chunk:{s.name}"
                for s in chunk.inputs
            },
            meta=meta,
            template=template,
        )
        for i, (name, build, params, meta) in enumerate(pieces)
    )


@attrs.frozen
class ComponentBuildContext:
    """What a component factory gets: the profile, size, weights path and export shape."""

    profile: DeviceProfile
    size: str  # "tiny" | "full"
    weights: Path | None
    shape: ExportShape
    seed: int = 0
    policy: str = "fp16"  # the component's quantization policy (size chunks with it)
    # stored bytes one chunk may hold: the profile's per-chunk budget, lowered when the
    # export host could not convert such a chunk in memory (see engine.chunk_budget)
    chunk_budget_bytes: int = 0


@attrs.frozen
class PipelineLink:
    """Where a component's pipeline input comes from inside a bundle.

    ``source`` is ``"COMPONENT:OUTPUT"``; ``transform`` says in words what a runtime does
    between the two (empty when the tensor passes unchanged).
    """

    source: str
    transform: str = ""


@attrs.frozen
class ComponentSpec:
    """A model component a plugin registers (e.g. ``stdit3``).

    ``order`` places it in the pipeline (text encoder 10, denoiser 20, decoders 30/40).
    ``describe`` returns a lightweight description of the component for a build context:
    whatever the component's chunking hook needs (configs, checkpoint readers), never the
    whole model's weights.
    """

    name: str
    description: str
    order: int
    describe: Callable[[ComponentBuildContext], Any]
    aliases: tuple[str, ...] = ()
    plugin: str = ""
    # pipeline input -> the earlier component output that feeds it when both are in one
    # bundle (e.g. stdit3's "y" <- t5's "y"); listed in the manifest's "dataflow"
    links: Mapping[str, PipelineLink] = attrs.field(factory=dict)


@attrs.frozen
class TransformSpec:
    """An optimisation plugin (e.g. ``tdtm``, ``lpl``) that needs some components present."""

    name: str
    description: str
    requires: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    plugin: str = ""


@attrs.frozen
class PlannedComponent:
    """A component with its description and its chunks, as planned."""

    spec: ComponentSpec
    context: ComponentBuildContext
    description: Any
    chunks: tuple[Chunk, ...] = attrs.field(converter=tuple)


def default_shapes() -> tuple[str, ...]:
    """The shapes a request selects unless told: ``$SORA_EXPORT_SHAPES`` (e.g. ``default``
    while iterating on a model), else every profile shape (``all``)."""
    text = os.environ.get("SORA_EXPORT_SHAPES", "")
    return tuple(n.strip() for n in text.split(",") if n.strip()) or ("all",)


# Below this, converting a chunk part by part costs more (a capture and a conversion per
# part) than converting it whole; tiny models never reach it.
STITCH_MIN_PARAMS = 20_000_000


@attrs.frozen
class ExportRequest:
    """Everything the user asked for, already parsed (the CLI's only product)."""

    plugins: tuple[str, ...] = attrs.field(converter=tuple)
    profile: str = "iphone15pro"
    output: Path = Path("sora-export-out")
    weights: Mapping[str, Path] = attrs.field(factory=dict)
    size: str = "tiny"
    targets: tuple[str, ...] = attrs.field(converter=tuple, factory=tuple)
    quantize: str | None = None
    verify: bool | None = None
    jobs: int | None = None  # None: chosen from cores, memory and the plan (engine.auto_jobs)
    # memory the export may use on this machine (all workers together); None: 75% of RAM
    host_memory_bytes: int | None = None
    # content-addressed cache of lowered models (core.cache); None: no cache
    cache_dir: Path | None = None
    # Core ML chunks with parts (Chunk.parts) of at least this many weights are converted
    # part by part and stitched; whole_chunks converts every chunk as one graph
    stitch_min_params: int = STITCH_MIN_PARAMS
    whole_chunks: bool = False
    # bind the weights of parts sharing a template into one lowered package (core.rebind)
    rebind: bool = True
    resume: bool = False
    force: bool = False
    seed: int = 0
    # which profile shapes to export: ("all",), ("default",) or shape names
    shapes: tuple[str, ...] = attrs.field(converter=tuple, factory=default_shapes)


@attrs.frozen
class ExportPlan:
    """The resolved plan: profile, active plugins, components in pipeline order, targets."""

    request: ExportRequest
    profile: DeviceProfile
    plugins: tuple[str, ...] = attrs.field(converter=tuple)
    transforms: tuple[TransformSpec, ...] = attrs.field(converter=tuple)
    components: tuple[PlannedComponent, ...] = attrs.field(converter=tuple)
    targets: tuple[str, ...] = attrs.field(converter=tuple)
    verify: bool = True
    # the export shapes every chunk accepts, the bundle's default first
    shapes: tuple[ExportShape, ...] = attrs.field(converter=tuple, factory=tuple)
    jobs: int = 1  # worker processes (resolved from the request; see engine.auto_jobs)
    jobs_reason: str = ""  # why that many, when chosen automatically

    @property
    def chunks(self) -> list[Chunk]:
        return [c for comp in self.components for c in comp.chunks]


@attrs.frozen
class Verification:
    """How closely an artifact matches the PyTorch fp32 reference."""

    backend: str
    psnr_db: float
    max_abs_err: float
    finite: bool
    threshold_db: float
    passed: bool
    seconds: float = 0.0  # running the artifact (all functions), load excluded
    reference_seconds: float = 0.0  # running the PyTorch reference (all functions)
    load_seconds: float = 0.0  # loading the artifact (interpreter: reading and decoding)
    note: str = ""
    error: str = ""  # the runner itself failed (not a fidelity verdict)
    # worst PSNR (dB) over the functions run at each export shape, by shape name
    psnr_by_shape: Mapping[str, float] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Artifact:
    """A written package: its path relative to the bundle, size and digest."""

    target: str
    path: str
    bytes: int
    sha256: str
    functions: tuple[str, ...] = ("main",)


@attrs.frozen
class ChunkResult:
    """What happened to one chunk: artifacts, timings per stage, precision, verification."""

    chunk_key: str
    component: str
    name: str
    target: str
    artifact: Artifact | None
    params: int
    quantization: str
    timings: Mapping[str, float]
    peak_rss_bytes: int
    verification: Verification | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()
    # how the chunk accepts several export shapes: "static" (one shape, or all shapes have
    # the same input shapes), "dynamic" (one shape-polymorphic function per variant) or
    # "per-shape" (one function per variant and shape); strategy_note says why per-shape
    strategy: str = "static"
    strategy_note: str = ""
    cached: bool = False  # the whole result was taken from an earlier run (--resume)
    # the lowered (pre-quantization) models: "hit" (reused from the cache), "stored"
    # (lowered now and kept), "" (no cache)
    lowered_cache: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and (self.verification is None or self.verification.passed)


@attrs.frozen
class RunResult:
    """The whole run: per-chunk results, total time, peak memory, bundle path."""

    plan: ExportPlan
    bundle: Path
    results: tuple[ChunkResult, ...] = attrs.field(converter=tuple)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    # bundle-level checks (core.verify.pipeline): each has .name, .target, .passed and
    # .verification
    checks: tuple[Any, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and all(c.passed for c in self.checks)
