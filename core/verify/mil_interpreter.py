"""Reference interpreter for saved Core ML ML Programs, on any OS.

Core ML prediction runs only on macOS. To verify an exported ``.mlpackage`` on Linux we read
the package back (``coremltools`` MIL loader) and execute its MIL program with PyTorch CPU
kernels, one kernel per MIL op type, following the op definitions in
``coremltools/converters/mil/mil/ops/defs``.

What a caller may rely on:

* dtypes are honoured per op: an op whose output var is fp16 yields a tensor rounded to fp16
  (computed in fp32, then cast), so fp16 overflow shows up as ``inf`` exactly where a
  device would round it; fp32 ops compute in fp32; integer and bool vars stay integers and
  bools. Inputs are cast to the declared input dtype, outputs come back as numpy arrays in
  the declared output dtype.
* Weight-compression ops (``constexpr_lut_to_dense``, ``constexpr_blockwise_shift_scale``,
  ``constexpr_affine_dequantize``, ``constexpr_cast``, ``constexpr_sparse_to_dense``) and any
  op whose inputs are all constant are evaluated once, when the interpreter is built.
  :meth:`MILInterpreter.run` only executes a precomputed plan.
* Constants that live in the package's weight file are shared, in one process, between
  interpreters of the same package (e.g. the functions of a multifunction package), as are
  their decoded forms.
* An op without a kernel (or in a form the kernel does not handle) never produces a wrong
  number: :class:`UnsupportedMILOp` names it, at :meth:`~MILInterpreter.check_supported`
  or :meth:`~MILInterpreter.run`.

The interpreter is a reference for numerics, not a simulator of a device's kernels: ops
compute in fp32 internally and round their result, so fp16 rounding *inside* a fused op
(e.g. the accumulation of a matmul on the Neural Engine) is not reproduced.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MILInterpreter",
    "MILTensorSpec",
    "UnsupportedMILOp",
    "coreml_predict_available",
    "run_mlpackage",
]


class UnsupportedMILOp(Exception):
    """The program holds ops this interpreter cannot execute faithfully.

    ``problems`` lists ``(op_type, op_name, reason)`` for every such op, in program order;
    ``op_types`` is the set of their op types. The message names each op type and op name.
    """

    def __init__(self, problems: Sequence[tuple[str, str, str]], function: str = "main"):
        self.problems: tuple[tuple[str, str, str], ...] = tuple(problems)
        self.function = function
        lines = [
            f"  - {op_type} (op {op_name!r}): {reason}" for op_type, op_name, reason in problems
        ]
        kinds = ", ".join(sorted(self.op_types))
        super().__init__(
            f"the MIL interpreter cannot run {len(self.problems)} op(s) of function "
            f"{function!r} (op types: {kinds}):\n" + "\n".join(lines)
        )

    @property
    def op_types(self) -> set[str]:
        return {op_type for op_type, _, _ in self.problems}


@attrs.frozen
class MILTensorSpec:
    """A function input or output: ``shape`` has ``None`` for a flexible dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


def coreml_predict_available() -> bool:
    """True only on macOS where coremltools' Core ML runtime bindings load."""
    if sys.platform != "darwin":
        return False
    try:
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except Exception:
        return False
    return True


def run_mlpackage(
    path: str | Path, inputs: Mapping[str, np.ndarray], function: str = "main"
) -> dict[str, np.ndarray]:
    """Load ``path`` and run ``function`` once on ``inputs`` (see :class:`MILInterpreter`)."""
    return MILInterpreter(path, function=function).run(inputs)


# --------------------------------------------------------------------------------------------
# dtypes

# How each MIL dtype is held in the interpreter. uint16/uint32 have no general torch kernels,
# so they live in a wider signed type; sub-byte types only appear inside constexpr ops.
_TORCH_DTYPE: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bool": torch.bool,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.int32,
    "int32": torch.int32,
    "uint32": torch.int64,
    "int64": torch.int64,
}
_NUMPY_DTYPE: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "uint16": np.dtype(np.uint16),
    "int32": np.dtype(np.int32),
    "uint32": np.dtype(np.uint32),
    "int64": np.dtype(np.int64),
}
# Wrap-around range of the MIL integer types that are held in a wider torch type.
_UNSIGNED_BITS = {"uint16": 16, "uint32": 32}


def _mil_dtype(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _f(t: torch.Tensor) -> torch.Tensor:
    """Compute form of a float tensor: fp16 is widened to fp32 (CPU fp16 kernels are partial)."""
    return t.float() if t.dtype == torch.float16 else t


def _to_torch(value: Any) -> torch.Tensor:
    """A constant's value as a tensor; fp16 values are held widened to fp32 (exactly)."""
    arr = np.asarray(value)
    if arr.dtype == np.float16 or arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        # Loaded weights may be read-only buffers; the interpreter never writes into them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------
# kernel registry

_Kernel = Callable[..., Any]
_KERNELS: dict[str, Callable[[_OpBinder], _Kernel]] = {}


def _kernel(*op_types: str) -> Callable[[Callable[[_OpBinder], _Kernel]], Any]:
    def register(factory: Callable[[_OpBinder], _Kernel]) -> Callable[[_OpBinder], _Kernel]:
        for op_type in op_types:
            _KERNELS[op_type] = factory
        return factory

    return register


class _Unsupported(Exception):
    """Raised by a kernel factory for an op form it does not handle."""


_MISSING = object()


class _OpBinder:
    """What a kernel factory sees of one op.

    Attribute-like inputs (axes, perm, modes, ...) are read now with :meth:`const`; tensor
    inputs are declared with :meth:`tensor` / :meth:`tensors`, and the returned kernel is
    called with their values, in declaration order, at run time.
    """

    def __init__(self, op: Any, const_value: Callable[[Any], Any]):
        self.op = op
        self._const_value = const_value
        self._defaults: dict[str, Any] | None = None
        self.tensor_vars: list[Any] = []

    @property
    def op_type(self) -> str:
        return self.op.op_type

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def var(self, name: str) -> Any:
        return self.op.inputs[name]

    def const(self, name: str, default: Any = _MISSING) -> Any:
        """Value (numpy array or python scalar/str) of a constant input, or ``default``."""
        var = self.op.inputs.get(name)
        if var is None:
            # Absent optional inputs take the op definition's own default, where it has one.
            if self._defaults is None:
                self._defaults = dict(self.op.default_inputs().items())
            value = self._defaults.get(name)
            if value is not None:
                return value
            if default is _MISSING:
                raise _Unsupported(f"required input {name!r} is missing")
            return default
        value = self._const_value(var)
        if value is None:
            raise _Unsupported(
                f"input {name!r} is computed at run time; only a constant is supported"
            )
        return value

    def is_const(self, name: str) -> bool:
        var = self.op.inputs.get(name)
        return var is not None and self._const_value(var) is not None

    def ints(self, name: str, default: Any = _MISSING) -> list[int] | None:
        value = self.const(name, default)
        if value is None:
            return None
        return [int(v) for v in np.asarray(value).reshape(-1)]

    def tensor(self, name: str) -> None:
        self.tensor_vars.append(self.op.inputs[name])

    def tensors(self, name: str) -> int:
        values = self.op.inputs[name]
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        self.tensor_vars.extend(values)
        return len(values)

    def rank(self, name: str) -> int:
        return len(self.op.inputs[name].shape)

    def out_dtype(self, index: int = 0) -> str:
        return _mil_dtype(self.op.outputs[index])


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- elementwise -----------------------------------------------------------------------------


def _binary(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[_OpBinder], _Kernel]:
    def factory(op: _OpBinder) -> _Kernel:
        op.tensor("x")
        op.tensor("y")
        return lambda x, y: fn(_f(x), _f(y))

    return factory


for _name, _fn in {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    # True division; on int inputs the cast to the declared int output truncates, as MIL does.
    "real_div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "floor_div": torch.floor_divide,
    "mod": torch.remainder,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "less": torch.lt,
    "less_equal": torch.le,
    "logical_and": lambda x, y: torch.logical_and(x, y),
    "logical_or": lambda x, y: torch.logical_or(x, y),
    "logical_xor": lambda x, y: torch.logical_xor(x, y),
}.items():
    _KERNELS[_name] = _binary(_fn)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[_OpBinder], _Kernel]:
    def factory(op: _OpBinder) -> _Kernel:
        op.tensor("x")
        return lambda x: fn(_f(x))

    return factory


for _name, _fn in {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "round": torch.round,  # half to even, like np.round in the op's reference
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "logical_not": torch.logical_not,
    "identity": lambda x: x,
}.items():
    _KERNELS[_name] = _unary(_fn)


@_kernel("rsqrt", "log", "inverse")
def _eps_unary(op: _OpBinder) -> _Kernel:
    default_eps = {"rsqrt": 1e-12, "log": 1e-45, "inverse": 1e-4}[op.op_type]
    eps = float(op.const("epsilon", default_eps))
    op.tensor("x")
    if op.op_type == "rsqrt":
        return lambda x: torch.rsqrt(_f(x) + eps)
    if op.op_type == "log":
        return lambda x: torch.log(_f(x) + eps)
    return lambda x: torch.reciprocal(_f(x) + eps)


@_kernel("clip")
def _clip(op: _OpBinder) -> _Kernel:
    alpha = float(op.const("alpha"))
    beta = float(op.const("beta"))
    op.tensor("x")
    return lambda x: torch.clamp(_f(x), alpha, beta)


@_kernel("gelu")
def _gelu(op: _OpBinder) -> _Kernel:
    mode = str(op.const("mode", "EXACT"))
    op.tensor("x")
    if mode == "EXACT":
        return lambda x: F.gelu(_f(x))
    if mode == "TANH_APPROXIMATION":
        return lambda x: F.gelu(_f(x), approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return lambda x: _f(x) * torch.sigmoid(1.702 * _f(x))
    raise _Unsupported(f"gelu mode {mode!r}")


@_kernel("leaky_relu", "elu", "thresholded_relu")
def _alpha_activation(op: _OpBinder) -> _Kernel:
    alpha = float(op.const("alpha"))
    op.tensor("x")
    if op.op_type == "leaky_relu":
        return lambda x: F.leaky_relu(_f(x), alpha)
    if op.op_type == "elu":
        return lambda x: F.elu(_f(x), alpha)
    return lambda x: torch.where(_f(x) > alpha, _f(x), 0.0)


@_kernel("clamped_relu", "sigmoid_hard", "linear_activation", "scaled_tanh")
def _alpha_beta_activation(op: _OpBinder) -> _Kernel:
    alpha = float(op.const("alpha"))
    beta = float(op.const("beta"))
    op.tensor("x")
    if op.op_type == "clamped_relu":
        return lambda x: torch.clamp(torch.where(_f(x) >= 0, _f(x), alpha * _f(x)), max=beta)
    if op.op_type == "sigmoid_hard":
        return lambda x: torch.clamp(alpha * _f(x) + beta, 0.0, 1.0)
    if op.op_type == "linear_activation":
        return lambda x: alpha * _f(x) + beta
    return lambda x: alpha * torch.tanh(beta * _f(x))


@_kernel("prelu")
def _prelu(op: _OpBinder) -> _Kernel:
    alpha = torch.as_tensor(np.asarray(op.const("alpha"), dtype=np.float32))
    rank = op.rank("x")
    shape = [1, -1] + [1] * (rank - 2)
    alpha = alpha.reshape(shape)
    op.tensor("x")
    return lambda x: torch.where(_f(x) >= 0, _f(x), alpha * _f(x))


@_kernel("softplus_parametric")
def _softplus_parametric(op: _OpBinder) -> _Kernel:
    rank = op.rank("x")
    shape = [1, -1] + [1] * (rank - 2)
    alpha = torch.as_tensor(np.asarray(op.const("alpha"), dtype=np.float32)).reshape(shape)
    beta = torch.as_tensor(np.asarray(op.const("beta"), dtype=np.float32)).reshape(shape)
    op.tensor("x")
    return lambda x: alpha * F.softplus(beta * _f(x))


@_kernel("softmax")
def _softmax(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis", -1))
    op.tensor("x")
    return lambda x: torch.softmax(_f(x), dim=axis)


@_kernel("cast")
def _cast(op: _OpBinder) -> _Kernel:
    target = str(op.const("dtype"))
    if target not in _TORCH_DTYPE:
        raise _Unsupported(f"cast to {target!r}")
    bits = _UNSIGNED_BITS.get(target)
    torch_dtype = _TORCH_DTYPE[target]
    op.tensor("x")
    if bits is not None:
        # Held in a wider signed type: wrap like the real unsigned type would.
        return lambda x: torch.remainder(x.to(torch.int64), 1 << bits).to(torch_dtype)
    return lambda x: x.to(torch_dtype)


@_kernel("select")
def _select(op: _OpBinder) -> _Kernel:
    op.tensor("cond")
    op.tensor("a")
    op.tensor("b")
    return lambda c, a, b: torch.where(c.to(torch.bool), a, b)


@_kernel("fill")
def _fill(op: _OpBinder) -> _Kernel:
    value = float(op.const("value", 0.0))
    dtype = _TORCH_DTYPE[op.out_dtype()]
    if op.is_const("shape"):
        shape = tuple(op.ints("shape") or ())
        return lambda: torch.full(shape, value, dtype=dtype)
    op.tensor("shape")
    return lambda s: torch.full(tuple(int(v) for v in s.tolist()), value, dtype=dtype)


@_kernel("fill_like")
def _fill_like(op: _OpBinder) -> _Kernel:
    value = float(op.const("value", 0.0))
    dtype = _TORCH_DTYPE[op.out_dtype()]
    op.tensor("ref_tensor")
    return lambda ref: torch.full(ref.shape, value, dtype=dtype)


@_kernel("range_1d")
def _range_1d(op: _OpBinder) -> _Kernel:
    dtype = _TORCH_DTYPE[op.out_dtype()]
    op.tensor("end")
    op.tensor("start")
    op.tensor("step")
    return lambda end, start, step: torch.arange(start.item(), end.item(), step.item(), dtype=dtype)


@_kernel("shape")
def _shape(op: _OpBinder) -> _Kernel:
    op.tensor("x")
    return lambda x: torch.tensor(list(x.shape), dtype=torch.int32)


# ---- linear algebra --------------------------------------------------------------------------


@_kernel("linear")
def _linear(op: _OpBinder) -> _Kernel:
    op.tensor("x")
    op.tensor("weight")
    if op.has("bias"):
        op.tensor("bias")
        return lambda x, w, b: F.linear(_f(x), _f(w), _f(b))
    return lambda x, w: F.linear(_f(x), _f(w))


@_kernel("matmul")
def _matmul(op: _OpBinder) -> _Kernel:
    tx = bool(op.const("transpose_x", False)) and op.rank("x") >= 2
    ty = bool(op.const("transpose_y", False)) and op.rank("y") >= 2
    op.tensor("x")
    op.tensor("y")

    def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _f(x), _f(y)
        if tx:
            x = x.transpose(-1, -2)
        if ty:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)

    return matmul


@_kernel("einsum")
def _einsum(op: _OpBinder) -> _Kernel:
    equation = str(op.const("equation"))
    op.tensors("values")
    return lambda *values: torch.einsum(equation, *[_f(v) for v in values])


@_kernel("scaled_dot_product_attention")
def _sdpa(op: _OpBinder) -> _Kernel:
    op.tensor("query")
    op.tensor("key")
    op.tensor("value")
    if op.has("attn_mask"):
        op.tensor("attn_mask")

        def attention_masked(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
        ) -> torch.Tensor:
            # A bool mask selects the keys that take part (same convention as torch).
            mask = mask if mask.dtype == torch.bool else _f(mask)
            return F.scaled_dot_product_attention(_f(q), _f(k), _f(v), attn_mask=mask)

        return attention_masked
    return lambda q, k, v: F.scaled_dot_product_attention(_f(q), _f(k), _f(v))


# ---- convolution -----------------------------------------------------------------------------


def _conv_padding(
    pad_type: str,
    custom: list[int] | None,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, per the MIL conv pad_type rules."""
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        assert custom is not None
        return [(custom[2 * i], custom[2 * i + 1]) for i in range(n)]
    pads = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@_kernel("conv")
def _conv(op: _OpBinder) -> _Kernel:
    n = op.rank("x") - 2
    if n not in _CONV_FNS:
        raise _Unsupported(f"{n}-d convolution")
    strides = op.ints("strides", [1] * n) or [1] * n
    dilations = op.ints("dilations", [1] * n) or [1] * n
    groups = int(op.const("groups", 1))
    pad_type = str(op.const("pad_type", "valid"))
    custom = op.ints("pad", [0] * 2 * n) if pad_type == "custom" else None
    if pad_type not in ("valid", "custom", "same", "same_lower"):
        raise _Unsupported(f"pad_type {pad_type!r}")
    kernel_sizes = [int(k) for k in op.var("weight").shape[2:]]
    conv_fn = _CONV_FNS[n]
    op.tensor("x")
    op.tensor("weight")
    has_bias = op.has("bias")
    if has_bias:
        op.tensor("bias")

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        x = _f(x)
        pads = _conv_padding(pad_type, custom, x.shape[2:], kernel_sizes, strides, dilations)
        if all(before == after for before, after in pads):
            padding: Any = [before for before, _ in pads]
        else:
            # torch pads symmetrically only: pad explicitly (last dim first) and run "valid".
            x = F.pad(x, [p for before, after in reversed(pads) for p in (before, after)])
            padding = 0
        return conv_fn(
            x,
            _f(w),
            None if b is None else _f(b),
            stride=strides,
            padding=padding,
            dilation=dilations,
            groups=groups,
        )

    return conv


# ---- normalisation ---------------------------------------------------------------------------


@_kernel("layer_norm")
def _layer_norm(op: _OpBinder) -> _Kernel:
    rank = op.rank("x")
    axes_value = op.ints("axes", None)
    axes = sorted(_axis(a, rank) for a in (axes_value if axes_value is not None else range(rank)))
    eps = float(op.const("epsilon", 1e-5))
    op.tensor("x")
    has_gamma, has_beta = op.has("gamma"), op.has("beta")
    if has_gamma:
        op.tensor("gamma")
    if has_beta:
        op.tensor("beta")
    trailing = axes == list(range(rank - len(axes), rank))

    def layer_norm(x: torch.Tensor, *affine: torch.Tensor) -> torch.Tensor:
        x = _f(x)
        it = iter(affine)
        gamma = _f(next(it)) if has_gamma else None
        beta = _f(next(it)) if has_beta else None
        if trailing:
            shape = x.shape[rank - len(axes) :]
            gamma = None if gamma is None else gamma.reshape(shape)
            beta = None if beta is None else beta.reshape(shape)
            return F.layer_norm(x, shape, gamma, beta, eps)
        norm_shape = [x.shape[i] if i in axes else 1 for i in range(rank)]
        mean = x.mean(dim=axes, keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=axes, keepdim=True)
        y = centred / torch.sqrt(var + eps)
        if gamma is not None:
            y = y * gamma.reshape(norm_shape)
        if beta is not None:
            y = y + beta.reshape(norm_shape)
        return y

    return layer_norm


@_kernel("instance_norm")
def _instance_norm(op: _OpBinder) -> _Kernel:
    eps = float(op.const("epsilon", 1e-5))
    op.tensor("x")
    has_gamma, has_beta = op.has("gamma"), op.has("beta")
    if has_gamma:
        op.tensor("gamma")
    if has_beta:
        op.tensor("beta")

    def instance_norm(x: torch.Tensor, *affine: torch.Tensor) -> torch.Tensor:
        it = iter(affine)
        gamma = _f(next(it)) if has_gamma else None
        beta = _f(next(it)) if has_beta else None
        return F.instance_norm(_f(x), weight=gamma, bias=beta, eps=eps)

    return instance_norm


@_kernel("batch_norm")
def _batch_norm(op: _OpBinder) -> _Kernel:
    eps = float(op.const("epsilon", 1e-5))
    names = [n for n in ("mean", "variance", "gamma", "beta") if op.has(n)]
    if names[:2] != ["mean", "variance"]:
        raise _Unsupported("batch_norm without mean/variance")
    op.tensor("x")
    for name in names:
        op.tensor(name)

    def batch_norm(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        given = dict(zip(names, (_f(p) for p in params), strict=True))
        return F.batch_norm(
            _f(x),
            given["mean"],
            given["variance"],
            given.get("gamma"),
            given.get("beta"),
            training=False,
            eps=eps,
        )

    return batch_norm


# ---- reductions ------------------------------------------------------------------------------


def _reduce_factory(reduce: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Any:
    def factory(op: _OpBinder) -> _Kernel:
        rank = op.rank("x")
        axes_value = op.ints("axes", None)
        axes = [_axis(a, rank) for a in (axes_value if axes_value is not None else range(rank))]
        keep = bool(op.const("keep_dims", False))
        op.tensor("x")
        return lambda x: reduce(_f(x), axes, keep)

    return factory


def _reduce_prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    # torch.prod takes one dim; going from the last axis keeps the others' indices valid.
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keep)
    return x


for _name, _reduce in {
    "reduce_mean": lambda x, a, k: torch.mean(x, dim=a, keepdim=k),
    "reduce_sum": lambda x, a, k: torch.sum(x, dim=a, keepdim=k),
    "reduce_max": lambda x, a, k: torch.amax(x, dim=a, keepdim=k),
    "reduce_min": lambda x, a, k: torch.amin(x, dim=a, keepdim=k),
    "reduce_prod": _reduce_prod,
    "reduce_sum_square": lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k),
    "reduce_l1_norm": lambda x, a, k: torch.sum(x.abs(), dim=a, keepdim=k),
    "reduce_l2_norm": lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)),
    "reduce_log_sum": lambda x, a, k: torch.log(torch.sum(x, dim=a, keepdim=k)),
    "reduce_log_sum_exp": lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k),
}.items():
    _KERNELS[_name] = _reduce_factory(_reduce)


@_kernel("reduce_argmax", "reduce_argmin")
def _reduce_arg(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis", -1))
    keep = bool(op.const("keep_dims", False))
    fn = torch.argmax if op.op_type == "reduce_argmax" else torch.argmin
    op.tensor("x")
    return lambda x: fn(_f(x), dim=axis, keepdim=keep).to(torch.int32)


# ---- tensor layout ---------------------------------------------------------------------------


def _reshape_target(shape: Sequence[int], x_shape: Sequence[int]) -> list[int]:
    """Resolve MIL (iOS17+) reshape zeros: right-aligned copies of x's dims, else 1."""
    k, rank = len(shape), len(x_shape)
    out = []
    for i, s in enumerate(shape):
        if s == 0:
            j = rank - (k - i)
            out.append(int(x_shape[j]) if j >= 0 else 1)
        else:
            out.append(int(s))
    return out


@_kernel("reshape")
def _reshape(op: _OpBinder) -> _Kernel:
    op.tensor("x")
    if op.is_const("shape"):
        shape = op.ints("shape") or []
        if 0 in shape:
            return lambda x: x.reshape(_reshape_target(shape, x.shape))
        return lambda x: x.reshape(shape)
    op.tensor("shape")
    return lambda x, s: x.reshape(_reshape_target([int(v) for v in s.tolist()], x.shape))


@_kernel("transpose")
def _transpose(op: _OpBinder) -> _Kernel:
    perm = op.ints("perm") or []
    op.tensor("x")
    return lambda x: x.permute(perm)


@_kernel("expand_dims")
def _expand_dims(op: _OpBinder) -> _Kernel:
    axes = op.ints("axes") or []
    out_rank = op.rank("x") + len(axes)
    positions = sorted(_axis(a, out_rank) for a in axes)
    op.tensor("x")

    def expand_dims(x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        for p in positions:
            shape.insert(p, 1)
        return x.reshape(shape)

    return expand_dims


@_kernel("squeeze")
def _squeeze(op: _OpBinder) -> _Kernel:
    axes = op.ints("axes", None)
    op.tensor("x")
    if axes is None:
        return lambda x: x.squeeze()
    dims = tuple(axes)
    return lambda x: x.squeeze(dims)


@_kernel("tile")
def _tile(op: _OpBinder) -> _Kernel:
    op.tensor("x")
    if op.is_const("reps"):
        reps = op.ints("reps") or []
        return lambda x: x.repeat(reps)
    # a shape-polymorphic program (enumerated input shapes) computes reps at run time
    op.tensor("reps")
    return lambda x, reps: x.repeat([int(v) for v in reps.tolist()])


@_kernel("concat")
def _concat(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis"))
    interleave = bool(op.const("interleave", False))
    op.tensors("values")
    if not interleave:
        # shape arithmetic of shape-polymorphic programs concatenates scalars into a shape
        # vector (MIL reads a scalar there as a length-1 vector)
        return lambda *values: torch.cat(
            [v.reshape(1) if v.dim() == 0 else v for v in values], dim=axis
        )

    def interleaved(*values: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, values[0].dim())
        stacked = torch.stack(values, dim=a + 1)
        return stacked.flatten(a, a + 1)

    return interleaved


@_kernel("stack")
def _stack(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis"))
    op.tensors("values")
    return lambda *values: torch.stack(values, dim=axis)


@_kernel("split")
def _split(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis"))
    sizes = op.ints("split_sizes", None)
    num_splits = op.const("num_splits", None)
    if sizes is None and num_splits is None:
        raise _Unsupported("split without split_sizes or num_splits")
    op.tensor("x")
    if sizes is not None:
        return lambda x: torch.split(x, sizes, dim=axis)
    n = int(num_splits)
    return lambda x: torch.split(x, x.shape[axis] // n, dim=axis)


def _slice_key(
    shape: Sequence[int],
    begin: Sequence[int],
    end: Sequence[int],
    stride: Sequence[int],
    begin_mask: Sequence[bool],
    end_mask: Sequence[bool],
    squeeze_mask: Sequence[bool],
) -> tuple[tuple[Any, ...], list[tuple[int, list[int]]]]:
    """Basic-indexing key plus (axis, indices) for axes with a negative stride."""
    key: list[Any] = []
    gathers: list[tuple[int, list[int]]] = []
    kept_axis = 0
    for i, size in enumerate(shape):
        if squeeze_mask[i]:
            key.append(0 if begin_mask[i] else int(begin[i]))
            continue
        s = slice(
            None if begin_mask[i] else int(begin[i]),
            None if end_mask[i] else int(end[i]),
            int(stride[i]),
        )
        if s.step > 0:
            key.append(s)
        else:
            key.append(slice(None))
            gathers.append((kept_axis, list(range(*s.indices(int(size))))))
        kept_axis += 1
    return tuple(key), gathers


def _apply_slice(
    x: torch.Tensor,
    begin: Sequence[int],
    end: Sequence[int],
    stride: Sequence[int],
    begin_mask: Sequence[bool],
    end_mask: Sequence[bool],
    squeeze_mask: Sequence[bool],
) -> torch.Tensor:
    """MIL ``slice_by_index``: python slicing per axis; squeezed axes take ``begin``."""
    key, gathers = _slice_key(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    y = x[key]
    for axis, idx in gathers:
        y = y.index_select(axis, torch.tensor(idx, dtype=torch.long))
    return y


@_kernel("slice_by_index")
def _slice_by_index(op: _OpBinder) -> _Kernel:
    rank = op.rank("x")
    begin = op.ints("begin") or []
    end = op.ints("end") or []
    stride = op.ints("stride", None) or [1] * rank
    begin_mask, end_mask, squeeze_mask = (
        [bool(v) for v in np.asarray(op.const(name, [False] * rank)).reshape(-1)]
        for name in ("begin_mask", "end_mask", "squeeze_mask")
    )
    op.tensor("x")
    return lambda x: _apply_slice(x, begin, end, stride, begin_mask, end_mask, squeeze_mask)


@_kernel("slice_by_size")
def _slice_by_size(op: _OpBinder) -> _Kernel:
    begin = op.ints("begin") or []
    size = op.ints("size") or []
    key = tuple(
        slice(b, None) if s == -1 else slice(b, b + s) for b, s in zip(begin, size, strict=True)
    )
    op.tensor("x")
    return lambda x: x[key]


@_kernel("pad")
def _pad(op: _OpBinder) -> _Kernel:
    pads = op.ints("pad") or []
    mode = str(op.const("mode", "constant"))
    value = float(op.const("constant_val", 0.0))
    pairs = [(pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)]
    # Leading unpadded dims can be dropped; torch's reflect/replicate pad only trailing dims.
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    torch_pad = [p for before, after in reversed(pairs) for p in (before, after)]
    torch_mode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}.get(mode)
    if torch_mode is None:
        raise _Unsupported(f"pad mode {mode!r}")
    op.tensor("x")
    if not torch_pad:
        return lambda x: x
    if torch_mode == "constant":
        return lambda x: F.pad(x, torch_pad, mode="constant", value=value)
    n = len(pairs)
    if n > 3:
        raise _Unsupported(f"{mode} padding of {n} dims")

    def pad_edges(x: torch.Tensor) -> torch.Tensor:
        # torch wants (batch, channel, *n padded dims): fold everything in front into one.
        lead = x.shape[: x.dim() - n]
        y = F.pad(_f(x).reshape(1, -1, *x.shape[x.dim() - n :]), torch_pad, mode=torch_mode)
        return y.reshape(*lead, *y.shape[2:])

    return pad_edges


@_kernel("gather")
def _gather(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis", 0))
    batch_dims = int(op.const("batch_dims", 0))
    op.tensor("x")
    op.tensor("indices")

    def gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a = _axis(axis, x.dim())
        idx = indices.to(torch.long)
        if batch_dims == 0:
            flat = torch.index_select(x, a, idx.reshape(-1))
            return flat.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1 :])
        # Batched: x = B + D[b:], indices = B + N[b:].
        b = batch_dims
        batch = x.shape[:b]
        nb = math.prod(batch)
        xr = x.reshape(nb, *x.shape[b:]).movedim(a - b + 1, 1)
        ir = idx.reshape(nb, -1)
        picked = xr[torch.arange(nb).unsqueeze(1), ir]  # (nb, M, rest...)
        n_shape = idx.shape[b:]
        before = list(x.shape[b:a])
        after = list(x.shape[a + 1 :])
        picked = picked.reshape(nb, *n_shape, *before, *after)
        nn_, nbf = len(n_shape), len(before)
        perm = [
            0,
            *range(1 + nn_, 1 + nn_ + nbf),
            *range(1, 1 + nn_),
            *range(1 + nn_ + nbf, picked.dim()),
        ]
        return picked.permute(perm).reshape(*batch, *before, *n_shape, *after)

    return gather


@_kernel("gather_along_axis")
def _gather_along_axis(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis", 0))
    op.tensor("x")
    op.tensor("indices")
    return lambda x, idx: torch.gather(x, axis, idx.to(torch.long))


@_kernel("gather_nd")
def _gather_nd(op: _OpBinder) -> _Kernel:
    if int(op.const("batch_dims", 0)) != 0:
        raise _Unsupported("gather_nd with batch_dims > 0")
    op.tensor("x")
    op.tensor("indices")

    def gather_nd(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.to(torch.long)
        return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]

    return gather_nd


@_kernel("upsample_nearest_neighbor")
def _upsample_nearest(op: _OpBinder) -> _Kernel:
    sh = float(op.const("scale_factor_height", 1.0))
    sw = float(op.const("scale_factor_width", 1.0))
    op.tensor("x")
    if sh.is_integer() and sw.is_integer():
        ih, iw = int(sh), int(sw)
        # Integer factors are pure data movement: repeat in the stored dtype.
        return lambda x: x.repeat_interleave(ih, dim=-2).repeat_interleave(iw, dim=-1)

    def upsample(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (math.floor(h * sh), math.floor(w * sw))
        y = F.interpolate(_f(x).reshape(1, -1, h, w), size=size, mode="nearest")
        return y.reshape(*x.shape[:-2], *size)

    return upsample


@_kernel("resize_nearest_neighbor")
def _resize_nearest(op: _OpBinder) -> _Kernel:
    size = (int(op.const("target_size_height")), int(op.const("target_size_width")))
    op.tensor("x")

    def resize(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = F.interpolate(_f(x).reshape(1, -1, h, w), size=size, mode="nearest")
        return y.reshape(*x.shape[:-2], *size)

    return resize


@_kernel("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(op: _OpBinder) -> _Kernel:
    name = "upscale_factor" if op.op_type == "pixel_shuffle" else "downscale_factor"
    factor = int(op.const(name))
    fn = F.pixel_shuffle if op.op_type == "pixel_shuffle" else F.pixel_unshuffle
    op.tensor("x")
    return lambda x: fn(x, factor)


@_kernel("reverse")
def _reverse(op: _OpBinder) -> _Kernel:
    axes = op.ints("axes", None)
    op.tensor("x")
    if axes is None:
        return lambda x: torch.flip(x, dims=tuple(range(x.dim())))
    dims = tuple(axes)
    return lambda x: torch.flip(x, dims=dims)


@_kernel("cumsum")
def _cumsum(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis", 0))
    exclusive = bool(op.const("exclusive", False))
    reverse = bool(op.const("reverse", False))
    op.tensor("x")

    def cumsum(x: torch.Tensor) -> torch.Tensor:
        x = _f(x)
        if reverse:
            x = torch.flip(x, dims=(axis,))
        y = torch.cumsum(x, dim=axis)
        if exclusive:
            y = y - x
        return torch.flip(y, dims=(axis,)) if reverse else y

    return cumsum


# ---- weight decompression (evaluated once, at load) ------------------------------------------


def _blockwise_repeat(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Expand a per-block tensor to ``shape`` by repeating each entry over its block."""
    for axis, (full, blocks) in enumerate(zip(shape, t.shape, strict=True)):
        if full != blocks:
            t = t.repeat_interleave(full // blocks, dim=axis)
    return t


def _decode_shift_scale(
    data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * (data - offset)`` with scale/offset constant over blocks of ``data``.

    The block size along each axis is ``data.shape[i] // scale.shape[i]``. Computed in fp32:
    integer data and fp16 scales multiply exactly there, so rounding the result to fp16
    afterwards equals computing in fp16.
    """
    values = data.to(torch.float32)
    if offset is not None:
        values = values - _blockwise_repeat(offset.to(torch.float32), data.shape)
    return values * _blockwise_repeat(_f(scale), data.shape)


def _decode_lut(
    indices: torch.Tensor, lut: torch.Tensor, vector_axis: int | None = None
) -> torch.Tensor:
    """Dense tensor from palette ``indices`` and ``lut`` (iOS18 ``constexpr_lut_to_dense``).

    ``lut`` has shape ``(*blocks, palettes, vector)`` with ``blocks[i]`` dividing
    ``indices.shape[i]``: every index picks an entry of the palette of its block. With a
    vector size above 1 the picked vectors are laid out contiguously along ``vector_axis``.
    """
    rank = indices.dim()
    block_counts = lut.shape[:rank]
    palettes, vector = lut.shape[rank], lut.shape[rank + 1]
    # Flat block number of every element, built by broadcasting (no per-element loop).
    block_id = torch.zeros((), dtype=torch.long)
    for axis in range(rank):
        size, count = indices.shape[axis], block_counts[axis]
        view = [1] * rank
        view[axis] = size
        block_id = block_id * count + (torch.arange(size) // (size // count)).reshape(view)
    flat_lut = lut.reshape(-1, palettes, vector)
    picked = flat_lut[block_id.expand(indices.shape), indices.to(torch.long)]  # (*idx, vector)
    if vector == 1:
        return picked.squeeze(-1)
    if vector_axis is None:
        raise ValueError("vector palettization needs vector_axis")
    a = _axis(int(vector_axis), rank)
    return picked.movedim(-1, a + 1).flatten(a, a + 1)


@_kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(op: _OpBinder) -> _Kernel:
    op.tensor("data")
    op.tensor("scale")
    if op.has("offset"):
        op.tensor("offset")
    return _decode_shift_scale


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(op: _OpBinder) -> _Kernel:
    if op.has("shape"):
        raise _Unsupported("iOS16 form of constexpr_lut_to_dense (flat packed indices)")
    vector_axis = op.const("vector_axis", None)
    axis = None if vector_axis is None else int(vector_axis)
    op.tensor("indices")
    op.tensor("lut")
    return lambda indices, lut: _decode_lut(indices, lut, axis)


@_kernel("constexpr_affine_dequantize")
def _affine_dequantize(op: _OpBinder) -> _Kernel:
    axis = int(op.const("axis"))
    op.tensor("quantized_data")
    op.tensor("zero_point")
    op.tensor("scale")

    def decode(data: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # scale / zero_point are scalars or vectors along `axis`.
        shape = [1] * data.dim()
        shape[_axis(axis, data.dim())] = -1

        def along(t: torch.Tensor) -> torch.Tensor:
            t = t.to(torch.float32)
            return t if t.dim() == 0 else t.reshape(shape)

        return (data.to(torch.float32) - along(zero_point)) * along(scale)

    return decode


@_kernel("constexpr_cast")
def _constexpr_cast(op: _OpBinder) -> _Kernel:
    op.tensor("source_val")
    return lambda x: x


@_kernel("constexpr_sparse_to_dense")
def _sparse_to_dense(op: _OpBinder) -> _Kernel:
    if op.has("shape"):
        raise _Unsupported("iOS16 form of constexpr_sparse_to_dense (flat packed mask)")
    op.tensor("nonzero_data")
    op.tensor("mask")

    def decode(nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=nonzero.dtype)
        out[mask.to(torch.bool)] = nonzero
        return out

    return decode


# --------------------------------------------------------------------------------------------
# loading


def _load_program(package: Path) -> tuple[Any, Any, Path]:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(
            f"{package} is not an ML Program (neural-network models are not supported)"
        )
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    weights = getattr(model, "weights_dir", None)
    if weights:
        weights_dir = Path(weights)
    program = load(spec, spec.specificationVersion, str(weights_dir))
    return spec, program, weights_dir


def _constant_keys(spec: Any, function: str) -> dict[str, tuple[Any, ...]]:
    """Content keys of the function's const / constexpr outputs, from the serialized program.

    Two functions of one package that reference the same blob get the same key, so their
    constants (and decoded compressed weights) can be shared.
    """
    fn = spec.mlProgram.functions[function]
    block = fn.block_specializations[fn.opset]
    keys: dict[str, tuple[Any, ...]] = {}

    def value_key(value: Any) -> tuple[Any, ...]:
        if value.WhichOneof("value") == "blobFileValue":
            blob = value.blobFileValue
            return ("blob", blob.fileName, blob.offset, value.type.SerializeToString())
        return ("immediate", value.SerializeToString())

    def constexpr_key(op: Any) -> tuple[Any, ...] | None:
        parts: list[tuple[Any, ...]] = []
        for param in sorted(op.inputs):
            for argument in op.inputs[param].arguments:
                if argument.WhichOneof("binding") == "name":
                    known = keys.get(argument.name)
                    if known is None:
                        return None
                    parts.append((param, known))
                else:
                    parts.append((param, value_key(argument.value)))
        for attr in sorted(op.attributes):
            if attr != "name":
                parts.append((attr, value_key(op.attributes[attr])))
        return (op.type, tuple(parts), tuple(o.type.SerializeToString() for o in op.outputs))

    for op in block.operations:
        if op.type == "const":
            keys[op.outputs[0].name] = value_key(op.attributes["val"])
        elif op.type.startswith("constexpr_"):
            key = constexpr_key(op)
            if key is not None:
                for index, output in enumerate(op.outputs):
                    keys[output.name] = (*key, index)
    return keys


# Decoded constants shared between interpreters of one package (multifunction packages keep
# one copy of the weights; so do we). Entries die with the last interpreter using them.
_SHARED_CONSTANTS: weakref.WeakValueDictionary[tuple[Any, ...], torch.Tensor] = (
    weakref.WeakValueDictionary()
)


def _package_identity(weights_dir: Path) -> tuple[Any, ...]:
    files = sorted(weights_dir.glob("*")) if weights_dir.is_dir() else []
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return (str(weights_dir.resolve()), *stats)


@attrs.frozen
class _Step:
    fn: _Kernel
    args: tuple[int, ...]
    outs: tuple[int, ...]
    out_dtypes: tuple[torch.dtype, ...]
    release: tuple[int, ...]
    op_type: str
    op_name: str
    out_shapes: tuple[tuple[int | None, ...], ...]


class MILInterpreter:
    """Executes one function of a saved ``.mlpackage`` with PyTorch CPU kernels.

    Building the interpreter loads the program, decodes compressed weights, folds constant
    subgraphs and precomputes the execution plan; :meth:`run` then only executes the plan.
    A program with unsupported ops still loads (so it can be inspected); :meth:`run` and
    :meth:`check_supported` raise :class:`UnsupportedMILOp` for it.
    """

    def __init__(self, package_path: str | Path, function: str = "main"):
        self.package_path = Path(package_path)
        if not self.package_path.exists():
            raise FileNotFoundError(f"no such Core ML package: {self.package_path}")
        spec, program, weights_dir = _load_program(self.package_path)
        # The description lists a multifunction package's functions in a stable order; the
        # program's function map does not keep one.
        described = [f.name for f in spec.description.functions]
        self._functions = described if described else sorted(program.functions)
        if function not in program.functions:
            raise KeyError(
                f"{self.package_path} has no function {function!r}; "
                f"it has: {', '.join(self._functions)}"
            )
        self.function = function
        fn = program.functions[function]
        self._op_types = {op.op_type for op in self._walk(fn.operations)}
        self._problems: list[tuple[str, str, str]] = []
        self._inputs = [
            MILTensorSpec(name, self._static_shape(var), _NUMPY_DTYPE[_mil_dtype(var)])
            for name, var in fn.inputs.items()
        ]
        self._outputs = [
            MILTensorSpec(var.name, self._static_shape(var), _NUMPY_DTYPE[_mil_dtype(var)])
            for var in fn.outputs
        ]
        self._enumerated = _enumerated_shapes(spec, function)
        self._build_plan(fn, _constant_keys(spec, function), _package_identity(weights_dir))

    # ---- public properties ------------------------------------------------------------------

    @property
    def functions(self) -> list[str]:
        """Names of every function in the package's program."""
        return list(self._functions)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self._outputs]

    @property
    def input_specs(self) -> list[MILTensorSpec]:
        return list(self._inputs)

    @property
    def enumerated_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """``{input name: its allowed shapes}`` for inputs declared with
        ``ct.EnumeratedShapes`` (read from the package's model description)."""
        return {k: list(v) for k, v in self._enumerated.items()}

    @property
    def output_specs(self) -> list[MILTensorSpec]:
        return list(self._outputs)

    def op_types(self) -> set[str]:
        """Every op type used by the selected function (const and constexpr included)."""
        return set(self._op_types)

    def check_supported(self) -> None:
        """Raise :class:`UnsupportedMILOp` listing every op the interpreter cannot run."""
        if self._problems:
            raise UnsupportedMILOp(self._problems, self.function)

    # ---- running -------------------------------------------------------------------------------

    def run(
        self, inputs: Mapping[str, np.ndarray], *, check_shapes: bool = False
    ) -> dict[str, np.ndarray]:
        """Execute the function; returns ``{output name: array in the declared dtype}``.

        Every declared input must be given (extra names are an error); values are cast to
        the declared input dtype and checked against the declared (static) dimensions.
        Outputs are checked against their declared static dimensions; with
        ``check_shapes=True`` every op's outputs are (a debugging aid for the interpreter).
        """
        self.check_supported()
        env = list(self._base_env)
        missing = [s.name for s in self._inputs if s.name not in inputs]
        unknown = sorted(set(inputs) - {s.name for s in self._inputs})
        if missing or unknown:
            raise KeyError(
                f"inputs of {self.package_path.name}:{self.function} are "
                f"{self.input_names}; missing {missing}, unknown {unknown}"
            )
        for input_spec, slot in zip(self._inputs, self._input_slots, strict=True):
            array = np.asarray(inputs[input_spec.name])
            allowed = self._enumerated.get(input_spec.name)
            if allowed is not None and tuple(array.shape) not in allowed:
                raise ValueError(
                    f"input {input_spec.name!r} has shape {array.shape}; the package "
                    f"enumerates {[list(s) for s in allowed]}"
                )
            if not _shape_matches(array.shape, input_spec.shape):
                raise ValueError(
                    f"input {input_spec.name!r} has shape {array.shape}, "
                    f"the program declares {input_spec.shape}"
                )
            env[slot] = _to_torch_input(array, input_spec.dtype)
        with torch.inference_mode():
            for step in self._steps:
                try:
                    result = step.fn(*[env[i] for i in step.args])
                except Exception as error:
                    error.add_note(f"while running MIL op {step.op_type} {step.op_name!r}")
                    raise
                if not isinstance(result, (tuple, list)):
                    result = (result,)
                for slot, value, dtype in zip(step.outs, result, step.out_dtypes, strict=True):
                    env[slot] = value if value.dtype == dtype else value.to(dtype)
                if check_shapes:
                    for slot, shape in zip(step.outs, step.out_shapes, strict=True):
                        self._check_shape(step.op_type, step.op_name, env[slot].shape, shape)
                for slot in step.release:
                    env[slot] = None
        outputs = {}
        for output_spec, slot in zip(self._outputs, self._output_slots, strict=True):
            value = env[slot]
            self._check_shape("output", output_spec.name, value.shape, output_spec.shape)
            outputs[output_spec.name] = _to_numpy(value, output_spec.dtype)
        return outputs

    @staticmethod
    def _check_shape(
        op_type: str, op_name: str, got: Sequence[int], declared: Sequence[int | None]
    ) -> None:
        if not _shape_matches(got, declared):
            raise RuntimeError(
                f"MIL interpreter bug: {op_type} {op_name!r} produced shape {tuple(got)}, "
                f"the program declares {tuple(declared)}"
            )

    # ---- plan building ----------------------------------------------------------------------

    @staticmethod
    def _walk(operations: Iterable[Any]) -> Iterable[Any]:
        for op in operations:
            yield op
            for block in getattr(op, "blocks", None) or ():
                yield from MILInterpreter._walk(block.operations)

    @staticmethod
    def _static_shape(var: Any) -> tuple[int | None, ...]:
        return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)

    def _build_plan(
        self, fn: Any, constant_keys: Mapping[str, tuple[Any, ...]], package_id: tuple[Any, ...]
    ) -> None:
        slots: dict[str, int] = {}
        base_env: list[Any] = []
        constant_slots: set[int] = set()
        # Keep shared constants alive as long as this interpreter.
        self._shared: list[torch.Tensor] = []

        def new_slot(name: str, value: Any = None, constant: bool = False) -> int:
            slots[name] = len(base_env)
            base_env.append(value)
            if constant:
                constant_slots.add(slots[name])
            return slots[name]

        def shared(name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
            key = constant_keys.get(name)
            if key is None:
                return make()
            full_key = (*package_id, key)
            value = _SHARED_CONSTANTS.get(full_key)
            if value is None:
                value = make()
                _SHARED_CONSTANTS[full_key] = value
            self._shared.append(value)
            return value

        def const_value(var: Any) -> Any:
            """Python/numpy value of a constant var, or None if it is computed at run time."""
            producer = var.op
            if producer is not None and producer.op_type == "const":
                return var.val
            slot = slots.get(var.name)
            if slot is not None and slot in constant_slots:
                value = base_env[slot]
                if isinstance(value, torch.Tensor):
                    return value.numpy()
                return value
            return None

        def slot_of(var: Any) -> int:
            slot = slots.get(var.name)
            if slot is not None:
                return slot
            producer = var.op
            if producer is not None and producer.op_type == "const":
                value = shared(var.name, lambda: _to_torch(var.val))
                return new_slot(var.name, value, constant=True)
            raise KeyError(f"MIL var {var.name!r} is used before it is produced")

        self._input_slots = [new_slot(name) for name in fn.inputs]
        steps: list[_Step] = []
        failed: set[str] = set()

        for op in fn.operations:
            if op.op_type == "const":
                continue  # materialised on first use, only if used as a tensor
            if failed and self._depends_on(op, failed):
                # Downstream of an unsupported op: not reported itself, never planned.
                failed.update(out.name for out in op.outputs)
                continue
            problem = self._unsupported_reason(op)
            if problem is None:
                binder = _OpBinder(op, const_value)
                try:
                    kernel = _KERNELS[op.op_type](binder)
                except _Unsupported as error:
                    problem = str(error)
            if problem is not None:
                self._problems.append((op.op_type, op.name, problem))
                failed.update(out.name for out in op.outputs)
                continue
            args = tuple(slot_of(var) for var in binder.tensor_vars)
            out_dtypes = tuple(_TORCH_DTYPE[_mil_dtype(out)] for out in op.outputs)
            if all(a in constant_slots for a in args):
                # Constant subgraph (decompression included): evaluate once, now.
                def evaluate(kernel: _Kernel = kernel, args: tuple[int, ...] = args) -> Any:
                    with torch.inference_mode():
                        result = kernel(*[base_env[a] for a in args])
                    return result

                outputs = self._fold(op, evaluate, out_dtypes, shared)
                for out, value in zip(op.outputs, outputs, strict=True):
                    new_slot(out.name, value, constant=True)
                continue
            outs = tuple(new_slot(out.name) for out in op.outputs)
            out_shapes = tuple(self._static_shape(out) for out in op.outputs)
            step = _Step(kernel, args, outs, out_dtypes, (), op.op_type, op.name, out_shapes)
            steps.append(step)

        self._output_slots = [
            slots.get(var.name, -1) if var.name in failed else slot_of(var) for var in fn.outputs
        ]
        self._base_env = base_env
        self._steps = self._with_releases(steps, constant_slots)

    @staticmethod
    def _unsupported_reason(op: Any) -> str | None:
        if op.op_type not in _KERNELS:
            return "the interpreter has no kernel for this op type"
        if getattr(op, "blocks", None):
            return "ops with nested blocks (control flow) are not supported"
        for out in op.outputs:
            if _mil_dtype(out) not in _TORCH_DTYPE:
                return f"output dtype {_mil_dtype(out)} is not supported"
        return None

    @staticmethod
    def _depends_on(op: Any, names: set[str]) -> bool:
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                if var.name in names:
                    return True
        return False

    @staticmethod
    def _fold(
        op: Any,
        evaluate: Callable[[], Any],
        out_dtypes: tuple[torch.dtype, ...],
        shared: Callable[[str, Callable[[], torch.Tensor]], torch.Tensor],
    ) -> list[torch.Tensor]:
        cache: dict[str, Any] = {}

        def results() -> Any:
            if "r" not in cache:
                r = evaluate()
                cache["r"] = r if isinstance(r, (tuple, list)) else (r,)
            return cache["r"]

        values = []
        for index, (out, dtype) in enumerate(zip(op.outputs, out_dtypes, strict=True)):

            def make(index: int = index, dtype: torch.dtype = dtype) -> torch.Tensor:
                # Round to the declared dtype (fp16 weights really are fp16), then hold the
                # compute form.
                return _f(results()[index].to(dtype))

            values.append(shared(out.name, make))
        return values

    def _with_releases(self, steps: list[_Step], constant_slots: set[int]) -> list[_Step]:
        """Attach to each step the run-time slots that are dead after it (frees memory)."""
        keep = set(self._output_slots) | constant_slots
        last_use: dict[int, int] = {}
        for index, step in enumerate(steps):
            for slot in step.args:
                last_use[slot] = index
            for slot in step.outs:
                last_use.setdefault(slot, index)
        releases: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot not in keep:
                releases.setdefault(index, []).append(slot)
        return [
            attrs.evolve(step, release=tuple(releases.get(i, ()))) for i, step in enumerate(steps)
        ]


def _to_torch_input(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    converted = np.ascontiguousarray(array.astype(dtype, copy=False))
    if converted.dtype == np.uint16:
        converted = converted.astype(np.int32)
    elif converted.dtype == np.uint32:
        converted = converted.astype(np.int64)
    return torch.from_numpy(converted.copy() if not converted.flags.writeable else converted)


def _enumerated_shapes(spec: Any, function: str) -> dict[str, list[tuple[int, ...]]]:
    """Enumerated input shapes of ``function`` from a model spec (multifunction packages
    describe each function; single-function ones only the model's inputs)."""
    description = spec.description
    inputs = description.input
    for described in description.functions:
        if described.name == function:
            inputs = described.input
    out: dict[str, list[tuple[int, ...]]] = {}
    for feature in inputs:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            continue
        array = feature.type.multiArrayType
        if array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            out[feature.name] = [
                tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes
            ]
    return out


def _shape_matches(got: Sequence[int], declared: Sequence[int | None]) -> bool:
    return len(got) == len(declared) and all(
        want is None or want == have for want, have in zip(declared, got, strict=True)
    )


def _to_numpy(value: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return value.detach().cpu().numpy().astype(dtype, copy=False)
