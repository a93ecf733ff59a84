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
