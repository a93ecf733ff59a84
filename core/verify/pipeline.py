"""Bundle-level checks: a component's artifacts chained, and the whole text-to-video pipeline.

Per-chunk verification (:func:`sora_export.core.engine.verify_artifact`) feeds every
artifact its own example inputs, so it cannot see what goes wrong *between* chunks: a
manifest input wired to the wrong output, two packages swapped on disk, an output name a
runtime would not find, fp16 error that grows along a chain. The checks here run the
artifacts the way an on-device runtime does: in manifest order, every input taken from its
manifest ``wiring``. The same chain runs in PyTorch (fp32, the plan's chunks and wiring)
on the same inputs, and the final outputs are compared (PSNR, max abs error, finiteness).

Both checks work from an :class:`ExportPlan` and a bundle directory, so they serve the end
of an export and ``sora-export verify BUNDLE --pipeline`` alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from sora_export.core.backends import get_backend
from sora_export.core.bundle import read_manifest
from sora_export.core.types import Chunk, ExportPlan, TensorSpec, Verification
from sora_export.core.verify.chain import ChunkRunner, run_chain, torch_runner
from sora_export.core.verify.metrics import compare

# The Open-Sora v1.2 text-to-video pipeline, in order (component names as registered).
T5, STDIT3, VAE_TEMPORAL, VAE_SPATIAL = "t5", "stdit3", "vae-temporal", "vae-spatial"
TEXT_TO_VIDEO = (T5, STDIT3, VAE_TEMPORAL, VAE_SPATIAL)
# Names on the component links (see the stdit3 and vae plugins' ComponentSpec.links).
_T5_OUTPUT = "y"
_T5_MASK = "attention_mask"
# Frames the spatial VAE decodes per call when a manifest does not say (upstream's value).
_DEFAULT_MICRO_BATCH = 4


# -- results -----------------------------------------------------------------------------
@attrs.frozen
class ChainCheck:
    """One component's artifacts chained by their manifest wiring, against PyTorch.

    ``verification.seconds`` is the artifact chain's run time, ``reference_seconds`` the
    PyTorch chain's; ``verification.error`` is set when either chain could not run (a
    missing or unwired input, a runner failure), and the check then fails.
    """

    component: str
    target: str
    chunks: tuple[str, ...] = attrs.field(converter=tuple)
    verification: Verification

    @property
    def name(self) -> str:
        return self.component

    @property
    def passed(self) -> bool:
        return self.verification.passed


@attrs.frozen(eq=False)
class PipelineCheck:
    """The whole text-to-video pipeline through the artifacts, against PyTorch.

    ``videos`` maps ``"pytorch"`` and the target name to float32 videos ``[3, F, H, W]``
    (the decoder's values, about [-1, 1], not clipped); it is empty when a run failed.
    """

    target: str
    steps: int
    verification: Verification
    videos: Mapping[str, np.ndarray] = attrs.field(factory=dict)

    name = "text-to-video"

    @property
    def passed(self) -> bool:
        return self.verification.passed


# -- the bundle as a runtime sees it ---------------------------------------------------------
def _component_entry(manifest: Mapping[str, Any], component: str, target: str) -> dict[str, Any]:
    for entry in manifest.get("components", []):
        if entry.get("name") == component and entry.get("target") == target:
            return entry
    raise ValueError(f"the manifest has no {component!r} component for target {target!r}")


def _spec(entry: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(entry["name"], tuple(entry["shape"]), entry.get("dtype", "float32"))


def manifest_chunks(
    plan: ExportPlan, manifest: Mapping[str, Any], component: str, target: str
) -> list[Chunk]:
    """A component's chunks as the manifest lists them for ``target``.

    Order, input/output names and shapes, and wiring come from the manifest (what a
    runtime follows); only ``build`` and ``example_inputs`` come from the plan's chunk of
    the same name. Raises ValueError when the manifest and the plan disagree on which
    chunks exist.
    """
    planned = {
        c.name: c for comp in plan.components if comp.spec.name == component for c in comp.chunks
    }
    entries = _component_entry(manifest, component, target)["chunks"]
    listed = [e["name"] for e in entries]
    unknown = [n for n in listed if n not in planned]
    missing = [n for n in planned if n not in listed]
    if unknown or missing:
        raise ValueError(
            f"{component}: manifest chunks {listed} do not match the plan's {list(planned)}"
        )
    return [
        attrs.evolve(
            planned[e["name"]],
            index=e.get("index", planned[e["name"]].index),
            inputs=tuple(_spec(s) for s in e["inputs"]),
            outputs=tuple(_spec(s) for s in e["outputs"]),
            wiring=dict(e.get("wiring", {})),
        )
        for e in entries
    ]


class ArtifactRunner:
    """A :data:`ChunkRunner` that runs a chunk's saved artifact from the bundle.

    Inputs are converted to the dtypes the manifest declares; the first function of the
    artifact runs (``main``, or ``plain`` for a multifunction package, which is the
    unpatched model :func:`torch_runner` builds). Outputs come back as tensors under the
    manifest's output names; an output the artifact does not produce raises KeyError.
    """

    def __init__(self, bundle: Path, manifest: Mapping[str, Any], target: str) -> None:
        self.bundle = Path(bundle)
        self.target = target
        self.backend = get_backend(target)
        self._entries = {
            f"{comp['name']}/{ch['name']}": ch
            for comp in manifest.get("components", [])
            if comp.get("target") == target
            for ch in comp["chunks"]
        }

    @property
    def backend_name(self) -> str:
        return self.backend.runner_name()

    def __call__(self, chunk: Chunk, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = self._entries.get(chunk.key)
        if entry is None or not entry.get("path"):
            raise FileNotFoundError(f"{chunk.key}: no {self.target} artifact in the manifest")
        feed = {
            spec["name"]: inputs[spec["name"]].detach().cpu().numpy().astype(spec["dtype"])
            for spec in entry["inputs"]
        }
        functions = entry.get("functions") or ["main"]
        out = self.backend.run(self.bundle / entry["path"], feed, functions[0])
        result = {}
        for spec in entry["outputs"]:
            if spec["name"] not in out:
                raise KeyError(
                    f"{chunk.key}: artifact has no output {spec['name']!r} "
                    f"(it gives {', '.join(sorted(out))})"
                )
            value = torch.from_numpy(np.ascontiguousarray(out[spec["name"]]))
            result[spec["name"]] = value.float() if value.is_floating_point() else value
        return result


def _threshold(
    plan: ExportPlan, manifest: Mapping[str, Any], components: Sequence[str], target: str
) -> float:
    """The bar of a chain: the per-chunk error budgets added up.

    Each chunk may lose up to its threshold's worth of error power (relative to the
    signal peak); independent errors add in power through a chain, so a chain of chunks
    with bars T_i is held to -10*log10(sum 10^(-T_i/10)) dB: three int8 chunks at 30 dB
    give 25.2 dB, one fp32 and two fp16 chunks give 32 dB.
    """
    bars = [
        plan.profile.threshold_for(ch.get("quantization") or "fp16")
        for component in components
        for ch in _component_entry(manifest, component, target)["chunks"]
    ]
    if not bars:
        return plan.profile.threshold_for("fp16")
    return -10.0 * math.log10(sum(10.0 ** (-bar / 10.0) for bar in bars))


def _failed(backend: str, threshold: float, error: str, seconds: float = 0.0) -> Verification:
    return Verification(
        backend=backend,
        psnr_db=-math.inf,
        max_abs_err=math.inf,
        finite=False,
        threshold_db=threshold,
        passed=False,
        seconds=seconds,
        error=error,
    )


def _verdict(
    backend: str,
    threshold: float,
    reference: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    seconds: float,
    reference_seconds: float,
) -> Verification:
    fid = compare(reference, actual)
    return Verification(
        backend=backend,
        psnr_db=fid.psnr_db,
        max_abs_err=fid.max_abs_err,
        finite=fid.finite,
        threshold_db=threshold,
        passed=fid.finite and fid.psnr_db >= threshold,
        seconds=seconds,
        reference_seconds=reference_seconds,
        note="" if fid.finite else "the artifact chain produced inf/NaN",
    )


def _pipeline_inputs(chunks: Sequence[Chunk]) -> dict[str, torch.Tensor]:
    """The component's pipeline inputs, from the example inputs of the chunks taking them."""
    values: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        wanted = [
            s.name
            for s in chunk.inputs
            if chunk.wiring.get(s.name, f"pipeline:{s.name}").startswith("pipeline:")
        ]
        if not wanted or all(n in values for n in wanted):
            continue
        for spec, tensor in zip(chunk.inputs, chunk.example_inputs(), strict=True):
            source = chunk.wiring.get(spec.name, f"pipeline:{spec.name}")
            if source.startswith("pipeline:"):
                values.setdefault(source.removeprefix("pipeline:"), tensor.contiguous())
    return values


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- component chains --------------------------------------------------------------------
def check_component_chain(
    plan: ExportPlan,
    bundle: Path,
    target: str,
    component: str,
    manifest: Mapping[str, Any] | None = None,
) -> ChainCheck:
    """Chain one component's artifacts by the manifest and compare with PyTorch.

    Both chains start from the example inputs of the chunks that take pipeline inputs
    (the first chunk, for every built-in component). The artifact chain follows the
    manifest (order, names, wiring; :class:`ArtifactRunner`), the reference chain the
    plan (:func:`torch_runner`, fp32). The outputs of the plan's last chunk are compared
    with the same outputs of the artifact chain; the check passes when they are finite
    and reach the loosest PSNR bar among the component's chunks. ``manifest`` defaults to
    ``bundle/manifest.json``. Never raises for a faulty bundle: failures are in the
    returned check's verification (``error`` when a chain could not run).
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle) if manifest is None else manifest
    runner = ArtifactRunner(bundle, manifest, target)
    planned = next((c for c in plan.components if c.spec.name == component), None)
    if planned is None:
        raise ValueError(f"component {component!r} is not in the plan")
    names = tuple(c.name for c in planned.chunks)
    try:
        threshold = _threshold(plan, manifest, [component], target)
        chunks = manifest_chunks(plan, manifest, component, target)
    except (ValueError, KeyError) as exc:
        threshold = plan.profile.threshold_for("fp16")
        return ChainCheck(
            component, target, names, _failed(runner.backend_name, threshold, _describe(exc))
        )
    last = planned.chunks[-1]
    wanted = [f"{last.key}:{s.name}" for s in last.outputs]
    inputs = _pipeline_inputs(planned.chunks)
    start = time.perf_counter()
    try:
        reference = run_chain(planned.chunks, inputs, torch_runner)
    except Exception as exc:
        error = f"PyTorch chain failed: {_describe(exc)}"
        return ChainCheck(component, target, names, _failed(runner.backend_name, threshold, error))
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        actual = run_chain(chunks, inputs, runner)
        missing = [k for k in wanted if k not in actual]
        if missing:
            raise KeyError(f"the artifact chain does not produce {', '.join(missing)}")
    except Exception as exc:
        error = f"artifact chain failed: {_describe(exc)}"
        seconds = time.perf_counter() - start
        return ChainCheck(
            component, target, names, _failed(runner.backend_name, threshold, error, seconds)
        )
    seconds = time.perf_counter() - start
    verification = _verdict(
        runner.backend_name,
        threshold,
        {k: reference[k].float().numpy() for k in wanted},
        {k: actual[k].float().numpy() for k in wanted},
        seconds,
        reference_seconds,
    )
    return ChainCheck(component, target, names, verification)


def check_component_chains(
    plan: ExportPlan, bundle: Path, target: str, manifest: Mapping[str, Any] | None = None
) -> list[ChainCheck]:
    """:func:`check_component_chain` for every component of the plan, in pipeline order."""
    manifest = read_manifest(Path(bundle)) if manifest is None else manifest
    return [
        check_component_chain(plan, bundle, target, comp.spec.name, manifest)
        for comp in plan.components
    ]


# -- the text-to-video pipeline ------------------------------------------------------------
def has_text_to_video(plan: ExportPlan) -> bool:
    """Whether the plan holds every component of :data:`TEXT_TO_VIDEO`."""
    present = {c.spec.name for c in plan.components}
    return all(name in present for name in TEXT_TO_VIDEO)


def _component_fn(
    chunks: Sequence[Chunk], runner: ChunkRunner
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The component as a function: pipeline inputs -> outputs of its last chunk."""
    last = chunks[-1]

    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = run_chain(chunks, inputs, runner)
        return {s.name: values[f"{last.key}:{s.name}"] for s in last.outputs}

    return run


def _single(chunks: Sequence[Chunk], runner: ChunkRunner) -> Callable[[torch.Tensor], torch.Tensor]:
    """A one-input, one-output component (the VAE decoders) as a tensor function."""
    fn = _component_fn(chunks, runner)
    (source,) = {chunks[0].wiring.get(s.name, f"pipeline:{s.name}") for s in chunks[0].inputs}
    (output,) = chunks[-1].outputs
    name = source.removeprefix("pipeline:")
    return lambda x: fn({name: x})[output.name]


@attrs.frozen
class _Pipeline:
    """Everything one text-to-video run needs besides its runner."""

    t5: Sequence[Chunk]
    stdit3: Sequence[Chunk]
    temporal: Sequence[Chunk]
    spatial: Sequence[Chunk]
    null_caption: torch.Tensor  # [L, C]


def _text_to_video(
    pipe: _Pipeline,
    runner: ChunkRunner,
    plan: ExportPlan,
    steps: int,
) -> np.ndarray:
    """Prompt -> T5 -> guided rectified-flow sampling with STDiT3 -> VAE -> video [3,F,H,W].

    Every model evaluation goes through ``runner``; everything between components (the
    guidance batch, the sampler, frames to batch) is the plain-PyTorch reference a runtime
    mirrors. Inputs and the initial noise depend only on the plan's seed.
    """
    from sora_export.plugins.lpl.plugin import settings_from_profile
    from sora_export.plugins.lpl.sampler import LPLSettings, guided_velocity, sample
    from sora_export.plugins.vae.spatial import decode_video

    stdit_component = next(c for c in plan.components if c.spec.name == STDIT3)
    shape = stdit_component.context.shape
    prompt = _pipeline_inputs(pipe.t5)
    y = _component_fn(pipe.t5, runner)(prompt)[_T5_OUTPUT]  # [1, L, C]
    # fps/height/width conditioning: the stdit3 plugin's example values (one batch row)
    example = dict(
        zip((s.name for s in pipe.stdit3[0].inputs), pipe.stdit3[0].example_inputs(), strict=True)
    )
    cond = {
        "y": y.unsqueeze(1),
        "mask": prompt[_T5_MASK].float(),
        "fps": example["fps"][:1],
        "height": example["height"][:1],
        "width": example["width"][:1],
    }
    null = {"y": pipe.null_caption.reshape(1, 1, *pipe.null_caption.shape).float()}
    stdit = _component_fn(pipe.stdit3, runner)
    (velocity_out,) = pipe.stdit3[-1].outputs

    def model(x: torch.Tensor, timestep: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return stdit({"x": x, "timestep": timestep, **kwargs})[velocity_out.name]

    keep = int(pipe.stdit3[-1].meta.get("keep_channels", 4))
    settings = attrs.evolve(
        settings_from_profile(plan.profile), num_steps=steps, lpl=LPLSettings(mode="off")
    )
    velocity = guided_velocity(model, cond, null, settings.cfg_scale, in_channels=keep)
    x_spec = next(s for s in pipe.stdit3[0].inputs if s.name == "x")
    g = torch.Generator().manual_seed(plan.request.seed)
    z = torch.randn((1, *x_spec.shape[1:]), generator=g)
    latent = sample(
        velocity,
        z,
        settings,
        height=shape.height,
        width=shape.width,
        num_frames=shape.num_frames,
    ).latent
    micro_batch = int(pipe.spatial[0].meta.get("micro_batch", _DEFAULT_MICRO_BATCH))
    video = decode_video(
        _single(pipe.temporal, runner),
        _single(pipe.spatial, runner),
        latent,
        micro_batch,
        num_frames=shape.num_frames,
        static_batch=True,  # fixed-shape artifacts: pad the last micro-batch
    )
    return video[0].float().numpy()


def _link_error(plan: ExportPlan) -> str:
    """Why T5's caption cannot feed STDiT3 in this plan ("" when it can).

    The guidance batch turns t5 ``y`` [1, L, C] into stdit3 ``y`` [2, 1, L, C] and the
    text mask [1, L] into [2, L]; anything else would fail deep inside a chunk with a
    message about matrix shapes.
    """
    by_name = {c.spec.name: c for c in plan.components}
    t5_y = next(s for s in by_name[T5].chunks[-1].outputs if s.name == _T5_OUTPUT)
    t5_mask = next(s for s in by_name[T5].chunks[0].inputs if s.name == _T5_MASK)
    stdit_in = {s.name: s for s in by_name[STDIT3].chunks[0].inputs}
    y, mask = stdit_in["y"], stdit_in["mask"]
    if tuple(y.shape[1:]) != (1, *t5_y.shape[1:]) or tuple(mask.shape[1:]) != tuple(
        t5_mask.shape[1:]
    ):
        return (
            f"t5 output y {list(t5_y.shape)} (mask {list(t5_mask.shape)}) cannot feed stdit3 "
            f"input y {list(y.shape)} (mask {list(mask.shape)}): caption length and width "
            "must match (T5 d_model = STDiT3 caption_channels, max_length = model_max_length)"
        )
    return ""


def _bundle_null_caption(bundle: Path, manifest: Mapping[str, Any]) -> torch.Tensor:
    section = manifest.get(STDIT3, {}).get("null_caption")
    if not section:
        raise ValueError("the manifest has no stdit3 null_caption entry")
    return torch.from_numpy(np.load(Path(bundle) / section["path"]))


def check_text_to_video(
    plan: ExportPlan,
    bundle: Path,
    target: str,
    steps: int = 2,
    manifest: Mapping[str, Any] | None = None,
) -> PipelineCheck:
    """Generate a video with the bundle's artifacts and with PyTorch; compare the videos.

    Requires every component of :data:`TEXT_TO_VIDEO` in the plan (ValueError otherwise).
    One run: the T5 plugin's example prompt -> T5 chunks -> ``y``; the guidance batch
    ``[y; null caption]`` with the text mask twice; ``steps`` Euler steps of the
    rectified-flow sampler (the profile's ``[plugins.lpl]`` guidance scale and timestep
    transform, LPL off) from seeded noise at the stdit3 export shape, the velocity being
    the stdit3 chunks chained, channels ``0..keep_channels-1`` kept; the latent through
    vae-temporal per micro-chunk, frames to batch, vae-spatial in micro-batches (the last
    zero-padded). The artifact run takes chunks and wiring from the manifest and the null
    caption from the bundle's file; the PyTorch run uses the plan's chunks (fp32) and the
    stdit3 plugin's null caption. Same seed, same inputs. Passes when the artifact video
    is finite and reaches the loosest per-chunk PSNR bar of the four components. Never
    raises for a faulty bundle (the failure is in ``verification.error``).
    """
    from sora_export.plugins.stdit3.plugin import null_caption

    if not has_text_to_video(plan):
        raise ValueError(f"the text-to-video check needs components {', '.join(TEXT_TO_VIDEO)}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle) if manifest is None else manifest
    runner = ArtifactRunner(bundle, manifest, target)
    by_name = {c.spec.name: c for c in plan.components}
    try:
        threshold = _threshold(plan, manifest, TEXT_TO_VIDEO, target)
        if error := _link_error(plan):
            raise ValueError(error)
        artifact_pipe = _Pipeline(
            *(manifest_chunks(plan, manifest, name, target) for name in TEXT_TO_VIDEO),
            null_caption=_bundle_null_caption(bundle, manifest),
        )
    except (ValueError, KeyError, OSError) as exc:
        threshold = plan.profile.threshold_for("fp16")
        return PipelineCheck(target, steps, _failed(runner.backend_name, threshold, _describe(exc)))
    torch_pipe = _Pipeline(
        *(by_name[name].chunks for name in TEXT_TO_VIDEO),
        null_caption=null_caption(by_name[STDIT3].description),
    )
    start = time.perf_counter()
    try:
        reference = _text_to_video(torch_pipe, torch_runner, plan, steps)
    except Exception as exc:
        error = f"PyTorch pipeline failed: {_describe(exc)}"
        return PipelineCheck(target, steps, _failed(runner.backend_name, threshold, error))
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        actual = _text_to_video(artifact_pipe, runner, plan, steps)
    except Exception as exc:
        error = f"artifact pipeline failed: {_describe(exc)}"
        seconds = time.perf_counter() - start
        return PipelineCheck(target, steps, _failed(runner.backend_name, threshold, error, seconds))
    seconds = time.perf_counter() - start
    verification = _verdict(
        runner.backend_name,
        threshold,
        {"video": reference},
        {"video": actual},
        seconds,
        reference_seconds,
    )
    return PipelineCheck(target, steps, verification, {"pytorch": reference, target: actual})


# -- everything at once ------------------------------------------------------------------
BundleCheck = ChainCheck | PipelineCheck
FRAMES_FILE = "frames.png"


def pipeline_checks(
    plan: ExportPlan,
    bundle: Path,
    manifest: Mapping[str, Any] | None = None,
    steps: int = 2,
) -> list[BundleCheck]:
    """Every bundle-level check, per target of the manifest (in the plan's target order):
    :func:`check_component_chains`, then :func:`check_text_to_video` when the plan holds
    the whole text-to-video pipeline."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle) if manifest is None else manifest
    present = {entry.get("target") for entry in manifest.get("components", [])}
    checks: list[BundleCheck] = []
    for target in (t for t in plan.targets if t in present):
        checks += check_component_chains(plan, bundle, target, manifest)
        if has_text_to_video(plan):
            checks.append(check_text_to_video(plan, bundle, target, steps, manifest))
    return checks


def write_frames(checks: Sequence[BundleCheck], path: Path, frames: int = 8) -> Path | None:
    """Write the text-to-video frames as a PNG strip (:func:`~sora_export.core.verify.png.
    frame_strip`): the PyTorch video on top, then one row per target whose pipeline ran,
    in check order. Returns ``path``, or None (nothing written) when no video was made."""
    from sora_export.core.verify.png import frame_strip

    videos: dict[str, np.ndarray] = {}
    for check in checks:
        if isinstance(check, PipelineCheck) and check.videos:
            videos.setdefault("pytorch", check.videos["pytorch"])
            videos[check.target] = check.videos[check.target]
    if not videos:
        return None
    frame_strip(videos, path, frames)
    return Path(path)
