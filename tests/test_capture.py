"""Capture fixes that keep Core ML numbers equal to PyTorch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sora_export.core.backends import capture
from sora_export.core.backends.coreml import CoreMLBackend
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, TensorSpec
from sora_export.core.verify.mil_interpreter import MILInterpreter, run_mlpackage


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_survives_coreml_conversion(tmp_path: Path, approximate: str) -> None:
    # coremltools 9 would lower tanh-GELU as exact GELU; capture() spells the formula out
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate=approximate)).eval()
    x = torch.randn(4, 8) * 3
    chunk = Chunk(
        "toy",
        0,
        "gelu",
        build=lambda: module,
        example_inputs=lambda: (x,),
        inputs=(TensorSpec("input", (4, 8)),),
        outputs=(TensorSpec("y", (4, 8)),),
        params=72,
    )
    profile = Registry.discover().profile("iphone15pro")
    path = tmp_path / "gelu.mlpackage"
    CoreMLBackend().save(
        {"main": CoreMLBackend().lower(capture(module, (x,)), chunk, profile, "fp32")}, path
    )
    got = run_mlpackage(path, {"input": x.numpy()})["y"]
    with torch.no_grad():
        want = module(x).numpy()
    assert abs(got - want).max() < 1e-5
    if approximate == "tanh":
        assert "tanh" in MILInterpreter(path).op_types()


def test_alias_nodes_are_removed() -> None:
    class Crop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, :4].to(torch.float32) * 2  # full-size slice + same-dtype cast

    program = capture(Crop(), (torch.randn(1, 2, 4),))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.alias.default not in targets


class _Doubles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _toy_chunk(rows: int, out_rows: int) -> Chunk:
    return Chunk(
        "toy",
        0,
        "double",
        build=_Doubles,
        example_inputs=lambda: (torch.ones(rows, 3),),
        inputs=(TensorSpec("x", (rows, 3)),),
        outputs=(TensorSpec("y", (out_rows, 3)),),
        params=3,
    )


def test_dynamic_program_is_checked_at_the_other_shapes() -> None:
    """Without a reference the other shapes' outputs are checked on fake tensors (shapes
    only); with one, by running the program and comparing."""
    from sora_export.core.engine import _check_dynamic
    from sora_export.core.errors import ExportError

    module = _Doubles().eval()
    rows = torch.export.Dim("rows", min=2, max=64)
    program = capture(module, (torch.ones(4, 3),), dynamic_shapes=({0: rows},))
    inputs = {"a": (torch.ones(4, 3),), "b": (torch.randn(6, 3),)}
    good = {"a": _toy_chunk(4, 4), "b": _toy_chunk(6, 6)}
    _check_dynamic(program, good, inputs, ["b"], {}, "main")
    with pytest.raises(ExportError, match="at b output 'y' has shape \\[6, 3\\], spec says"):
        _check_dynamic(program, {**good, "b": _toy_chunk(6, 7)}, inputs, ["b"], {}, "main")
    right = {("main", "b"): {"y": (inputs["b"][0] * 2).numpy()}}
    _check_dynamic(program, good, inputs, ["b"], right, "main")
    wrong = {("main", "b"): {"y": (inputs["b"][0] * 3).numpy()}}
    with pytest.raises(ExportError, match="differs from the module at b"):
        _check_dynamic(program, good, inputs, ["b"], wrong, "main")
