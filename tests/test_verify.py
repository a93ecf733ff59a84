"""Verification: exported artifacts are checked on Linux and real faults are caught."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sora_export.core import engine
from sora_export.core.backends import capture
from sora_export.core.backends.coreml import CoreMLBackend
from sora_export.core.cli import main
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, TensorSpec
from sora_export.core.verify.metrics import compare, psnr_db


def test_tiny_stdit_chunks_pass_on_linux(tiny_stdit_bundle: Path) -> None:
    report = json.loads((tiny_stdit_bundle / "report.json").read_text())
    assert report["verify"] is True
    for chunk in report["chunks"]:
        v = chunk["verification"]
        assert v["passed"] and v["finite"], chunk["chunk"]
        assert v["backend"] in ("mil-interpreter", "coreml-predict")
        threshold = 60.0 if chunk["quantization"] == "fp32" else 35.0
        assert v["threshold_db"] == threshold
        assert v["psnr_db"] == "inf" or v["psnr_db"] >= threshold
        assert v["reference_seconds"] > 0 and v["seconds"] > 0


def test_verify_subcommand_passes_then_catches_alteration(
    tiny_stdit_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bundle = tmp_path / "copy"
    shutil.copytree(tiny_stdit_bundle, bundle)
    assert main(["verify", str(bundle)]) == 0
    assert "passed" in capsys.readouterr().out
    # flip bytes in the middle of the block chunk's weights: hash and numbers both change
    weights = next(bundle.glob("stdit3/01-*.mlpackage/Data/com.apple.CoreML/weights/weight.bin"))
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
    weights.write_bytes(bytes(data))
    assert main(["verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "altered" in out and "FAIL" in out


def test_verify_refuses_non_bundle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a sora-export bundle" in capsys.readouterr().err


class _Amplify(nn.Module):
    """Scales activations past the fp16 range in the middle and back down at the end."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.up = nn.Linear(16, 16)
        self.down = nn.Linear(16, 16)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * self.gain) / self.gain


def _package(tmp_path: Path, module: nn.Module, precision: str) -> tuple[Path, dict, dict]:
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    chunk = Chunk(
        component="toy",
        index=0,
        name="amp",
        build=lambda: module,
        example_inputs=lambda: (x,),
        inputs=(TensorSpec("x", (2, 16)),),
        outputs=(TensorSpec("y", (2, 16)),),
        params=sum(p.numel() for p in module.parameters()),
    )
    profile = Registry.discover().profile("iphone15pro")
    backend = CoreMLBackend()
    model = backend.lower(capture(module.eval(), (x,)), chunk, profile, precision)
    path = tmp_path / f"amp-{precision}.mlpackage"
    backend.save({"main": model}, path)
    with torch.no_grad():
        reference = {"y": module(x).numpy()}
    return path, {"x": x.numpy()}, reference


def test_fp16_overflow_is_a_failure_not_a_pass(tmp_path: Path) -> None:
    module = _Amplify(gain=1e5)
    path, inputs, reference = _package(tmp_path, module, "fp16")
    v = engine.verify_artifact(path, "coreml", inputs, {"main": reference}, threshold_db=35.0)
    assert not v.passed and not v.finite
    assert math.isinf(v.psnr_db) and v.psnr_db < 0
    # the same module lowered in fp32 is fine: the failure is the overflow, not the model
    path32, inputs, reference = _package(tmp_path, module, "fp32")
    v32 = engine.verify_artifact(path32, "coreml", inputs, {"main": reference}, 60.0)
    assert v32.passed and v32.finite


def test_metrics() -> None:
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    assert psnr_db(a, a) == math.inf
    assert psnr_db(a, a + 0.01) == pytest.approx(40.0, abs=0.01)
    assert psnr_db(a, np.where(a > 0.5, np.inf, a)) == -math.inf
    fid = compare({"y": a}, {"y": a + 0.001})
    assert fid.finite and fid.max_abs_err == pytest.approx(0.001, rel=1e-3)
    with pytest.raises(ValueError, match="did not produce"):
        compare({"y": a}, {"z": a})
