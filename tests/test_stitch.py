"""Chunks converted part by part and stitched: same numbers, parallel, cached per part."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from sora_export.core import engine
from sora_export.core.backends import tree_bytes
from sora_export.core.backends.stitch import StitchError, stitch_packages
from sora_export.core.errors import PluginError
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, ExportRequest, TensorSpec, chained_parts
from sora_export.core.verify.mil_interpreter import MILInterpreter


def _run(out: Path, sink: engine.EventSink = engine._ignore, **changes: object) -> engine.RunResult:
    registry = Registry.discover()
    request = ExportRequest(plugins=("stdit", "tdtm"), output=out, targets=("coreml",))
    plan = engine.plan(attrs.evolve(request, **changes), registry)
    return engine.run(plan, registry, sink)


def _inputs(bundle: Path, chunk: str) -> dict[str, np.ndarray]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = next(c for c in manifest["components"][0]["chunks"] if c["name"] == chunk)
    rng = np.random.default_rng(0)
    return {s["name"]: rng.standard_normal(s["shape"]).astype(np.float32) for s in spec["inputs"]}


def test_stitched_chunk_equals_the_whole_chunk(tmp_path: Path) -> None:
    _run(tmp_path / "whole", whole_chunks=True, verify=False)
    stitched = _run(tmp_path / "parts", stitch_min_params=0, jobs=2, cache_dir=tmp_path / "c")
    by_name = {r.name: r for r in stitched.results}
    blocks = by_name["blocks-00-03"]
    assert blocks.ok and blocks.verification is not None and blocks.verification.passed
    # the four pairs share one template: lowered once (twice with markers), bound four times
    assert "converted as 4 parts and stitched; 4 bound into one lowered template 'block-pair'" in (
        blocks.notes
    )
    assert blocks.artifact is not None and blocks.artifact.functions == ("plain", "tdtm")
    # no part leftovers in the published bundle
    assert not list((tmp_path / "parts").rglob(".parts*"))
    name = "stdit3/01-blocks-00-03.mlpackage"
    inputs = _inputs(tmp_path / "parts", "blocks-00-03")
    for function in ("plain", "tdtm"):
        a = MILInterpreter(tmp_path / "whole" / name, function=function).run(inputs)
        b = MILInterpreter(tmp_path / "parts" / name, function=function).run(inputs)
        # the same ops on the same weights; fp16 -> fp32 -> fp16 at part seams is lossless
        np.testing.assert_array_equal(a["tokens_out"], b["tokens_out"])
    # weights stored once across the two functions, as in the whole chunk's package
    sizes = [tree_bytes(tmp_path / d / name) for d in ("whole", "parts")]
    assert sizes[1] < 1.05 * sizes[0]

    # the int8 re-run quantizes the cached parts: nothing is captured or lowered again, and
    # no pair is even built: its weights are read back from its lowered package
    events: list[engine.Event] = []
    again = _run(
        tmp_path / "int8",
        events.append,
        stitch_min_params=0,
        cache_dir=tmp_path / "c",
        quantize="int8",
    )
    blocks8 = {r.name: r for r in again.results}["blocks-00-03"]
    assert blocks8.ok and blocks8.lowered_cache == "hit"
    assert blocks8.verification is not None and blocks8.verification.passed
    assert "capture" not in blocks8.timings and "lower" not in blocks8.timings
    built = [e.detail for e in events if e.kind == "stage" and e.stage == "build"]
    assert built and not [d for d in built if d.startswith("pair-")]
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    int8_bytes = (tmp_path / "int8" / name / weights).stat().st_size
    assert int8_bytes < 0.6 * (tmp_path / "parts" / name / weights).stat().st_size


def _linear_package(path: Path, weight: torch.Tensor, name_in: str, name_out: str) -> None:
    from sora_export.core.backends.coreml import quiet_coremltools

    ct = quiet_coremltools()

    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x @ self.w) + 1.0

    program = torch.export.export(Lin().eval(), (torch.zeros(2, weight.shape[0]),))
    model = ct.convert(
        program.run_decompositions({}),
        inputs=[ct.TensorType(name=name_in, shape=(2, weight.shape[0]))],
        outputs=[ct.TensorType(name=name_out)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    model.save(str(path))


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    a, b = folder / "a.mlpackage", folder / "b.mlpackage"
    _linear_package(a, w, "x", "x_out")
    _linear_package(b, w * 0.5, "x", "x_out")
    return a, b, w


def test_stitch_chains_parts_and_dedups_weights(two_parts, tmp_path: Path) -> None:
    a, b, w = two_parts
    wiring = [{"x": "chunk:x"}, {"x": "previous:x_out"}]
    dest = tmp_path / "ab.mlpackage"
    stitch_packages([{"main": (a, "main")}, {"main": (b, "main")}], wiring, ("main",), dest)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    got = MILInterpreter(dest).run({"x": x})["x_out"]
    h = np.maximum(x @ w.numpy(), 0) + 1
    want = np.maximum(h @ (0.5 * w.numpy()), 0) + 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # two functions made of the same parts share every blob
    both = tmp_path / "fn.mlpackage"
    parts = [{"f": (a, "main"), "g": (a, "main")}, {"f": (b, "main"), "g": (b, "main")}]
    stitch_packages(parts, wiring, ("f", "g"), both)
    assert tree_bytes(both / "Data/com.apple.CoreML/weights") == tree_bytes(
        dest / "Data/com.apple.CoreML/weights"
    )
    for function in ("f", "g"):
        out = MILInterpreter(both, function=function).run({"x": x})["x_out"]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_blob_writer_shares_only_equal_blobs(tmp_path: Path) -> None:
    """Blobs that agree on the sampled pages but not elsewhere are both kept; equal ones
    (from another file too) are written once; every copy reads back byte for byte."""
    from sora_export.core.backends import stitch

    rng = np.random.default_rng(0)
    size = 5 * stitch._PROBE + 100
    a = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    changed = bytearray(a)
    changed[size // 4] ^= 0xFF  # off every sampled page
    b = bytes(changed)
    small = b"\x01\x02\x03"

    def weights(path: Path, blobs: list[bytes]) -> list[int]:
        metas = []
        with open(path, "wb") as fh:
            fh.write(stitch._HEADER.pack(len(blobs), 2))
            for blob in blobs:
                at = fh.tell()
                at += -at % stitch._ALIGN
                fh.seek(at)
                fh.write(
                    stitch._META.pack(stitch._SENTINEL, 1, len(blob), at + stitch._META.size, 0)
                )
                fh.write(blob)
                metas.append(at)
        return metas

    first = weights(tmp_path / "one.bin", [a, b, small])
    second = weights(tmp_path / "two.bin", [small, a])
    out = tmp_path / "out.bin"
    with (
        open(tmp_path / "one.bin", "rb") as one,
        open(tmp_path / "two.bin", "rb") as two,
        open(out, "w+b") as fh,
    ):
        writer = stitch.BlobWriter(fh)
        got = [writer.copy_from(one, m) for m in first]
        got += [writer.copy_from(two, m) for m in second]
        writer.finish()
    assert writer.count == 3 and len(set(got)) == 3
    assert got[3] == got[2] and got[4] == got[0]  # small and a: shared across files
    records = {r.meta: r for r in stitch.blob_records(out)}
    data = out.read_bytes()
    for meta, blob in zip(got, [a, b, small, small, a], strict=True):
        record = records[meta]
        assert data[record.offset : record.offset + record.size] == blob


@pytest.mark.parametrize(
    ("wiring", "functions", "message"),
    [
        ([{"x": "chunk:x"}, {"x": "previous:nope"}], ("main",), "names no output"),
        ([{"x": "chunk:x"}, {}], ("main",), "not wired"),
        ([{"x": "chunk:x"}, {"x": "somewhere:x"}], ("main",), "neither"),
        ([{"x": "chunk:x"}], ("main",), "wirings"),
        ([{"x": "chunk:x"}, {"x": "previous:x_out"}], ("main", "other"), "lacks"),
    ],
)
def test_stitch_refuses_what_does_not_fit(
    two_parts, tmp_path: Path, wiring: list, functions: tuple, message: str
) -> None:
    a, b, _ = two_parts
    parts = [{"main": (a, "main")}, {"main": (b, "main")}]
    with pytest.raises(StitchError, match=message):
        stitch_packages(parts, wiring, functions, tmp_path / "bad.mlpackage")


def _chunk(params: int = 10) -> Chunk:
    spec = TensorSpec("h", (1, 4))
    return Chunk(
        component="c",
        index=0,
        name="blocks",
        build=object,
        example_inputs=tuple,
        inputs=(spec, TensorSpec("bias", (1, 4))),
        outputs=(TensorSpec("h_out", (1, 4)),),
        params=params,
    )


def test_chained_parts_wire_the_carry() -> None:
    chunk = _chunk()
    parts = chained_parts(chunk, [("a", object, 4, {}), ("b", object, 6, {})], {"h": "h_out"})
    assert [p.name for p in parts] == ["a", "b"]  # independent of the chunk: cache keys
    assert parts[0].wiring == {"h": "chunk:h", "bias": "chunk:bias"}
    assert parts[1].wiring == {"h": "previous:h_out", "bias": "chunk:bias"}
    engine._check_parts("p", attrs.evolve(chunk, parts=parts))
    with pytest.raises(ValueError, match="different number of weights"):
        chained_parts(chunk, [("a", object, 4, {})], {"h": "h_out"})
    with pytest.raises(ValueError, match="names no input"):
        chained_parts(chunk, [("a", object, 10, {})], {"nope": "h_out"})


def test_plan_refuses_parts_that_do_not_chain() -> None:
    chunk = _chunk()
    parts = chained_parts(chunk, [("a", object, 4, {}), ("b", object, 6, {})], {"h": "h_out"})
    broken = (parts[0], attrs.evolve(parts[1], wiring={"h": "previous:x", "bias": "chunk:bias"}))
    with pytest.raises(PluginError, match="wired to 'previous:x'"):
        engine._check_parts("p", attrs.evolve(chunk, parts=broken))
    short = (parts[0], attrs.evolve(parts[1], params=1))
    with pytest.raises(PluginError, match="do not add up"):
        engine._check_parts("p", attrs.evolve(chunk, parts=short))


def test_full_size_plans_convert_blocks_by_parts(tmp_path: Path) -> None:
    registry = Registry.discover()
    request = ExportRequest(plugins=("stdit", "t5"), output=tmp_path / "o", size="full")
    plan = engine.plan(attrs.evolve(request, verify=False), registry)
    blocks = [c for c in plan.chunks if "blocks" in c.name]
    assert blocks and all(engine.by_parts(plan, c, "coreml") for c in blocks)
    assert all(not engine.by_parts(plan, c, "onnx") for c in blocks)
    whole = engine.plan(attrs.evolve(request, verify=False, whole_chunks=True), registry)
    assert not any(engine.by_parts(whole, c, "coreml") for c in whole.chunks)
    tiny = engine.plan(attrs.evolve(request, size="tiny", verify=False), registry)
    assert not any(engine.by_parts(tiny, c, "coreml") for c in tiny.chunks)


def test_parts_keep_their_cache_key_when_chunks_change(tmp_path: Path) -> None:
    # at fp16 the iPhone budget holds 15 pairs per chunk, at int8 all 28: different chunks,
    # the same parts, so re-quantizing reuses every lowered pair
    registry = Registry.discover()
    request = ExportRequest(plugins=("stdit",), output=tmp_path / "o", size="full", verify=False)

    def keys(policy: str) -> dict[str, str]:
        plan = engine.plan(attrs.evolve(request, quantize=policy), registry)
        return {
            part.name: engine.lowered_key(plan, part, "coreml", "fp16")
            for chunk in plan.chunks
            for part in chunk.parts
        }

    fp16, int8 = keys("fp16"), keys("int8")
    assert len(fp16) == 28 and fp16 == int8
