"""``--quantize auto``: per chunk, the smallest policy that passes its fidelity gate."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

from sora_export.core import engine
from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, ComponentSpec, ExportRequest, TensorSpec
from sora_export.core.weights import seeded_init_


class Mlp(nn.Module):
    """Two linear layers. A ``sensitive`` chunk outputs the small difference of two nearly
    equal projections: weight rounding that is harmless elsewhere swamps that difference
    (the kind of quantization-sensitive layer real checkpoints have)."""

    def __init__(self, sensitive: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 256)
        self.sensitive = sensitive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sensitive:
            return self.fc1(x) - self.fc2(x)
        return self.fc2(torch.relu(self.fc1(x)))


@attrs.frozen
class Build:
    index: int
    sensitive: bool

    def __call__(self) -> nn.Module:
        module = seeded_init_(Mlp(self.sensitive), seed=self.index)
        if self.sensitive:
            with torch.no_grad():
                g = torch.Generator().manual_seed(99)
                delta = 0.01 * torch.randn(module.fc1.weight.shape, generator=g)
                module.fc2.weight.copy_(module.fc1.weight + delta * module.fc1.weight.std())
                module.fc2.bias.copy_(module.fc1.bias)
        return module


@attrs.frozen
class Inputs:
    def __call__(self) -> tuple[torch.Tensor, ...]:
        return (torch.randn(8, 256, generator=torch.Generator().manual_seed(0)),)


def _chunks(component) -> list[Chunk]:
    return [
        Chunk(
            component="mlps",
            index=i,
            name=f"mlp{i}",
            build=Build(i, sensitive=(i == 1)),
            example_inputs=Inputs(),
            inputs=(TensorSpec("x", (8, 256)),),
            outputs=(TensorSpec("y", (8, 256)),),
            params=2 * (256 * 256 + 256),
        )
        for i in range(3)
    ]


class MlpPlugin:
    @hookimpl
    def sora_export_register_components(self, register):
        register(ComponentSpec("mlps", "three MLP chunks", 50, describe=lambda ctx: None))

    @hookimpl
    def sora_export_chunk_component(self, component):
        return _chunks(component) if component.spec.name == "mlps" else None


def _registry() -> Registry:
    registry = Registry.discover()
    registry.pm.register(MlpPlugin(), name="mlps-test")
    return Registry(registry.pm, registry.origins)


def test_auto_picks_a_wider_policy_for_the_sensitive_chunk(tmp_path: Path) -> None:
    registry = _registry()
    request = ExportRequest(plugins=("mlps",), output=tmp_path / "out", quantize="auto")
    result = engine.run(engine.plan(request, registry), registry)
    chosen = {r.name: r.quantization for r in result.results}
    bytes_per = {
        "palettize4": 0.5,
        "int4-block": 0.5625,
        "palettize6": 0.75,
        "int8": 1,
        "palettize8": 1,
        "fp16": 2,
        "fp32": 4,
    }
    assert bytes_per[chosen["mlp1"]] > bytes_per[chosen["mlp0"]]
    assert bytes_per[chosen["mlp1"]] > bytes_per[chosen["mlp2"]]
    for r in result.results:
        assert r.verification is not None and r.verification.passed
        assert any(n.startswith("auto chose") for n in r.notes)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(c["compression_vs_fp32"] > 1 for c in report["chunks"])


def test_auto_needs_verification(tmp_path: Path) -> None:
    request = ExportRequest(
        plugins=("stdit",), output=tmp_path / "o", quantize="auto", verify=False
    )
    with pytest.raises(UsageError, match="needs --verify"):
        engine.plan(request, Registry.discover())
