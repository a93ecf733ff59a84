"""Export shapes: every chunk accepts every selected profile shape, weights stored once.

Tiny exports use a two-shape profile with small videos (64x64 and 48x48 pixels, 17 frames)
so both strategies run in seconds: dynamic capture (one shape-polymorphic function, Core ML
EnumeratedShapes / ONNX dynamic axes) and per-shape functions (``<variant>@<shape>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core import engine
from sora_export.core.backends import get_backend
from sora_export.core.cli import main
from sora_export.core.errors import UsageError
from sora_export.core.registry import Registry
from sora_export.core.shapes import group_dims, select_shapes
from sora_export.core.types import Chunk, ExportRequest, TensorSpec

BUILTIN = Path(__file__).resolve().parents[1] / "plugins" / "profiles" / "iphone15pro.toml"
SHAPES = """
[[shapes]]
name = "64x64x17"
height = 64
width = 64
num_frames = 17
default = true

[[shapes]]
name = "48x48x17"
height = 48
width = 48
num_frames = 17
"""


@pytest.fixture(scope="module")
def two_shape_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iphone15pro with two small shapes (everything else as built in)."""
    text = BUILTIN.read_text()
    head, _, _ = text.partition("[[shapes]]")
    tail = text[text.index("[plugins.tdtm]") :]
    path = tmp_path_factory.mktemp("profile") / "two-shapes.toml"
    path.write_text(head.replace('name = "iphone15pro"', 'name = "two-shapes"') + SHAPES + tail)
    return path


def _export(profile: Path, out: Path, *args: str) -> dict:
    # explicit: the suite's default is SORA_EXPORT_SHAPES=default (conftest)
    shapes = [] if "--shapes" in args else ["--shapes", "all"]
    code = main(["--profile", str(profile), "-o", str(out), *shapes, *args])
    assert code == 0
    return json.loads((out / "manifest.json").read_text())


def _chunks(manifest: dict, target: str) -> dict[str, dict]:
    return {
        f"{comp['name']}/{c['name']}": c
        for comp in manifest["components"]
        if comp["target"] == target
        for c in comp["chunks"]
    }


# -- Dim grouping ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=4), min_size=1, max_size=3).flatmap(
        lambda ranks: st.lists(
            st.tuples(*[st.tuples(*[st.integers(1, 6) for _ in r]) for r in ranks]),
            min_size=1,
            max_size=4,
        )
    )
)
def test_group_dims_ties_dims_with_equal_values(cases: list[tuple[tuple[int, ...], ...]]) -> None:
    names = [f"in{i}" for i in range(len(cases[0]))]
    groups = group_dims(names, cases)
    grouped = {axis: g for g in groups for axis in g.axes}
    for i, shape in enumerate(cases[0]):
        for axis in range(len(shape)):
            values = tuple(case[i][axis] for case in cases)
            if len(set(values)) == 1:
                assert (i, axis) not in grouped  # static dims stay static
            else:
                g = grouped[(i, axis)]
                assert g.values == values and g.min == min(values) and g.max == max(values)
    # one group per distinct value tuple: equal values share a Dim, different ones do not
    assert len({g.values for g in groups}) == len(groups)
    for g in groups:
        assert g.name == f"{names[g.axes[0][0]]}_{g.axes[0][1]}"


def test_group_dims_refuses_rank_changes() -> None:
    with pytest.raises(ValueError, match="rank"):
        group_dims(["x"], [[(1, 2)], [(1, 2, 3)]])


# -- shape selection ------------------------------------------------------------------------
def test_select_shapes_default_first_and_unknown_name() -> None:
    profile = Registry.discover().profile("macos15")
    assert [s.name for s in select_shapes(profile, ("all",))] == ["256x256x68", "384x384x51"]
    assert [s.name for s in select_shapes(profile, ("default",))] == ["256x256x68"]
    assert [s.name for s in select_shapes(profile, ("384x384x51",))] == ["384x384x51"]
    with pytest.raises(UsageError, match="256x256x68, 384x384x51"):
        select_shapes(profile, ("999x999x1",))


def test_cli_unknown_shape_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--plugins", "stdit", "--shapes", "nope", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "192x192x68" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plan_gives_every_chunk_every_shape() -> None:
    registry = Registry.discover()
    every = ExportRequest(plugins=("stdit",), profile="iphone15pro", shapes=("all",))
    plan = engine.plan(every, registry)
    assert [s.name for s in plan.shapes] == ["256x256x68", "192x192x68"]
    for chunk in plan.chunks:
        assert list(chunk.shapes) == ["256x256x68", "192x192x68"]
        assert chunk.shapes["256x256x68"].inputs == chunk.inputs  # the default is the chunk
    small = plan.chunks[0].shapes["192x192x68"].inputs[0]
    assert small.shape == (2, 4, 20, 24, 24)
    only = engine.plan(
        ExportRequest(plugins=("stdit",), profile="iphone15pro", shapes=("default",)), registry
    )
    assert all(list(c.shapes) == ["256x256x68"] for c in only.chunks)


def test_default_shapes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sora_export.core.types import default_shapes

    monkeypatch.delenv("SORA_EXPORT_SHAPES", raising=False)
    assert ExportRequest(plugins=("stdit",)).shapes == ("all",)
    monkeypatch.setenv("SORA_EXPORT_SHAPES", "default, 192x192x68")
    assert default_shapes() == ("default", "192x192x68")
    assert ExportRequest(plugins=("stdit",)).shapes == ("default", "192x192x68")


# -- interpreter and fallback on a hand-made chunk ------------------------------------------
class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.conv(x))


class _SizeBaked(_Conv):
    """Adds a constant that depends on the width: a dynamic capture specialises on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = 1.0 if x.shape[-1] > 10 else -1.0
        return super().forward(x) + offset


def _chunk(module: type[torch.nn.Module]) -> Chunk:
    def at(h: int, name: str) -> Chunk:
        torch.manual_seed(h)
        x = torch.randn(1, 3, h, h)
        return Chunk(
            component="toy",
            index=0,
            name="conv",
            build=module,
            example_inputs=lambda x=x: (x,),
            inputs=(TensorSpec("x", (1, 3, h, h)),),
            outputs=(TensorSpec("y", (1, 8, h, h)),),
            params=8 * 3 * 9 + 8,
            shape=name,
        )

    big, small = at(12, "big"), at(8, "small")
    return attrs.evolve(big, shapes={"big": big, "small": small})


def _prepare(chunk: Chunk) -> engine._Prepared:
    registry = Registry.discover()
    profile = registry.profile("iphone15pro")
    prepared = engine._Prepared(chunk, registry, set(), profile, {}, lambda e: None)
    assert prepared.programs  # builds, runs the references and captures
    return prepared


@pytest.mark.parametrize("target", ["coreml", "onnx"])
def test_dynamic_chunk_runs_at_both_shapes(tmp_path: Path, target: str) -> None:
    prepared = _prepare(_chunk(_Conv))
    assert prepared.strategy == "dynamic" and list(prepared.programs) == ["main"]
    captured = prepared.programs["main"]
    assert captured.enumerated == {"x": [(1, 3, 12, 12), (1, 3, 8, 8)]}
    backend = get_backend(target)
    profile = Registry.discover().profile("iphone15pro")
    model = backend.lower(captured.program, captured.chunk, profile, "fp32", captured.enumerated)
    path = tmp_path / f"toy{backend.suffix}"
    assert backend.save({"main": model}, path) == ("main",)
    v = engine.verify_cases(path, target, prepared.cases, 60.0)
    assert v.passed and set(v.psnr_by_shape) == {"big", "small"}, v
    if target == "coreml":
        from sora_export.core.verify.mil_interpreter import MILInterpreter

        interp = MILInterpreter(path)
        assert interp.enumerated_shapes == {"x": [(1, 3, 12, 12), (1, 3, 8, 8)]}
        with pytest.raises(ValueError, match="enumerates"):
            interp.run({"x": np.zeros((1, 3, 10, 10), np.float32)})


def test_failed_dynamic_capture_falls_back_to_per_shape(tmp_path: Path) -> None:
    chunk = _chunk(_SizeBaked)
    prepared = _prepare(chunk)
    assert prepared.strategy == "per-shape"
    assert prepared.strategy_note  # the first line of why
    assert list(prepared.programs) == ["main", "main@small"]
    backend = get_backend("onnx")
    profile = Registry.discover().profile("iphone15pro")
    models = {
        name: backend.lower(p.program, p.chunk, profile, "fp32")
        for name, p in prepared.programs.items()
    }
    path = tmp_path / "toy.onnx"
    assert backend.save(models, path) == ("main", "main@small")
    v = engine.verify_cases(path, "onnx", prepared.cases, 60.0)
    assert v.passed and set(v.psnr_by_shape) == {"big", "small"}


# -- tiny exports ---------------------------------------------------------------------------
def test_stdit_tdtm_two_shapes(two_shape_profile: Path, tmp_path: Path) -> None:
    # both targets: the blocks chunk is dynamic in each (ONNX dynamic axes are also
    # checked by name in test_t5_vae_two_shapes)
    manifest = _export(
        two_shape_profile,
        tmp_path / "two",
        "--plugins",
        "stdit,tdtm",
        "--target",
        "coreml",
        "--target",
        "onnx",
    )
    assert manifest["shapes"] == ["64x64x17", "48x48x17"]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    for r in report["chunks"]:
        assert set(r["verification"]["psnr_by_shape"]) == {"64x64x17", "48x48x17"}, r
        assert r["verification"]["passed"]
    for target in ("coreml", "onnx"):
        chunks = _chunks(manifest, target)
        blocks = next(c for k, c in chunks.items() if "blocks" in k)
        assert blocks["strategy"] == "dynamic"
        assert blocks["functions"] == ["plain", "tdtm"]
        assert blocks["enumerated_shapes"]["tokens"] == [[2, 5, 4, 4, 64], [2, 5, 3, 3, 64]]
        small = blocks["shapes"]["48x48x17"]
        assert small["functions"] == {"plain": "plain", "tdtm": "tdtm"}
        assert small["inputs"][0]["shape"] == [2, 5, 3, 3, 64]
        # the input chunk's position embedding depends on the grid: per-shape functions
        inp = chunks["stdit3/input"]
        if inp["strategy"] == "per-shape":
            assert inp["strategy_note"]
            assert inp["functions"] == ["main", "main@48x48x17"]
            assert inp["shapes"]["48x48x17"]["functions"] == {"main": "main@48x48x17"}
    one = _export(
        two_shape_profile,
        tmp_path / "one",
        "--plugins",
        "stdit,tdtm",
        "--target",
        "coreml",
        "--target",
        "onnx",
        "--shapes",
        "default",
        "--no-verify",  # only its sizes are compared
    )
    assert one["shapes"] == ["64x64x17"]
    for target in ("coreml", "onnx"):
        two_chunks, one_chunks = _chunks(manifest, target), _chunks(one, target)
        for key, c in two_chunks.items():
            # weights stored once: a second shape costs graphs, not weights
            if c["params"] > 50_000:
                assert c["bytes"] < 1.2 * one_chunks[key]["bytes"], (target, key)
        assert all(list(c["shapes"]) == ["64x64x17"] for c in one_chunks.values())
    assert main(["verify", str(tmp_path / "two")]) == 0


def test_t5_vae_two_shapes(two_shape_profile: Path, tmp_path: Path) -> None:
    manifest = _export(
        two_shape_profile,
        tmp_path / "b",
        "--plugins",
        "t5,vae",
        "--target",
        "coreml",
        "--target",
        "onnx",
    )
    for target in ("coreml", "onnx"):
        chunks = _chunks(manifest, target)
        for key, c in chunks.items():
            assert set(c["shapes"]) == {"64x64x17", "48x48x17"}
            if key.startswith("t5/"):
                assert c["strategy"] == "static"  # text does not depend on the video size
            else:
                assert c["strategy"] in ("dynamic", "per-shape")
                if c["strategy"] == "dynamic":
                    assert c["functions"] == ["main"] and c["enumerated_shapes"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["ok"]
    for r in report["chunks"]:
        assert set(r["verification"]["psnr_by_shape"]) == {"64x64x17", "48x48x17"}
    onnx_spatial = next(
        c for k, c in _chunks(manifest, "onnx").items() if k.startswith("vae-spatial")
    )
    if onnx_spatial["strategy"] == "dynamic":
        import onnx

        model = onnx.load(str(tmp_path / "b" / onnx_spatial["path"] / "main.onnx"))
        dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims[2] == dims[3] != ""  # one named Dim for the latent height and width
