"""int8 weight quantization of a saved ML Program, written straight into a new package.

coremltools' ``linear_quantize_weights`` loads the whole program into its Python MIL
representation, rewrites it, and serializes it again through its backend pass pipeline
and validation: about 5 s for one STDiT3 block pair (84 MB of fp16 weights), of which the
arithmetic is a tenth. For the int8 policy (linear symmetric, one scale per output
channel, iOS18's ``constexpr_blockwise_shift_scale``) this module does the same rewrite on
the package's protobuf and weight file instead: each weight ``const`` it quantizes becomes
a ``constexpr_blockwise_shift_scale`` of the int8 data and fp16 scales, every other blob
is copied as it is, and nothing else in the graph changes.

It decides like coremltools, so the two give the same weights (tests/test_mil_int8.py
compares them blob by blob, and their outputs):

- a candidate is an fp16 ``const`` stored in the weight file, of rank 2 or more, read by
  at least one op and by no ``constexpr_`` op, which the caller's ``keep`` rule does not
  keep (the quantization plugin's threshold and ``skip_ops``);
- its channel axis comes from its readers: 1 for ``conv_transpose``, the last or the one
  before for ``matmul`` (by operand and ``transpose_x``/``transpose_y``), else 0; readers
  that disagree leave it unquantized, as does an infinite value;
- scale = max|w| / 127 per channel (computed in fp16 arithmetic, as coremltools does),
  data = round(w / scale) clipped to [-127, 127]
  (:func:`sora_export.core.rebind.int8_per_channel`).

What it does not take -- a deployment target below iOS18, fp32 weights, nested blocks, a
weight that is also a block output, a ``transpose`` flag it cannot read, a channel of
zeros or a NaN (where coremltools' own arithmetic decides what is stored) -- raises
:class:`Unsupported`, and the caller quantizes with coremltools instead.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from sora_export.core.backends.stitch import (
    BLOB_PATH,
    SPEC_FILE,
    WEIGHTS_FILE,
    BlobWriter,
    op_values,
    read_blob,
    read_spec,
)

IOS18_SPEC_VERSION = 9
# MIL blob storage data types
BLOB_FP16 = 1
BLOB_INT8 = 4
# coremltools writes a value of at least this many elements to the weight file
INLINE_LIMIT = 10
_NEW = "@sora-export/new/"  # placeholder file name of a blob still to be written


class Unsupported(ValueError):
    """The package has something this writer does not handle; use coremltools."""


@attrs.frozen
class WeightConst:
    """A candidate weight: its op name, shape and the op types that read it."""

    name: str
    shape: tuple[int, ...]
    consumers: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@attrs.frozen
class Int8Result:
    """What :func:`quantize_int8` did: the weights it quantized and those it left at the
    lowered precision for a reason of its own (the ``keep`` rule's are not listed)."""

    quantized: tuple[str, ...]
    left: tuple[str, ...]


def _blocks(spec: Any) -> Iterator[Any]:
    for function in spec.mlProgram.functions.values():
        yield from function.block_specializations.values()


def _const_name(op: Any) -> str:
    attr = op.attributes.get("name")
    if attr is not None and attr.immediateValue.tensor.strings.values:
        return str(attr.immediateValue.tensor.strings.values[0])
    return str(op.outputs[0].name)


def _bool_value(value: Any) -> bool | None:
    if value.WhichOneof("value") != "immediateValue":
        return None
    bools = value.immediateValue.tensor.bools.values
    return bool(bools[0]) if len(bools) == 1 else None


def _flag(reader: Any, key: str, bools: dict[str, bool]) -> bool:
    """A reader's boolean input ``key`` (absent: False), inline or from a const."""
    if key not in reader.inputs:
        return False
    (binding,) = reader.inputs[key].arguments
    if binding.HasField("value"):
        found = _bool_value(binding.value)
    else:
        found = bools.get(binding.name)
    if found is None:
        raise Unsupported(f"cannot read {reader.type}'s {key}")
    return found


def _channel_axis(readers: list[tuple[Any, str]], rank: int, bools: dict[str, bool]) -> int | None:
    """The output-channel axis coremltools would pick (for rank >= 2, always one of the
    first two), or None when readers disagree."""
    outs, ins = set(), set()
    for reader, key in readers:
        out_axis, in_axis = 0, 1
        if reader.type == "conv_transpose":
            out_axis, in_axis = 1, 0
        elif reader.type == "matmul":
            if key == "y":
                flipped = _flag(reader, "transpose_y", bools)
                out_axis, in_axis = (-2, -1) if flipped else (-1, -2)
            else:
                flipped = _flag(reader, "transpose_x", bools)
                out_axis, in_axis = (-1, -2) if flipped else (-2, -1)
        outs.add(out_axis + rank if out_axis < 0 else out_axis)
        ins.add(in_axis + rank if in_axis < 0 else in_axis)
    if len(outs) != 1 or len(ins) != 1:
        return None
    return outs.pop()


def _tensor_value(value: Any, dtype: int, shape: tuple[int, ...]) -> None:
    """Set ``value``'s type to a tensor of MIL ``dtype`` and ``shape``."""
    tensor_type = value.type.tensorType
    tensor_type.Clear()
    tensor_type.dataType = dtype
    tensor_type.rank = len(shape)
    for dim in shape:
        tensor_type.dimensions.add().constant.size = dim


def quantize_int8(
    src: Path, dest: Path, keep: Callable[[WeightConst], bool], spec: Any = None
) -> Int8Result:
    """Write ``dest``, the package ``src`` with its weights quantized to int8 per channel.

    ``keep(weight)`` says which candidates stay at the lowered precision. ``spec``: the
    package's spec when the caller has it parsed (else it is read from ``src``).

    :raises Unsupported: for what this writer does not handle (module docstring); ``dest``
        is not created then.
    """
    from coremltools.proto import MIL_pb2

    spec = read_spec(src) if spec is None else spec
    if spec.specificationVersion < IOS18_SPEC_VERSION:
        raise Unsupported("constexpr_blockwise_shift_scale needs an iOS18 deployment target")
    weights = src / WEIGHTS_FILE
    new_blobs: list[tuple[int, np.ndarray]] = []  # (blob type, data) by placeholder index
    done: dict[tuple[int, int], tuple[int, int]] = {}  # (blob, axis) -> (data, scale) index
    quantized: list[str] = []
    left: list[str] = []
    dt = MIL_pb2.DataType
    source = open(weights, "rb") if weights.exists() else contextlib.nullcontext()  # noqa: SIM115
    with source as fh:
        for block in _blocks(spec):
            readers: dict[str, list[tuple[Any, str]]] = {}
            bools: dict[str, bool] = {}
            for op in block.operations:
                if op.blocks:
                    raise Unsupported(f"op {op.type} has nested blocks")
                for key, argument in op.inputs.items():
                    for binding in argument.arguments:
                        if binding.HasField("name"):
                            readers.setdefault(binding.name, []).append((op, key))
                if op.type == "const" and "val" in op.attributes:
                    flag = _bool_value(op.attributes["val"])
                    if flag is not None:
                        bools[op.outputs[0].name] = flag
            outputs = set(block.outputs)
            for op in block.operations:
                if op.type != "const" or "val" not in op.attributes:
                    continue
                value = op.attributes["val"]
                if value.WhichOneof("value") != "blobFileValue":
                    continue
                tensor_type = value.type.tensorType
                if tensor_type.dataType not in (dt.FLOAT16, dt.FLOAT32):
                    continue
                var = op.outputs[0].name
                found = readers.get(var, [])
                if any(d.WhichOneof("dimension") != "constant" for d in tensor_type.dimensions):
                    raise Unsupported(f"weight {_const_name(op)} has a symbolic shape")
                shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
                weight = WeightConst(_const_name(op), shape, tuple(r.type for r, _ in found))
                if (
                    not found
                    or len(shape) <= 1
                    or any(r.type.startswith("constexpr_") for r, _ in found)
                    or keep(weight)
                ):
                    continue
                if var in outputs:
                    raise Unsupported(f"weight {weight.name} is also a block output")
                if tensor_type.dataType != dt.FLOAT16:
                    raise Unsupported(f"weight {weight.name} is fp32")
                axis = _channel_axis(found, len(shape), bools)
                if axis is None:
                    left.append(weight.name)  # coremltools: "cannot decide the axis"
                    continue
                blob = value.blobFileValue.offset
                if (blob, axis) not in done:
                    kind, raw = read_blob(fh, blob)
                    if kind != BLOB_FP16 or len(raw) != 2 * weight.size:
                        raise Unsupported(f"weight {weight.name}: blob is not its fp16 values")
                    data = torch.frombuffer(bytearray(raw), dtype=torch.float16).reshape(shape)
                    if bool(torch.isinf(data).any()):
                        left.append(weight.name)  # coremltools skips infinite weights
                        continue
                    if bool(torch.isnan(data).any()):
                        raise Unsupported(f"weight {weight.name} holds NaN")
                    done[(blob, axis)] = _encode(data, axis, new_blobs, weight.name)
                data_at, scale_at = done[(blob, axis)]
                _rewrite(op, shape, data_at, scale_at, new_blobs, dt)
                quantized.append(weight.name)
        _write_package(src, dest, spec, fh, new_blobs)
    # each name once (a multi-function package meets a shared weight once per function)
    return Int8Result(tuple(dict.fromkeys(quantized)), tuple(dict.fromkeys(left)))


def _encode(
    data: torch.Tensor, axis: int, new_blobs: list[tuple[int, np.ndarray]], name: str
) -> tuple[int, int]:
    """Quantize ``data``; queue its int8 data and fp16 scales; return their indices."""
    from sora_export.core.rebind import RebindError, int8_per_channel

    try:
        q, scale = int8_per_channel(data, axis)
    except RebindError as exc:  # a channel of zeros: coremltools stores 0/0 there
        raise Unsupported(f"weight {name}: {exc}") from exc
    new_blobs.append((BLOB_INT8, q.numpy()))
    new_blobs.append((BLOB_FP16, scale.numpy()))
    return len(new_blobs) - 2, len(new_blobs) - 1


def _rewrite(
    op: Any,
    shape: tuple[int, ...],
    data_at: int,
    scale_at: int,
    new_blobs: list[tuple[int, np.ndarray]],
    mil: Any,
) -> None:
    """Turn the const ``op`` into a ``constexpr_blockwise_shift_scale`` of the queued
    blobs (its output, and so every reader, unchanged)."""
    scale = new_blobs[scale_at][1]
    op.type = "constexpr_blockwise_shift_scale"
    del op.attributes["val"]
    data_value = op.inputs["data"].arguments.add().value
    _tensor_value(data_value, mil.INT8, shape)
    data_value.blobFileValue.fileName = f"{_NEW}{data_at}"
    scale_value = op.inputs["scale"].arguments.add().value
    _tensor_value(scale_value, mil.FLOAT16, tuple(scale.shape))
    if scale.size >= INLINE_LIMIT:
        scale_value.blobFileValue.fileName = f"{_NEW}{scale_at}"
    else:
        scale_value.immediateValue.tensor.bytes.values = scale.tobytes()


def _write_package(
    src: Path, dest: Path, spec: Any, fh: Any, new_blobs: list[tuple[int, np.ndarray]]
) -> None:
    """``dest``: ``src``'s manifest, ``spec``, and a weight file of the blobs it names
    (copied from ``fh`` or queued in ``new_blobs``), written under a temporary name."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / WEIGHTS_FILE).parent.mkdir(parents=True)
        with open(tmp / WEIGHTS_FILE, "w+b") as out:
            writer = BlobWriter(out, dedup=False)  # the source's blobs as they are
            written: dict[int, int] = {}
            for block in _blocks(spec):
                for op in block.operations:
                    for value in op_values(op):
                        if value.WhichOneof("value") != "blobFileValue":
                            continue
                        blob = value.blobFileValue
                        if blob.fileName.startswith(_NEW):
                            index = int(blob.fileName[len(_NEW) :])
                            if index not in written:
                                kind, array = new_blobs[index]
                                written[index] = writer.add(kind, array.tobytes())
                            blob.offset = written[index]
                        else:
                            blob.offset = writer.copy_from(fh, blob.offset)
                        blob.fileName = BLOB_PATH
            writer.finish()
        (tmp / SPEC_FILE).write_bytes(spec.SerializeToString())
        shutil.copy2(src / "Manifest.json", tmp / "Manifest.json")
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_model_int8(model: Any, keep: Callable[[WeightConst], bool]) -> tuple[Any, Int8Result]:
    """:func:`quantize_int8` of a coremltools ``MLModel`` (an ML Program with its package
    on disk): returns a new ``MLModel`` of a temporary package (removed at exit, like the
    ones coremltools makes) and what was done.

    :raises Unsupported: as :func:`quantize_int8`.
    """
    from sora_export.core.backends.coreml import quiet_coremltools

    ct = quiet_coremltools()
    package = getattr(model, "package_path", None)
    if not package or not Path(package, "Manifest.json").exists():
        raise Unsupported("the model has no saved package")
    folder = Path(tempfile.mkdtemp(suffix=".mlpackage"))
    folder.rmdir()  # quantize_int8 creates it
    try:
        result = quantize_int8(Path(package), folder, keep, spec=model.get_spec())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    quantized = ct.models.MLModel(
        str(folder),
        skip_model_load=model.__proxy__ is None,
        is_temp_package=True,
        compute_units=model.compute_unit,
    )
    return quantized, result
