"""Stitch Core ML packages of consecutive parts into one package, streaming the weights.

Why: converting one big chunk (say 15 STDiT3 block pairs, 1.3 GB fp16) in one graph costs
memory proportional to the chunk and gives one process nothing to overlap with. Converting
its parts (one pair each) costs a fraction of the memory, runs in parallel workers and
caches part by part; this module then joins the parts' ML Programs into the one package
the device profile asked for. It works on the saved packages' protobuf and weight file:
operations are copied with their value names prefixed per part, each part's inputs are
bound to the chunk's inputs or an earlier part's outputs, and every weight blob is copied
from the part's ``weight.bin`` into the new one a blob at a time (never the whole model in
memory). The result is an ordinary ML Program; nothing is re-optimised, so the graph is
exactly the parts' graphs in sequence.

Weight files use the MIL blob storage layout (coremltools' ``milstorage``): a 64-byte
header (blob count, version 2), then per blob a 64-byte metadata record (sentinel
0xDEADBEEF, data type, size in bytes, data offset, padding bits, reserved) followed by its
data, each record aligned to 64 bytes. A const op names its blob by the metadata offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import attrs

SPEC_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")
BLOB_PATH = "@model_path/weights/weight.bin"
_SENTINEL = 0xDEADBEEF
_ALIGN = 64
_HEADER = struct.Struct("<II56x")  # count, version
_META = struct.Struct("<IIQQQ32x")  # sentinel, dtype, size, data offset, padding bits

# a part input bound to the chunk's input NAME, or to the previous part's output NAME
CHUNK_INPUT = "chunk:"
PREVIOUS_OUTPUT = "previous:"


@attrs.frozen
class BlobRecord:
    """One blob of a weight file: its metadata offset (what a const op names), MIL data
    type, size in bytes and data offset."""

    meta: int
    dtype: int
    size: int
    offset: int


def blob_records(path: Path) -> list[BlobRecord]:
    """Every blob of the weight file ``path``, in file order (reads only the metadata)."""
    records = []
    with open(path, "rb") as fh:
        count, _version = _HEADER.unpack(fh.read(_HEADER.size))
        at = _HEADER.size
        for _ in range(count):
            fh.seek(at)
            sentinel, dtype, size, offset, _padding = _META.unpack(fh.read(_META.size))
            if sentinel != _SENTINEL:
                raise StitchError(f"no weight blob at offset {at} of {path} (bad sentinel)")
            records.append(BlobRecord(at, dtype, size, offset))
            at = offset + size
            at += -at % _ALIGN
    return records


# pages sampled for the content probe of a blob: start, middle, end
_PROBE = 4096
_COPY_STEP = 64 << 20


def _probe_starts(size: int) -> list[int]:
    return sorted({0, max(0, size // 2 - _PROBE // 2), max(0, size - _PROBE)})


def _probe(fh: BinaryIO, at: int, size: int) -> bytes:
    """Digest of up to three pages of the ``size`` bytes at ``at`` (all of a small blob)."""
    digest = hashlib.blake2b(digest_size=20)
    for start in _probe_starts(size):
        fh.seek(at + start)
        digest.update(fh.read(min(_PROBE, size - start)))
    return digest.digest()


def _probe_bytes(data: bytes | memoryview) -> bytes:
    """:func:`_probe` of blob data held in memory."""
    digest = hashlib.blake2b(digest_size=20)
    for start in _probe_starts(len(data)):
        digest.update(data[start : start + _PROBE])
    return digest.digest()


def _same_bytes(a: BinaryIO, at_a: int, b: BinaryIO, at_b: int, size: int) -> bool:
    b.flush()
    for done in range(0, size, _COPY_STEP):
        step = min(_COPY_STEP, size - done)
        a.seek(at_a + done)
        b.seek(at_b + done)
        if a.read(step) != b.read(step):
            return False
    return True


def copy_range(src: BinaryIO, at: int, dst: BinaryIO, to: int, size: int) -> None:
    """Copy ``size`` bytes from ``src`` at ``at`` to ``dst`` at ``to`` (its end), leaving
    ``dst`` positioned after them: in the kernel where it can (Linux), else by reading."""
    dst.flush()
    copy = getattr(os, "copy_file_range", None)
    done = 0
    if copy is not None:
        try:
            while done < size:
                n = copy(src.fileno(), dst.fileno(), size - done, at + done, to + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # e.g. across file systems on old kernels: read and write instead
    while done < size:
        src.seek(at + done)
        data = src.read(min(_COPY_STEP, size - done))
        if not data:
            raise StitchError(f"weight blob at {at} of {src.name} is truncated")
        dst.seek(to + done)
        dst.write(data)
        done += len(data)
    dst.seek(to + size)


class StitchError(ValueError):
    """The parts cannot be joined (mismatched functions, wiring, unsupported content)."""


def read_spec(package: Path) -> Any:
    from sora_export.core.backends.coreml import quiet_coremltools

    quiet_coremltools()  # the first import of coremltools: as the backend makes it
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC_FILE).read_bytes())
    if spec.WhichOneof("Type") != "mlProgram":
        raise StitchError(f"{package}: not an ML Program")
    return spec


def read_blob(src: BinaryIO, offset: int) -> tuple[int, bytes]:
    """The (MIL data type, data) of the blob whose metadata is at ``offset`` of ``src``."""
    src.seek(offset)
    sentinel, dtype, size, data_offset, _padding = _META.unpack(src.read(_META.size))
    if sentinel != _SENTINEL:
        raise StitchError(f"no weight blob at offset {offset} of {src.name} (bad sentinel)")
    src.seek(data_offset)
    data = src.read(size)
    if len(data) != size:
        raise StitchError(f"weight blob at {offset} of {src.name} is truncated")
    return dtype, data


class BlobWriter:
    """Appends blobs copied from other weight files (or given), each distinct blob once.

    Blobs are deduplicated by content, so functions lowered separately from the same
    weights (e.g. ``plain`` and ``tdtm``) share their blobs (``dedup=False``: one blob per
    source blob, as rewriting one package wants). Content is first told apart by
    type, size and a digest of a few sampled pages (:data:`_PROBE`); only blobs that agree
    on those are read whole and compared. The data itself is copied by the kernel
    (``os.copy_file_range``) where there is one.
    """

    def __init__(self, fh: BinaryIO, dedup: bool = True) -> None:
        self.fh = fh
        self.dedup = dedup  # False: one blob per source blob, equal contents or not
        self.count = 0
        # (type, size, probe digest) -> data offsets (in fh) of the blobs written with it
        self.by_probe: dict[tuple[int, int, bytes], list[tuple[int, int]]] = {}
        self.by_source: dict[tuple[str, int], int] = {}
        fh.write(_HEADER.pack(0, 2))

    def copy_from(self, src: BinaryIO, offset: int) -> int:
        """Copy the blob whose metadata is at ``offset`` of ``src``; return its new offset."""
        source_key = (src.name, offset)
        if source_key in self.by_source:
            return self.by_source[source_key]
        src.seek(offset)
        sentinel, dtype, size, data_offset, padding = _META.unpack(src.read(_META.size))
        if sentinel != _SENTINEL:
            raise StitchError(f"no weight blob at offset {offset} of {src.name} (bad sentinel)")
        src.seek(0, os.SEEK_END)
        if data_offset + size > src.tell():
            raise StitchError(f"weight blob at {offset} of {src.name} is truncated")
        probe_key = (dtype, size, _probe(src, data_offset, size) if self.dedup else b"")
        for meta_at, written_at in self.by_probe.get(probe_key, []) if self.dedup else ():
            if _same_bytes(src, data_offset, self.fh, written_at, size):
                self.by_source[source_key] = meta_at
                return meta_at
        meta_at = self._meta(dtype, size, padding)
        copy_range(src, data_offset, self.fh, meta_at + _META.size, size)
        self.count += 1
        self.by_probe.setdefault(probe_key, []).append((meta_at, meta_at + _META.size))
        self.by_source[source_key] = meta_at
        return meta_at

    def add(self, dtype: int, data: bytes) -> int:
        """Append a blob of MIL type ``dtype`` holding ``data`` (unless an equal one is
        already written); return its metadata offset."""
        probe_key = (dtype, len(data), _probe_bytes(data) if self.dedup else b"")
        for meta_at, written_at in self.by_probe.get(probe_key, []) if self.dedup else ():
            self.fh.flush()
            self.fh.seek(written_at)
            if self.fh.read(len(data)) == data:
                return meta_at
        meta_at = self._meta(dtype, len(data), 0)
        self.fh.write(data)
        self.count += 1
        self.by_probe.setdefault(probe_key, []).append((meta_at, meta_at + _META.size))
        return meta_at

    def _meta(self, dtype: int, size: int, padding: int) -> int:
        """Write the metadata of a blob at the next aligned offset of the end; return it."""
        self.fh.seek(0, os.SEEK_END)
        pos = self.fh.tell()
        pad = -pos % _ALIGN
        meta_at = pos + pad
        self.fh.write(b"\0" * pad)
        self.fh.write(_META.pack(_SENTINEL, dtype, size, meta_at + _META.size, padding))
        return meta_at

    def finish(self) -> None:
        self.fh.seek(0, os.SEEK_END)
        end = self.fh.tell()
        self.fh.write(b"\0" * (-end % _ALIGN))
        self.fh.seek(0)
        self.fh.write(_HEADER.pack(self.count, 2))


def op_values(message: Any) -> Iterator[Any]:
    """Every ``Value`` proto held by an operation (attributes and bound input values)."""
    yield from message.attributes.values()
    for argument in message.inputs.values():
        for binding in argument.arguments:
            if binding.HasField("value"):
                yield binding.value


def _function_io(spec: Any, function: str) -> tuple[Any, Any]:
    """The (input, output) FeatureDescription lists of ``function`` in ``spec``."""
    desc = spec.description
    if len(desc.functions):
        for f in desc.functions:
            if f.name == function:
                return f.input, f.output
        raise StitchError(f"no function {function!r} (has {[f.name for f in desc.functions]})")
    if function != "main":
        raise StitchError(f"single-function part has no function {function!r}")
    return desc.input, desc.output


PartFunctions = Mapping[str, tuple[Path, str]]


def stitch_packages(
    parts: Sequence[PartFunctions],
    wiring: Sequence[Mapping[str, str]],
    functions: Sequence[str],
    dest: Path,
) -> None:
    """Join consecutive parts into the package ``dest``.

    ``parts[k]`` maps each function name to where part ``k``'s version of it is: a saved
    .mlpackage and the function inside it (``"main"`` for a single-function package), so
    the functions of one part may come from one multifunction package or from separate
    ones. ``wiring[k]`` maps every input of part ``k`` to ``"chunk:NAME"`` (an input of the
    stitched package) or ``"previous:NAME"`` (output NAME of part ``k - 1``). The stitched
    package's outputs are the last part's outputs, by their names. It has ``functions``
    (a single-function package when that is ``("main",)``), sharing identical weight
    blobs.

    :raises StitchError: when the parts or wiring do not fit together.
    """
    from coremltools.proto import Model_pb2

    if not parts:
        raise StitchError("nothing to stitch")
    if len(wiring) != len(parts):
        raise StitchError(f"{len(parts)} parts but {len(wiring)} wirings")
    for k, part in enumerate(parts):
        missing = [f for f in functions if f not in part]
        if missing:
            raise StitchError(f"part {k} lacks function(s) {missing}")
    packages = sorted({pkg for part in parts for pkg, _ in part.values()})
    specs = {pkg: read_spec(pkg) for pkg in packages}
    multi = len(functions) > 1 or functions[0] != "main"
    dest.mkdir(parents=True)
    (dest / WEIGHTS_FILE).parent.mkdir(parents=True)
    first = specs[parts[0][functions[0]][0]]
    out = Model_pb2.Model()
    out.specificationVersion = max(s.specificationVersion for s in specs.values())
    out.description.metadata.CopyFrom(first.description.metadata)
    out.mlProgram.version = first.mlProgram.version
    for key, value in first.mlProgram.attributes.items():
        out.mlProgram.attributes[key].CopyFrom(value)
    with ExitStack() as stack:
        sources = {
            pkg: stack.enter_context(open(pkg / WEIGHTS_FILE, "rb"))
            for pkg in packages
            if (pkg / WEIGHTS_FILE).exists()
        }
        fh = stack.enter_context(open(dest / WEIGHTS_FILE, "w+b"))
        writer = BlobWriter(fh)
        for function in functions:
            chain = [
                (specs[part[function][0]], part[function][1], part[function][0]) for part in parts
            ]
            _stitch_function(function, chain, wiring, sources, writer, out, multi)
        writer.finish()
    if multi:
        out.description.defaultFunctionName = functions[0]
    (dest / SPEC_FILE).write_bytes(out.SerializeToString())
    shutil.copy2(parts[0][functions[0]][0] / "Manifest.json", dest / "Manifest.json")
    json.loads((dest / "Manifest.json").read_text())  # the package index must parse


def _stitch_function(
    function: str,
    chain: Sequence[tuple[Any, str, Path]],
    wiring: Sequence[Mapping[str, str]],
    sources: Mapping[Path, BinaryIO],
    writer: BlobWriter,
    out: Any,
    multi: bool,
) -> None:
    """Append ``function`` to ``out``: the parts' (spec, inner function, package) in order."""
    last = len(chain) - 1
    new_fn = None
    chunk_inputs: dict[str, Any] = {}  # name -> (NamedValueType, FeatureDescription)
    outputs_of_previous: dict[str, str] = {}
    final_out: Any = ()
    opset = ""
    block = None
    for k, (spec, inner, package) in enumerate(chain):
        if inner not in spec.mlProgram.functions:
            raise StitchError(f"part {k}: {package} has no function {inner!r}")
        fn = spec.mlProgram.functions[inner]
        if new_fn is None:
            opset = fn.opset
            new_fn = out.mlProgram.functions[function]
            new_fn.opset = opset
            block = new_fn.block_specializations[opset]
        elif fn.opset != opset:
            raise StitchError(f"part {k} uses opset {fn.opset}, part 0 {opset}")
        src_block = fn.block_specializations[fn.opset]
        desc_in, desc_out = _function_io(spec, inner)
        desc_by_name = {d.name: d for d in desc_in}
        rename: dict[str, str] = {}
        for var in fn.inputs:
            source = wiring[k].get(var.name)
            if source is None:
                raise StitchError(f"part {k}: input {var.name!r} is not wired")
            if source.startswith(CHUNK_INPUT):
                name = source[len(CHUNK_INPUT) :]
                if name not in chunk_inputs:
                    chunk_inputs[name] = (var, desc_by_name[var.name])
                rename[var.name] = name
            elif source.startswith(PREVIOUS_OUTPUT):
                name = source[len(PREVIOUS_OUTPUT) :]
                if k == 0 or name not in outputs_of_previous:
                    raise StitchError(f"part {k}: {source!r} names no output of the part before")
                rename[var.name] = outputs_of_previous[name]
            else:
                raise StitchError(f"part {k}: wiring {source!r} is neither chunk: nor previous:")
        keep = set(src_block.outputs) if k == last else set()
        prefix = f"p{k}_"
        for op in src_block.operations:
            if op.blocks:
                raise StitchError(f"part {k}: op {op.type} has nested blocks (not supported)")
            for o in op.outputs:
                rename[o.name] = o.name if o.name in keep else prefix + o.name
        for op in src_block.operations:
            new = block.operations.add()
            new.CopyFrom(op)
            for o in new.outputs:
                o.name = rename[o.name]
            for argument in new.inputs.values():
                for binding in argument.arguments:
                    if binding.HasField("name"):
                        binding.name = rename.get(binding.name, binding.name)
            name_attr = new.attributes.get("name")
            if name_attr is not None and name_attr.immediateValue.tensor.strings.values:
                values = name_attr.immediateValue.tensor.strings.values
                values[0] = prefix + values[0]
            for value in op_values(new):
                if value.WhichOneof("value") == "blobFileValue":
                    blob = value.blobFileValue
                    if package not in sources:
                        raise StitchError(f"part {k}: {package} references weights it lacks")
                    blob.offset = writer.copy_from(sources[package], blob.offset)
                    blob.fileName = BLOB_PATH
        outputs_of_previous = {name: rename[name] for name in src_block.outputs}
        if k == last:
            block.outputs.extend(src_block.outputs)
            final_out = desc_out
    assert new_fn is not None
    for name, (var, _desc) in chunk_inputs.items():
        added = new_fn.inputs.add()
        added.CopyFrom(var)
        added.name = name
    descs = [d for _, d in chunk_inputs.values()]
    if multi:
        fdesc = out.description.functions.add()
        fdesc.name = function
        target_in, target_out = fdesc.input, fdesc.output
    else:
        target_in, target_out = out.description.input, out.description.output
    for name, d in zip(chunk_inputs, descs, strict=True):
        added = target_in.add()
        added.CopyFrom(d)
        added.name = name
    for d in final_out:
        target_out.add().CopyFrom(d)
