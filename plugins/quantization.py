"""Built-in quantization policies: the ``sora_export_quantize`` hook for Core ML and ONNX.

The engine lowers every chunk at fp16 (fp32 only for the ``fp32`` policy) and then hands
the in-memory artifact to this hook with the policy the profile (or ``--quantize``) gives
the chunk. This plugin handles:

========== =============================================================================
policy     Core ML (``coremltools.models.MLModel``, ML Program)
========== =============================================================================
int8       linear symmetric int8, one fp16 scale per output channel
           (``constexpr_blockwise_shift_scale``)
int4-block linear symmetric int4, one scale per block of 32 input channels
           (``constexpr_blockwise_shift_scale``); a tensor whose input channels are not
           a multiple of 32 falls back to int8 per channel
palettizeN k-means palettization to 2**N entries (N = 4, 6, 8), one look-up table per
           group of ``palettize_group_size`` output channels
           (``constexpr_lut_to_dense``); a tensor whose output channels are not a
           multiple of the group size falls back to one table for the whole tensor
========== =============================================================================

For ONNX only ``int8`` is handled: weight-only int8 of every ``MatMul`` weight (and of
``Gemm`` weights, rewritten to ``MatMul`` + ``Add`` first) through onnxruntime's
``MatMulNBitsQuantizer`` (``com.microsoft.MatMulNBits``, symmetric, one scale per block of
32 input channels). Activations keep the lowered precision (fp16 or fp32), so the graph
the engine lowered at fp16 is quantized as it is; nothing needs the fp32 graph. ``Conv``
weights stay at the lowered precision (ONNX has no weight-only int8 convolution that
onnxruntime runs on fp16 activations).

Every other policy/target pair returns None, so the engine reports the policy as
unsupported: ``fp32``/``fp16`` (the lowering chose the precision), ``auto`` (the engine's
to resolve into concrete policies; it never reaches a backend as such) and any name this
plugin does not know. The hook is ``trylast``: a third-party plugin that implements a
policy wins.

Which weights are left alone (Core ML), in the order they are checked:

1. tensors of at most ``weight_threshold`` elements (default 2048, coremltools' own
   default): a negligible share of the bytes, not worth any accuracy;
2. vectors (rank 0 or 1): biases and scales that normalisations apply through ``mul``
   (T5's RMSNorm), tiny next to the matrices and applied to every activation unaveraged;
3. tensors read by an op whose type is in ``skip_ops`` (default: the ``gather`` family,
   i.e. embedding tables, and the normalisation ops, i.e. their gamma/beta): an embedding
   row is used as it is stored, with no matmul to average the rounding error out, and a
   normalisation's parameters scale every activation of a layer.

Skipped tensors go into the ``OptimizationConfig`` as op-name overrides set to None and the
``skip_ops`` as op-type overrides set to None, so coremltools' own selection agrees. For
ONNX the threshold applies the same way; embedding tables, norms and biases are never
``MatMul`` weights, so they are untouched by construction.

Profile options (``[plugins.quantization]`` table of a device profile)::

    [plugins.quantization]
    weight_threshold = 2048        # keep tensors with at most this many elements
    skip_ops = ["gather", "layer_norm"]   # MIL op types; replaces the default list
    palettize_group_size = 16      # output channels per look-up table; 0 = one per tensor

Palettization uses this module's own 1-D k-means (:func:`kmeans_palette`) as the
coremltools ``lut_function``: coremltools' ``kmeans`` mode needs scikit-learn, which is not
a dependency, and the 1-D problem has a fast exact structure (sorted distinct values,
prefix sums) that makes each table cost about a millisecond.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import Chunk, DeviceProfile

__all__ = [
    "COREML_POLICIES",
    "DEFAULT_SKIP_OPS",
    "ONNX_POLICIES",
    "QuantizationOptions",
    "kmeans_palette",
    "quantize_coreml",
    "quantize_onnx",
    "sora_export_quantize",
]

log = logging.getLogger(__name__)

PLUGIN = "quantization"
COREML_POLICIES: tuple[str, ...] = ("int8", "int4-block", "palettize8", "palettize6", "palettize4")
ONNX_POLICIES: tuple[str, ...] = ("int8",)
DEFAULT_WEIGHT_THRESHOLD = 2048
DEFAULT_PALETTIZE_GROUP_SIZE = 16
INT4_BLOCK_SIZE = 32
ONNX_INT8_BLOCK_SIZE = 32
DEFAULT_SKIP_OPS: tuple[str, ...] = (
    "gather",
    "gather_along_axis",
    "gather_nd",
    "layer_norm",
    "instance_norm",
    "batch_norm",
    "l2_norm",
    "local_response_norm",
)
# Lloyd iterations after the companded start; it converges in a handful on weight-like data
_KMEANS_MAX_ITERS = 32
# bins of the density estimate that places the initial centroids
_KMEANS_DENSITY_BINS = 64
_IOS18_SPEC_VERSION = 9  # grouped palettization and int4 per-block need iOS18 / macOS15


@attrs.frozen
class QuantizationOptions:
    """The ``[plugins.quantization]`` settings of a profile, validated (see module doc)."""

    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD
    skip_ops: tuple[str, ...] = attrs.field(default=DEFAULT_SKIP_OPS, converter=tuple)
    palettize_group_size: int = DEFAULT_PALETTIZE_GROUP_SIZE

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> QuantizationOptions:
        """Read and check ``profile.options("quantization")``.

        :raises UsageError: naming the profile and the key, for an unknown key or a value of
            the wrong type or range (the user fixes the profile; exit status 2).
        """
        return cls.from_mapping(profile.options(PLUGIN), f"profile {profile.name!r}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> QuantizationOptions:
        """Options from a ``[plugins.quantization]`` table; ``where`` prefixes error messages."""
        fields = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(table) - fields)
        if unknown:
            raise UsageError(
                f"{where}: unknown key(s) {', '.join(unknown)} in [plugins.{PLUGIN}]; "
                f"known: {', '.join(sorted(fields))}"
            )
        values: dict[str, Any] = {}
        for key in ("weight_threshold", "palettize_group_size"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(
                        f"{where}: [plugins.{PLUGIN}] {key} must be a non-negative integer, "
                        f"got {value!r}"
                    )
                values[key] = value
        if "skip_ops" in table:
            ops = table["skip_ops"]
            if not isinstance(ops, list | tuple) or not all(isinstance(o, str) for o in ops):
                raise UsageError(
                    f"{where}: [plugins.{PLUGIN}] skip_ops must be a list of MIL op type "
                    f'names (e.g. ["gather", "layer_norm"]), got {ops!r}'
                )
            values["skip_ops"] = tuple(ops)
        return cls(**values)


# --------------------------------------------------------------------------------------------
# the hook


@hookimpl(trylast=True)
def sora_export_quantize(
    artifact: Any, policy: str, chunk: Chunk, target: str, profile: DeviceProfile
) -> Any | None:
    """Quantize a lowered Core ML or ONNX artifact (see the module docstring for the policies).

    :returns: a new ``MLModel`` for Core ML; for ONNX the same ``ModelProto``, quantized in
        place (the engine keeps only the quantized model, and a copy of a multi-GB graph
        would double the peak memory); None for a policy/target this plugin does not handle.
    :raises UsageError: for malformed ``[plugins.quantization]`` options in the profile.
    """
    if target == "coreml" and policy in COREML_POLICIES:
        options = QuantizationOptions.from_profile(profile)
        log.debug("%s: quantizing Core ML artifact with %s", chunk.key, policy)
        return quantize_coreml(artifact, policy, options)
    if target == "onnx" and policy in ONNX_POLICIES:
        options = QuantizationOptions.from_profile(profile)
        log.debug("%s: quantizing ONNX artifact with %s", chunk.key, policy)
        return quantize_onnx(artifact, policy, options)
    return None


# --------------------------------------------------------------------------------------------
# Core ML


@attrs.frozen
class _ConstTensor:
    """A float ``const`` of an ML Program, read from the spec without loading its values."""

    name: str  # the op name: what OptimizationConfig.op_name_configs matches
    shape: tuple[int, ...]
    consumers: tuple[str, ...]  # op types that read it (empty: only a block output)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _skip_reason(tensor: _ConstTensor, options: QuantizationOptions) -> str | None:
    """Why a weight stays at the lowered precision, or None if it is to be compressed."""
    if tensor.size <= options.weight_threshold:
        return f"at most {options.weight_threshold} elements"
    if len(tensor.shape) <= 1:
        return "a vector (bias or scale)"
    skipped = sorted(set(tensor.consumers) & set(options.skip_ops))
    if skipped:
        return f"read by {', '.join(skipped)}"
    return None


def _iter_ops(block: Any) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _iter_ops(inner)


def _float_consts(spec: Any) -> list[_ConstTensor]:
    """Every fp16/fp32 ``const`` of every function in an ML Program spec, with its readers."""
    from coremltools.proto import MIL_pb2

    floats = {MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.FLOAT32}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # output var -> (op name, shape)
    readers: dict[str, list[str]] = {}
    for function in spec.mlProgram.functions.values():
        for op in _iter_ops(function.block_specializations[function.opset]):
            for argument in op.inputs.values():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "name":
                        readers.setdefault(binding.name, []).append(op.type)
            if op.type != "const" or len(op.outputs) != 1:
                continue
            tensor_type = op.outputs[0].type.tensorType
            if tensor_type.dataType not in floats:
                continue
            name_attr = op.attributes.get("name")
            name = (
                name_attr.immediateValue.tensor.strings.values[0]
                if name_attr is not None
                else op.outputs[0].name
            )
            shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
            found[op.outputs[0].name] = (name, shape)
    return [
        _ConstTensor(name, shape, tuple(readers.get(var, ())))
        for var, (name, shape) in found.items()
    ]


@attrs.frozen
class _CompressionPass:
    """One coremltools call: ``linear_quantize_weights`` or ``palettize_weights``."""

    kind: str  # "linear" | "palettize"
    config: Any  # an OpLinearQuantizerConfig or OpPalettizerConfig
    label: str


def _coreml_passes(
    cto: Any, policy: str, options: QuantizationOptions, ios18: bool
) -> tuple[_CompressionPass, ...]:
    """The primary compression for a policy, then fallbacks for tensors it could not take."""
    threshold = options.weight_threshold
    int8 = _CompressionPass(
        "linear",
        cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype="int8",
            granularity="per_channel",
            weight_threshold=threshold,
        ),
        "int8 per channel",
    )
    if policy == "int8":
        return (int8,)
    if policy == "int4-block":
        if not ios18:
            raise ValueError(
                "int4-block needs an iOS18/macOS15 (or later) deployment target; lower the "
                "chunk with one or use int8 / palettize4"
            )
        int4 = _CompressionPass(
            "linear",
            cto.OpLinearQuantizerConfig(
                mode="linear_symmetric",
                dtype="int4",
                granularity="per_block",
                block_size=INT4_BLOCK_SIZE,
                weight_threshold=threshold,
            ),
            f"int4 per block of {INT4_BLOCK_SIZE}",
        )
        return (int4, int8)
    nbits = int(policy.removeprefix("palettize"))
    lut_function = functools.partial(kmeans_palette, nbits=nbits)
    per_tensor = _CompressionPass(
        "palettize",
        cto.OpPalettizerConfig(
            mode="custom",
            lut_function=lut_function,
            granularity="per_tensor",
            weight_threshold=threshold,
        ),
        f"{nbits}-bit palette per tensor",
    )
    group = options.palettize_group_size
    if group and ios18:
        grouped = _CompressionPass(
            "palettize",
            cto.OpPalettizerConfig(
                mode="custom",
                lut_function=lut_function,
                granularity="per_grouped_channel",
                group_size=group,
                weight_threshold=threshold,
            ),
            f"{nbits}-bit palette per {group} channels",
        )
        return (grouped, per_tensor)
    return (per_tensor,)


def quantize_coreml(
    model: Any, policy: str, options: QuantizationOptions, *, direct: bool = True
) -> Any:
    """Compress the weights of an ML Program ``MLModel`` under ``policy``; returns a new model.

    ``int8`` is written straight into a new package where it can be
    (:mod:`sora_export.core.backends.mil_int8`: the same weights as coremltools' quantizer,
    in a fraction of the time); ``direct=False``, or a model that writer does not handle,
    goes through coremltools.

    Tensors the skip rules keep (module docstring) are left as they are. A tensor the
    primary layout cannot take (e.g. input channels not divisible by the int4 block) gets
    the policy's fallback layout; one that no layout can take (e.g. it feeds only a block
    output, or ops that disagree about its channel axis) stays at the lowered precision and
    is logged at INFO.

    :raises ValueError: for a policy this function does not know, or int4-block below iOS18.
    """
    if policy not in COREML_POLICIES:
        raise ValueError(f"unknown Core ML quantization policy {policy!r}")
    if not hasattr(model, "get_spec"):
        raise TypeError(f"expected a coremltools MLModel, got {type(model).__name__}")
    from sora_export.core.backends.coreml import quiet_coremltools

    quiet_coremltools()
    from coremltools.optimize import coreml as cto

    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError("only ML Program models can be quantized (convert with an iOS15+ target)")
    if policy == "int8" and direct:
        quantized = _int8_direct(model, options)
        if quantized is not None:
            return quantized
    tensors = _float_consts(spec)
    skipped = {t.name for t in tensors if _skip_reason(t, options) is not None}
    # a const read only by a block output cannot be compressed (coremltools refuses it)
    pending = {t.name for t in tensors if t.name not in skipped and t.consumers}
    passes = _coreml_passes(cto, policy, options, spec.specificationVersion >= _IOS18_SPEC_VERSION)
    for index, step in enumerate(passes):
        if not pending:
            break
        if index == 0:
            config = cto.OptimizationConfig(
                global_config=step.config,
                op_type_configs=dict.fromkeys(options.skip_ops),
                op_name_configs=dict.fromkeys(sorted(skipped)),
            )
        else:
            config = cto.OptimizationConfig(
                op_name_configs=dict.fromkeys(sorted(pending), step.config)
            )
        compress = cto.linear_quantize_weights if step.kind == "linear" else cto.palettize_weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = compress(model, config)
        still_plain = {t.name for t in _float_consts(model.get_spec())}
        done = pending - still_plain
        if done:
            log.debug("%s: %d tensor(s) stored as %s", policy, len(done), step.label)
        pending &= still_plain
    if pending:
        log.info(
            "%s: %d tensor(s) kept at the lowered precision (no layout fits): %s",
            policy,
            len(pending),
            ", ".join(sorted(pending)[:5]) + (" ..." if len(pending) > 5 else ""),
        )
    return model


def _int8_direct(model: Any, options: QuantizationOptions) -> Any | None:
    """``int8`` by :func:`~sora_export.core.backends.mil_int8.quantize_model_int8` with
    this plugin's skip rules; None when that writer does not handle the model."""
    from sora_export.core.backends.mil_int8 import Unsupported, quantize_model_int8

    def keep(weight: Any) -> bool:
        tensor = _ConstTensor(weight.name, weight.shape, weight.consumers)
        return _skip_reason(tensor, options) is not None

    try:
        quantized, result = quantize_model_int8(model, keep)
    except Unsupported as exc:
        log.debug("int8: written by coremltools (%s)", exc)
        return None
    log.debug("int8: %d tensor(s) stored as int8 per channel", len(result.quantized))
    if result.left:
        left = sorted(result.left)
        log.info(
            "int8: %d tensor(s) kept at the lowered precision (no layout fits): %s",
            len(left),
            ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""),
        )
    return quantized


def kmeans_palette(weight: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares palette of ``2**nbits`` entries for a weight tensor (1-D k-means).

    The ``lut_function`` contract of coremltools' custom palettization: returns the look-up
    table (``2**nbits`` entries, ``weight.dtype``, ascending) and one ``uint8`` index per
    element of ``weight`` (flattened, C order), each pointing to the nearest entry.

    Lloyd's algorithm on the sorted distinct values weighted by their counts, with prefix
    sums so an iteration costs O(k log m) for k entries and m distinct values. The start is
    the high-resolution optimum (centroid density proportional to the cube root of the
    value density), which leaves Lloyd a few iterations of polishing. A tensor with at most
    ``2**nbits`` distinct values is represented exactly. Deterministic.

    :raises ValueError: if the weight holds inf or NaN (an fp16 overflow upstream), or for
        ``nbits`` outside 1..8 (indices are stored as ``uint8``).
    """
    if not 1 <= nbits <= 8:
        raise ValueError(f"palettes have 1 to 8 bits per index, got {nbits}")
    k = 1 << nbits
    flat = np.ascontiguousarray(weight).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot palettize an empty tensor")
    values, counts, element_to_value = _distinct_values(flat)
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot palettize a weight holding inf or NaN values")
    if values.size <= k:
        centroids = np.concatenate([values, np.full(k - values.size, values[-1])])
    else:
        centroids = _lloyd_1d(values, counts.astype(np.float64), k)
    lut = centroids.astype(flat.dtype)
    # index of the nearest stored entry, decided per distinct value then spread to elements
    stored = lut.astype(np.float64)
    nearest = np.searchsorted((stored[:-1] + stored[1:]) * 0.5, values, side="left")
    return lut, nearest.astype(np.uint8)[element_to_value]


def _distinct_values(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values (float64), their counts, and each element's value index."""
    if flat.dtype == np.float16:
        # fp16 has 65536 bit patterns: counting them is linear time, no sort of the tensor
        bits = flat.view(np.uint16)
        pattern_counts = np.bincount(bits, minlength=1 << 16)
        patterns = np.flatnonzero(pattern_counts)
        decoded = patterns.astype(np.uint16).view(np.float16).astype(np.float64)
        order = np.argsort(decoded, kind="stable")
        rank = np.zeros(1 << 16, dtype=np.int64)
        rank[patterns[order]] = np.arange(order.size)
        return decoded[order], pattern_counts[patterns[order]], rank[bits]
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return values.astype(np.float64), counts, inverse.reshape(-1)


def _lloyd_1d(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """k ascending centroids of sorted ``values`` with ``weights`` (len(values) > k)."""
    m = values.size
    cum_w = np.zeros(m + 1)
    np.cumsum(weights, out=cum_w[1:])
    cum_wx = np.zeros(m + 1)
    np.cumsum(weights * values, out=cum_wx[1:])
    # start: quantiles of density**(1/3), the asymptotically optimal centroid density
    hist, edges = np.histogram(values, bins=_KMEANS_DENSITY_BINS, weights=weights)
    mass = np.concatenate(([0.0], np.cumsum(np.cbrt(hist))))
    centroids = np.interp((np.arange(k) + 0.5) / k * mass[-1], mass, edges)
    tolerance = 1e-3 * (values[-1] - values[0]) / k
    lo = np.zeros(k, dtype=np.int64)
    hi = np.full(k, m, dtype=np.int64)
    for _ in range(_KMEANS_MAX_ITERS):
        # in 1-D each cluster is a run of the sorted values between two midpoints
        cut = np.searchsorted(values, (centroids[:-1] + centroids[1:]) * 0.5, side="right")
        lo[1:] = cut
        hi[:-1] = cut
        mass_in = cum_w[hi] - cum_w[lo]
        means = (cum_wx[hi] - cum_wx[lo]) / np.maximum(mass_in, np.finfo(np.float64).tiny)
        # an empty cluster keeps its place; 1-D Lloyd keeps the centroids ordered
        updated = np.where(mass_in > 0, means, centroids)
        converged = float(np.max(np.abs(updated - centroids))) <= tolerance
        centroids = updated
        if converged:
            break
    return centroids


# --------------------------------------------------------------------------------------------
# ONNX


def quantize_onnx(model: Any, policy: str, options: QuantizationOptions) -> Any:
    """Weight-only int8 of an ``onnx.ModelProto``'s ``MatMul``/``Gemm`` weights, in place.

    Eligible: a ``MatMul`` whose second input is a 2-D fp16/fp32 initializer of more than
    ``weight_threshold`` elements read by no other node, and a ``Gemm`` of that kind (with
    ``alpha == 1``, no ``transA``, ``beta == 1`` if it has a bias), rewritten to ``MatMul``
    (+ ``Add``) first. Each becomes ``com.microsoft.MatMulNBits`` (8 bits, symmetric, one
    scale per 32 input channels, scales in the weight's dtype). Everything else is kept.

    :returns: ``model`` itself, modified.
    :raises ValueError: for a policy other than int8, or initializers whose data lives in
        external files not loaded into the proto.
    """
    if policy not in ONNX_POLICIES:
        raise ValueError(f"unknown ONNX quantization policy {policy!r}")
    import onnx

    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    graph = model.graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(
            f"ONNX initializers {', '.join(external[:3])} hold external data that is not "
            "loaded; quantize the in-memory model before saving it"
        )
    _name_nodes(graph)
    _gemm_to_matmul(graph, options.weight_threshold)
    eligible = _eligible_matmuls(graph, options.weight_threshold)
    exclude = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in eligible]
    if not eligible:
        log.info("int8: no MatMul weight above %d elements to quantize", options.weight_threshold)
        return model
    quantizer_class = _matmul_nbits_quantizer()
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    previous = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer = quantizer_class(
            model,
            bits=8,
            block_size=ONNX_INT8_BLOCK_SIZE,
            is_symmetric=True,
            nodes_to_exclude=exclude,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    finally:
        quant_logger.setLevel(previous)
    quantized = quantizer.model.model
    _drop_stale_value_info(quantized.graph)
    log.debug("int8: %d MatMul weight(s) stored as int8", len(eligible))
    return quantized


def _matmul_nbits_quantizer() -> Any:
    """Import onnxruntime's ``MatMulNBitsQuantizer`` without its side effects on the process.

    * The module calls ``logging.basicConfig(level=INFO)`` on import, which would send every
      library's INFO records to stderr under the engine's progress display; the root
      logger's handlers and level are put back as they were.
    * ``onnxruntime.quantization`` imports ``onnxruntime.transformers`` scripts that import
      each other as top-level modules, which works only while that package's folder is on
      ``sys.path``. The package appends it when first imported, but whoever imported it
      earlier may have removed it again (the ONNX backend does, for its fp16 converter), so
      the folder is put on ``sys.path`` for the import and ``sys.path`` restored after.
    """
    import onnxruntime

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    search_path = list(sys.path)
    scripts = str(Path(onnxruntime.__file__).parent / "transformers")
    if scripts not in sys.path:
        sys.path.append(scripts)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        sys.path[:] = search_path
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return MatMulNBitsQuantizer


def _name_nodes(graph: Any) -> None:
    """Give unnamed nodes unique names: the quantizer selects nodes by name."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _readers(graph: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    for output in graph.output:
        counts[output.name] = counts.get(output.name, 0) + 1
    return counts


def _float_initializer(graph: Any, name: str) -> Any | None:
    import onnx

    for tensor in graph.initializer:
        if tensor.name == name:
            if tensor.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT):
                return tensor
            return None
    return None


def _eligible_matmuls(graph: Any, threshold: int) -> set[str]:
    readers = _readers(graph)
    eligible = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        weight = _float_initializer(graph, node.input[1])
        if weight is None or len(weight.dims) != 2 or readers.get(weight.name, 0) != 1:
            continue
        if math.prod(weight.dims) > threshold:
            eligible.add(node.name)
    return eligible


def _gemm_to_matmul(graph: Any, threshold: int) -> None:
    """Rewrite ``Gemm(A, W[, C])`` with a constant W as ``MatMul(A, W')`` (+ ``Add(C)``).

    Only a weight that will be quantized (more than ``threshold`` elements) in the plain
    form (alpha 1, no transA, beta 1 when C is given, W read by this node only);
    ``transB`` is folded into the stored weight. Node order is kept.
    """
    from onnx import helper, numpy_helper

    readers = _readers(graph)
    nodes = list(graph.node)
    rewritten: list[Any] = []
    changed = False
    for node in nodes:
        attrs_ = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = (
            _float_initializer(graph, node.input[1])
            if node.op_type == "Gemm" and len(node.input) >= 2
            else None
        )
        has_bias = len(node.input) > 2 and node.input[2] != ""
        if (
            weight is None
            or len(weight.dims) != 2
            or math.prod(weight.dims) <= threshold
            or readers.get(weight.name, 0) != 1
            or attrs_.get("alpha", 1.0) != 1.0
            or attrs_.get("transA", 0) != 0
            or (has_bias and attrs_.get("beta", 1.0) != 1.0)
        ):
            rewritten.append(node)
            continue
        weight_name = weight.name
        if attrs_.get("transB", 0):
            # a new name: the graph's value_info may still describe the old [N, K] tensor
            weight_name = _unique_name(graph, f"{weight.name}_transposed")
            array = numpy_helper.to_array(weight)
            weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.T), weight_name))
        product = node.output[0] if not has_bias else f"{node.output[0]}_matmul"
        rewritten.append(
            helper.make_node(
                "MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_matmul"
            )
        )
        if has_bias:
            rewritten.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(rewritten)


def _unique_name(graph: Any, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {v.name for v in graph.input} | {v.name for v in graph.value_info}
    name = base
    while name in taken:
        name += "_"
    return name


def _drop_stale_value_info(graph: Any) -> None:
    """Forget shapes recorded for tensors that no longer exist (replaced initializers)."""
    alive = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    alive |= {v.name for v in graph.input}
    kept = [v for v in graph.value_info if v.name in alive]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)


@hookimpl
def sora_export_check_profile(profile: DeviceProfile) -> None:
    QuantizationOptions.from_profile(profile)  # UsageError names [plugins.quantization] key
