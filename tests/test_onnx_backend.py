"""ONNX backend: lower the shared torch.export capture, save as a directory, run in ORT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import attrs
import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core import engine
from sora_export.core.backends import atomic_replace, capture
from sora_export.core.backends import onnx as onnx_backend
from sora_export.core.backends.coreml import CoreMLBackend
from sora_export.core.backends.onnx import (
    ONNXBackend,
    dynamic_axes,
    sort_nodes,
    with_external_data,
    write_weights,
)
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, DeviceProfile, ExportPlan, ExportRequest, TensorSpec
from sora_export.core.verify.metrics import psnr_db

B, N, C, HEADS = 2, 6, 32, 4


class TinyBlock(torch.nn.Module):
    """Attention + MLP with the shape arithmetic STDiT3 uses (``B, N, _ = x.shape; view``).

    ``gated`` is a variant that reuses the same weights with a different forward, like a
    multifunction chunk's ``plain`` and patched functions.
    """

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.norm = torch.nn.LayerNorm(C)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.proj = torch.nn.Linear(C, C)
        self.fc1 = torch.nn.Linear(C, 4 * C)
        self.fc2 = torch.nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x) + shift).view(b, n, 3, HEADS, C // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, C))
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        out = x + (torch.sigmoid(h) * h if self.gated else h)
        return out, out.mean(dim=1)


def build_block(gated: bool = False) -> TinyBlock:
    torch.manual_seed(0)
    return TinyBlock(gated).eval()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, N, C, generator=gen), torch.randn(C, generator=gen)


CHUNK = Chunk(
    component="toy",
    index=0,
    name="block",
    build=build_block,
    example_inputs=example_inputs,
    inputs=[TensorSpec("x", (B, N, C)), TensorSpec("shift", (C,))],
    outputs=[TensorSpec("out", (B, N, C)), TensorSpec("pooled", (B, C))],
    params=sum(p.numel() for p in TinyBlock().parameters()),
)


@pytest.fixture(scope="module")
def profile() -> DeviceProfile:
    return Registry.discover().profile("android-arm64")


@pytest.fixture(scope="module")
def program() -> torch.export.ExportedProgram:
    return capture(build_block(), example_inputs())


@pytest.fixture(scope="module")
def before_lowering(program: torch.export.ExportedProgram) -> tuple[str, tuple[torch.Tensor, ...]]:
    """The program's graph code and outputs before any backend has seen it."""
    with torch.no_grad():
        return program.graph_module.code, tuple(program.module()(*example_inputs()))


@pytest.fixture(scope="module")
def lowered(
    program: torch.export.ExportedProgram,
    before_lowering: tuple[str, tuple[torch.Tensor, ...]],
    profile: DeviceProfile,
) -> dict[str, onnx.ModelProto]:
    """fp32 and fp16 lowerings of the same captured program (capture once, lower twice)."""
    backend = ONNXBackend()
    return {p: backend.lower(program, CHUNK, profile, p) for p in ("fp32", "fp16")}


def torch_outputs(module: torch.nn.Module) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*example_inputs())
    return {s.name: t.numpy() for s, t in zip(CHUNK.outputs, out, strict=True)}


def numpy_inputs() -> dict[str, np.ndarray]:
    return {s.name: t.numpy() for s, t in zip(CHUNK.inputs, example_inputs(), strict=True)}


def large_weight_bytes() -> int:
    """fp32 bytes of the parameters big enough for external data (>= 1 KiB each)."""
    return sum(p.numel() * 4 for p in build_block().parameters() if p.numel() * 4 >= 1024)


def assert_every_file_checks(artifact: Path) -> list[Path]:
    files = sorted(artifact.glob("*.onnx"))
    assert files
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)
    return files


def _initializer_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.ByteSize() > 1024}


def test_android_profile_loads_for_onnx(profile: DeviceProfile) -> None:
    from sora_export.plugins.lpl.plugin import settings_from_profile

    assert profile.targets == ("onnx",) and profile.onnx_opset == 18
    assert profile.deployment_target == ""  # Core ML settings are not needed without coreml
    assert profile.per_chunk_budget_bytes == 1_500_000_000  # (4.0 - 1.0) GB / 2 resident
    assert profile.quantization.for_chunk("stdit3", "input") == "fp16"
    assert profile.quantization.for_chunk("t5", "blocks-00-05") == "int8"
    assert profile.threshold_for("fp16") == 35 and profile.threshold_for("fp32") == 60
    assert profile.threshold_for("int8") == 30
    latents = {s.name: (s.latent_frames, *s.latent_hw) for s in profile.shapes}
    assert latents == {"256x256x68": (20, 32, 32), "192x192x68": (20, 24, 24)}
    assert profile.default_shape.name == "256x256x68"
    settings_from_profile(profile)  # [plugins.lpl] passes the plugin's own validation


# -- lower + save + run ----------------------------------------------------------------------
def test_fp32_matches_torch(lowered: dict[str, onnx.ModelProto], tmp_path: Path) -> None:
    backend = ONNXBackend()
    model = lowered["fp32"]
    assert [i.name for i in model.graph.input] == ["x", "shift"]
    assert [o.name for o in model.graph.output] == ["out", "pooled"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert _initializer_types(model) == {onnx.TensorProto.FLOAT}
    artifact = tmp_path / "00-block.onnx"
    assert backend.save({"main": model}, artifact) == ("main",)
    assert artifact.is_dir()
    # 33 k weights (130 kB) are far below the external-data threshold: one self-contained file
    assert [p.name for p in assert_every_file_checks(artifact)] == ["main.onnx"]
    assert not (artifact / onnx_backend.WEIGHTS_FILE).exists()
    got = backend.run(artifact, numpy_inputs())
    want = torch_outputs(build_block())
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32
        assert np.abs(got[name] - want[name]).max() < 1e-5, name


def test_fp16_keeps_fp32_io_and_passes_fidelity(
    lowered: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    backend = ONNXBackend()
    model = lowered["fp16"]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    assert _initializer_types(model) == {onnx.TensorProto.FLOAT16}
    props = {p.key: p.value for p in model.metadata_props}
    assert props["sora_export.precision"] == "fp16" and props["sora_export.chunk"] == CHUNK.key
    artifact = tmp_path / "00-block.onnx"
    backend.save({"main": model}, artifact)
    assert_every_file_checks(artifact)
    got = backend.run(artifact, numpy_inputs())
    want = torch_outputs(build_block())
    for name in want:
        assert got[name].dtype == np.float32
        db = psnr_db(want[name], got[name])
        assert 35.0 <= db < 100.0, (name, db)  # fp16 really is fp16: not bit-exact


def test_lowering_leaves_the_program_usable(
    program: torch.export.ExportedProgram,
    before_lowering: tuple[str, tuple[torch.Tensor, ...]],
    lowered: dict[str, onnx.ModelProto],
) -> None:
    # the same capture feeds the Core ML backend after this one: it must be as captured
    code, outputs = before_lowering
    assert program.graph_module.code == code
    with torch.no_grad():
        again = program.module()(*example_inputs())
    for got, want in zip(again, outputs, strict=True):
        assert torch.equal(got, want)


def test_external_data_for_large_single_function(
    lowered: dict[str, onnx.ModelProto], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    backend = ONNXBackend()
    model = lowered["fp32"]
    before = model.SerializeToString()
    artifact = tmp_path / "00-block.onnx"
    backend.save({"main": model}, artifact)
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    assert_every_file_checks(artifact)
    graph_only = onnx.load(str(artifact / "main.onnx"), load_external_data=False)
    external = [
        t for t in graph_only.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "weights.bin"
    }
    assert len(external) >= 4  # qkv, proj, fc1, fc2 weights at least
    # the weights left the graph file (which gains a few bytes of references per tensor)
    moved = model.ByteSize() - (artifact / "main.onnx").stat().st_size
    assert moved > 0.95 * large_weight_bytes()
    got = backend.run(artifact, numpy_inputs())
    want = torch_outputs(build_block())
    assert np.abs(got["out"] - want["out"]).max() < 1e-5


def test_two_functions_share_one_weights_file(
    program: torch.export.ExportedProgram,
    lowered: dict[str, onnx.ModelProto],
    profile: DeviceProfile,
    tmp_path: Path,
) -> None:
    backend = ONNXBackend()
    gated = backend.lower(
        capture(build_block(gated=True), example_inputs()), CHUNK, profile, "fp32"
    )
    artifact = tmp_path / "01-block.onnx"
    functions = backend.save({"plain": lowered["fp32"], "gated": gated}, artifact)
    assert functions == ("plain", "gated")
    files = assert_every_file_checks(artifact)
    assert sorted(p.name for p in files) == ["gated.onnx", "plain.onnx"]
    assert sorted(p.name for p in artifact.iterdir()) == ["gated.onnx", "plain.onnx", "weights.bin"]
    # one copy of the weights (plus alignment padding), not two
    weight_bytes = large_weight_bytes()
    stored = (artifact / "weights.bin").stat().st_size
    assert weight_bytes <= stored < 1.25 * weight_bytes, (weight_bytes, stored)
    for function, gated_flag in (("plain", False), ("gated", True)):
        got = backend.run(artifact, numpy_inputs(), function)
        want = torch_outputs(build_block(gated=gated_flag))
        assert np.abs(got["out"] - want["out"]).max() < 1e-5, function
    with pytest.raises(FileNotFoundError, match=r"'main'.*gated.*plain"):
        backend.run(artifact, numpy_inputs(), "main")
    with pytest.raises(ValueError, match=r"missing input.*shift"):
        backend.run(artifact, {"x": numpy_inputs()["x"]}, "plain")


def test_run_reloads_a_replaced_artifact(
    lowered: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    backend = ONNXBackend()
    final = tmp_path / "00-block.onnx"
    backend.save({"main": lowered["fp32"]}, final)
    first = backend.run(final, numpy_inputs())["out"]
    tmp = tmp_path / ".tmp-00-block.onnx"
    backend.save({"main": lowered["fp16"]}, tmp)
    atomic_replace(tmp, final)
    second = backend.run(final, numpy_inputs())["out"]
    assert not np.array_equal(first, second)  # a stale cached fp32 session would repeat first
    np.testing.assert_allclose(second, first, atol=0.05)


def test_dynamic_batch_axis_stays_dynamic(profile: DeviceProfile, tmp_path: Path) -> None:
    # the chunk spec gives example sizes; an axis captured with torch.export.Dim stays dynamic
    module = build_block()
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        program = torch.export.export(
            module, example_inputs(), dynamic_shapes={"x": {0: batch}, "shift": None}, strict=False
        ).run_decompositions({})
    backend = ONNXBackend()
    model = backend.lower(program, CHUNK, profile, "fp32")
    axes = dynamic_axes(model)
    assert set(axes) == {"x", "out", "pooled"} and all(set(a) == {0} for a in axes.values())
    artifact = tmp_path / "00-block.onnx"
    backend.save({"main": model}, artifact)
    for b in (1, 3):
        x = torch.randn(b, N, C, generator=torch.Generator().manual_seed(b))
        shift = example_inputs()[1]
        got = backend.run(artifact, {"x": x.numpy(), "shift": shift.numpy()})
        with torch.no_grad():
            want = module(x, shift)[0].numpy()
        assert got["out"].shape == (b, N, C)
        assert np.abs(got["out"] - want).max() < 1e-5


def test_lower_refuses_bad_requests(
    program: torch.export.ExportedProgram, profile: DeviceProfile
) -> None:
    backend = ONNXBackend()
    with pytest.raises(ValueError, match="fp16 or fp32"):
        backend.lower(program, CHUNK, profile, "int8")
    with pytest.raises(ValueError, match="onnx_opset 17 is below 18"):
        backend.lower(program, CHUNK, attrs.evolve(profile, onnx_opset=17), "fp32")
    one_input = attrs.evolve(CHUNK, inputs=CHUNK.inputs[:1])
    with pytest.raises(ValueError, match=r"takes 2 inputs.*declares 1"):
        backend.lower(program, one_input, profile, "fp32")


def test_check_io_names_the_mismatch(lowered: dict[str, onnx.ModelProto]) -> None:
    model = lowered["fp32"]
    wrong_shape = attrs.evolve(CHUNK, outputs=[TensorSpec("out", (B, N, 8)), CHUNK.outputs[1]])
    with pytest.raises(ValueError, match=r"output 'out' has shape \[2, 6, 32\].*\[2, 6, 8\]"):
        onnx_backend.check_io(model, wrong_shape)
    wrong_dtype = attrs.evolve(CHUNK, inputs=[TensorSpec("x", (B, N, C), "int32"), CHUNK.inputs[1]])
    with pytest.raises(ValueError, match=r"input 'x' has dtype float32.*int32"):
        onnx_backend.check_io(model, wrong_dtype)


def test_save_refuses_unsafe_function_names(
    lowered: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="cannot name a file"):
        ONNXBackend().save({"../evil": lowered["fp32"]}, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# -- external data writer and node sorting (hand-built graphs) --------------------------------
def _identity_model(*initializers: tuple[str, np.ndarray]) -> onnx.ModelProto:
    """A graph returning each initializer through Identity (so each one is used)."""
    nodes = [onnx.helper.make_node("Identity", [n], [f"{n}_out"]) for n, _ in initializers]
    outputs = [
        onnx.helper.make_tensor_value_info(f"{n}_out", onnx.TensorProto.FLOAT, a.shape)
        for n, a in initializers
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [],
        outputs,
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in initializers],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_write_weights_stores_equal_bytes_once_and_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(300_000).astype(np.float32)  # 1.2 MB: 64 KiB-aligned
    small = rng.standard_normal(1000).astype(np.float32)
    tiny = np.ones(3, np.float32)  # stays inline
    first = _identity_model(("small", small), ("big", big), ("tiny", tiny))
    second = _identity_model(("renamed_big", big.copy()), ("other", small + 1))
    placements = write_weights([first, second], tmp_path / "weights.bin")
    assert [sorted(p) for p in placements] == [[0, 1], [0, 1]]  # "tiny" stays inline
    (small_at, big_at), (renamed_at, other_at) = ((p[0], p[1]) for p in placements)
    assert renamed_at == big_at  # same bytes under another name: one copy
    assert big_at[0] % 2**16 == 0 and small_at[0] % 64 == 0 and other_at[0] % 64 == 0
    data = (tmp_path / "weights.bin").read_bytes()
    assert len(data) == max(off + length for off, length in (small_at, big_at, other_at))
    for (off, length), array in ((small_at, small), (big_at, big), (other_at, small + 1)):
        assert data[off : off + length] == array.tobytes()
    assert first.graph.initializer[1].raw_data == big.tobytes()  # models untouched
    # the copy that references weights.bin loads back to the same arrays
    (tmp_path / "m.onnx").write_bytes(with_external_data(second, placements[1]).SerializeToString())
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.graph.initializer}
    np.testing.assert_array_equal(arrays["renamed_big"], big)
    np.testing.assert_array_equal(arrays["other"], small + 1)


def _chain_graph(order: list[int], width: int) -> onnx.GraphProto:
    """Node i adds the outputs of nodes i-1 and i//2 (a DAG), listed in ``order``."""
    nodes = []
    for i in range(width):
        a = "x" if i == 0 else f"v{i - 1}"
        b = "x" if i < 2 else f"v{i // 2}"
        nodes.append(onnx.helper.make_node("Add", [a, b], [f"v{i}"], name=f"n{i}"))
    vi = onnx.helper.make_tensor_value_info
    return onnx.helper.make_graph(
        [nodes[i] for i in order],
        "chain",
        [vi("x", onnx.TensorProto.FLOAT, [2])],
        [vi(f"v{width - 1}", onnx.TensorProto.FLOAT, [2])],
    )


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_sort_nodes_gives_a_valid_order(width: int, seed: int) -> None:
    order = list(range(width))
    random.Random(seed).shuffle(order)
    graph = _chain_graph(order, width)
    sort_nodes(graph)
    seen = {"x"}
    for node in graph.node:
        assert set(node.input) <= seen, node.name
        seen.update(node.output)
    assert len(graph.node) == width
    onnx.checker.check_model(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    )
    # an already sorted graph keeps its order exactly
    again = [n.name for n in graph.node]
    sort_nodes(graph)
    assert [n.name for n in graph.node] == again


def test_sort_nodes_reports_a_cycle() -> None:
    graph = _chain_graph([0, 1], 2)
    graph.node[0].input[0] = "v1"  # n0 now waits for n1, which waits for n0
    with pytest.raises(ValueError, match="cycle"):
        sort_nodes(graph)


# -- through the engine and the CLI -----------------------------------------------------------
def _onnx_chunks(manifest: dict) -> list[dict]:
    (component,) = [c for c in manifest["components"] if c["target"] == "onnx"]
    return component["chunks"]


def test_tiny_stdit3_through_the_engine(tmp_path: Path) -> None:
    registry = Registry.discover()
    out = tmp_path / "o"
    plan = engine.plan(
        ExportRequest(plugins=("stdit",), profile="android-arm64", targets=("onnx",), output=out),
        registry,
    )
    assert plan.profile.name == "android-arm64" and plan.targets == ("onnx",)
    result = engine.run(plan, registry)
    assert result.ok
    manifest = json.loads((out / "manifest.json").read_text())
    chunks = _onnx_chunks(manifest)
    assert [c["name"] for c in chunks] == [c.name for c in plan.chunks]
    for entry in chunks:
        path = out / entry["path"]
        assert path.suffix == ".onnx" and path.is_dir()
        assert_every_file_checks(path)
        model = onnx.load(str(path / "main.onnx"), load_external_data=False)
        assert [i.name for i in model.graph.input] == [s["name"] for s in entry["inputs"]]
        assert [o.name for o in model.graph.output] == [s["name"] for s in entry["outputs"]]
    for r in result.results:
        assert r.verification is not None and r.verification.passed
        assert r.verification.backend == "onnxruntime"
        assert r.verification.psnr_db >= 35.0


def test_engine_lowers_one_capture_for_both_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry.discover()
    profile = registry.profile("iphone15pro")
    plan = ExportPlan(
        request=ExportRequest(plugins=(), profile=profile.name, output=tmp_path / "o"),
        profile=profile,
        plugins=(),
        transforms=(),
        components=(),
        targets=("coreml", "onnx"),
        verify=True,
    )
    captured: list[int] = []
    real_capture = engine.capture

    def counting_capture(module: torch.nn.Module, inputs: tuple) -> object:
        captured.append(1)
        return real_capture(module, inputs)

    monkeypatch.setattr(engine, "capture", counting_capture)
    results = engine.export_chunk(CHUNK, plan, registry, set(), tmp_path)
    assert captured == [1]
    assert [r.target for r in results] == ["coreml", "onnx"]
    for r in results:
        assert r.ok, (r.target, r.error, r.verification)
    coreml, onnx_result = results
    assert coreml.artifact.path.endswith(".mlpackage")
    assert onnx_result.artifact.path == "toy/00-block.onnx"
    assert onnx_result.artifact.functions == ("main",)
    assert onnx_result.verification.backend == "onnxruntime"
    assert onnx_result.verification.psnr_db >= 35.0
    assert_every_file_checks(tmp_path / onnx_result.artifact.path)


# Like iphone15pro but for a 64x64x17 video (80 latent tokens instead of 5120), so exporting
# and verifying every chunk for both targets stays a matter of seconds.
SMALL_PROFILE = """
name = "small-both"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 3_300_000_000
activation_reserve_bytes = 700_000_000

[psnr_thresholds_db]
fp32 = 60.0
fp16 = 35.0

[[shapes]]
name = "64x64x17"
height = 64
width = 64
num_frames = 17
"""


@pytest.mark.slow  # ~2 CPU-minutes: the 4-pair block chunk is lowered for both targets
def test_cli_exports_both_targets_from_one_capture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sora_export.core.cli import main

    captured: list[int] = []
    real_capture = engine.capture

    def counting_capture(module: torch.nn.Module, inputs: tuple) -> object:
        captured.append(1)
        return real_capture(module, inputs)

    monkeypatch.setattr(engine, "capture", counting_capture)
    profile = tmp_path / "small-both.toml"
    profile.write_text(SMALL_PROFILE)
    out = tmp_path / "both"
    argv = ["--plugins", "stdit", "--profile", str(profile), "-o", str(out)]
    code = main([*argv, "--target", "coreml", "--target", "onnx"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["target"] for c in manifest["components"]} == {"coreml", "onnx"}
    suffixes = {
        c["target"]: {Path(ch["path"]).suffix for ch in c["chunks"]} for c in manifest["components"]
    }
    assert suffixes == {"coreml": {".mlpackage"}, "onnx": {".onnx"}}
    n_chunks = len(_onnx_chunks(manifest))
    assert n_chunks >= 3
    assert len(captured) == n_chunks  # captured once per chunk, lowered for both targets
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["targets"] == ["coreml", "onnx"]
    assert len(report["chunks"]) == 2 * n_chunks
    for chunk in report["chunks"]:
        assert chunk["verification"]["passed"], chunk
        want = "onnxruntime" if chunk["target"] == "onnx" else CoreMLBackend.runner_name()
        assert chunk["verification"]["backend"] == want
