"""Lower one part, bind the weights of its look-alikes: template rebinding.

The 28 block pairs of STDiT3-XL/2 (or the 24 blocks of T5-XXL) are one architecture with
different weights. Capturing and lowering each of them costs seconds of tracing and
converter passes that compute the same graph every time; only the weight values differ.
So a plugin may give its parts a ``template`` name (:attr:`Chunk.template`), and the
engine lowers that template once and writes every part's lowered package by putting the
part's own weights into the template's weight file.

Where does each parameter land in the lowered weights? The converter may transpose,
reshape, cast or fold them, so the template is lowered twice, each time with its
parameters replaced by seeded random *markers* (seeds :data:`MARKER_SEEDS`); then

- every numeric value written inline in the graph (by op name and input) must be the
  same in both, or one parameter's markers as stored in both (bound like a blob);
- every weight blob of the first lowering must be one parameter's markers as stored -- as
  is or transposed, in fp16 or fp32 -- with the second lowering holding that parameter's
  second markers the same way (:class:`Binding`), or else a constant of the graph that the
  second lowering holds too.

Anything else (a blob or value folded from two parameters) raises
:class:`RebindError` and the engine converts the parts one by one as before. A part is
bound only when its parameters have the template's shapes and dtypes in the same order
and its buffers (and integer parameters) equal the template's (:func:`signature`).

What the check cannot see: a value the converter computes from the weights that both
marker sets happen to give alike (say, a comparison of a weight against a threshold the
small markers never reach) passes for a constant. Transformer blocks compute no such
thing, and a verified export (the default) still compares every stitched chunk with
PyTorch.

Quantized packages are bound the same way: the two marker lowerings are quantized by the
quantize hook and compared with quantized layouts among the candidates (int8 data and
per-channel scales, :func:`int8_per_channel`), so only what really matches coremltools'
quantizer byte for byte is bound.

The weight file layout is the MIL blob storage of Core ML packages
(:func:`sora_export.core.backends.stitch.blob_records`). Rebinding never loads a model:
it copies the template package and overwrites the parameters' blob data in place, so a
part costs building its module and writing its weights. Re-quantizing a part whose lowered
package was bound does not even build the module: :func:`read_bound` reads its weights
back from that package.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from sora_export.core.backends.stitch import (
    SPEC_FILE,
    WEIGHTS_FILE,
    blob_records,
    copy_range,
    read_spec,
)

MARKER_SEEDS = (1, 2)
MARKER_SCALE = 0.05


class RebindError(ValueError):
    """The template cannot be used: the lowered weights are not the parameters as stored."""


def _digest(buffer: Any) -> bytes:
    return hashlib.blake2b(buffer, digest_size=20).digest()


def _raw(t: torch.Tensor) -> Any:
    """A contiguous tensor's bytes as a uint8 array (no copy)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def signature(module: torch.nn.Module) -> dict[str, list]:
    """What two parts must share to be bound through one template: the floating-point
    parameters' shapes and dtypes in order, and every other tensor's exact value."""
    params, fixed = [], []
    for _, p in module.named_parameters():
        if p.is_floating_point():
            params.append([list(p.shape), str(p.dtype)])
        else:
            fixed.append([list(p.shape), str(p.dtype), _tensor_digest(p)])
    for _, b in module.named_buffers():
        fixed.append([list(b.shape), str(b.dtype), _tensor_digest(b)])
    return {"params": params, "fixed": fixed}


def _tensor_digest(t: torch.Tensor) -> str:
    return _digest(_raw(t.detach())).hex()


def floating_params(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters bindings index, in :func:`signature` order."""
    return [p.detach() for _, p in module.named_parameters() if p.is_floating_point()]


def marker(index: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Parameter ``index``'s marker values under ``seed``: seeded, distinct per parameter."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(tuple(shape), generator=g).mul_(MARKER_SCALE)


def fill_markers(module: torch.nn.Module, seed: int) -> None:
    """Replace every floating-point parameter of ``module`` with its markers."""
    with torch.no_grad():
        for i, p in enumerate(floating_params(module)):
            p.copy_(marker(i, p.shape, seed))


@attrs.frozen
class Encoding:
    """How a parameter is stored in a blob: laid out as is or transposed (2-D), then as
    ``fp16`` / ``fp32`` values, or quantized to ``int8`` per channel along ``axis`` (-1:
    one scale for the whole tensor) the
    way coremltools' linear-symmetric quantizer does it, as its ``data`` or ``scale``."""

    kind: str  # fp16 | fp32 | int8
    transpose: bool = False
    axis: int = 0
    piece: str = ""  # int8: data | scale

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        t = value.t() if self.transpose else value
        if self.kind == "fp16":
            return t.to(torch.float16).contiguous()
        if self.kind == "fp32":
            return t.to(torch.float32).contiguous()
        data, scale = int8_per_channel(t.to(torch.float16), self.axis)
        return data if self.piece == "data" else scale

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes this encoding of a parameter of ``shape`` takes (without encoding it)."""
        if self.kind != "int8":
            return math.prod(shape) * (2 if self.kind == "fp16" else 4)
        if self.piece == "data":
            return math.prod(shape)
        stored = list(reversed(shape)) if self.transpose else list(shape)
        return 2 * (stored[self.axis] if self.axis >= 0 else 1)

    def __str__(self) -> str:
        name = f"{self.kind}{'.T' if self.transpose else ''}"
        return f"{name}[axis {self.axis}].{self.piece}" if self.kind == "int8" else name


def _reduced_dims(weight: torch.Tensor, axis: int) -> list[int]:
    return [d for d in range(weight.dim()) if d != axis]


def int8_per_channel(
    weight: torch.Tensor, axis: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """coremltools' ``linear_symmetric`` int8 per-channel quantization of an fp16 tensor,
    in torch: the same fp16 arithmetic (each op computed in fp32 and rounded to fp16, as
    numpy does for float16), so the same bytes. Returns (int8 data, fp16 scale). Whether
    it really matches is checked, not assumed: :func:`derive_bindings` only binds a blob
    whose bytes these give for both marker sets, and the direct int8 writer that uses it
    (:mod:`sora_export.core.backends.mil_int8`) is compared with coremltools blob by blob
    in tests/test_mil_int8.py. ``scale``: :func:`int8_scale` of the same weight and axis,
    when already computed."""
    scale = int8_scale(weight, axis) if scale is None else scale
    data = torch.round(weight / scale).clamp_(-127, 127).to(torch.int8)
    return data.contiguous(), scale


def int8_scale(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """The scales of :func:`int8_per_channel` alone (a fraction of its work)."""
    dims = _reduced_dims(weight, axis)  # axis -1: every dim (per tensor)
    low = weight.amin(dim=dims, keepdim=True)
    high = weight.amax(dim=dims, keepdim=True)
    max_abs = torch.maximum(low.abs(), high.abs())
    if bool((max_abs == 0).any()):
        raise RebindError("a channel is all zeros (its scale would be 0)")
    return ((max_abs - (-max_abs)) / 254).contiguous()  # (max - min) / (127 - (-127))


@attrs.frozen
class Binding:
    """One weight blob of the template, at ``offset`` (data) of ``size`` bytes, that holds
    parameter ``param`` stored as ``encoding`` -- or, with ``inline``, a value written
    into the graph itself (e.g. the 6 int8 scales of STDiT3's ``scale_shift_table``)."""

    offset: int
    size: int
    param: int
    encoding: Encoding
    # a value written inline in the graph instead: (op name, which input or attribute)
    inline: tuple[str, str] | None = None


class _Encoder:
    """One parameter's encodings, computing each int8 quantization once for both pieces."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.int8: dict[tuple[bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: dict[tuple[bool, int], torch.Tensor] = {}

    def __call__(self, encoding: Encoding) -> torch.Tensor:
        if encoding.kind != "int8":
            return encoding.encode(self.value)
        key = (encoding.transpose, encoding.axis)
        if key not in self.int8:
            self.int8[key] = int8_per_channel(
                self._fp16(encoding.transpose), encoding.axis, self.scales.get(key)
            )
        data, scale = self.int8[key]
        return data if encoding.piece == "data" else scale

    def scale(self, encoding: Encoding) -> torch.Tensor:
        """An int8 encoding's scales, without quantizing the data (kept for it)."""
        key = (encoding.transpose, encoding.axis)
        if key in self.int8:
            return self.int8[key][1]
        if key not in self.scales:
            self.scales[key] = int8_scale(self._fp16(encoding.transpose), encoding.axis)
        return self.scales[key]

    def _fp16(self, transpose: bool) -> torch.Tensor:
        return (self.value.t() if transpose else self.value).to(torch.float16)


def _encodings(value: torch.Tensor, quantized: bool) -> Iterable[Encoding]:
    for transpose in (False, True) if value.dim() == 2 else (False,):
        yield Encoding("fp16", transpose)
        yield Encoding("fp32", transpose)
        if quantized and value.dim() >= 1:
            for axis in (*range(min(value.dim(), 2)), -1):
                yield Encoding("int8", transpose, axis, "data")
                yield Encoding("int8", transpose, axis, "scale")


def _inline_slots(spec: Any) -> dict[tuple[str, str], Any]:
    """Every numeric tensor written into the graph (op attributes and inputs given as
    immediate values) by (op name, input or attribute): stable across runs, unlike the
    order the converter emits ops in."""
    out: dict[tuple[str, str], Any] = {}

    def walk(block: Any) -> None:
        for position, op in enumerate(block.operations):
            name = f"{op.type}#{position}"  # (every op the converter writes has a name)
            if "name" in op.attributes:
                name = op.attributes["name"].immediateValue.tensor.strings.values[0]
            values = [(f"@{k}", v) for k, v in op.attributes.items() if k != "name"]
            for arg, argument in op.inputs.items():
                values += [
                    (f"{arg}[{i}]", b.value)
                    for i, b in enumerate(argument.arguments)
                    if b.HasField("value")
                ]
            for where, value in values:
                if value.HasField("immediateValue"):
                    tensor = value.immediateValue.tensor
                    if tensor.WhichOneof("value") != "strings":
                        key = (name, where)
                        if key in out:
                            raise RebindError(f"two ops named {name!r} in the lowered graph")
                        out[key] = tensor
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return out


def _inline_raw(tensor: Any) -> bytes | None:
    """An inline tensor's values as stored bytes (fp16 / int8 are ``bytes``, fp32
    ``floats``); None for kinds we do not bind."""
    kind = tensor.WhichOneof("value")
    if kind == "bytes":
        return bytes(tensor.bytes.values)
    if kind == "floats":
        return np.asarray(tensor.floats.values, dtype=np.float32).tobytes()
    return None


def _set_inline(tensor: Any, raw: bytes) -> None:
    if tensor.WhichOneof("value") == "bytes":
        tensor.bytes.values = raw
    else:
        tensor.floats.values[:] = np.frombuffer(raw, dtype=np.float32).tolist()


def derive_bindings(
    first: Path, second: Path, params: Sequence[Sequence[int]], quantized: bool = False
) -> list[Binding]:
    """Where each parameter lands in a template package, from its two marker lowerings.

    ``first`` and ``second`` are the same function lowered (and, with ``quantized``,
    quantized) with markers of :data:`MARKER_SEEDS` ``[0]`` and ``[1]``; ``params`` are
    the floating parameters' shapes (:func:`signature`). The bindings are offsets in
    ``first``.

    The converter may emit the same graph with its ops in another order from one run to
    the next (coremltools does, for shape-polymorphic programs), so the lowerings are
    compared as collections: the same numeric values inline in the graph, and the same
    weight blobs once each parameter's blobs are accounted for (``first``'s holding the
    first markers, ``second``'s the second). Raises :class:`RebindError` when anything
    else differs: a parameter-dependent value inline, or a blob that is not a parameter
    as stored (folded by the converter, or quantized some other way).
    """
    inline_a, inline_b = _inline_slots(read_spec(first)), _inline_slots(read_spec(second))
    if inline_a.keys() != inline_b.keys():
        raise RebindError("the two lowerings write different values into the graph")
    varying_inline = []
    for key, tensor in inline_a.items():
        if tensor.SerializeToString(deterministic=True) != inline_b[key].SerializeToString(
            deterministic=True
        ):
            raw_a, raw_b = _inline_raw(tensor), _inline_raw(inline_b[key])
            if raw_a is None or raw_b is None or len(raw_a) != len(raw_b):
                raise RebindError(f"a value inline in the graph ({key}) depends on the weights")
            varying_inline.append((key, raw_a, raw_b))
    weights_a, weights_b = first / WEIGHTS_FILE, second / WEIGHTS_FILE
    if weights_a.exists() != weights_b.exists():
        raise RebindError("only one of the two lowerings has a weight file")
    blobs_a = _blob_digests(weights_a) if weights_a.exists() else []
    blobs_b = _blob_digests(weights_b) if weights_b.exists() else []
    if not blobs_a and not varying_inline:
        return []
    seed_a, seed_b = MARKER_SEEDS
    remaining_b = Counter((size, digest) for _, size, digest in blobs_b)
    # every parameter's first markers as the converter may store them, by content
    wanted = {(size, digest) for _, size, digest in blobs_a}
    wanted |= {(len(raw), _digest(raw)) for _, raw, _ in varying_inline}
    sizes = {size for size, _ in wanted}
    # (size, digest) -> every (parameter, encoding) giving those bytes, with the digest of
    # the same encoding of the parameter's second markers (small blobs, e.g. one int8
    # scale, may match several parameters: the second markers tell them apart)
    found: dict[tuple[int, bytes], list[tuple[int, Encoding, bytes]]] = {}
    for index, shape in enumerate(params):
        value, second = marker(index, shape, seed_a), None
        encoder = _Encoder(value)
        for encoding in _encodings(value, quantized):
            if encoding.nbytes(shape) not in sizes:
                continue  # nothing stored has its size: not worth encoding and hashing
            if encoding.kind == "int8" and _key(encoder.scale(encoding)) not in wanted:
                continue  # no blob or inline value holds these scales: skip the data too
            encoded = encoder(encoding)
            key = _key(encoded)
            if key in wanted:
                second = second or _Encoder(marker(index, shape, seed_b))
                found.setdefault(key, []).append((index, encoding, _digest(_raw(second(encoding)))))

    def pick(key: tuple[int, bytes], fits: Callable[[bytes], bool], where: str) -> Any:
        """The one parameter whose first markers give ``key`` and second ``fits``."""
        hits = [h for h in found.get(key, []) if fits(h[2])]
        if len({h[0] for h in hits}) > 1:
            raise RebindError(f"{where} matches several parameters")
        return hits[0] if hits else None

    bindings = []
    for offset, size, digest in blobs_a:
        where = f"a weight blob ({size} bytes at offset {offset})"
        hit = pick((size, digest), lambda d, size=size: remaining_b[(size, d)] > 0, where)
        if hit is not None:
            index, encoding, expected = hit
            remaining_b[(size, expected)] -= 1
            bindings.append(Binding(offset, size, index, encoding))
        elif found.get((size, digest)):
            raise RebindError(
                f"parameter {found[(size, digest)][0][0]} lands differently in the two lowerings"
            )
        elif remaining_b[(size, digest)]:  # a constant of the graph, in both
            remaining_b[(size, digest)] -= 1
        else:
            raise RebindError(
                f"a weight blob ({size} bytes at offset {offset}) is not a parameter as "
                "stored (the converter folded it?)"
            )
    if +remaining_b:
        raise RebindError("the second lowering has weight blobs the first lacks")
    for key, raw_a, raw_b in varying_inline:
        where = f"a value inline in the graph ({key})"
        digest_b = _digest(raw_b)
        hit = pick((len(raw_a), _digest(raw_a)), lambda d, b=digest_b: d == b, where)
        if hit is None:
            raise RebindError(f"{where} depends on the weights")
        bindings.append(Binding(-1, len(raw_a), hit[0], hit[1], inline=key))
    return bindings


def bindings_to_json(bindings: Sequence[Binding]) -> list[dict[str, Any]]:
    """Bindings as JSON-ready records (derived once, kept beside the template)."""
    return [attrs.asdict(b) for b in bindings]


def bindings_from_json(records: Sequence[dict[str, Any]]) -> list[Binding]:
    return [
        Binding(
            offset=r["offset"],
            size=r["size"],
            param=r["param"],
            encoding=Encoding(**r["encoding"]),
            inline=tuple(r["inline"]) if r["inline"] is not None else None,  # type: ignore[arg-type]
        )
        for r in records
    ]


def read_bound(
    package: Path, bindings: Sequence[Binding], shapes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """The parameters a package written by :func:`write_rebound` with ``bindings`` holds,
    decoded from their fp16 / fp32 blobs (or inline values), in the dtype stored: the part's
    weights as its lowered package has them, without building the part.

    Raises :class:`RebindError` when a parameter is bound only in a form that cannot be
    decoded exactly (quantized)."""
    found: dict[int, Binding] = {}
    for binding in bindings:
        if binding.encoding.kind in ("fp16", "fp32") and binding.param not in found:
            found[binding.param] = binding
    missing = [i for i in range(len(shapes)) if i not in found]
    if missing:
        raise RebindError(f"parameter {missing[0]} is not stored as fp16 or fp32 values")
    slots = None
    params = []
    with contextlib.ExitStack() as stack:
        weights = None
        for index, shape in enumerate(shapes):
            binding = found[index]
            if binding.inline is not None:
                slots = slots if slots is not None else _inline_slots(read_spec(package))
                if binding.inline not in slots:
                    raise RebindError(f"{package.name} has no inline value {binding.inline}")
                raw = _inline_raw(slots[binding.inline]) or b""
            else:
                if weights is None:
                    weights = stack.enter_context(open(package / WEIGHTS_FILE, "rb"))
                weights.seek(binding.offset)
                raw = weights.read(binding.size)
            dtype = torch.float16 if binding.encoding.kind == "fp16" else torch.float32
            stored = list(reversed(shape)) if binding.encoding.transpose else list(shape)
            if len(raw) != binding.size or binding.size != math.prod(shape) * dtype.itemsize:
                raise RebindError(f"parameter {index}'s bytes in {package.name} are cut short")
            value = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(stored)
            params.append(value.t() if binding.encoding.transpose else value)
    return params


def _key(encoded: torch.Tensor) -> tuple[int, bytes]:
    """(size in bytes, digest) of an encoded parameter, as blobs are compared."""
    return encoded.numel() * encoded.element_size(), _digest(_raw(encoded))


def _blob_digests(path: Path) -> list[tuple[int, int, bytes]]:
    """(data offset, size, digest) of every blob of a weight file."""
    out = []
    with open(path, "rb") as fh:
        for rec in blob_records(path):
            fh.seek(rec.offset)
            out.append((rec.offset, rec.size, _digest(fh.read(rec.size))))
    return out


def write_rebound(
    template: Path, bindings: Sequence[Binding], params: Sequence[torch.Tensor], dest: Path
) -> None:
    """Write ``dest``: the ``template`` package with ``params`` bound into its weights
    (and into the values written inline in its graph)."""
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(WEIGHTS_FILE.name))
    encoders: dict[int, _Encoder] = {}

    def encoded(binding: Binding) -> torch.Tensor:
        encoder = encoders.setdefault(binding.param, _Encoder(params[binding.param]))
        data = encoder(binding.encoding)
        if data.numel() * data.element_size() != binding.size:
            raise RebindError(
                f"parameter {binding.param} has {data.numel()} values, the template "
                f"holds {binding.size} bytes for it"
            )
        return data

    inline = [b for b in bindings if b.inline is not None]
    if inline:
        spec = read_spec(template)
        slots = _inline_slots(spec)
        for binding in inline:
            _set_inline(slots[binding.inline], _raw(encoded(binding)).tobytes())
        (dest / SPEC_FILE).write_bytes(spec.SerializeToString())
    if not (template / WEIGHTS_FILE).exists():
        return
    # written front to back once: the template's bytes up to each bound blob, its data
    source = template / WEIGHTS_FILE
    end = source.stat().st_size
    with open(source, "rb") as src, open(dest / WEIGHTS_FILE, "w+b") as fh:
        at = 0
        for binding in sorted(bindings, key=lambda b: b.offset):
            if binding.inline is not None:
                continue
            data = _raw(encoded(binding))
            copy_range(src, at, fh, at, binding.offset - at)
            fh.write(data)
            at = binding.offset + binding.size
        copy_range(src, at, fh, at, end - at)
