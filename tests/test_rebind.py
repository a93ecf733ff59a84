"""Template rebinding: one lowering with marker weights, every look-alike part bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_export.core.backends import capture
from sora_export.core.backends.coreml import CoreMLBackend
from sora_export.core.backends.stitch import SPEC_FILE, WEIGHTS_FILE, blob_records
from sora_export.core.cache import LoweredCache
from sora_export.core.rebind import (
    MARKER_SEEDS,
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
from sora_export.core.types import Chunk, TensorSpec
from sora_export.core.verify.mil_interpreter import MILInterpreter

WIDTH = 48
PROFILE = Registry.discover().profile("iphone15pro")


class Block(torch.nn.Module):
    """Linear layers (stored transposed or not by the converter), a norm and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)
        self.gate = torch.nn.Parameter(torch.randn(WIDTH, WIDTH))
        self.register_buffer("offset", torch.linspace(0, 1, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return x + h @ self.gate + self.offset


class Folded(Block):
    """The converter folds ``gate + gate2`` into one constant: no parameter as stored."""

    def __init__(self) -> None:
        super().__init__()
        self.gate2 = torch.nn.Parameter(torch.randn(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ (self.gate + self.gate2)


class Tiny(Block):
    """A parameter the converter folds into one value written inline in the graph (its
    sum): no parameter as stored."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5, 1.5, 2.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale.sum()


def _lower(module: torch.nn.Module, path: Path) -> Path:
    chunk = Chunk(
        component="t",
        index=0,
        name="block",
        build=lambda: module,
        example_inputs=lambda: (torch.zeros(2, WIDTH),),
        inputs=(TensorSpec("x", (2, WIDTH)),),
        outputs=(TensorSpec("y", (2, WIDTH)),),
        params=0,
    )
    program = capture(module.eval(), (torch.zeros(2, WIDTH),))
    model = CoreMLBackend().lower(program, chunk, PROFILE, "fp16")
    model.save(str(path))
    return path


def _template(cls: type[torch.nn.Module], tmp: Path) -> tuple[Path, Path, list]:
    packages = []
    for seed in MARKER_SEEDS:
        torch.manual_seed(0)
        module = cls()
        fill_markers(module, seed)
        packages.append(_lower(module, tmp / f"markers-{seed}.mlpackage"))
    shapes = [shape for shape, _ in signature(cls())["params"]]
    return packages[0], packages[1], shapes


def test_rebound_part_equals_its_own_lowering(tmp_path: Path) -> None:
    first, second, shapes = _template(Block, tmp_path)
    bindings = derive_bindings(first, second, shapes)
    # every parameter is found (norm weight and bias, two linears, gate), the buffer is not
    assert sorted({b.param for b in bindings}) == list(range(len(shapes)))
    assert len(bindings) < len(blob_records(first / WEIGHTS_FILE))
    torch.manual_seed(7)
    real = Block()
    with torch.no_grad():
        real.norm.weight.uniform_(0.5, 1.5)  # not the init values: every blob must change
        real.norm.bias.uniform_(-0.1, 0.1)
    direct = _lower(real, tmp_path / "direct.mlpackage")
    bound = tmp_path / "bound.mlpackage"
    write_rebound(first, bindings, floating_params(real), bound)
    assert (bound / WEIGHTS_FILE).read_bytes() == (direct / WEIGHTS_FILE).read_bytes()
    assert (bound / SPEC_FILE).read_bytes() == (direct / SPEC_FILE).read_bytes()
    x = {"x": np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32)}
    np.testing.assert_array_equal(
        MILInterpreter(bound).run(x)["y"], MILInterpreter(direct).run(x)["y"]
    )


def test_int8_template_quantizes_like_coremltools(tmp_path: Path) -> None:
    """Binding into a template quantized by the int8 policy gives the bytes coremltools'
    quantizer gives for the part itself (data and per-channel scales)."""
    import coremltools as ct

    from sora_export.plugins.quantization import QuantizationOptions, quantize_coreml

    options = QuantizationOptions.from_profile(PROFILE)

    def int8(package: Path) -> Path:
        model = ct.models.MLModel(str(package), skip_model_load=True)
        out = package.with_name(f"int8-{package.name}")
        quantize_coreml(model, "int8", options).save(str(out))
        return out

    first, second, shapes = _template(Block, tmp_path)
    template = int8(first)
    bindings = derive_bindings(template, int8(second), shapes, quantized=True)
    kinds = {b.encoding.kind for b in bindings}
    assert kinds == {"fp16", "int8"}  # the linears and gate quantized, the norm kept fp16
    torch.manual_seed(3)
    real = Block()
    direct = int8(_lower(real, tmp_path / "direct.mlpackage"))
    bound = tmp_path / "bound.mlpackage"
    write_rebound(template, bindings, floating_params(real), bound)
    assert (bound / WEIGHTS_FILE).read_bytes() == (direct / WEIGHTS_FILE).read_bytes()
    # re-quantizing needs no module: the weights read back from the part's bound fp16
    # package (bindings kept as JSON) quantize to the same bytes
    lowered_bindings = derive_bindings(first, second, shapes)
    kept = bindings_from_json(json.loads(json.dumps(bindings_to_json(lowered_bindings))))
    assert kept == lowered_bindings
    lowered = tmp_path / "lowered.mlpackage"
    write_rebound(first, lowered_bindings, floating_params(real), lowered)
    back = read_bound(lowered, kept, shapes)
    for value, param in zip(back, floating_params(real), strict=True):
        assert value.dtype == torch.float16 and torch.equal(value, param.half())
    again = tmp_path / "again.mlpackage"
    write_rebound(template, bindings, back, again)
    assert (again / WEIGHTS_FILE).read_bytes() == (direct / WEIGHTS_FILE).read_bytes()
    with pytest.raises(RebindError, match="not stored as fp16 or fp32"):
        read_bound(bound, bindings, shapes)  # int8 only: not read back
    # a part with an all-zero channel has no int8 scale to bind: refused, not guessed
    with torch.no_grad():
        real.up.weight[0].zero_()
    with pytest.raises(RebindError, match="all zeros"):
        write_rebound(int8(first), bindings, floating_params(real), tmp_path / "zero.mlpackage")


@pytest.mark.parametrize(
    ("cls", "why"),
    [(Folded, "not a parameter as stored"), (Tiny, "inline")],
)
def test_weights_not_stored_as_parameters_are_refused(
    cls: type[torch.nn.Module], why: str, tmp_path: Path
) -> None:
    first, second, shapes = _template(cls, tmp_path)
    with pytest.raises(RebindError, match=why):
        derive_bindings(first, second, shapes)


def test_signature_tells_look_alikes_apart() -> None:
    torch.manual_seed(0)
    a, b = Block(), Block()
    assert signature(a) == signature(b)  # other weights, same shapes and buffers
    b.offset += 1
    assert signature(a) != signature(b)  # a buffer is part of the graph, not bound
    assert signature(Block()) != signature(Folded())


def test_cache_lock_is_exclusive(tmp_path: Path) -> None:
    cache = LoweredCache(tmp_path)
    with cache.lock("k") as held:
        assert held
        with cache.lock("k", wait=False) as again:
            assert not again
        with cache.lock("other", wait=False) as other:
            assert other
    with cache.lock("k", wait=False) as held:
        assert held


def test_unusable_template_falls_back_to_lowering_each_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sora_export.core import engine
    from sora_export.core.types import ExportRequest

    def refuse(*_: object, **__: object) -> list:
        raise RebindError("refused for the test")

    monkeypatch.setattr(engine, "derive_bindings", refuse)
    monkeypatch.setattr(engine, "_TEMPLATES", {})
    registry = Registry.discover()
    request = ExportRequest(
        plugins=("stdit",),
        output=tmp_path / "o",
        targets=("coreml",),
        stitch_min_params=0,
        cache_dir=tmp_path / "cache",
    )
    plan = engine.plan(request, registry)
    result = engine.run(plan, registry)
    blocks = {r.name: r for r in result.results}["blocks-00-03"]
    assert blocks.ok and blocks.verification is not None and blocks.verification.passed
    assert "converted as 4 parts and stitched" in blocks.notes
    assert "template 'block-pair' not used: refused for the test" in blocks.notes
    assert blocks.timings["lower"] > 0  # every part captured and lowered on its own
