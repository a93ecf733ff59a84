"""The direct int8 writer (core/backends/mil_int8.py) against coremltools' quantizer.

A probe module reads its weights every way that decides a channel axis (linear, matmul
with a constant on either side, conv, conv_transpose, a broadcast add) beside tensors the
skip rules keep; both writers quantize its fp16 lowering, and every quantized weight must
be stored alike -- same weights chosen, same int8 bytes, same scales -- and run alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sora_export.core.backends import capture
from sora_export.core.backends.coreml import CoreMLBackend, quiet_coremltools
from sora_export.core.backends.mil_int8 import Unsupported, quantize_model_int8
from sora_export.core.backends.stitch import WEIGHTS_FILE, blob_records, read_blob, read_spec
from sora_export.core.types import Chunk, DeviceProfile, TensorSpec
from sora_export.plugins.quantization import QuantizationOptions, quantize_coreml

OPTIONS = QuantizationOptions()


def _keep(weight: Any) -> bool:
    return weight.size <= OPTIONS.weight_threshold or "gather" in weight.consumers


CONSTEXPR = "constexpr_blockwise_shift_scale"


class _Axes(torch.nn.Module):
    def __init__(self, zero_row: bool = False, deconv: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.05)

        self.table = param(64, 64)  # gather: kept
        self.fc = torch.nn.Linear(64, 96)  # linear: axis 0
        self.right = param(96, 80)  # matmul y: axis -1
        self.batched = param(4, 20, 48)  # batched matmul y (rank 3)
        self.shift = param(1, 6, 480)  # broadcast add: one channel on axis 0
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)  # axis 0
        # axis 1 (the MIL interpreter has no conv_transpose: a 1x1 conv stands in to run it)
        self.deconv = (
            torch.nn.ConvTranspose2d(32, 24, 3, padding=1) if deconv else torch.nn.Conv2d(32, 24, 1)
        )
        self.small = param(40, 40)  # at most 2048 elements: kept
        self.both = param(48, 48)  # coremltools splits it: transposed for linear, and add
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 0.05, generator=g)
            if zero_row:
                self.fc.weight[3].zero_()

    def forward(
        self, ids: torch.Tensor, img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.table[ids]  # [2, 6, 64]
        h = self.fc(h) @ self.right  # [2, 6, 80]
        h = h.reshape(2, 6, 4, 20).transpose(1, 2) @ self.batched  # [2, 4, 6, 48]
        seq = h.transpose(1, 2).reshape(2, 6, 192).repeat(1, 1, 3)[..., :480] + self.shift
        seq = seq[..., :40] @ self.small
        both = torch.cat([seq, seq[..., :8]], -1)  # [2, 6, 48]
        square = both.transpose(-1, -2) @ both  # [2, 48, 48]
        seq = torch.cat([seq, (square @ self.both + self.both)[:, :6]], -1)
        feat = self.deconv(torch.relu(self.conv(img)))
        return h, seq, feat


def _chunk(module: type[torch.nn.Module], **kwargs: Any) -> Chunk:
    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (2, 6), generator=g, dtype=torch.int32)
        return ids, torch.randn(1, 16, 8, 8, generator=g)

    return Chunk(
        component="probe",
        index=0,
        name="axes",
        build=lambda: module(**kwargs).eval(),
        example_inputs=inputs,
        inputs=(TensorSpec("ids", (2, 6), "int32"), TensorSpec("img", (1, 16, 8, 8))),
        outputs=(
            TensorSpec("h", (2, 4, 6, 48)),
            TensorSpec("seq", (2, 6, 88)),
            TensorSpec("feat", (1, 24, 8, 8)),
        ),
        params=sum(p.numel() for p in module(**kwargs).parameters()),
    )


def _profile(target: str = "iOS18") -> DeviceProfile:
    return DeviceProfile(
        name="int8-test",
        description="direct int8 tests",
        targets=("coreml",),
        deployment_target=target,
        compute_units="CPU_ONLY",
        memory_budget_bytes=1 << 30,
        activation_reserve_bytes=0,
    )


def _lower(chunk: Chunk, target: str = "iOS18") -> Any:
    module = chunk.build()
    return CoreMLBackend().lower(
        capture(module, chunk.example_inputs()), chunk, _profile(target), "fp16"
    )


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    chunk = _chunk(_Axes)
    return {"chunk": chunk, "model": _lower(chunk)}


def _stored(package: Path) -> dict[str, tuple[bytes, bytes]]:
    """Every quantized weight of a package: op name (without coremltools' suffix) ->
    (int8 data bytes, fp16 scale bytes)."""
    spec = read_spec(package)
    found: dict[str, tuple[bytes, bytes]] = {}
    with open(package / WEIGHTS_FILE, "rb") as fh:

        def value_bytes(value: Any) -> bytes:
            if value.WhichOneof("value") == "blobFileValue":
                return read_blob(fh, value.blobFileValue.offset)[1]
            return bytes(value.immediateValue.tensor.bytes.values)

        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                for op in block.operations:
                    if op.type != CONSTEXPR:
                        continue
                    name = op.attributes["name"].immediateValue.tensor.strings.values[0]
                    data = value_bytes(op.inputs["data"].arguments[0].value)
                    scale = value_bytes(op.inputs["scale"].arguments[0].value)
                    found[name.removesuffix("_quantized")] = (data, scale)
    return found


def _blobs(package: Path) -> list[tuple[int, bytes]]:
    """Every blob of the weight file, as (type, data), sorted."""
    with open(package / WEIGHTS_FILE, "rb") as fh:
        return sorted(read_blob(fh, r.meta) for r in blob_records(package / WEIGHTS_FILE))


def _save(model: Any, path: Path) -> Path:
    model.save(str(path))
    return path


def test_direct_int8_stores_what_coremltools_stores(probe: dict[str, Any], tmp_path: Path) -> None:
    ours = _save(quantize_coreml(probe["model"], "int8", OPTIONS), tmp_path / "ours.mlpackage")
    theirs = _save(
        quantize_coreml(probe["model"], "int8", OPTIONS, direct=False),
        tmp_path / "theirs.mlpackage",
    )
    a, b = _stored(ours), _stored(theirs)
    assert sorted(a) == sorted(b)
    # linear (x3: matmuls with a 2-D constant become linear), the batched matmul, the
    # broadcast adds (x2), conv and conv_transpose: all chosen alike
    assert len(a) == 8
    for name in a:
        assert a[name] == b[name], name
    # the rest of the weight file: the same fp16 blobs (the table, norms, biases, ...)
    assert _blobs(ours) == _blobs(theirs)


def test_direct_int8_runs_like_coremltools(tmp_path: Path) -> None:
    from sora_export.core.verify.mil_interpreter import run_mlpackage

    chunk = _chunk(_Axes, deconv=False)
    model = _lower(chunk)
    ours = _save(quantize_coreml(model, "int8", OPTIONS), tmp_path / "ours.mlpackage")
    theirs = _save(
        quantize_coreml(model, "int8", OPTIONS, direct=False), tmp_path / "theirs.mlpackage"
    )
    ids, img = chunk.example_inputs()
    feeds = {"ids": ids.numpy(), "img": img.numpy()}
    out_a, out_b = run_mlpackage(ours, feeds), run_mlpackage(theirs, feeds)
    assert sorted(out_a) == sorted(out_b) == ["feat", "h", "seq"]
    for key in out_b:
        np.testing.assert_array_equal(out_a[key], out_b[key])


def test_direct_int8_is_used_and_leaves_the_source_alone(probe: dict[str, Any]) -> None:
    model = probe["model"]
    before = model.get_spec().SerializeToString()
    quantized, result = quantize_model_int8(model, _keep)
    assert len(result.quantized) == 8 and not result.left
    assert model.get_spec().SerializeToString() == before
    assert quantized.package_path != model.package_path and quantized.is_temp_package


@pytest.mark.parametrize(
    ("why", "chunk", "target", "message"),
    [
        ("a channel of zeros", _chunk(_Axes, zero_row=True), "iOS18", "all zeros"),
        ("iOS17", _chunk(_Axes), "iOS17", "iOS18"),
    ],
)
def test_what_the_direct_writer_refuses_goes_to_coremltools(
    why: str, chunk: Chunk, target: str, message: str
) -> None:
    model = _lower(chunk, target)
    with pytest.raises(Unsupported, match=message):
        quantize_model_int8(model, _keep)
    quantized = quantize_coreml(model, "int8", OPTIONS)  # coremltools' path instead
    kinds = {
        op.type
        for f in quantized.get_spec().mlProgram.functions.values()
        for b in f.block_specializations.values()
        for op in b.operations
    }
    assert kinds & {CONSTEXPR, "constexpr_affine_dequantize"}, why
    quiet_coremltools()


def _op(kind: str, **flags: bool) -> Any:
    from coremltools.proto import MIL_pb2

    op = MIL_pb2.Operation(type=kind)
    for key, flag in flags.items():
        op.inputs[key].arguments.add().value.immediateValue.tensor.bools.values.append(flag)
    return op


@pytest.mark.parametrize(
    ("readers", "rank", "axis"),
    [
        ([("linear", "weight", {})], 2, 0),
        ([("conv", "weight", {})], 4, 0),
        ([("conv_transpose", "weight", {})], 4, 1),
        ([("matmul", "y", {"transpose_y": False})], 3, 2),
        ([("matmul", "y", {"transpose_y": True})], 3, 1),
        ([("matmul", "x", {"transpose_x": False})], 2, 0),
        ([("matmul", "x", {"transpose_x": True})], 2, 1),
        ([("add", "y", {}), ("mul", "x", {})], 3, 0),
        # readers that disagree: coremltools leaves the weight alone, so does the writer
        ([("matmul", "y", {"transpose_y": False}), ("add", "y", {})], 2, None),
    ],
)
def test_channel_axis_follows_the_readers(readers: list, rank: int, axis: int | None) -> None:
    from sora_export.core.backends.mil_int8 import _channel_axis

    found = [(_op(kind, **flags), key) for kind, key, flags in readers]
    assert _channel_axis(found, rank, {}) == axis


def test_unreadable_transpose_flag_is_unsupported() -> None:
    from sora_export.core.backends.mil_int8 import _channel_axis

    reader = _op("matmul")
    reader.inputs["transpose_y"].arguments.add().name = "computed_flag"
    with pytest.raises(Unsupported, match="transpose_y"):
        _channel_axis([(reader, "y")], 2, {})
    assert _channel_axis([(reader, "y")], 2, {"computed_flag": True}) == 0
