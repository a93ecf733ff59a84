"""The export engine: plan -> run -> package.

``plan()`` resolves plugins, profile and weights and asks plugins to chunk each component;
it writes nothing, so every refusal leaves the disk as it was. ``run()`` exports one chunk
at a time (build only that chunk's weights, pre-trace patch, capture once, lower per target,
quantize, save atomically, verify, free) into a staging directory ``OUT.partial`` that
becomes ``OUT`` only when every chunk succeeded; an interrupted or failed run can be
continued with ``--resume``. ``package()`` writes manifest.json and report.json.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import math
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from sora_export.core import runtime
from sora_export.core.backends import (
    atomic_replace,
    capture,
    get_backend,
    remove_path,
    tree_bytes,
    tree_sha256,
)
from sora_export.core.bundle import (
    _jsonable,
    _write_json,
    build_manifest,
    build_report,
    result_from_json,
    result_to_json,
)
from sora_export.core.cache import LoweredCache, make_key
from sora_export.core.errors import ExportError, PluginError, SoraExportError, UsageError
from sora_export.core.memory import (
    TreePeakSampler,
    peak_rss_bytes,
    release_memory,
    reset_peak_rss,
)
from sora_export.core.profiles import load_profile_file
from sora_export.core.rebind import (
    MARKER_SEEDS,
    Binding,
    RebindError,
    bindings_from_json,
    bindings_to_json,
    derive_bindings,
    fill_markers,
    floating_params,
    read_bound,
    signature,
    write_rebound,
)
from sora_export.core.registry import Registry
from sora_export.core.shapes import dynamic_shapes, enumerated_shapes, group_dims, select_shapes
from sora_export.core.types import (
    Artifact,
    Chunk,
    ChunkResult,
    ComponentBuildContext,
    DeviceProfile,
    ExportPlan,
    ExportRequest,
    ExportShape,
    PlannedComponent,
    RunResult,
    Verification,
    bytes_per_param,
)
from sora_export.core.verify.metrics import compare
from sora_export.core.workers import WorkerPool, available_cores, new_executor

FP16_MAX = 65504.0
# An fp16 lowering is refused up front when a reference activation exceeds this share of the
# fp16 range: intermediate sums and the on-device accumulation order add headroom needs.
FP16_HEADROOM = 0.5
STAGES = ("build", "reference", "capture", "cache", "lower", "rebind", "quantize", "save", "verify")


# -- events: the engine reports progress through a callback, never prints -------------------
@attrs.frozen
class Event:
    kind: str  # "plan", "chunk-start", "stage", "chunk-done", "note"
    chunk: str = ""
    stage: str = ""
    detail: str = ""
    result: ChunkResult | None = None


EventSink = Callable[[Event], None]


def _ignore(_: Event) -> None:
    return None


# -- planning ----------------------------------------------------------------------------
def resolve_profile(registry: Registry, name_or_path: str) -> DeviceProfile:
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_profile_file(Path(name_or_path))
    return registry.profile(name_or_path)


def plan(request: ExportRequest, registry: Registry) -> ExportPlan:
    """Resolve everything the run needs; raise UsageError on any bad input. Writes nothing."""
    if not request.plugins:
        raise UsageError("no plugins selected; pass e.g. --plugins stdit (see --list-plugins)")
    components, transforms = registry.resolve(request.plugins)
    if not components:
        raise UsageError(
            "the selected plugins name no model component; add one, e.g. --plugins stdit"
        )
    profile = resolve_profile(registry, request.profile)
    if request.size not in ("tiny", "full"):
        raise UsageError(f"--size must be tiny or full, got {request.size!r}")
    targets = request.targets or profile.targets
    for t in targets:
        if t not in ("coreml", "onnx"):
            raise UsageError(f"unknown target {t!r}; use coreml or onnx")
    weights = _canonical_weights(request, registry, {c.name for c in components})
    active = registry.active_plugins(components, transforms)
    registry.call("sora_export_check_profile", active, profile=profile)
    shapes = select_shapes(profile, request.shapes)
    planned = []
    for spec in components:
        policy = request.quantize or profile.quantization.for_chunk(spec.name, "")
        # the chunking hook runs once per shape; the default shape's plan is the component's
        # Chunks converted part by part need only their parts to fit the export host's
        # memory, so a Core ML-only plan first asks for device-sized chunks; if any chunk
        # then could not be converted here (too big and not stitchable), it is planned
        # again under the host cap.
        stitchable = set(targets) == {"coreml"} and not request.whole_chunks

        args = (spec, active, registry, request, profile, weights, policy)
        per_shape = [_plan_component(*args, shape, not stitchable) for shape in shapes]
        if stitchable and not all(_fits_host(cs, profile, policy, request) for _, cs in per_shape):
            per_shape = [_plan_component(*args, shape, True) for shape in shapes]
        pc, chunks = per_shape[0]
        named = [(s.name, c) for s, (_, c) in zip(shapes, per_shape, strict=True)]
        chunks = _match_shapes(spec, named)
        with_variants = []
        for chunk in chunks:
            extra: list[str] = []
            for plugin, names_ in registry.call(
                "sora_export_chunk_variants", active, chunk=chunk, profile=profile
            ):
                if not isinstance(names_, list | tuple) or not all(
                    isinstance(n, str) for n in names_
                ):
                    raise PluginError(
                        plugin, "sora_export_chunk_variants", "must return a list of names"
                    )
                extra += [n for n in names_ if n not in extra]
            functions = ("plain", *extra) if extra else ("main",)
            _check_parts(spec.plugin, chunk)
            at_shapes = {}
            for name, c in chunk.shapes.items():
                _check_parts(spec.plugin, c)
                if len(c.parts) != len(chunk.parts):
                    raise PluginError(
                        spec.plugin,
                        "sora_export_chunk_component",
                        f"{chunk.key} has {len(chunk.parts)} parts at {chunk.shape} but "
                        f"{len(c.parts)} at {name}",
                    )
                at_shapes[name] = attrs.evolve(c, functions=functions, shapes={}, parts=())
            # each part carries its twins at the other shapes, like its chunk
            parts = tuple(
                attrs.evolve(
                    part,
                    functions=functions,
                    shape=chunk.shape,
                    shapes={
                        name: attrs.evolve(c.parts[i], functions=functions, shape=name)
                        for name, c in chunk.shapes.items()
                    },
                )
                for i, part in enumerate(chunk.parts)
            )
            with_variants.append(
                attrs.evolve(chunk, functions=functions, shapes=at_shapes, parts=parts)
            )
        planned.append(attrs.evolve(pc, chunks=tuple(with_variants)))
    verify = request.verify if request.verify is not None else request.size == "tiny"
    if not verify and (request.quantize == "auto" or _profile_uses_auto(profile)):
        raise UsageError(
            "--quantize auto picks each chunk's policy by measuring it: it needs --verify"
        )
    all_chunks = [c for pc in planned for c in pc.chunks]
    if request.jobs is None:
        units = _export_units(all_chunks, request, tuple(targets))
        jobs, reason = auto_jobs(units, request.host_memory_bytes or host_memory_bytes())
    else:
        jobs, reason = request.jobs, ""
    return ExportPlan(
        request=request,
        profile=profile,
        plugins=tuple(sorted(active)),
        transforms=tuple(transforms),
        components=tuple(planned),
        targets=tuple(dict.fromkeys(targets)),
        verify=verify,
        shapes=shapes,
        jobs=jobs,
        jobs_reason=reason,
    )


def _plan_component(
    spec: Any,
    active: set[str],
    registry: Registry,
    request: ExportRequest,
    profile: DeviceProfile,
    weights: dict[str, Path],
    policy: str,
    shape: ExportShape,
    capped: bool = True,
) -> tuple[PlannedComponent, list[Chunk]]:
    """Describe and chunk one component at one export shape (chunks sized by the device
    budget, ``capped`` by what the export host can convert whole)."""
    ctx = ComponentBuildContext(
        profile=profile,
        size=request.size,
        weights=weights.get(spec.name),
        shape=shape,
        seed=request.seed,
        policy=policy,
        chunk_budget_bytes=(
            chunk_budget(profile, policy, request) if capped else profile.per_chunk_budget_bytes
        ),
    )
    try:
        description = spec.describe(ctx)
    except SoraExportError:
        raise
    except Exception as exc:
        raise PluginError(spec.plugin, "describe", f"{type(exc).__name__}: {exc}") from exc
    pc = PlannedComponent(spec=spec, context=ctx, description=description, chunks=())
    chunks = registry.call("sora_export_chunk_component", active, firstresult=True, component=pc)
    if chunks is None:
        raise PluginError(
            spec.plugin, "sora_export_chunk_component", f"no plugin chunks {spec.name!r}"
        )
    if not isinstance(chunks, list | tuple) or not all(isinstance(c, Chunk) for c in chunks):
        raise PluginError(
            spec.plugin,
            "sora_export_chunk_component",
            f"must return a list of Chunk, got {type(chunks).__name__}",
        )
    return pc, list(chunks)


def _match_shapes(spec: Any, per_shape: list[tuple[str, list[Chunk]]]) -> list[Chunk]:
    """The default shape's chunks, each carrying its per-shape twins (matched by name).

    A plugin whose chunk list (names, in order) differs between shapes cannot store one
    set of weights per chunk for every shape: PluginError naming it.
    """
    (default_name, default_chunks), *others = per_shape
    names = [c.name for c in default_chunks]
    for shape_name, chunks in others:
        got = [c.name for c in chunks]
        if got != names:
            raise PluginError(
                spec.plugin,
                "sora_export_chunk_component",
                f"component {spec.name!r} is partitioned differently per shape: "
                f"{default_name} gives chunks {names}, {shape_name} gives {got}; every "
                "shape must have the same chunks",
            )
    out = []
    for i, chunk in enumerate(default_chunks):
        at_shapes = {name: attrs.evolve(chunks[i], shape=name) for name, chunks in per_shape}
        out.append(attrs.evolve(chunk, shape=default_name, shapes=at_shapes))
    return out


def _check_parts(plugin: str, chunk: Chunk) -> None:
    """Parts must chain: every input wired to the chunk or the previous part, the last
    part's outputs the chunk's, the weights adding up (see ``Chunk.parts``)."""
    if not chunk.parts:
        return

    def bad(why: str) -> PluginError:
        return PluginError(plugin, "sora_export_chunk_component", f"{chunk.key} parts: {why}")

    chunk_inputs = {s.name for s in chunk.inputs}
    previous: set[str] = set()
    for i, part in enumerate(chunk.parts):
        for spec in part.inputs:
            source = part.wiring.get(spec.name, "")
            kind, _, name = source.partition(":")
            if kind == "chunk" and name in chunk_inputs:
                continue
            if kind == "previous" and i and name in previous:
                continue
            raise bad(f"{part.name}: input {spec.name!r} wired to {source!r}")
        previous = {s.name for s in part.outputs}
    if [s.to_json() for s in chunk.parts[-1].outputs] != [s.to_json() for s in chunk.outputs]:
        raise bad("the last part's outputs are not the chunk's outputs")
    if sum(p.params for p in chunk.parts) != chunk.params:
        raise bad("the parts' weights do not add up to the chunk's")


# Peak resident bytes per weight while one chunk is captured, converted and saved
# (measured: STDiT3-XL/2 15 block pairs 9.3, T5-XXL 6 blocks 10.4, both fp32 -> Core ML),
# on top of what an export process holds before it builds anything (torch, coremltools and
# onnx imported: about 0.4 GB).
EXPORT_BYTES_PER_PARAM = 10.5
EXPORT_PROCESS_BYTES = 400_000_000
# Below this many weights in the whole plan, worker processes cost more than they save:
# starting one (spawn, import torch and coremltools) takes seconds, as long as exporting a
# tiny model's chunk.
PARALLEL_MIN_PARAMS = 50_000_000


def host_memory_bytes() -> int:
    """75% of this machine's physical memory (stable across runs, unlike free memory)."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * page * 0.75)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def export_peak_bytes(params: int) -> int:
    """Estimated peak resident memory of one process exporting a chunk of ``params``."""
    return EXPORT_PROCESS_BYTES + int(params * EXPORT_BYTES_PER_PARAM)


def chunk_budget(profile: DeviceProfile, policy: str, request: ExportRequest) -> int:
    """Stored bytes per chunk: the device's budget, capped so that ``--jobs`` chunks can be
    converted side by side in the export host's memory (``--max-memory``, else 75% of RAM).
    """
    host = request.host_memory_bytes or host_memory_bytes()
    per_worker = host / max(1, request.jobs or 1) - EXPORT_PROCESS_BYTES
    max_params = max(per_worker, 0) / EXPORT_BYTES_PER_PARAM
    host_cap = int(max_params * bytes_per_param(policy))
    return max(1, min(profile.per_chunk_budget_bytes, host_cap))


def _fits_host(
    chunks: list[Chunk], profile: DeviceProfile, policy: str, request: ExportRequest
) -> bool:
    """Whether each chunk converts within one worker's share of the export memory: it is
    small enough, or it is converted part by part and its parts are."""
    cap = chunk_budget(profile, policy, request) / bytes_per_param(policy)
    for chunk in chunks:
        if chunk.params <= cap:
            continue
        if _stitched(request, chunk, "coreml") and max(p.params for p in chunk.parts) <= cap:
            continue
        return False
    return True


def auto_jobs(chunks: list[Chunk], host_bytes: int, cores: int | None = None) -> tuple[int, str]:
    """Worker processes for a plan when ``--jobs`` is not given, and why.

    As many as there are cores, but never more than chunks, never more than the export
    host's memory holds at the largest chunk's estimated peak (:func:`export_peak_bytes`),
    and one for plans too small to repay starting workers (``PARALLEL_MIN_PARAMS``).
    """
    cores = cores or available_cores()
    if not chunks:
        return 1, "nothing to export"
    total = sum(c.params for c in chunks)
    if total < PARALLEL_MIN_PARAMS:
        return 1, f"{total / 1e6:.1f}M weights: too small to repay worker start-up"
    peak = max(export_peak_bytes(c.params) for c in chunks)
    fit = max(1, host_bytes // peak)
    jobs = max(1, min(cores, len(chunks), fit))
    limits = {
        "cores": cores,
        "chunks": len(chunks),
        f"memory ({host_bytes / 1e9:.1f} GB / {peak / 1e9:.1f} GB per worker)": fit,
    }
    why = min(limits, key=lambda k: limits[k])
    return jobs, f"limited by {why}"


def _profile_uses_auto(profile: DeviceProfile) -> bool:
    q = profile.quantization
    return "auto" in (q.default, *q.components.values(), *q.chunks.values())


def _canonical_weights(
    request: ExportRequest, registry: Registry, selected: set[str]
) -> dict[str, Path]:
    """Map ``--weights NAME=PATH`` (names or aliases) to selected component names.

    An alias naming several components (``vae``) gives the path to each selected one: one
    checkpoint file may hold several components (OpenSora-VAE-v1.2 holds both decoders).
    """
    out = {}
    for name, path in request.weights.items():
        match = [c for c in registry.components.values() if name in (c.name, *c.aliases)]
        if not match:
            raise UsageError(
                f"--weights {name}=...: unknown component; use one of "
                f"{', '.join(sorted(registry.components))}"
            )
        chosen = [c.name for c in match if c.name in selected]
        if not chosen:
            raise UsageError(
                f"--weights {name}=... names a component that is not selected; add it to --plugins"
            )
        for component in chosen:
            out[component] = Path(path)
    return out


# -- bundle directory --------------------------------------------------------------------
def staging_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def prepare_output(request: ExportRequest) -> Path:
    """Check the output directory and return the staging directory to write into.

    A directory that already holds anything is refused unless --force or --resume; the
    existing bundle is untouched until a new one is complete.
    """
    out = request.output
    stage = staging_dir(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not (request.force or request.resume):
        what = "a bundle" if (out / "manifest.json").exists() else "files"
        raise UsageError(
            f"output directory {str(out)!r} already holds {what}; pass --force to replace it "
            "(the old bundle stays until the new one is complete) or --resume to continue"
        )
    if stage.exists() and not request.resume:
        remove_path(stage)
    if request.resume and not stage.exists() and (out / "manifest.json").exists():
        # resuming from a finished bundle: stage a hard-linked copy so its chunks are reused
        # while the bundle itself stays intact until the new one is complete
        shutil.copytree(out, stage, copy_function=_link_or_copy)
    stage.mkdir(parents=True, exist_ok=True)
    return stage


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- fingerprints for resume and keys for the lowered-model cache -----------------------
def _chunk_identity(plan: ExportPlan, chunk: Chunk) -> dict[str, Any]:
    """Everything about a chunk that decides what its export produces, but the policy."""
    comp = next(c for c in plan.components if c.spec.name == chunk.component)
    weights = comp.context.weights
    wstat = None
    if weights is not None and weights.exists():
        st = weights.stat()
        wstat = [str(weights.resolve()), st.st_size, st.st_mtime_ns]
    profile = plan.profile.to_json()
    # quantization and gates act after lowering; they never change a lowered model
    profile.pop("quantization", None)
    profile.pop("psnr_thresholds_db", None)
    return {
        "chunk": chunk.key,
        "params": chunk.params,
        "inputs": [s.to_json() for s in chunk.inputs],
        "outputs": [s.to_json() for s in chunk.outputs],
        "functions": list(chunk.functions),
        "shapes": {
            name: [[s.to_json() for s in c.inputs], [s.to_json() for s in c.outputs]]
            for name, c in chunk.shapes.items()
        },
        "meta": _jsonable(chunk.meta),
        "profile": profile,
        "profile_options": _jsonable(dict(plan.profile.plugin_options)),
        "size": plan.request.size,
        "seed": plan.request.seed,
        "weights": wstat,
        "plugins": list(plan.plugins),
    }


def chunk_fingerprint(plan: ExportPlan, chunk: Chunk, target: str, policy: str) -> str:
    """Identity of one finished artifact, for ``--resume``: chunk, code, policy, gates."""
    return make_key(
        {
            **_chunk_identity(plan, chunk),
            "target": target,
            "policy": policy,
            "quantization": attrs.asdict(plan.profile.quantization),
            "psnr_thresholds_db": dict(plan.profile.psnr_thresholds_db),
            "verify": plan.verify,
        }
    )


def lowered_key(plan: ExportPlan, chunk: Chunk, target: str, precision: str) -> str:
    """Cache key of a chunk's lowered models (all functions) at ``precision``."""
    return make_key(
        {**_chunk_identity(plan, chunk), "target": target, "precision": precision, "v": 1}
    )


# -- running one chunk -------------------------------------------------------------------
@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _max_activation(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, float]:
    """Run the fp32 reference once, recording the largest |activation| of every submodule."""
    peak = [0.0]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                peak[0] = max(peak[0], float(t.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, peak[0]


def _output_tuple(chunk: Chunk, out: Any, source: str = "module") -> tuple[Any, ...]:
    """A forward's outputs as a tuple, as many as ``chunk`` declares."""
    outs = tuple(out) if isinstance(out, tuple | list) else (out,)
    if len(outs) != len(chunk.outputs):
        raise ExportError(
            f"{chunk.key}: {source} returned {len(outs)} outputs, chunk declares "
            f"{len(chunk.outputs)} ({', '.join(s.name for s in chunk.outputs)})"
        )
    return outs


def _outputs_dict(chunk: Chunk, out: Any) -> dict[str, np.ndarray]:
    outs = _output_tuple(chunk, out)
    return {s.name: o.detach().float().numpy() for s, o in zip(chunk.outputs, outs, strict=True)}


def _inputs_dict(chunk: Chunk, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {s.name: t.detach().numpy() for s, t in zip(chunk.inputs, inputs, strict=True)}


def _check_inputs(chunk: Chunk, inputs: tuple[torch.Tensor, ...]) -> None:
    if len(inputs) != len(chunk.inputs):
        raise ExportError(
            f"{chunk.key}: example_inputs gave {len(inputs)} tensors, chunk declares "
            f"{len(chunk.inputs)}"
        )
    for spec, t in zip(chunk.inputs, inputs, strict=True):
        if tuple(t.shape) != tuple(spec.shape):
            raise ExportError(
                f"{chunk.key}: example input {spec.name!r} has shape {list(t.shape)}, "
                f"spec says {list(spec.shape)}"
            )


@attrs.define
class _Program:
    """One captured function: its program, the chunk whose specs it is lowered with, and
    (shape-polymorphic programs) the enumerated shapes of each varying input."""

    program: Any
    chunk: Chunk
    enumerated: dict[str, list[tuple[int, ...]]] = attrs.Factory(dict)


@attrs.define
class _Case:
    """One verification run: an artifact function at one export shape."""

    function: str
    shape: str
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]


# A shape-polymorphic program must reproduce its own module at every shape this closely
# (fp32 against fp32: only summation order differs), else the chunk is captured per shape.
DYNAMIC_AGREEMENT_DB = 100.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _capture_dynamic(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], groups: list[Any]
) -> Any:
    """One torch.export capture whose varying input dims are ``torch.export.Dim``s.

    ``backed_size_oblivious`` lets torch reason about the symbolic sizes without guards
    for the sizes 0 and 1 (which the shapes never take); without it the reshapes of
    STDiT3's blocks add guards that torch cannot prove for a whole range and the capture
    fails.
    """
    import torch.fx.experimental._config as fx_config

    spec = dynamic_shapes(groups, [t.dim() for t in inputs])
    with fx_config.patch(backed_size_oblivious=True):
        return capture(module, inputs, dynamic_shapes=spec)


class _Prepared:
    """A chunk at every export shape: example inputs, fp32 references, captured functions
    and how it takes its shapes (``strategy``), each made on first use.

    Building (materialising the chunk's weights), the reference forwards and capture are
    the expensive stages; a chunk whose lowered models all come from the cache needs none
    of them unless it is verified (then only the builds and the reference forwards), and
    the cache entry tells its strategy (:meth:`adopt`).

    Capture: a chunk whose input shapes differ across its shapes is first captured once
    with dynamic dims (each group of :func:`group_dims` one ``torch.export.Dim``); the
    program must then run at every other shape and (when references are measured) match
    the module there. Otherwise, or when that capture raises, every variant is captured
    once per shape (functions ``<variant>@<shape>`` for the non-default shapes), and
    ``strategy_note`` keeps the first line of the reason.
    """

    def __init__(
        self,
        chunk: Chunk,
        registry: Registry,
        active: set[str],
        profile: DeviceProfile,
        timings: dict[str, float],
        sink: EventSink,
        measure: bool = True,
        weights: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        self.chunk, self.registry, self.active, self.profile = chunk, registry, active, profile
        self.timings, self.sink, self.measure = timings, sink, measure
        self.weights = weights  # called on every built module before it is used
        self.at_shape = chunk.shape_chunks()
        self.shape_names = list(self.at_shape)
        self._measured = False  # references, inputs and max activation are known
        self._captured = False  # programs are captured
        self._error: Exception | None = None
        self._programs: dict[str, _Program] = {}
        self._inputs: dict[str, tuple[torch.Tensor, ...]] = {}
        self._references: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._max_activation: float | None = None
        self.reference_seconds = 0.0
        varying = len({tuple(tuple(s.shape) for s in c.inputs) for c in self.at_shape.values()})
        # known without capture when every shape has the same inputs
        self.strategy: str | None = "static" if varying == 1 else None
        self.strategy_note = ""

    @property
    def programs(self) -> dict[str, _Program]:
        if not self._captured:
            self._prepare(capture_programs=True)
        return self._programs

    @property
    def max_activation(self) -> float | None:
        """Largest |activation| of the fp32 references; None when not measured."""
        if not self.measure:
            return None
        if not self._measured:
            self._prepare(capture_programs=False)
        return self._max_activation

    def adopt(self, strategy: str, note: str) -> None:
        """Take the strategy an earlier capture chose (from the lowered-model cache)."""
        if self.strategy is None:
            self.strategy, self.strategy_note = strategy, note

    @property
    def cases(self) -> list[_Case]:
        """Verification runs: every function at every shape with its own inputs."""
        if not self._measured:
            self._prepare(capture_programs=False)
        if self.strategy is None:
            self._prepare(capture_programs=True)
        per_shape = self.strategy == "per-shape"
        distinct = self._distinct()
        cases = []
        for variant in self.chunk.functions:
            for name in self.shape_names:
                ins = self._inputs
                ref_name = next(m for m in distinct if _same_inputs(ins[name], ins[m]))
                if (variant, ref_name) not in self._references:
                    continue
                cases.append(
                    _Case(
                        self.chunk.function_for(variant, name, per_shape),
                        name,
                        _inputs_dict(self.at_shape[name], self._inputs[name]),
                        self._references[(variant, ref_name)],
                    )
                )
        return cases

    def _distinct(self) -> list[str]:
        """Shapes whose inputs differ from every earlier shape's (others repeat a run)."""
        names = self.shape_names
        return [
            n
            for i, n in enumerate(names)
            if not any(_same_inputs(self._inputs[n], self._inputs[m]) for m in names[:i])
        ]

    def _prepare(self, capture_programs: bool) -> None:
        """Build the chunk and run what is still missing: reference forwards (when
        measuring) and, if asked, capture. Everything is freed but the results. A failure
        is remembered: the next target gets the same error without a second attempt."""
        if self._error is not None:
            raise self._error
        try:
            self._build_and_run(capture_programs)
        except Exception as exc:
            self._error = exc
            raise

    def _build_and_run(self, capture_programs: bool) -> None:
        chunk, timings, sink = self.chunk, self.timings, self.sink
        at_shape, names = self.at_shape, self.shape_names
        default = names[0]
        reference = self.measure and not self._measured
        sink(Event("stage", chunk.key, "build"))
        inputs: dict[str, tuple[torch.Tensor, ...]] = {}
        with _timed(timings, "build"):
            # one module per distinct builder: shapes whose builders are equal share it
            builders: list[Any] = []
            group_of: dict[str, int] = {}
            for name, shape_chunk in at_shape.items():
                for i, b in enumerate(builders):
                    if b is shape_chunk.build or _same_builder(b, shape_chunk.build):
                        group_of[name] = i
                        break
                else:
                    group_of[name] = len(builders)
                    builders.append(shape_chunk.build)
            bases = []
            for b in builders:
                base = b()
                base.eval()
                if self.weights is not None:
                    self.weights(base)
                for p in base.parameters():
                    p.requires_grad_(False)
                bases.append(base)
            for name, shape_chunk in at_shape.items():
                # contiguous: Core ML rejects captured inputs with a non-default dim order
                inputs[name] = tuple(t.contiguous() for t in shape_chunk.example_inputs())
                _check_inputs(shape_chunk, inputs[name])
        self._inputs = inputs
        input_names = [s.name for s in chunk.inputs]
        case_shapes = [[tuple(t.shape) for t in inputs[n]] for n in names]
        groups = group_dims(input_names, case_shapes) if len(names) > 1 else []
        strategy, note = ("dynamic" if groups else "static"), ""
        distinct = self._distinct()
        programs: dict[str, _Program] = {}
        max_act: float | None = None
        modules: dict[tuple[str, int], torch.nn.Module] = {}
        for v_index, variant in enumerate(chunk.functions):
            last = v_index == len(chunk.functions) - 1
            for g, base in enumerate(bases):
                shape_chunk = at_shape[next(n for n in names if group_of[n] == g)]
                module = base if last else copy.deepcopy(base)
                modules[(variant, g)] = _patched(
                    shape_chunk, module, variant, self.registry, self.active, self.profile
                )
            if reference:
                for name in distinct:
                    module = modules[(variant, group_of[name])]
                    sink(Event("stage", chunk.key, "reference", f"{variant} {name}".strip()))
                    with _timed(timings, "reference"):
                        start = time.perf_counter()
                        out, act = _max_activation(module, inputs[name])
                        # the chunk's inputs count too: an fp16 package receives them in fp16
                        floats = [t for t in inputs[name] if t.is_floating_point()]
                        act = max([act, *(float(t.abs().max()) for t in floats)])
                        self.reference_seconds += time.perf_counter() - start
                    self._references[(variant, name)] = _outputs_dict(at_shape[name], out)
                    max_act = max(max_act or 0.0, act)
                    del out
            if not capture_programs:
                continue
            if strategy == "dynamic":
                sink(Event("stage", chunk.key, "capture", f"{variant} dynamic"))
                with _timed(timings, "capture"):
                    try:
                        program = _capture_dynamic(
                            modules[(variant, group_of[default])], inputs[default], groups
                        )
                        _check_dynamic(
                            program, at_shape, inputs, names[1:], self._references, variant
                        )
                        programs[variant] = _Program(
                            program, chunk, enumerated_shapes(input_names, case_shapes)
                        )
                    except Exception as exc:
                        strategy, note = "per-shape", _first_line(exc)
                        programs.clear()
            if strategy != "dynamic":
                # per shape (or static): capture every variant so far at each shape
                for done in chunk.functions[: v_index + 1]:
                    for name in names if strategy == "per-shape" else names[:1]:
                        function = chunk.function_for(done, name, strategy == "per-shape")
                        if function in programs:
                            continue
                        sink(Event("stage", chunk.key, "capture", function))
                        with _timed(timings, "capture"):
                            try:
                                program = capture(modules[(done, group_of[name])], inputs[name])
                            except Exception as exc:
                                raise ExportError(
                                    f"{chunk.key}: torch.export failed for function "
                                    f"{function!r}: {type(exc).__name__}: {exc}"
                                ) from exc
                        programs[function] = _Program(program, at_shape[name])
        del modules, bases
        if reference:
            self._max_activation = max_act
        self._measured = True
        if capture_programs:
            self._programs = programs
            self._captured = True
            self.strategy, self.strategy_note = strategy, note


def _same_builder(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _same_inputs(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )


def _check_dynamic(
    program: Any,
    at_shape: dict[str, Chunk],
    inputs: dict[str, tuple[torch.Tensor, ...]],
    others: list[str],
    references: dict[tuple[str, str], dict[str, np.ndarray]],
    variant: str,
) -> None:
    """Raise unless the shape-polymorphic ``program`` runs at every other shape with the
    declared output shapes and (where measured) matches the module's reference there.

    Where nothing was measured (a template's marker lowering) only the shapes are
    checked, on fake tensors: running a full-size STDiT3 block pair for its output shape
    cost 11 s of one core."""
    runner = program.module()
    for name in others:
        shape_chunk = at_shape[name]
        reference = references.get((variant, name))
        with torch.no_grad():
            if reference is None:
                shapes = _fake_output_shapes(runner, shape_chunk, inputs[name])
            else:
                got = _outputs_dict(shape_chunk, runner(*inputs[name]))
                shapes = {k: tuple(v.shape) for k, v in got.items()}
        for spec in shape_chunk.outputs:
            if shapes[spec.name] != tuple(spec.shape):
                raise ExportError(
                    f"at {name} output {spec.name!r} has shape {list(shapes[spec.name])}, "
                    f"spec says {list(spec.shape)}"
                )
        if reference is not None:
            fid = compare(reference, got)
            if not fid.finite or fid.psnr_db < DYNAMIC_AGREEMENT_DB:
                raise ExportError(
                    f"the dynamic program differs from the module at {name} "
                    f"({fid.psnr_db:.1f} dB < {DYNAMIC_AGREEMENT_DB:.0f} dB)"
                )


def _fake_output_shapes(
    runner: torch.nn.Module, chunk: Chunk, inputs: tuple[torch.Tensor, ...]
) -> dict[str, tuple[int, ...]]:
    """The output shapes ``runner`` gives for ``inputs``, propagated on fake tensors (no
    arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        outs = _output_tuple(chunk, runner(*(mode.from_tensor(t) for t in inputs)), "program")
    return {s.name: tuple(o.shape) for s, o in zip(chunk.outputs, outs, strict=True)}


def _patched(
    chunk: Chunk,
    module: torch.nn.Module,
    variant: str,
    registry: Registry,
    active: set[str],
    profile: DeviceProfile,
) -> torch.nn.Module:
    """``module`` after the patch hook for ``variant``."""
    for plugin, replacement in registry.call(
        "sora_export_patch_module",
        active,
        chunk=chunk,
        module=module,
        variant=variant,
        profile=profile,
    ):
        if not isinstance(replacement, torch.nn.Module):
            raise PluginError(
                plugin,
                "sora_export_patch_module",
                f"must return None or an nn.Module, got {type(replacement).__name__}",
            )
        module = replacement
    return module


def patched_variants(
    chunk: Chunk,
    base: torch.nn.Module,
    registry: Registry,
    active: set[str],
    profile: DeviceProfile,
) -> Iterator[tuple[str, torch.nn.Module]]:
    """Yield ``(variant, module)`` for each function of a chunk, after the patch hook.

    Every variant but the last gets a deep copy of ``base``, so an in-place patch of one
    variant never leaks into another.
    """
    for i, variant in enumerate(chunk.functions):
        last = i == len(chunk.functions) - 1
        module = base if last else copy.deepcopy(base)
        yield variant, _patched(chunk, module, variant, registry, active, profile)


def _write_error(chunk: Chunk, path: Path, exc: OSError) -> ExportError:
    """A failed package write, saying so plainly when the disk is full."""
    full = " (disk full)" if getattr(exc, "errno", None) == 28 else ""
    return ExportError(f"{chunk.key}: cannot write {str(path)!r}: {exc.strerror or exc}{full}")


def by_parts(plan: ExportPlan, chunk: Chunk, target: str) -> bool:
    """Whether ``chunk`` is converted part by part and stitched (Core ML only so far)."""
    return _stitched(plan.request, chunk, target)


def _stitched(request: ExportRequest, chunk: Chunk, target: str) -> bool:
    return (
        target == "coreml"
        and len(chunk.parts) > 1
        and not request.whole_chunks
        and chunk.params >= request.stitch_min_params
    )


def _export_units(chunks: list[Chunk], request: ExportRequest, targets: tuple[str, ...]) -> list:
    """What the workers convert one at a time: a chunk, or its parts when it is converted
    only part by part (a Core ML-only plan)."""
    units: list[Chunk] = []
    for chunk in chunks:
        if all(_stitched(request, chunk, t) for t in targets):
            units.extend(chunk.parts)
        else:
            units.append(chunk)
    return units


CACHE_HIT_NOTE = "lowered model reused from the cache (not captured or lowered again)"
PARTS_CACHE = ".parts-cache"  # in the staging directory, when no cache directory is set


def part_cache(plan: ExportPlan, stage: Path) -> LoweredCache:
    return LoweredCache(plan.request.cache_dir or stage / PARTS_CACHE)


def lower_programs(
    backend: Any,
    prepared: _Prepared,
    chunk: Chunk,
    profile: DeviceProfile,
    precision: str,
    timings: dict[str, float],
    sink: EventSink = _ignore,
) -> dict[str, Any]:
    """Lower every captured function of ``prepared`` to ``backend`` at ``precision``."""
    models: dict[str, Any] = {}
    for function, captured in prepared.programs.items():
        sink(Event("stage", chunk.key, "lower", f"{backend.name} {precision} {function}"))
        with _timed(timings, "lower"):
            try:
                models[function] = backend.lower(
                    captured.program,
                    captured.chunk,
                    profile,
                    precision,
                    enumerated=captured.enumerated or None,
                )
            except Exception as exc:
                raise ExportError(
                    f"{chunk.key}: lowering to {backend.name} failed: {type(exc).__name__}: {exc}"
                ) from exc
    return models


@attrs.frozen
class _PartJob:
    """One part of ``chunk`` to lower (or bind) for ``target`` at ``precision``: where its
    models go (``cache``, the part cache) and where its stage times and events go."""

    plan: ExportPlan
    registry: Registry
    chunk: Chunk
    part: Chunk
    target: str
    precision: str
    cache: LoweredCache
    timings: dict[str, float]
    sink: EventSink = _ignore
    # False: when another process is still making a marker lowering of the part's
    # template, raise TemplatePending instead of waiting for it
    wait: bool = True


class TemplatePending(Exception):
    """A marker lowering of the part's template is being made by another process (and
    the job said not to wait): run the part again later."""


def lower_part(job: _PartJob) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """One part's lowered models, from ``job.cache`` or made now (and cached).

    Returns the models (by artifact function), what the cache entry records about them
    (:func:`_lowered_about`) and whether they came from the cache. A part with a
    ``template`` is bound into its template's lowered package (:func:`rebind_part`); one
    without, or whose template cannot be used, is captured and lowered. Parts are never
    verified on their own (the stitched chunk is), so nothing but the part is built.
    """
    plan, registry, chunk, part = job.plan, job.registry, job.chunk, job.part
    target, precision, cache, timings, sink = (
        job.target,
        job.precision,
        job.cache,
        job.timings,
        job.sink,
    )
    backend = get_backend(target)
    key = lowered_key(plan, part, target, precision)
    sink(Event("stage", chunk.key, "cache", f"{part.name} {precision}"))
    with _timed(timings, "cache"):
        hit = cache.get(key, backend)
    if hit is not None:
        return hit[0], hit[1], True
    unused = ""
    if part.template and plan.request.rebind and target == "coreml":
        try:
            rebind_part(job)
            hit = cache.get(key, backend)
            if hit is not None:
                return hit[0], hit[1], False
            unused = f"template {part.template!r} not used: its part vanished from the cache"
        except RebindError as exc:
            unused = f"template {part.template!r} not used: {exc}"
    prepared = _Prepared(part, registry, set(plan.plugins), plan.profile, timings, sink, False)
    models = lower_programs(backend, prepared, part, plan.profile, precision, timings, sink)
    about = _lowered_about(prepared, part, target, precision)
    if unused:
        about["template_note"] = unused
    del prepared
    with _timed(timings, "cache"):
        cache.put(key, backend, models, about)
    return models, about, False


# -- template rebinding (core/rebind.py) --------------------------------------------------
@attrs.frozen
class _Template:
    """A part template lowered with markers: where each function's package is (the first
    marker lowering, in the cache), where the parameters land in it, and what a part
    must match to be bound into it."""

    key: str  # the first marker lowering's cache key: what parts bound into it record
    packages: dict[str, Path]
    bindings: dict[str, list[Binding]]
    signature: dict[str, list]
    about: dict[str, Any]


# per process: template key -> the template, or why it cannot be used
_TEMPLATES: dict[str, _Template | RebindError] = {}


def template_key(
    plan: ExportPlan, part: Chunk, target: str, precision: str, seed: int, policy: str | None = None
) -> str:
    """Cache key of ``part``'s template lowered with the markers of ``seed`` (and quantized
    under ``policy``): the part's identity without what tells parts of one template apart
    (name, meta)."""
    identity = _chunk_identity(plan, part)
    for field in ("chunk", "meta"):
        identity.pop(field)
    quantized = {}
    if policy is not None:
        quantized = {"policy": policy, "quantization": attrs.asdict(plan.profile.quantization)}
    return make_key(
        {
            **identity,
            **quantized,
            "template": f"{part.component}/{part.template}",
            "target": target,
            "precision": precision,
            "marker_seed": seed,
            "v": 1,
        }
    )


def _lower_markers(job: _PartJob, key: str, seed: int) -> None:
    """Capture and lower ``job.part`` with marker weights; cache it under ``key``."""
    plan, part, target, precision = job.plan, job.part, job.target, job.precision
    timings = job.timings
    backend = get_backend(target)
    signatures: list[dict[str, list]] = []

    def markers(module: torch.nn.Module) -> None:
        fill_markers(module, seed)
        signatures.append(signature(module))

    prepared = _Prepared(
        part, job.registry, set(plan.plugins), plan.profile, timings, _ignore, False, markers
    )
    job.sink(Event("stage", part.key, "lower", f"template {part.template} (markers {seed})"))
    models = lower_programs(backend, prepared, part, plan.profile, precision, timings, _ignore)
    if any(sig != signatures[0] for sig in signatures):
        raise RebindError("the part's modules differ between its export shapes")
    about = {
        **_lowered_about(prepared, part, target, precision),
        "template": part.template,
        "marker_seed": seed,
        "signature": signatures[0],
    }
    del prepared  # the module and captured programs: only the lowered models stay
    release_memory()
    with _timed(timings, "cache"):
        if not job.cache.put(key, backend, models, about):
            raise RebindError(f"cannot write the template to {job.cache.root}")


def _ensure_entries(
    cache: LoweredCache,
    keys: list[tuple[int, str]],
    make: Callable[[int, str], None],
    wait: bool = True,
) -> None:
    """Make the missing cache entries ``(seed, key)`` with ``make(seed, key)``, each under
    its lock: first those no other process is making, then (waiting) the others -- or,
    with ``wait`` False, raise :class:`TemplatePending` if another is making one."""
    suffix = get_backend("coreml").suffix
    todo = keys
    # not waiting: the second pass tries the locks again (one may have been released
    # while this process made its own lowering) and gives up on those still held
    for waiting in (False, wait):
        later = []
        for seed, key in todo:
            with cache.lock(key, wait=waiting) as held:
                if not held:
                    later.append((seed, key))
                elif cache.files(key, suffix) is None:
                    make(seed, key)
        todo = later
    if todo:
        raise TemplatePending(f"{len(todo)} marker lowering(s) being made elsewhere")


def part_template(job: _PartJob, policy: str | None = None) -> _Template:
    """``job.part``'s template: its two marker lowerings (from the cache, or made now) -- and,
    for a quantization ``policy``, the two quantized by the quantize hook -- with the
    bindings derived from them. Workers wanting the same template share the work: each
    lowering is made under a lock by one worker while another makes the other one or
    waits. Raises :class:`RebindError` when it cannot be used."""
    plan, registry, part, target, precision = (
        job.plan,
        job.registry,
        job.part,
        job.target,
        job.precision,
    )
    cache, timings, sink = job.cache, job.timings, job.sink
    keys = [template_key(plan, part, target, precision, seed) for seed in MARKER_SEEDS]
    qkeys = [template_key(plan, part, target, precision, seed, policy) for seed in MARKER_SEEDS]
    memo = qkeys[0]
    known = _TEMPLATES.get(memo)
    if isinstance(known, RebindError):
        raise known
    if known is not None:
        return known
    backend = get_backend(target)
    # both marker lowerings, in whichever worker, of one part: the first of its template
    # (the graph is the same for all, but value names follow the module paths)
    canonical = next(
        (
            p
            for c in plan.chunks
            for p in c.parts
            if p.component == part.component and p.template == part.template
        ),
        part,
    )

    def lower(seed: int, key: str) -> None:
        _lower_markers(attrs.evolve(job, part=canonical), key, seed)

    def quantize(seed: int, key: str) -> None:
        assert policy is not None
        hit = cache.get(keys[MARKER_SEEDS.index(seed)], backend)
        if hit is None:
            raise RebindError("its marker lowering vanished from the cache")
        models, about = hit
        sink(Event("stage", part.key, "quantize", f"template {part.template} {policy}"))
        with _timed(timings, "quantize"):
            quantized = {
                f: quantize_with_plugins(registry, plan, m, policy, part, target)
                for f, m in models.items()
            }
        if not cache.put(key, backend, quantized, {**about, "policy": policy}):
            raise RebindError(f"cannot write the template to {cache.root}")

    try:
        _ensure_entries(cache, list(zip(MARKER_SEEDS, keys, strict=True)), lower, job.wait)
        if policy is not None:
            pairs = list(zip(MARKER_SEEDS, qkeys, strict=True))
            _ensure_entries(cache, pairs, quantize, job.wait)
        entries = [cache.files(key, backend.suffix) for key in qkeys]
        if any(e is None for e in entries):
            raise RebindError("its marker lowerings vanished from the cache")
        (first, about), (second, about_b) = entries  # type: ignore[misc]
        if list(first) != list(second) or about["signature"] != about_b["signature"]:
            raise RebindError("its two marker lowerings have different functions")
        shapes = [shape for shape, _dtype in about["signature"]["params"]]
        with _timed(timings, "rebind"):
            bindings = _template_bindings(cache, qkeys, first, second, shapes, policy is not None)
        template = _Template(
            key=qkeys[0],
            packages=first,
            bindings=bindings,
            signature=about["signature"],
            about={k: about[k] for k in ("target", "precision", "strategy", "strategy_note")},
        )
    except RebindError as exc:
        _TEMPLATES[memo] = exc
        raise
    except (ExportError, OSError, ValueError) as exc:
        error = RebindError(f"{type(exc).__name__}: {exc}")
        _TEMPLATES[memo] = error
        raise error from exc
    _TEMPLATES[memo] = template
    return template


def _template_bindings(
    cache: LoweredCache,
    keys: list[str],
    first: dict[str, Path],
    second: dict[str, Path],
    shapes: list[list[int]],
    quantized: bool,
) -> dict[str, list[Binding]]:
    """The bindings of the marker lowerings cached under ``keys`` by function: derived
    once (:func:`derive_bindings`, seconds of hashing) and kept in the cache beside them.
    Workers wanting them at once wait for the one deriving them (cache lock)."""
    key = make_key({"bindings-of": keys, "v": 1})

    def kept() -> dict[str, list[Binding]] | None:
        found = cache.files(key, ".json")
        if found is None:
            return None
        try:
            return {f: bindings_from_json(json.loads(p.read_text())) for f, p in found[0].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # derived again, and rewritten

    bindings = kept()
    if bindings is not None:
        return bindings
    with cache.lock(key):
        bindings = kept()
        if bindings is not None:
            return bindings
        bindings = {f: derive_bindings(first[f], second[f], shapes, quantized) for f in first}
        writers = {
            f: lambda path, b=b: path.write_text(json.dumps(bindings_to_json(b)))
            for f, b in bindings.items()
        }
        cache.put_with(key, ".json", writers, {"bindings_of": keys})
    return bindings


def _params_from_lowered(job: _PartJob, shapes: list[list[int]]) -> list[torch.Tensor] | None:
    """``job.part``'s floating parameters read back from its lowered package in the part
    cache, when that package was bound into the lowered template (so its bindings say
    where each parameter is); None otherwise. Re-quantizing then builds no module."""
    backend = get_backend(job.target)
    key = lowered_key(job.plan, job.part, job.target, job.precision)
    found = job.cache.files(key, backend.suffix)
    if found is None:
        return None
    packages, about = found
    try:
        template = part_template(job)
    except RebindError:
        return None
    if about.get("bound_from") != template.key or list(packages) != list(template.packages):
        return None
    function = next(iter(packages))
    try:
        return read_bound(packages[function], template.bindings[function], shapes)
    except (RebindError, OSError):
        return None  # the module is built instead


def rebind_part(job: _PartJob, policy: str | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """``job.part``'s packages made by binding its weights into its template's (see
    core/rebind.py): lowered, or with a quantization ``policy`` quantized; cached like a
    lowering under :func:`lowered_key` / :func:`quantized_key`. The weights come from the
    part's module, or, when quantizing a part whose lowered package was itself bound,
    from that package (:func:`_params_from_lowered`: no module built). Returns the
    packages by function and the entry's record. Raises :class:`RebindError` when the
    template cannot be used or the part does not match it."""
    plan, chunk, part, target, precision = (
        job.plan,
        job.chunk,
        job.part,
        job.target,
        job.precision,
    )
    cache, timings, sink = job.cache, job.timings, job.sink
    backend = get_backend(target)
    if policy is None:
        key = lowered_key(plan, part, target, precision)
    else:
        key = quantized_key(plan, part, target, precision, policy)
    template = part_template(job, policy)
    shapes = [shape for shape, _dtype in template.signature["params"]]
    # quantizing: the weights as the part's lowered package holds them, if it was bound
    # (the quantizer sees the lowered, fp16 values either way); else the part's module
    params = _params_from_lowered(job, shapes) if policy is not None else None
    if params is not None and any(
        b.encoding.kind == "fp32" and params[b.param].dtype != torch.float32
        for bs in template.bindings.values()
        for b in bs
    ):
        params = None  # kept at fp32 by the quantizer: the fp16 copy would lose bits
    module = None
    if params is None:
        sink(Event("stage", chunk.key, "build", part.name))
        with _timed(timings, "build"):
            module = part.build()
            if signature(module) != template.signature:
                raise RebindError(f"{part.name}'s parameters or buffers differ from the template's")
            params = floating_params(module)
    about = {**template.about, "chunk": part.key, "template": part.template}
    about["bound_from"] = template.key
    if policy is not None:
        about["policy"] = policy
    writers = {
        function: functools.partial(write_rebound, package, template.bindings[function], params)
        for function, package in template.packages.items()
    }
    # binding quantized weights is quantizing; binding lowered ones replaces lowering
    stage = "rebind" if policy is None else "quantize"
    sink(Event("stage", chunk.key, stage, f"{part.name} {policy or precision}"))
    with _timed(timings, stage):
        stored = cache.put_with(key, backend.suffix, writers, about)
    del module, params, writers
    found = cache.files(key, backend.suffix) if stored else None
    if found is None:
        raise RebindError(f"cannot write {part.name}'s package to {cache.root}")
    return found


def quantized_key(plan: ExportPlan, part: Chunk, target: str, precision: str, policy: str) -> str:
    """Cache key of a part's models quantized under ``policy`` (and the profile's
    quantization options)."""
    return make_key(
        {
            **_chunk_identity(plan, part),
            "target": target,
            "precision": precision,
            "policy": policy,
            "quantization": attrs.asdict(plan.profile.quantization),
            "v": 1,
        }
    )


def quantize_with_plugins(
    registry: Registry, plan: ExportPlan, model: Any, policy: str, chunk: Chunk, target: str
) -> Any:
    """``model`` quantized under ``policy`` by the first plugin whose quantize hook takes it."""
    quantized = registry.call(
        "sora_export_quantize",
        set(plan.plugins),
        firstresult=True,
        artifact=model,
        policy=policy,
        chunk=chunk,
        target=target,
        profile=plan.profile,
    )
    if quantized is None:
        raise ExportError(
            f"{chunk.key}: no plugin quantizes {target} artifacts with policy {policy!r}"
        )
    return quantized


def _lowered_about(prepared: _Prepared, chunk: Chunk, target: str, precision: str) -> dict:
    """What a cache entry records besides its models: enough to verify and describe it
    without capturing again (the strategy decides the verification cases' functions)."""
    return {
        "chunk": chunk.key,
        "target": target,
        "precision": precision,
        "strategy": prepared.strategy or "static",
        "strategy_note": prepared.strategy_note,
    }


def _lower_precision(policy: str) -> str:
    return "fp32" if policy == "fp32" else "fp16"


@attrs.define
class _TargetExport:
    """Lowering, quantizing, saving and verifying one prepared chunk for one target."""

    chunk: Chunk
    prepared: _Prepared
    target: str
    plan: ExportPlan
    registry: Registry
    active: set[str]
    stage_dir: Path
    timings: dict[str, float]
    sink: EventSink
    notes: list[str] = attrs.Factory(list)
    cache: LoweredCache | None = None
    # where parts' lowered models go (the cache, else a folder in the staging directory)
    part_cache: LoweredCache | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    # parts bound into a template (by template name), and why a template was not used
    rebound: dict[str, int] = attrs.Factory(dict)
    template_notes: list[str] = attrs.Factory(list)

    @property
    def forced(self) -> bool:
        """The user named the policy: never widen it silently."""
        return self.plan.request.quantize is not None

    @property
    def overflows_fp16(self) -> bool:
        act = self.prepared.max_activation
        return act is not None and act > FP16_MAX * FP16_HEADROOM

    def export(self, policy: str) -> tuple[Artifact, Verification | None, str, list[str]]:
        """Returns the artifact, its verification, the policy finally used and notes.

        An fp16 chunk whose inputs or reference activations would overflow fp16, or whose
        fp16 artifact fails the fidelity gate, is lowered again in fp32, and the notes say
        why (unless ``--quantize`` forced the policy).
        """
        if not self.forced and _lower_precision(policy) == "fp16" and self.overflows_fp16:
            self.notes.append(
                f"kept fp32: an input or reference activation reaches "
                f"{self.prepared.max_activation:.3g}, beyond {FP16_HEADROOM:.0%} of the fp16 "
                f"range ({FP16_MAX:.0f}); fp16 would overflow"
            )
            policy = "fp32"
        if policy == "auto":
            return self.export_auto()
        artifact, verification = self.lower_save_verify(policy)
        if (
            verification is not None
            and not verification.passed
            and not verification.error
            and policy == "fp16"
            and not self.forced
        ):
            self.notes.append(
                f"fp16 failed the fidelity gate ({verification.psnr_db:.1f} dB < "
                f"{verification.threshold_db:.0f} dB); fell back to fp32"
            )
            policy = "fp32"
            artifact, verification = self.lower_save_verify(policy)
        return artifact, verification, policy, self.notes

    def export_auto(self) -> tuple[Artifact, Verification | None, str, list[str]]:
        """The smallest policy whose artifact passes its gate (plan() ensures verification)."""
        tried = []
        candidates = AUTO_ORDER
        if self.overflows_fp16:
            candidates = ("fp32",)  # every other policy computes in fp16
            tried.append("fp16-family skipped: activations beyond the fp16 range")
        for candidate in candidates:
            try:
                artifact, verification = self.lower_save_verify(candidate)
            except ExportError as exc:
                if "no plugin quantizes" not in str(exc):
                    raise
                tried.append(f"{candidate} unsupported")
                continue
            assert verification is not None
            tried.append(f"{candidate} {verification.psnr_db:.1f} dB")
            if verification.passed:
                self.notes.append(f"auto chose {candidate} (tried: {', '.join(tried)})")
                return artifact, verification, candidate, self.notes
        raise ExportError(
            f"{self.chunk.key}: no policy passed its fidelity gate ({', '.join(tried)})"
        )

    def lower_save_verify(self, policy: str) -> tuple[Artifact, Verification | None]:
        chunk, target, timings, profile = self.chunk, self.target, self.timings, self.plan.profile
        backend = get_backend(target)
        if by_parts(self.plan, chunk, target):
            final, functions = self.export_by_parts(backend, policy)
        else:
            models: dict[str, Any] = {}
            for variant, model in self.lowered(backend, _lower_precision(policy)).items():
                if policy not in ("fp32", "fp16"):
                    self.sink(Event("stage", chunk.key, "quantize", policy))
                    with _timed(timings, "quantize"):
                        model = self.quantize(model, policy)
                models[variant] = model
            self.sink(Event("stage", chunk.key, "save", target))
            with _timed(timings, "save"):
                final, functions = self.save(backend, models)
            del models
        artifact = Artifact(
            target=target,
            path=str(final.relative_to(self.stage_dir)),
            bytes=tree_bytes(final),
            sha256=tree_sha256(final),
            functions=functions,
        )
        verification = None
        if self.plan.verify:
            self.sink(Event("stage", chunk.key, "verify", target))
            with _timed(timings, "verify"):
                verification = verify_cases(
                    final,
                    target,
                    self.prepared.cases,
                    profile.threshold_for(policy),
                    self.prepared.reference_seconds,
                )
        return artifact, verification

    def part_job(self, part: Chunk, precision: str) -> _PartJob:
        assert self.part_cache is not None
        return _PartJob(
            self.plan,
            self.registry,
            self.chunk,
            part,
            self.target,
            precision,
            self.part_cache,
            self.timings,
            self.sink,
        )

    def lowered(self, backend: Any, precision: str, part: Chunk | None = None) -> dict[str, Any]:
        """Every function's lowered model at ``precision`` (of the chunk, or of one of its
        parts): from the cache when an earlier run lowered the same thing with the same
        code, else lowered now (and cached)."""
        if part is not None:
            models, about, hit = lower_part(self.part_job(part, precision))
            self.cache_hits += hit
            self.cache_misses += not hit
            if about.get("template"):
                self.rebound[about["template"]] = self.rebound.get(about["template"], 0) + 1
            if about.get("template_note") and about["template_note"] not in self.template_notes:
                self.template_notes.append(about["template_note"])
            # the stitched chunk takes its shapes as its parts do
            self.prepared.adopt(about["strategy"], about["strategy_note"])
            return models
        chunk, cache = self.chunk, self.cache
        key = lowered_key(self.plan, chunk, self.target, precision) if cache else ""
        if cache is not None:
            self.sink(Event("stage", chunk.key, "cache", f"{self.target} {precision}"))
            with _timed(self.timings, "cache"):
                hit = cache.get(key, backend)
            if hit is not None:
                self.cache_hits += 1
                self.prepared.adopt(hit[1]["strategy"], hit[1]["strategy_note"])
                return hit[0]
        models = lower_programs(
            backend, self.prepared, chunk, self.plan.profile, precision, self.timings, self.sink
        )
        if cache is not None:
            with _timed(self.timings, "cache"):
                about = _lowered_about(self.prepared, chunk, self.target, precision)
                cache.put(key, backend, models, about)
            self.cache_misses += 1
        return models

    @property
    def cache_state(self) -> str:
        """``hit`` when every lowering came from the cache, ``stored`` when some was made
        now and cached, ``""`` without a cache."""
        if self.cache_misses:
            return "stored"
        return "hit" if self.cache_hits else ""

    def export_by_parts(self, backend: Any, policy: str) -> tuple[Path, tuple[str, ...]]:
        """Convert (or take from the cache) each part, quantize it (or bind it into its
        quantized template), and stitch the parts into the chunk's package. Holds one
        part's models at a time."""
        from sora_export.core.backends.stitch import StitchError, stitch_packages

        chunk, precision = self.chunk, _lower_precision(policy)
        self.rebound.clear()
        self.template_notes.clear()
        folder = self.stage_dir / chunk.component
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{chunk.index:02d}-{chunk.name}{backend.suffix}"
        work = folder / f".parts-{os.getpid()}-{chunk.index:02d}-{chunk.name}"
        tmp = folder / f".tmp-{os.getpid()}-{final.name}"
        remove_path(work)
        remove_path(tmp)
        try:
            work.mkdir()
            located: list[dict[str, tuple[Path, str]]] = []
            functions: tuple[str, ...] = ()

            def same_functions(part: Chunk, got: tuple[str, ...]) -> tuple[str, ...]:
                if functions and got != functions:
                    raise ExportError(
                        f"{chunk.key}: its parts take the export shapes differently "
                        f"({part.name} has functions {list(got)}, the first part "
                        f"{list(functions)}); export with --whole-chunks"
                    )
                return got

            for part in chunk.parts:
                bound = self.bound_quantized(part, precision, policy)
                if bound is not None:
                    functions = same_functions(part, tuple(bound))
                    located.append({f: (path, "main") for f, path in bound.items()})
                    continue
                key = lowered_key(self.plan, part, self.target, precision)
                models = self.lowered(backend, precision, part)
                functions = same_functions(part, tuple(models))
                if policy in ("fp32", "fp16") and self.part_cache is not None:
                    where = self.part_cache.paths(key, backend)
                    if where is not None:  # stitch straight from the cache entry
                        located.append({f: (path, "main") for f, path in where.items()})
                        continue
                saved = {}
                for function, model in models.items():
                    if policy not in ("fp32", "fp16"):
                        self.sink(Event("stage", chunk.key, "quantize", f"{part.name} {policy}"))
                        with _timed(self.timings, "quantize"):
                            model = self.quantize(model, policy)
                    path = work / f"{part.index:03d}-{function}{backend.suffix}"
                    with _timed(self.timings, "save"):
                        backend.save({"main": model}, path)
                    saved[function] = (path, "main")
                located.append(saved)
                del models
            self.sink(Event("stage", chunk.key, "save", f"stitch {len(located)} parts"))
            with _timed(self.timings, "save"):
                stitch_packages(located, [p.wiring for p in chunk.parts], functions, tmp)
                atomic_replace(tmp, final)
        except StitchError as exc:
            raise ExportError(f"{chunk.key}: stitching its parts failed: {exc}") from exc
        except OSError as exc:
            raise _write_error(chunk, final, exc) from exc
        finally:
            remove_path(work)
            remove_path(tmp)
        templates = "".join(
            f"; {n} bound into one lowered template {name!r}" for name, n in self.rebound.items()
        )
        self.notes.append(f"converted as {len(chunk.parts)} parts and stitched{templates}")
        self.notes.extend(self.template_notes)
        return final, functions

    def bound_quantized(self, part: Chunk, precision: str, policy: str) -> dict[str, Path] | None:
        """``part`` quantized under ``policy`` by binding its weights into its quantized
        template (from the part cache, or made now); None when the part has no template,
        the policy is not a quantization, or the template cannot be used (then the part's
        lowered model is quantized on its own, and the notes say why)."""
        if (
            policy in ("fp32", "fp16", "auto")
            or not part.template
            or not self.plan.request.rebind
            or self.part_cache is None
        ):
            return None
        backend = get_backend(self.target)
        key = quantized_key(self.plan, part, self.target, precision, policy)
        found = self.part_cache.files(key, backend.suffix)
        hit = found is not None
        if found is None:
            try:
                found = rebind_part(self.part_job(part, precision), policy)
            except RebindError as exc:
                note = f"template {part.template!r} not used for {policy}: {exc}"
                if note not in self.template_notes:
                    self.template_notes.append(note)
                return None
        paths, about = found
        # nothing captured or lowered for it: the lowered models (or the part) were at hand
        lowered = lowered_key(self.plan, part, self.target, precision)
        hit = hit or self.part_cache.files(lowered, backend.suffix) is not None
        self.cache_hits += hit
        self.cache_misses += not hit
        self.rebound[part.template] = self.rebound.get(part.template, 0) + 1
        self.prepared.adopt(about["strategy"], about["strategy_note"])
        return paths

    def quantize(self, model: Any, policy: str) -> Any:
        return quantize_with_plugins(
            self.registry, self.plan, model, policy, self.chunk, self.target
        )

    def save(self, backend: Any, models: dict[str, Any]) -> tuple[Path, tuple[str, ...]]:
        """Write under a temp name, then rename into place: never half a package."""
        chunk = self.chunk
        folder = self.stage_dir / chunk.component
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{chunk.index:02d}-{chunk.name}{backend.suffix}"
        # coremltools insists on the .mlpackage suffix, so the temp name keeps it
        tmp = folder / f".tmp-{os.getpid()}-{final.name}"
        remove_path(tmp)
        try:
            functions = backend.save(models, tmp)
            atomic_replace(tmp, final)
        except OSError as exc:
            remove_path(tmp)
            raise _write_error(chunk, final, exc) from exc
        except BaseException:
            remove_path(tmp)
            raise
        return final, functions


# ``--quantize auto`` tries these from the smallest stored size up and keeps the first that
# passes its fidelity gate (fp32 last: it always exists as the fallback).
AUTO_ORDER = ("palettize4", "int4-block", "palettize6", "int8", "palettize8", "fp16", "fp32")


def verify_artifact(
    path: Path,
    target: str,
    inputs: dict[str, np.ndarray],
    references: dict[str, dict[str, np.ndarray]],
    threshold_db: float,
    reference_seconds: float = 0.0,
) -> Verification:
    """Run every function of a saved artifact and compare with the fp32 references."""
    cases = [_Case(function, "", inputs, ref) for function, ref in references.items()]
    return verify_cases(path, target, cases, threshold_db, reference_seconds)


def verify_cases(
    path: Path,
    target: str,
    cases: list[_Case],
    threshold_db: float,
    reference_seconds: float = 0.0,
) -> Verification:
    """Run each case (a function at an export shape, with its own inputs) of a saved
    artifact against its fp32 reference; the worst case is the verdict and
    ``psnr_by_shape`` keeps the worst PSNR at each shape."""
    backend = get_backend(target)
    worst: Verification | None = None
    run_seconds = load_seconds = 0.0
    by_shape: dict[str, float] = {}
    for case in cases:
        function, inputs, reference = case.function, case.inputs, case.reference
        try:
            start = time.perf_counter()
            backend.load(path, function)
            loaded = time.perf_counter()
            actual = backend.run(path, inputs, function)
            load_seconds += loaded - start
            run_seconds += time.perf_counter() - loaded
            fid = compare(reference, actual)
        except Exception as exc:
            return Verification(
                backend=backend.runner_name(),
                psnr_db=-math.inf,
                max_abs_err=math.inf,
                finite=False,
                threshold_db=threshold_db,
                passed=False,
                reference_seconds=reference_seconds,
                error=f"function {function!r}{_at(case.shape)}: {type(exc).__name__}: {exc}",
            )
        passed = fid.finite and fid.psnr_db >= threshold_db
        if case.shape:
            by_shape[case.shape] = min(by_shape.get(case.shape, math.inf), fid.psnr_db)
        notes = [] if fid.finite else [f"function {function!r}{_at(case.shape)} produced inf/NaN"]
        if hasattr(backend, "cross_check"):  # e.g. interpreter vs real Core ML on macOS
            notes.append(backend.cross_check(path, inputs, function, actual))
        v = Verification(
            backend=backend.runner_name(),
            psnr_db=fid.psnr_db,
            max_abs_err=fid.max_abs_err,
            finite=fid.finite,
            threshold_db=threshold_db,
            passed=passed,
            note="; ".join(n for n in notes if n),
        )
        if worst is None or v.psnr_db < worst.psnr_db or not v.finite:
            worst = v
    assert worst is not None
    return attrs.evolve(
        worst,
        seconds=run_seconds,
        load_seconds=load_seconds,
        reference_seconds=reference_seconds,
        psnr_by_shape=by_shape,
    )


def _at(shape: str) -> str:
    return f" at {shape}" if shape else ""


def export_chunk(
    chunk: Chunk,
    plan: ExportPlan,
    registry: Registry,
    active: set[str],
    stage_dir: Path,
    sink: EventSink = _ignore,
) -> list[ChunkResult]:
    """Export one chunk to every target of the plan; returns one result per target."""
    reset_peak_rss()
    timings: dict[str, float] = {}
    policies = {t: _policy(plan, chunk) for t in plan.targets}
    results: list[ChunkResult] = []
    cache = LoweredCache(plan.request.cache_dir) if plan.request.cache_dir else None
    prepared = _Prepared(chunk, registry, active, plan.profile, timings, sink, plan.verify)
    for target in plan.targets:
        t_timings: dict[str, float] = {}
        job = _TargetExport(
            chunk,
            prepared,
            target,
            plan,
            registry,
            active,
            stage_dir,
            t_timings,
            sink,
            cache=cache,
            part_cache=part_cache(plan, stage_dir),
        )
        try:
            artifact, verification, used, notes = job.export(policies[target])
        except SoraExportError as exc:
            results.append(
                _failed(chunk, target, policies[target], {**timings, **t_timings}, str(exc))
            )
            continue
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            results.append(_failed(chunk, target, policies[target], {**timings, **t_timings}, msg))
            continue
        if job.cache_state == "hit":
            notes.append(CACHE_HIT_NOTE)
        results.append(
            ChunkResult(
                chunk_key=chunk.key,
                component=chunk.component,
                name=chunk.name,
                target=target,
                artifact=artifact,
                params=chunk.params,
                quantization=used,
                # build/reference/capture happen once for all targets; each target shows them
                timings={**timings, **t_timings},
                peak_rss_bytes=peak_rss_bytes(),
                verification=verification,
                notes=tuple(notes),
                strategy=prepared.strategy or "static",
                strategy_note=prepared.strategy_note,
                lowered_cache=job.cache_state,
            )
        )
    del prepared
    release_memory()
    return results


def _policy(plan: ExportPlan, chunk: Chunk) -> str:
    if plan.request.quantize is not None:
        return plan.request.quantize
    return plan.profile.quantization.for_chunk(chunk.component, chunk.name)


def _failed(chunk: Chunk, target: str, policy: str, timings: dict, error: str) -> ChunkResult:
    return ChunkResult(
        chunk_key=chunk.key,
        component=chunk.component,
        name=chunk.name,
        target=target,
        artifact=None,
        params=chunk.params,
        quantization=policy,
        timings=dict(timings),
        peak_rss_bytes=peak_rss_bytes(),
        error=error,
    )


# -- the whole run -----------------------------------------------------------------------
PROGRESS_FILE = "progress.json"


class _Terminated(KeyboardInterrupt):
    """SIGTERM handled like Ctrl-C, so finally-blocks clean up the partial package."""


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    plan: ExportPlan,
    registry: Registry,
    sink: EventSink = _ignore,
    workers: WorkerPool | None = None,
) -> RunResult:
    """Export every chunk into the staging directory, then package and publish the bundle.

    ``workers``: processes started ahead (:func:`sora_export.core.workers.start_workers`),
    used when the plan runs that many in parallel; the caller closes them either way.

    Raises :class:`ExportError` when a chunk failed (the staging directory keeps finished
    chunks for ``--resume``). KeyboardInterrupt/SIGTERM propagate after the partial chunk's
    temp files are removed.
    """
    request = plan.request
    stage = prepare_output(request)
    progress_path = stage / PROGRESS_FILE
    progress = _read_progress(progress_path) if request.resume else {}
    active = set(plan.plugins)
    start = time.perf_counter()
    results: list[ChunkResult] = []
    run_peak = 0
    pending = []
    for chunk in plan.chunks:
        cached = _cached_results(plan, chunk, progress, stage)
        if cached is None:
            pending.append(chunk)
            continue
        results.extend(cached)
        for r in cached:
            sink(Event("chunk-done", chunk.key, detail="cached", result=r))
    with _sigterm_as_exception(), TreePeakSampler() as sampler:
        if plan.jobs > 1 and len(pending) > 1:
            finished = _run_parallel(plan, registry, pending, stage, plan.jobs, sink, workers)
        else:
            finished = _run_serial(plan, registry, active, pending, stage, sink)
        for chunk, chunk_results in finished:
            for r in chunk_results:
                run_peak = max(run_peak, r.peak_rss_bytes)
                sink(Event("chunk-done", chunk.key, result=r))
                if r.ok and r.artifact is not None:
                    fingerprint = chunk_fingerprint(plan, chunk, r.target, _policy(plan, chunk))
                    progress[_progress_key(r)] = {
                        "fingerprint": fingerprint,
                        "result": result_to_json(r),
                    }
            results.extend(chunk_results)
            _write_json(progress_path, progress)
    order = {c.key: i for i, c in enumerate(plan.chunks)}
    results.sort(key=lambda r: (order[r.chunk_key], plan.targets.index(r.target)))
    seconds = time.perf_counter() - start
    result = RunResult(
        plan=plan,
        bundle=request.output,
        results=tuple(results),
        seconds=seconds,
        peak_rss_bytes=max(run_peak, sampler.peak),
    )
    package(plan, result, registry, stage)
    if plan.verify and len(plan.components) > 1:
        result = _pipeline_checks(plan, result, stage, sink, start)
    if not result.ok:
        raise ExportFailed(result, stage)
    # publish: the old bundle (if --force/--resume) is replaced only now
    (stage / PROGRESS_FILE).unlink(missing_ok=True)
    remove_path(stage / PARTS_CACHE)
    if request.output.exists():
        atomic_replace(stage, request.output)
    else:
        os.replace(stage, request.output)
    return result


def _pipeline_checks(
    plan: ExportPlan, result: RunResult, stage: Path, sink: EventSink, start: float
) -> RunResult:
    """Chain each component's artifacts (and, for t5+stdit3+VAEs, text-to-video for two
    sampler steps) against PyTorch; write the frame strip and add the checks to the report.

    Run for multi-component bundles when verifying; ``sora-export verify --pipeline`` runs
    the same checks on any bundle later.
    """
    from sora_export.core.verify.pipeline import FRAMES_FILE, pipeline_checks, write_frames

    if not all(r.ok for r in result.results):
        return result  # the per-chunk failures already say what is wrong
    sink(Event("stage", "bundle", "pipeline checks"))
    checks = tuple(pipeline_checks(plan, stage))
    write_frames(checks, stage / FRAMES_FILE)
    result = attrs.evolve(result, checks=checks, seconds=time.perf_counter() - start)
    _write_json(stage / "report.json", build_report(plan, result))
    return result


def _run_serial(
    plan: ExportPlan,
    registry: Registry,
    active: set[str],
    chunks: list[Chunk],
    stage: Path,
    sink: EventSink,
) -> Iterator[tuple[Chunk, list[ChunkResult]]]:
    for chunk in chunks:
        sink(Event("chunk-start", chunk.key))
        yield chunk, export_chunk(chunk, plan, registry, active, stage, sink)


_WORKER_REGISTRY: Registry | None = None


def worker_setup(extra_modules: tuple[str, ...]) -> None:
    """A worker process's start-up (:func:`sora_export.core.workers.init_worker`): discover
    the same plugins as the parent; quiet warnings."""
    import warnings

    global _WORKER_REGISTRY
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # N workers share the cores; no oversubscription
    _WORKER_REGISTRY = Registry.discover(extra_modules)
    runtime.settle_imports()


def _worker_export(plan: ExportPlan, index: int, stage: Path) -> list[ChunkResult]:
    assert _WORKER_REGISTRY is not None
    chunk = plan.chunks[index]
    return export_chunk(chunk, plan, _WORKER_REGISTRY, set(plan.plugins), stage)


def _worker_lower_part(
    plan: ExportPlan, index: int, part: int, stage: Path, wait: bool
) -> tuple[dict[str, float], bool]:
    assert _WORKER_REGISTRY is not None
    return lower_part_ahead(plan, _WORKER_REGISTRY, index, part, stage, wait)


def lower_part_ahead(
    plan: ExportPlan, registry: Registry, index: int, part: int, stage: Path, wait: bool = True
) -> tuple[dict[str, float], bool]:
    """Lower one part of a chunk into the part cache, ahead of the chunk's own task, and
    for a quantized policy with a usable template bind its quantized models too (the
    chunk's task then finds them there and only stitches). Returns the stage timings and
    whether the part is done: with ``wait`` False, not when its template's other marker
    lowering is still being made by another process (what this task made, e.g. one of
    them, is cached; run it again later)."""
    chunk = plan.chunks[index]
    timings: dict[str, float] = {}
    policy = _policy(plan, chunk)
    precision = _lower_precision(policy)
    cache = part_cache(plan, stage)
    the_part = chunk.parts[part]
    job = _PartJob(plan, registry, chunk, the_part, "coreml", precision, cache, timings, wait=wait)
    suffix = get_backend("coreml").suffix
    try:
        if cache.files(lowered_key(plan, the_part, "coreml", precision), suffix) is None:
            lower_part(job)
        if (
            policy not in ("fp32", "fp16", "auto")
            and the_part.template
            and plan.request.rebind
            and cache.files(quantized_key(plan, the_part, "coreml", precision, policy), suffix)
            is None
        ):
            # quantized here too, so the chunk's task only stitches; a template that cannot
            # be used is left to that task (which quantizes the part itself and notes why)
            with contextlib.suppress(RebindError):
                rebind_part(job, policy)
    except TemplatePending:
        done = False
    else:
        done = True
    if "lower" in timings:
        # a lowering leaves converter garbage worth handing back to the system; a bind
        # (most part tasks) does not, and the next one reuses its freed memory
        release_memory()
    return timings, done


def _part_tasks(plan: ExportPlan, chunk: Chunk) -> list[int]:
    """Parts to lower ahead in workers: those of a chunk converted part by part."""
    if "coreml" in plan.targets and by_parts(plan, chunk, "coreml"):
        return list(range(len(chunk.parts)))
    return []


def _add_timings(results: list[ChunkResult], extra: dict[str, float]) -> list[ChunkResult]:
    """Fold the stage times of a chunk's part tasks into its results. Parts lowered by
    this run's part tasks make the chunk's lowered models "stored", not cache hits."""
    if not extra:
        return results
    out = []
    for r in results:
        timings = dict(r.timings)
        for stage, seconds in extra.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if ("lower" in extra or "rebind" in extra) and r.lowered_cache == "hit":
            notes = tuple(n for n in r.notes if n != CACHE_HIT_NOTE)
            r = attrs.evolve(r, lowered_cache="stored", notes=notes)
        out.append(attrs.evolve(r, timings=timings))
    return out


@attrs.frozen
class _Task:
    """One unit of a parallel run: a part of ``chunk`` to lower ahead (``part`` its index),
    or the chunk's own export (``part`` None)."""

    chunk: Chunk
    part: int | None = None
    wait: bool = False  # a part: wait for its template's marker lowerings made elsewhere


@attrs.define
class _Feed:
    """The tasks of a parallel run, handed to a process pool and to this process.

    The pool's workers are kept busy from the pool's own thread: when one finishes a
    task the next ready one is submitted at once, whatever this process is doing. Every
    finished task (its future) goes to ``done`` for this process to collect. A broken pool
    (a worker died) takes no more tasks."""

    submit: Callable[[_Task], Any]
    size: int
    done: queue.Queue = attrs.Factory(queue.Queue)
    ready: collections.deque = attrs.Factory(collections.deque)
    running: int = 0
    broken: bool = False
    lock: threading.RLock = attrs.Factory(threading.RLock)

    def add(self, task: _Task, first: bool = False) -> None:
        with self.lock:
            if first:
                self.ready.appendleft(task)
            else:
                self.ready.append(task)
            self.fill()

    def take(self) -> _Task | None:
        """The next ready task, for this process to run."""
        with self.lock:
            return self.ready.popleft() if self.ready else None

    def fill(self) -> None:
        """Submit ready tasks while a worker is free."""
        from concurrent.futures.process import BrokenProcessPool

        with self.lock:
            while not self.broken and self.running < self.size and self.ready:
                task = self.ready.popleft()
                try:
                    future = self.submit(task)
                except (BrokenProcessPool, RuntimeError):
                    self.broken = True
                    self.ready.appendleft(task)  # run here instead
                    return
                self.running += 1
                future.add_done_callback(functools.partial(self._finished, task))

    def _finished(self, task: _Task, future: Any) -> None:
        with self.lock:
            self.running -= 1
            self.fill()
        self.done.put((task, future))


def _run_parallel(
    plan: ExportPlan,
    registry: Registry,
    chunks: list[Chunk],
    stage: Path,
    jobs: int,
    sink: EventSink,
    warm: WorkerPool | None = None,
) -> Iterator[tuple[Chunk, list[ChunkResult]]]:
    """Export chunks in ``jobs`` processes: this one and ``jobs - 1`` workers (spawned:
    torch and fork do not mix; ``warm``'s, already started, when it has that many for
    the same plugins).

    The parts of chunks converted part by part are lowered first, each as its own task, so
    the processes share even a plan of few big chunks; a chunk's own task (quantize,
    stitch, verify) is queued first when its parts are done. Workers take the next task
    as they finish; this process runs the next one itself whenever it has no finished
    task to collect, so ``jobs`` processes work while only ``jobs - 1`` start up. A worker
    that dies (e.g. killed for memory) breaks the pool: this process goes on with the
    tasks of other chunks, and the chunks whose tasks were lost are retried once in a
    fresh pool (parts already lowered are found in the cache), so only a chunk that kills
    its worker twice fails, with an error saying so.
    """
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    index_of = {c.key: i for i, c in enumerate(plan.chunks)}
    try:
        import pickle

        pickle.dumps(plan)
    except Exception as exc:
        raise ExportError(
            f"--jobs {jobs} needs picklable chunks and components ({type(exc).__name__}: "
            f"{exc}); run with --jobs 1"
        ) from exc
    active = set(plan.plugins)
    attempts = dict.fromkeys((c.key for c in chunks), 0)
    todo = list(chunks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process is one of the jobs; no oversubscription
    try:
        while todo:
            broken: list[Chunk] = []
            size = jobs - 1
            if (
                warm is not None
                and warm.workers == size
                and warm.extra_modules == tuple(registry.extra_modules)
            ):
                executor = warm.executor  # first attempt only: a broken pool is not reused
            else:
                executor = new_executor(size, registry.extra_modules)
            warm = None

            def submit(task: _Task, pool: Any = executor) -> Any:
                index = index_of[task.chunk.key]
                if task.part is None:
                    return pool.submit(_worker_export, plan, index, stage)
                return pool.submit(_worker_lower_part, plan, index, task.part, stage, task.wait)

            def run_here(task: _Task) -> Future:
                future: Future = Future()
                try:
                    if task.part is None:
                        value: Any = export_chunk(task.chunk, plan, registry, active, stage, sink)
                    else:
                        index = index_of[task.chunk.key]
                        value = lower_part_ahead(plan, registry, index, task.part, stage, task.wait)
                    future.set_result(value)
                except Exception as exc:
                    future.set_exception(exc)
                return future

            with executor:
                feed = _Feed(submit, size)
                waiting: dict[str, int] = {}  # chunk key -> parts still being lowered
                part_timings: dict[str, dict[str, float]] = {}
                # Queue order: the first parts (with templates, the first two make its two
                # marker lowerings side by side while the other processes wait for them),
                # then the chunks without parts, then the other parts (bound in moments
                # once the template exists).
                part_tasks: list[_Task] = []
                whole: list[_Task] = []
                for chunk in todo:
                    attempts[chunk.key] += 1
                    sink(Event("chunk-start", chunk.key))
                    parts = _part_tasks(plan, chunk)
                    waiting[chunk.key] = len(parts)
                    part_timings[chunk.key] = {}
                    part_tasks.extend(_Task(chunk, i) for i in parts)
                    if not parts:
                        whole.append(_Task(chunk))
                for task in [*part_tasks[:jobs], *whole, *part_tasks[jobs:]]:
                    feed.add(task)
                outstanding = len(part_tasks) + len(whole)
                while outstanding:
                    try:
                        task, future = feed.done.get_nowait()
                    except queue.Empty:
                        mine = feed.take()
                        if mine is not None and mine.chunk in broken:
                            outstanding -= 1  # retried with its chunk in a fresh pool
                            continue
                        if mine is not None:
                            task, future = mine, run_here(mine)
                        else:
                            task, future = feed.done.get()
                    outstanding -= 1
                    chunk = task.chunk
                    if task.part is not None:
                        try:
                            timings, done = future.result()
                            for stage_name, seconds in timings.items():
                                t = part_timings[chunk.key]
                                t[stage_name] = t.get(stage_name, 0.0) + seconds
                        except BrokenProcessPool:
                            if chunk not in broken:
                                broken.append(chunk)
                            continue
                        except Exception:
                            done = True  # the chunk's own task lowers it again and reports
                        if not done:  # its template is being made elsewhere: after the rest
                            feed.add(attrs.evolve(task, wait=True))
                            outstanding += 1
                            continue
                        waiting[chunk.key] -= 1
                        if waiting[chunk.key] == 0 and chunk not in broken:
                            feed.add(_Task(chunk), first=True)
                            outstanding += 1
                        continue
                    try:
                        yield chunk, _add_timings(future.result(), part_timings[chunk.key])
                    except BrokenProcessPool:
                        if chunk not in broken:
                            broken.append(chunk)
                    except Exception as exc:
                        message = f"task failed: {type(exc).__name__}: {exc}"
                        yield (
                            chunk,
                            [
                                _failed(chunk, t, _policy(plan, chunk), {}, message)
                                for t in plan.targets
                            ],
                        )
            todo = []
            for chunk in broken:
                if attempts[chunk.key] >= 2:
                    message = (
                        "its worker process died twice (killed, e.g. out of memory?); "
                        "try fewer --jobs"
                    )
                    yield (
                        chunk,
                        [
                            _failed(chunk, t, _policy(plan, chunk), {}, message)
                            for t in plan.targets
                        ],
                    )
                else:
                    todo.append(chunk)
    finally:
        torch.set_num_threads(threads)


class ExportFailed(ExportError):
    """Some chunk failed; carries the run result so the CLI can still show the report."""

    def __init__(self, result: RunResult, stage: Path) -> None:
        self.result = result
        self.stage = stage
        failed = [f"{r.chunk_key} ({r.target})" for r in result.results if not r.ok]
        failed += [f"pipeline check {c.name} ({c.target})" for c in result.checks if not c.passed]
        names = ", ".join(failed[:5]) + (f", ... (+{len(failed) - 5})" if len(failed) > 5 else "")
        super().__init__(
            f"failed: {names}. Finished chunks are kept in {str(stage)!r}; fix the cause and "
            "rerun with --resume"
        )


def _progress_key(r: ChunkResult) -> str:
    return f"{r.chunk_key}@{r.target}"


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cached_results(
    plan: ExportPlan, chunk: Chunk, progress: dict[str, Any], stage: Path
) -> list[ChunkResult] | None:
    """Results of a chunk finished by an earlier run, if its inputs and files are unchanged."""
    out = []
    for target in plan.targets:
        entry = progress.get(f"{chunk.key}@{target}")
        if entry is None:
            return None
        if entry.get("fingerprint") != chunk_fingerprint(plan, chunk, target, _policy(plan, chunk)):
            return None
        r = result_from_json(entry["result"])
        if r.artifact is None:
            return None
        path = stage / r.artifact.path
        if not path.exists() or tree_sha256(path) != r.artifact.sha256:
            return None
        out.append(attrs.evolve(r, cached=True))
    return out


def package(plan: ExportPlan, result: RunResult, registry: Registry, stage: Path) -> None:
    """Run the package hook and write manifest.json and report.json into ``stage``."""
    manifest = build_manifest(plan, result)
    contributed: dict[str, str] = {}
    for plugin, sections in registry.call(
        "sora_export_package", set(plan.plugins), plan=plan, result=result, bundle=stage
    ):
        if not isinstance(sections, dict):
            raise PluginError(plugin, "sora_export_package", "must return a dict or None")
        for key, value in sections.items():
            if key in contributed:
                raise PluginError(
                    plugin,
                    "sora_export_package",
                    f"manifest section {key!r} is also written by plugin {contributed[key]!r}",
                )
            if key in manifest and key != "sampler":
                raise PluginError(
                    plugin, "sora_export_package", f"manifest key {key!r} is reserved"
                )
            contributed[key] = plugin
            manifest[key] = value
    _write_json(stage / "manifest.json", manifest)
    _write_json(stage / "report.json", build_report(plan, result))
