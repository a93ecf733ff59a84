"""The vae-temporal / vae-spatial plugins: chunk plans, checkpoints, and the CLI export."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sora_export.core import engine
from sora_export.core.bundle import dataflow
from sora_export.core.cli import main
from sora_export.core.errors import UsageError
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest, ExportShape, PlannedComponent, bytes_per_param
from sora_export.core.verify.chain import run_chain
from sora_export.core.weights import WeightSource, seeded_init_
from sora_export.plugins.vae.plugin import (
    SpatialVAEDescription,
    TemporalVAEDescription,
    group_stages,
    micro_chunk,
    warmup_stages,
)
from sora_export.plugins.vae.spatial import (
    SPATIAL_VAE_CONFIGS,
    SpatialVAEDecoder,
)
from sora_export.plugins.vae.temporal import (
    OPEN_SORA_V12_SCALE,
    OPEN_SORA_V12_SHIFT,
    TEMPORAL_VAE_CONFIGS,
    TemporalVAEDecoder,
    build_temporal_chunk,
    temporal_stage_names,
)

MODULE = "sora_export.plugins.vae.plugin"
# Harmless when the entry point is installed: a module already registered is skipped.
PLUGIN_ARGS = ["--plugin-module", MODULE]
TINY_T = TEMPORAL_VAE_CONFIGS["tiny"]
TINY_S = SPATIAL_VAE_CONFIGS["tiny"]
# 100k fp32 parameters per chunk: 6 temporal and 3 spatial chunks of the tiny decoders.
SMALL_BUDGET = 400_000

PROFILE_TOML = """
name = "vae-test"
description = "small shape, small chunks, fp32"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_ONLY"
memory_budget_bytes = 2_000_000_000
activation_reserve_bytes = 1_000_000_000
chunk_budget_bytes = {budget}

[quantization]
default = "fp32"

[[shapes]]
name = "small"
height = {height}
width = {width}
num_frames = {frames}
default = true
"""


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny convolutions are dominated by thread hand-off on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _profile(tmp_path: Path, budget: int = SMALL_BUDGET, hw=(64, 48), frames: int = 17) -> Path:
    path = tmp_path / f"vae-test-{budget}-{hw[0]}x{hw[1]}x{frames}.toml"
    text = PROFILE_TOML.format(budget=budget, height=hw[0], width=hw[1], frames=frames)
    path.write_text(text)
    return path


def _registry() -> Registry:
    return Registry.discover(extra_modules=[MODULE])


def _plan(tmp_path: Path, profile: Path, weights=None, size: str = "tiny", seed: int = 0):
    request = ExportRequest(
        plugins=("vae",),
        profile=str(profile),
        output=tmp_path / "out",
        weights=weights or {},
        size=size,
        seed=seed,
    )
    return engine.plan(request, _registry())


def _components(plan) -> dict[str, PlannedComponent]:
    return {c.spec.name: c for c in plan.components}


def _chain(component: PlannedComponent, x: torch.Tensor) -> torch.Tensor:
    chunks = component.chunks
    first, last = chunks[0], chunks[-1]
    values = run_chain(chunks, {first.inputs[0].name: x})
    return values[f"{last.key}:{last.outputs[0].name}"]


def _temporal_whole(desc: TemporalVAEDescription) -> TemporalVAEDecoder:
    return TemporalVAEDecoder(desc.cfg, desc.latent_frames, num_frames=desc.num_frames)


# ------------------------------------------------------------------ registration


def test_vae_alias_selects_both_components_in_pipeline_order() -> None:
    registry = _registry()
    components, transforms = registry.resolve(["vae"])
    assert [c.name for c in components] == ["vae-temporal", "vae-spatial"]
    assert [c.order for c in components] == [30, 40] and transforms == []
    (only,), _ = registry.resolve(["vae-spatial"])
    assert only.name == "vae-spatial"
    temporal, spatial = components
    assert temporal.links["z"].source == "stdit3:velocity"
    assert spatial.links["latents"].source == "vae-temporal:latents"


# ------------------------------------------------------------------ chunk plans


@pytest.mark.parametrize(
    ("hw", "frames", "latent_frames"),
    [((64, 48), 17, 5), ((32, 32), 9, 3)],  # one full micro-chunk; a video shorter than one
)
def test_small_budget_chunks_chain_to_whole_decoders(
    tmp_path: Path, hw: tuple[int, int], frames: int, latent_frames: int
) -> None:
    plan = _plan(tmp_path, _profile(tmp_path, hw=hw, frames=frames), seed=3)
    comps = _components(plan)
    assert list(comps) == ["vae-temporal", "vae-spatial"]
    h, w = hw[0] // 8, hw[1] // 8
    max_params = SMALL_BUDGET / bytes_per_param("fp32")
    for name, comp in comps.items():
        chunks = comp.chunks
        assert len(chunks) >= 3, name
        assert [c.index for c in chunks] == list(range(len(chunks)))
        stages = [s for c in chunks for s in c.meta["stages"]]
        assert stages == comp.description.stage_names()
        for c in chunks:
            assert c.params <= max_params or len(c.meta["stages"]) == 1, c.key
            assert {s.name for s in c.inputs}.isdisjoint(s.name for s in c.outputs)
        assert not (tmp_path / "out").exists(), "planning must not write anything"

    temporal = comps["vae-temporal"]
    desc_t = temporal.description
    assert (desc_t.latent_frames, desc_t.num_frames) == (latent_frames, frames)
    assert temporal.chunks[0].inputs[0].shape == (1, 4, latent_frames, h, w)
    assert temporal.chunks[-1].outputs[0].shape == (1, 4, frames, h, w)
    z = torch.randn(1, 4, latent_frames, h, w, generator=torch.Generator().manual_seed(1))
    whole_t = seeded_init_(_temporal_whole(desc_t), seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(_chain(temporal, z), whole_t(z), rtol=0, atol=1e-5)

    spatial = comps["vae-spatial"]
    assert spatial.chunks[0].inputs[0].shape == (4, 4, h, w)
    assert spatial.chunks[-1].outputs[0].shape == (4, 3, 8 * h, 8 * w)
    x = torch.randn(4, 4, h, w, generator=torch.Generator().manual_seed(2))
    whole_s = seeded_init_(SpatialVAEDecoder(spatial.description.cfg), seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(_chain(spatial, x), whole_s(x), rtol=0, atol=1e-5)


def test_chunk_names_wiring_and_example_inputs(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _profile(tmp_path), seed=4)
    comps = _components(plan)
    assert [c.name for c in comps["vae-temporal"].chunks] == [
        "pre",
        "res",
        "up3",
        "up2",
        "up1",
        "up0-out",
    ]
    assert [c.name for c in comps["vae-spatial"].chunks] == ["in-up0", "up1-up2", "up3-out"]
    for comp in comps.values():
        chunks = comp.chunks
        first = chunks[0]
        pipeline_in = first.inputs[0].name
        assert first.wiring == {pipeline_in: f"pipeline:{pipeline_in}"}
        assert "config" in first.meta
        for prev, chunk in itertools.pairwise(chunks):
            assert chunk.inputs[0].name == "x"
            assert chunk.wiring == {"x": f"{prev.key}:x_out"}
            assert prev.outputs[0].shape == chunk.inputs[0].shape
        # tiny: a later chunk's example input is what the earlier chunks make of the first's
        examples = [c.example_inputs() for c in chunks]
        for chunk, example in zip(chunks, examples, strict=True):
            assert [tuple(t.shape) for t in example] == [s.shape for s in chunk.inputs]
        values = run_chain(chunks, {pipeline_in: examples[0][0]})
        for prev, (example,) in zip(chunks, examples[1:], strict=False):
            torch.testing.assert_close(example, values[f"{prev.key}:x_out"], rtol=0, atol=1e-5)
        assert torch.equal(examples[1][0], chunks[1].example_inputs()[0])  # deterministic
    meta = comps["vae-temporal"].chunks[0].meta
    assert meta["micro_chunk"] == {"latent_frames": 5, "num_frames": 17}
    assert comps["vae-spatial"].chunks[0].meta["micro_batch"] == 4


def test_full_size_examples_use_noise_past_the_first_stage() -> None:
    shape = ExportShape("256", 256, 256, 68, default=True)
    full_t = TEMPORAL_VAE_CONFIGS["full"]
    desc_t = TemporalVAEDescription(
        full_t, WeightSource(seed=0), shape, *micro_chunk(full_t, shape)
    )
    desc_s = SpatialVAEDescription(SPATIAL_VAE_CONFIGS["full"], WeightSource(seed=0), shape)
    assert warmup_stages(desc_t, "res") == ("pre",)
    assert warmup_stages(desc_t, "up.3") == ()
    assert warmup_stages(desc_s, "mid") == ("in",)
    assert warmup_stages(desc_s, "up.0") == ()
    tiny_t = TemporalVAEDescription(TINY_T, WeightSource(seed=0), shape, 5, 17)
    assert warmup_stages(tiny_t, "out") == tuple(temporal_stage_names(TINY_T)[:-1])


def test_single_stage_over_budget_gets_its_own_chunk(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _profile(tmp_path, budget=4))  # one fp32 parameter per chunk
    for comp in plan.components:
        assert [c.meta["stages"] for c in comp.chunks] == [
            [s] for s in comp.description.stage_names()
        ]
        assert all(c.meta.get("over_budget") for c in comp.chunks)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(st.integers(1, 1000), min_size=1, max_size=12),
    max_params=st.integers(1, 3000),
)
def test_group_stages_is_greedy_ordered_and_within_budget(
    params: list[int], max_params: int
) -> None:
    names = [f"s{i}" for i in range(len(params))]
    count = dict(zip(names, params, strict=True))
    groups = group_stages(names, count, max_params)
    assert [n for g in groups for n in g] == names
    for i, group in enumerate(groups):
        total = sum(count[n] for n in group)
        assert total <= max_params or len(group) == 1
        if i + 1 < len(groups):  # greedy: the next stage would not have fitted
            assert total + count[groups[i + 1][0]] > max_params


# ------------------------------------------------------------------ checkpoints


def _opensora_vae_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny OpenSora-VAE-v1.2 checkpoint: both decoders, both encoders' stand-ins, buffers."""
    temporal = seeded_init_(TemporalVAEDecoder(TINY_T), seed=seed).state_dict()
    spatial = seeded_init_(SpatialVAEDecoder(TINY_S), seed=seed + 1).state_dict()
    state = {f"temporal_vae.{k}": v for k, v in temporal.items() if k not in ("shift", "scale")}
    state |= {f"spatial_vae.module.{k}": v for k, v in spatial.items()}
    state["shift"] = torch.tensor(OPEN_SORA_V12_SHIFT).reshape(1, 4, 1, 1, 1)
    state["scale"] = torch.tensor(OPEN_SORA_V12_SCALE).reshape(1, 4, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    for key, shape in {
        "temporal_vae.encoder.conv_in.conv.weight": (16, 4, 3, 3, 3),
        "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
        "spatial_vae.module.encoder.conv_in.weight": (16, 3, 3, 3),
        "spatial_vae.module.quant_conv.weight": (8, 8, 1, 1),
    }.items():
        state[key] = torch.randn(shape, generator=g)
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def vae_state() -> dict[str, torch.Tensor]:
    return _opensora_vae_state(seed=21)


def _save(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt-module":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:  # a trainer checkpoint: nested under "state_dict", keys under "model."
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("safetensors", ".safetensors"), ("pt-module", ".pt"), ("nested", ".ckpt")]
)
def test_opensora_checkpoint_plans_both_and_chains(
    tmp_path: Path, vae_state, fmt: str, suffix: str
) -> None:
    path = _save(vae_state, tmp_path / f"vae{suffix}", fmt)
    # the same file for both components; --size full is overruled by the checkpoint shapes
    plan = _plan(
        tmp_path,
        _profile(tmp_path),
        weights={"vae-temporal": path, "vae-spatial": path},
        size="full",
    )
    comps = _components(plan)
    temporal, spatial = comps["vae-temporal"], comps["vae-spatial"]
    assert temporal.description.cfg == TINY_T and spatial.description.cfg == TINY_S
    assert len(temporal.chunks) >= 3 and len(spatial.chunks) >= 3

    whole_t = _temporal_whole(temporal.description)
    whole_t.load_state_dict(
        {
            k: vae_state[k if k in ("shift", "scale") else f"temporal_vae.{k}"]
            for k in whole_t.state_dict()
        },
        strict=True,
    )
    whole_s = SpatialVAEDecoder(TINY_S)
    whole_s.load_state_dict(
        {k: vae_state[f"spatial_vae.module.{k}"] for k in whole_s.state_dict()}, strict=True
    )
    z = torch.randn(1, 4, 5, 8, 6, generator=torch.Generator().manual_seed(5))
    x = torch.randn(4, 4, 8, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(_chain(temporal, z), whole_t.eval()(z), rtol=0, atol=1e-5)
        torch.testing.assert_close(_chain(spatial, x), whole_s.eval()(x), rtol=0, atol=1e-5)
    # the pre chunk carries the checkpoint's shift/scale, not seeded ones
    pre = temporal.chunks[0].build()
    assert torch.equal(pre.scale, vae_state["scale"]) and torch.equal(pre.shift, vae_state["shift"])


def test_each_stage_reads_only_its_own_keys(tmp_path: Path, vae_state) -> None:
    path = _save(vae_state, tmp_path / "vae.safetensors", "safetensors")
    plan = _plan(tmp_path, _profile(tmp_path), weights={"vae-temporal": path})
    (temporal,) = (c for c in plan.components if c.spec.name == "vae-temporal")
    up3 = next(c for c in temporal.chunks if c.name == "up3").build()
    expected = build_temporal_chunk(TINY_T, ["up.3"]).state_dict().keys()
    assert set(up3.state_dict()) == set(expected)
    for key, value in up3.state_dict().items():
        assert torch.equal(value, vae_state[f"temporal_vae.{key}"]), key


def test_builders_and_input_makers_pickle(tmp_path: Path, vae_state) -> None:
    """Chunks travel to worker processes (--jobs): builders and input makers must pickle."""
    path = _save(vae_state, tmp_path / "vae.safetensors", "safetensors")
    plan = _plan(tmp_path, _profile(tmp_path), weights={"vae-spatial": path})
    for comp in plan.components:
        chunk = comp.chunks[-1]
        build = pickle.loads(pickle.dumps(chunk.build))
        example = pickle.loads(pickle.dumps(chunk.example_inputs))
        assert build == chunk.build and example == chunk.example_inputs
        (x,) = example()
        with torch.no_grad():
            out = build().eval()(x)
        assert tuple(out.shape) == chunk.outputs[0].shape


def _cli_refuses(tmp_path: Path, args: list[str], capsys) -> str:
    out = tmp_path / "out"
    code = main(["--plugins", "vae", *PLUGIN_ARGS, "-o", str(out), *args])
    assert code == 2
    assert not out.exists() and not out.with_name("out.partial").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("component", "edit", "size", "named"),
    [
        ("vae-temporal", "drop", "tiny", "temporal_vae.decoder.res_blocks.1.conv2.conv.weight"),
        ("vae-temporal", "drop", "full", "temporal_vae.decoder.res_blocks.1.conv2.conv.weight"),
        ("vae-temporal", "drop", "tiny", "shift"),
        ("vae-temporal", "shape", "tiny", "temporal_vae.decoder.conv_blocks.2.conv.bias"),
        (
            "vae-spatial",
            "drop",
            "tiny",
            "spatial_vae.module.decoder.mid_block.attentions.0.to_k.bias",
        ),
        (
            "vae-spatial",
            "shape",
            "tiny",
            "spatial_vae.module.decoder.up_blocks.1.resnets.0.conv1.weight",
        ),
        ("vae-spatial", "extra", "tiny", "spatial_vae.module.decoder.up_blocks.9.conv.weight"),
        ("vae-spatial", "extra", "tiny", "ema_decay"),
    ],
)
def test_bad_checkpoint_is_refused_naming_the_key(
    tmp_path: Path, vae_state, capsys, component: str, edit: str, size: str, named: str
) -> None:
    state = dict(vae_state)
    if edit == "drop":
        del state[named]
    elif edit == "shape":
        state[named] = torch.zeros(*state[named].shape[:-1], state[named].shape[-1] + 1)
    else:
        state[named] = torch.zeros(2)
    path = _save(state, tmp_path / "vae.safetensors", "safetensors")
    err = _cli_refuses(tmp_path, ["--weights", f"{component}={path}", "--size", size], capsys)
    assert named in err, err
    word = {"drop": "missing key", "shape": "shape mismatch", "extra": "unexpected key"}[edit]
    assert word in err, err


def test_not_an_opensora_vae_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sd-vae.safetensors"  # a bare diffusers AutoencoderKL: no pipeline keys
    save_file({"decoder.conv_out.weight": torch.zeros(3, 16, 3, 3)}, str(path))
    err = _cli_refuses(tmp_path, ["--weights", f"vae-spatial={path}"], capsys)
    assert "spatial_vae.module.decoder.conv_out.weight" in err


def test_plan_refuses_without_cli(tmp_path: Path, vae_state) -> None:
    state = dict(vae_state)
    del state["scale"]
    path = _save(state, tmp_path / "vae.safetensors", "safetensors")
    with pytest.raises(UsageError, match=r"missing key.*scale"):
        _plan(tmp_path, _profile(tmp_path), weights={"vae-temporal": path})
    # the spatial decoder does not need the temporal buffers
    plan = _plan(tmp_path, _profile(tmp_path), weights={"vae-spatial": path})
    assert [c.spec.name for c in plan.components] == ["vae-temporal", "vae-spatial"]


# ------------------------------------------------------------------ the command line


def test_cli_exports_tiny_vae_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    assert main(["--plugins", "vae", *PLUGIN_ARGS, "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == ["vae-temporal", "vae-spatial"]
    chunks = {c["name"]: c for comp in manifest["components"] for c in comp["chunks"]}
    assert chunks, manifest["components"]
    for chunk in chunks.values():
        assert chunk["path"].endswith(".mlpackage") and (out / chunk["path"]).is_dir()
    assert manifest["dataflow"] == [
        {
            "from": "vae-temporal/pre-out:latents",
            "to": "vae-spatial/in-out:latents",
            "transform": "frames to batch: [1,4,17,h,w] -> [17,4,h,w], decoded in "
            "micro-batches of 4 (pad the last)",
        }
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["verify"]
    for result in report["chunks"]:
        verification = result["verification"]
        assert verification is not None and verification["passed"], result
        assert verification["backend"] == "mil-interpreter"


PIPELINE_EDGES = {
    ("t5", "stdit3"),
    ("stdit3", "vae-temporal"),
    ("vae-temporal", "vae-spatial"),
}


def _check_pipeline(pipeline: list[str], dataflow: list[dict[str, str]]) -> None:
    assert pipeline == ["t5", "stdit3", "vae-temporal", "vae-spatial"]
    edges = {(e["from"].split("/")[0], e["to"].split("/")[0]) for e in dataflow}
    assert edges >= PIPELINE_EDGES, dataflow
    to_temporal = [e for e in dataflow if e["to"].startswith("vae-temporal/")]
    assert [(e["from"].rsplit(":", 1)[1], e["to"].rsplit(":", 1)[1]) for e in to_temporal] == [
        ("velocity", "z")
    ]
    to_spatial = [e for e in dataflow if e["to"].startswith("vae-spatial/")]
    assert [(e["from"].rsplit(":", 1)[1], e["to"].rsplit(":", 1)[1]) for e in to_spatial] == [
        ("latents", "latents")
    ]


def _pipeline_registry() -> Registry:
    registry = _registry()
    if "t5" not in registry.components:
        pytest.skip("the t5 plugin is not installed")
    return registry


def test_whole_tiny_pipeline_plan_has_the_dataflow_edges(tmp_path: Path) -> None:
    registry = _pipeline_registry()
    request = ExportRequest(plugins=("t5", "stdit", "vae"), output=tmp_path / "out")
    plan = engine.plan(request, registry)
    _check_pipeline([c.spec.name for c in plan.components], dataflow(plan))


@pytest.mark.slow  # about 45 s of CPU: it lowers every tiny chunk of all four components
def test_cli_exports_the_whole_tiny_pipeline(tmp_path: Path) -> None:
    _pipeline_registry()
    out = tmp_path / "bundle"
    # a small shape without verification: this checks the assembly, not the fidelity
    profile = _profile(tmp_path, budget=1_000_000_000, hw=(64, 48), frames=17)
    args = ["--plugins", "t5,stdit,vae", *PLUGIN_ARGS, "--profile", str(profile)]
    assert main([*args, "--no-verify", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    _check_pipeline(manifest["pipeline"], manifest["dataflow"])
    for comp in manifest["components"]:
        for chunk in comp["chunks"]:
            assert (out / chunk["path"]).is_dir(), chunk["path"]
