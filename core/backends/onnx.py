"""ONNX backend: ONNX models from the shared torch.export program, run in ONNX Runtime.

An artifact is a directory ``NN-chunk.onnx/`` (like an ``.mlpackage``) holding one
``<function>.onnx`` graph per function (``main``, or ``plain`` and its variants). When the
weights are large (or shared by several functions) they live in one ``weights.bin`` beside
the graphs as ONNX external data; every distinct tensor is stored there once and each
function's graph references it by offset. A runtime opens ``<artifact>/<function>.onnx`` by
path; ONNX Runtime resolves ``weights.bin`` relative to it.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import logging
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sora_export.core.types import Chunk, DeviceProfile, TensorSpec

MIN_OPSET = 18  # the lowest opset torch's exporter produces (asked for less, it keeps 18)
WEIGHTS_FILE = "weights.bin"
# Above this many bytes of initializers a single-function artifact also moves its weights to
# weights.bin: protobuf cannot serialise a message over 2 GB, and a small graph file loads
# (and is inspected) without reading the weights.
EXTERNAL_DATA_THRESHOLD_BYTES = 100 * 2**20
# Tensors smaller than this (shapes, scalars, norms of tiny models) stay inside the graph:
# shape inference and graph tools need them and they cost nothing.
INLINE_TENSOR_BYTES = 1024
# Offsets in weights.bin: large tensors start on a 64 KiB boundary (the largest memory-map
# granularity among ONNX Runtime's platforms, so they can be mapped in place), the rest on
# 64 bytes (a cache line).
_LARGE_TENSOR_BYTES = 2**20
_LARGE_ALIGN = 2**16
_SMALL_ALIGN = 64
# ``<variant>@<shape>`` names the functions of per-shape artifacts
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*$")
_SESSION_CACHE_SIZE = 2  # like the device: the running chunk and the next


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's per-export chatter (missing torchvision ops, deprecations).

    The engine reports progress itself; logger levels are restored afterwards.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _float16_converter() -> Any:
    """ONNX Runtime's fp32 -> fp16 model converter (``onnxruntime.transformers.float16``).

    Importing ``onnxruntime.transformers`` appends that package's folder to ``sys.path`` so
    its scripts can import each other; the converter needs none of them, so the entry is
    removed again rather than exposing ~100 script modules as top-level names.
    """
    before = list(sys.path)
    try:
        module = importlib.import_module("onnxruntime.transformers.float16")
    finally:
        sys.path[:] = before
    return module.convert_float_to_float16


def _onnx_dtype(spec: TensorSpec) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))


def check_io(model: onnx.ModelProto, chunk: Chunk) -> None:
    """Raise ValueError unless the graph's inputs/outputs are the chunk's, in order.

    Names and element types must match the chunk's specs. A dimension must equal the spec's
    unless the graph leaves it symbolic (a ``dim_param``): a program captured with a
    ``torch.export.Dim`` keeps that axis dynamic, and the spec then gives its example size.
    """
    graph = model.graph
    for kind, values, specs in (
        ("input", graph.input, chunk.inputs),
        ("output", graph.output, chunk.outputs),
    ):
        got = [v.name for v in values]
        want = [s.name for s in specs]
        if got != want:
            raise ValueError(f"{chunk.key}: ONNX graph {kind}s are {got}, chunk declares {want}")
        for value, spec in zip(values, specs, strict=True):
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type != _onnx_dtype(spec):
                got_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
                raise ValueError(
                    f"{chunk.key}: ONNX {kind} {spec.name!r} has dtype {got_dtype}, "
                    f"chunk declares {spec.dtype}"
                )
            dims = tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            mismatch = len(dims) != len(spec.shape) or any(
                d.HasField("dim_value") and d.dim_value != n
                for d, n in zip(dims, spec.shape, strict=False)
            )
            if mismatch:
                raise ValueError(
                    f"{chunk.key}: ONNX {kind} {spec.name!r} has shape {shape}, "
                    f"chunk declares {list(spec.shape)}"
                )


def _name_dynamic_axes(
    model: onnx.ModelProto, program: torch.export.ExportedProgram, input_names: Sequence[str]
) -> None:
    """Rename the exporter's size symbols (``s17``) after the inputs that carry them."""
    placeholders = [
        n
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in set(map(str, program.graph_signature.user_inputs))
    ]
    names: dict[str, str] = {}
    for input_name, node in zip(input_names, placeholders, strict=False):
        value = node.meta.get("val")
        for axis, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, torch.SymInt) and str(size).isidentifier():
                names.setdefault(str(size), f"{input_name}_{axis}")
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _match_initializer_types(graph: onnx.GraphProto) -> None:
    """Make ``value_info`` agree with the initializers' element types.

    The fp16 converter keeps the float scales of a blocked op (``Resize``, as a
    shape-polymorphic upsample exports it) in fp32 but still records them as fp16 in
    ``value_info``, which the full checker rejects.
    """
    types = {t.name: t.data_type for t in graph.initializer}
    for value in graph.value_info:
        want = types.get(value.name)
        if want is not None and value.type.tensor_type.elem_type != want:
            value.type.tensor_type.elem_type = want


def _set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Add or update model-level metadata entries, keeping any others."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


def dynamic_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """``{input or output name: {axis: symbol}}`` for every symbolic (dynamic) dimension."""
    out: dict[str, dict[int, str]] = {}
    for value in (*model.graph.input, *model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                out.setdefault(value.name, {})[axis] = dim.dim_param
    return out


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Every value name a node's subgraphs (If/Loop/Scan bodies) read, at any depth."""
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for inner in sub.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically, keeping the given order wherever it is free.

    A node waits for the producers of its inputs and of the outer values its subgraphs
    read; graph inputs, initializers and outer-scope values are available from the start.
    Raises ValueError on a cycle.
    """
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    waiting_on: list[set[int]] = []
    for i, node in enumerate(nodes):
        deps = {
            producer[name] for name in (*node.input, *_subgraph_inputs(node)) if name in producer
        }
        deps.discard(i)
        waiting_on.append(deps)
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting_on):
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting_on[u].discard(i)
            if not waiting_on[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting_on[i]]
        raise ValueError(f"ONNX graph has a cycle through node(s) {stuck[:5]}")
    if order == list(range(len(nodes))):
        return
    sorted_nodes = [onnx.NodeProto() for _ in nodes]
    for new, old in zip(sorted_nodes, order, strict=True):
        new.CopyFrom(nodes[old])
    del graph.node[:]
    graph.node.extend(sorted_nodes)


class ONNXBackend:
    """Lower to ONNX (fp32 or fp16 with fp32 I/O), save as a directory, run in ONNX Runtime."""

    name = "onnx"
    suffix = ".onnx"

    def lower(
        self,
        program: torch.export.ExportedProgram,
        chunk: Chunk,
        profile: DeviceProfile,
        precision: str,
        enumerated: Mapping[str, Sequence[tuple[int, ...]]] | None = None,
    ) -> onnx.ModelProto:
        """Export the captured ``program`` to an in-memory ONNX model.

        The program is not modified, so the same capture can feed other backends. The
        model's default-domain opset is ``profile.onnx_opset``; its inputs and outputs are
        named, typed and shaped as ``chunk.inputs``/``chunk.outputs`` (see :func:`check_io`;
        axes the program captured as dynamic stay dynamic). ``fp16`` converts weights and
        compute to float16 and keeps float32 graph inputs and outputs (casts at the
        boundary), so a runtime feeds both precisions the same arrays.

        A shape-polymorphic program (``enumerated`` names its varying inputs) keeps its
        dynamic axes; each is named ``<input>_<axis>`` after the first input that has it
        (axes tied to one ``torch.export.Dim`` share the name), and output axes derived
        from them read e.g. ``2*tokens_2``.
        """
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"ONNX lowering precision must be fp16 or fp32, got {precision!r}")
        opset = profile.onnx_opset
        if opset < MIN_OPSET:
            raise ValueError(
                f"profile {profile.name!r}: onnx_opset {opset} is below {MIN_OPSET}, the "
                "lowest opset torch's exporter produces"
            )
        user_inputs = program.graph_signature.user_inputs
        if len(user_inputs) != len(chunk.inputs):
            raise ValueError(
                f"{chunk.key}: the captured program takes {len(user_inputs)} inputs "
                f"({', '.join(map(str, user_inputs))}), chunk declares {len(chunk.inputs)}"
            )
        with _quiet_exporter():
            exported = torch.onnx.export(
                program,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=[s.name for s in chunk.inputs],
                output_names=[s.name for s in chunk.outputs],
                optimize=True,
                verbose=False,
            )
            model = exported.model_proto
        del exported  # holds views of the program's weights
        got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if got_opset != opset:
            raise ValueError(f"{chunk.key}: asked torch.onnx for opset {opset}, got {got_opset}")
        check_io(model, chunk)
        if enumerated:
            _name_dynamic_axes(model, program, [s.name for s in chunk.inputs])
        if precision == "fp16":
            convert = _float16_converter()
            # The exporter records every intermediate value's type, so the converter needs
            # no onnx shape inference (which serialises the model and fails above 2 GB).
            # The converter edits the model in place; it is ours alone here.
            model = convert(model, keep_io_types=True, disable_shape_infer=True)
            _match_initializer_types(model.graph)
            # it appends its boundary casts at the end of the node list; ONNX requires
            # topological order (ONNX Runtime sorts for itself, the checker does not)
            sort_nodes(model.graph)
        _set_metadata(model, {"sora_export.chunk": chunk.key, "sora_export.precision": precision})
        return model

    def save(self, models: dict[str, onnx.ModelProto], path: Path) -> tuple[str, ...]:
        """Create the directory ``path`` (it must not exist) with ``<function>.onnx`` per entry.

        Several functions, or initializers over ``EXTERNAL_DATA_THRESHOLD_BYTES``, put the
        weights in ``path/weights.bin``, each distinct tensor (by bytes) once. Every graph
        file passes ``onnx.checker.check_model(file, full_check=True)`` before this returns.
        The models are left as they were given. Returns the function names, in order.
        """
        if not models:
            raise ValueError("no ONNX model to save")
        for function in models:
            if not _FUNCTION_NAME.match(function):
                raise ValueError(f"function name {function!r} cannot name a file")
        path.mkdir()
        external = len(models) > 1 or (
            sum(_initializer_bytes(m) for m in models.values()) > EXTERNAL_DATA_THRESHOLD_BYTES
        )
        placements: list[_Placements] = [{} for _ in models]
        if external:
            weights = path / WEIGHTS_FILE
            placements = write_weights(list(models.values()), weights)
            if not any(placements):  # every tensor was small enough to stay inline
                weights.unlink()
        for (function, model), placed in zip(models.items(), placements, strict=True):
            file = path / f"{function}.onnx"
            _write_model(with_external_data(model, placed) if placed else model, file)
            onnx.checker.check_model(str(file), full_check=True)
        return tuple(models)

    def save_lowered(self, model: onnx.ModelProto, path: Path) -> None:
        """Write one lowered model for the engine's cache (a directory, as :meth:`save`)."""
        self.save({"main": model}, path)

    def load_lowered(self, path: Path) -> onnx.ModelProto:
        """Read back what :meth:`save_lowered` wrote, weights included."""
        return onnx.load(str(Path(path) / "main.onnx"), load_external_data=True)

    def load(self, path: Path, function: str = "main") -> Any:
        """The (cached) ONNX Runtime session of ``path/<function>.onnx``."""
        file = Path(path) / f"{function}.onnx"
        if not file.is_file():
            have = sorted(p.stem for p in Path(path).glob("*.onnx"))
            raise FileNotFoundError(
                f"{str(path)!r} has no ONNX function {function!r} (functions: {have})"
            )
        return _SESSIONS.get(file)

    def run(
        self, path: Path, inputs: dict[str, np.ndarray], function: str = "main"
    ) -> dict[str, np.ndarray]:
        """Run ``path/<function>.onnx`` in ONNX Runtime (CPU) on numpy inputs.

        Takes the graph's inputs by name from ``inputs`` (extra entries are ignored) and
        returns every graph output by name. Sessions are cached per file and modification
        stamp, so a rewritten artifact is never served from a stale session.
        """
        file = Path(path) / f"{function}.onnx"
        session = self.load(path, function)
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"{file.name}: missing input(s) {', '.join(missing)}")
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in names}
        outputs = session.run(None, feeds)
        return {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}

    @staticmethod
    def runner_name() -> str:
        return "onnxruntime"


# -- external data ---------------------------------------------------------------------------
# For each model: {index in graph.initializer: (offset in weights.bin, length)}
_Placements = dict[int, tuple[int, int]]


def _movable(tensor: onnx.TensorProto) -> bool:
    # Tensors kept in typed fields (float_data, int64_data) rather than raw_data come from
    # hand-built graphs and are small; they stay inline like the tiny ones.
    return (
        tensor.HasField("raw_data")
        and tensor.data_location != onnx.TensorProto.EXTERNAL
        and tensor.ByteSize() >= INLINE_TENSOR_BYTES
    )


def _initializer_bytes(model: onnx.ModelProto) -> int:
    # ByteSize() sizes a tensor without copying its raw_data out of protobuf
    return sum(t.ByteSize() for t in model.graph.initializer)


def _align(offset: int, length: int) -> int:
    step = _LARGE_ALIGN if length >= _LARGE_TENSOR_BYTES else _SMALL_ALIGN
    return -(-offset // step) * step


def write_weights(models: Sequence[onnx.ModelProto], file: Path) -> list[_Placements]:
    """Write the large initializers of ``models`` to ``file``, each distinct tensor once.

    Tensors are deduplicated by their bytes (SHA-256), so functions that share weights
    (same bytes under the same or another name) share one copy. Initializers of subgraphs
    (If/Loop bodies; torch's exporter lifts them to the main graph) and tensors under
    ``INLINE_TENSOR_BYTES`` are not moved. Returns, per model, where each moved initializer
    (by index in ``graph.initializer``) lives; the models are not modified.
    """
    stored: dict[bytes, tuple[int, int]] = {}
    placements: list[_Placements] = []
    with open(file, "wb") as out:
        end = 0
        for model in models:
            placed: _Placements = {}
            for index, tensor in enumerate(model.graph.initializer):
                if not _movable(tensor):
                    continue
                raw = tensor.raw_data  # one tensor's bytes at a time
                digest = hashlib.sha256(raw).digest()
                if digest not in stored:
                    offset = _align(end, len(raw))
                    out.write(b"\0" * (offset - end))
                    out.write(raw)
                    end = offset + len(raw)
                    stored[digest] = (offset, len(raw))
                placed[index] = stored[digest]
                del raw
            placements.append(placed)
    return placements


def _is_repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; ``label`` before
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _copy_fields(src: Any, dst: Any, skip: frozenset[str] = frozenset()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if _is_repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def with_external_data(
    model: onnx.ModelProto, placed: _Placements, location: str = WEIGHTS_FILE
) -> onnx.ModelProto:
    """A copy of ``model`` whose placed initializers reference ``location`` by offset.

    Only the graph structure and the inline tensors are copied, never the moved weights, so
    this costs little memory even for a multi-GB model; ``model`` is not modified.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=frozenset({"graph"}))
    _copy_fields(model.graph, out.graph, skip=frozenset({"initializer"}))
    for index, tensor in enumerate(model.graph.initializer):
        ref = out.graph.initializer.add()
        if index not in placed:
            ref.CopyFrom(tensor)
            continue
        _copy_fields(tensor, ref, skip=frozenset({"raw_data", "external_data", "data_location"}))
        offset, length = placed[index]
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = ref.external_data.add()
            entry.key, entry.value = key, str(value)
        ref.data_location = onnx.TensorProto.EXTERNAL
    return out


def _write_model(model: onnx.ModelProto, file: Path) -> None:
    try:
        data = model.SerializeToString()
    except Exception as exc:  # protobuf raises EncodeError (or ValueError) over 2 GB
        raise ValueError(
            f"{file.name}: the graph does not fit protobuf's 2 GB limit even with its "
            f"initializers in {WEIGHTS_FILE}: {exc}"
        ) from exc
    file.write_bytes(data)


# -- ONNX Runtime sessions ---------------------------------------------------------------------
class _SessionCache:
    """A few ONNX Runtime sessions, keyed by file and invalidated by its stat stamp.

    The stamp includes the inode, so an artifact replaced atomically (a new directory
    renamed into place) is reloaded even within the file system's mtime granularity.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[tuple[int, ...], Any]] = OrderedDict()

    @staticmethod
    def _stamp(file: Path) -> tuple[int, ...]:
        parts = []
        for f in (file, file.with_name(WEIGHTS_FILE)):
            if f.exists():
                st = f.stat()
                parts += [st.st_ino, st.st_mtime_ns, st.st_size]
        return tuple(parts)

    def get(self, file: Path) -> Any:
        key = str(file.resolve())
        stamp = self._stamp(file)
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None and hit[0] == stamp:
                self._sessions.move_to_end(key)
                return hit[1]
            self._sessions.pop(key, None)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no provider-assignment chatter
        session = ort.InferenceSession(
            key, sess_options=options, providers=["CPUExecutionProvider"]
        )
        with self._lock:
            self._sessions[key] = (stamp, session)
            while len(self._sessions) > self._size:
                self._sessions.popitem(last=False)
        return session


_SESSIONS = _SessionCache(_SESSION_CACHE_SIZE)
