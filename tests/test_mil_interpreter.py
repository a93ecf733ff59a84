"""The MIL reference interpreter against PyTorch and against coremltools' own op semantics.

Small seeded torch modules are exported (torch.export -> ct.convert, fp32 and fp16 programs),
saved, read back and run by the interpreter. Packages are converted once per module
(module-scoped fixtures) to keep the file fast.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.milproto.load import load as load_mil
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core.verify import mil_interpreter as mi
from sora_export.core.verify.mil_interpreter import (
    MILInterpreter,
    UnsupportedMILOp,
    coreml_predict_available,
    run_mlpackage,
)

PRECISIONS = ("fp32", "fp16")


# ---- helpers -----------------------------------------------------------------------------------


def psnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """PSNR of ``actual`` against ``reference``, peak = max |reference|."""
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    mse = float(np.mean((reference - actual) ** 2))
    peak = float(np.max(np.abs(reference)))
    if mse == 0.0:
        return math.inf
    return 20 * math.log10(peak) - 10 * math.log10(mse)


def rel_err(reference: np.ndarray, actual: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    return float(np.max(np.abs(reference - actual)) / max(np.max(np.abs(reference)), 1e-12))


def convert(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    precision: str,
) -> Path:
    """torch.export -> Core ML (iOS18 ML Program) -> saved ``.mlpackage``."""
    program = torch.export.export(module.eval(), args).run_decompositions({})
    inputs = [
        ct.TensorType(
            name=name,
            shape=tuple(arg.shape),
            dtype=np.float32 if arg.dtype.is_floating_point else np.int32,
        )
        for name, arg in zip(names, args, strict=True)
    ]
    model = ct.convert(
        program,
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        inputs=inputs,
    )
    model.save(str(path))
    return path


def torch_outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module.eval()(*args)
    result = result if isinstance(result, tuple) else (result,)
    return [r.numpy() for r in result]


def interpret(path: Path, names: list[str], args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    interp = MILInterpreter(path)
    out = interp.run({n: a.numpy() for n, a in zip(names, args, strict=True)}, check_shapes=True)
    return [out[name] for name in interp.output_names]


# ---- op families as small torch modules --------------------------------------------------------


class Dense(nn.Module):
    """Linear, LayerNorm (affine and plain), RMSNorm by hand, GELU, SiLU, sigmoid, softmax,
    bmm, einsum.

    Only exact GELU: coremltools 9.0 drops ``approximate="tanh"`` when converting from
    torch.export (it lowers to ``gelu(mode=EXACT)``), so the tanh mode is checked on a
    MIL-built program below.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.ln_plain = nn.LayerNorm(32, elementwise_affine=False)
        self.out = nn.Linear(32, 16, bias=False)
        self.rms_weight = nn.Parameter(torch.rand(32) + 0.5)
        nn.init.normal_(self.ln.weight, 1.0, 0.2)
        nn.init.normal_(self.ln.bias, 0.0, 0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.fc(x)
        a = F.gelu(self.ln(h))
        b = F.silu(self.ln_plain(h)) + torch.sigmoid(h)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms_weight
        s = torch.softmax(a, dim=-1)
        m = torch.bmm(a, b.transpose(1, 2))
        e = torch.einsum("bij,bjk->bik", m, rms)
        return self.out(e + s), m, a @ rms.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with an additive mask: chunk, view, permute, SDPA, reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, 2, c // 2).permute(0, 2, 1, 3) for t in (q, k, v))
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        plain = F.scaled_dot_product_attention(q, k, v)
        return self.proj((masked + plain).transpose(1, 2).reshape(b, n, c))


class Convs(nn.Module):
    """Conv2d (stride, padding), GroupNorm, SiLU, nearest 2x upsampling, constant pad,
    Conv3d (stride, padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.Conv2d(8, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(3, 4, (3, 3, 3), stride=(1, 2, 2), padding=(1, 0, 1))
        nn.init.normal_(self.norm.weight, 1.0, 0.2)
        nn.init.normal_(self.norm.bias, 0.0, 0.2)

    def forward(self, img: torch.Tensor, vid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = F.silu(self.norm(self.down(img)))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up(F.pad(h, (1, 0, 2, 1), value=0.5))
        return h, self.conv3d(vid)


class Layout(nn.Module):
    """permute, reshape, unsqueeze + expand, repeat, cat, flip, stack, slicing, select,
    squeeze, split, tile."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first, rest = torch.split(x, [1, 3], dim=2)
        return (
            x.permute(2, 0, 1).reshape(4, 6),
            x.unsqueeze(1).expand(2, 3, 3, 4),
            x.repeat(1, 2, 1),
            torch.cat([x, x.flip(-1)], dim=1),
            torch.stack([x, -x], dim=0),
            x[:, 1:, ::2],
            x[..., -1],
            x.view(2, 1, 12).squeeze(1),
            first * 2,
            rest,
            x.tile(2, 1, 1),
        )


class Elementwise(nn.Module):
    """sin/cos/exp/log/sqrt/rsqrt/abs/square, arange-derived constants, binary ops, clip,
    reductions, comparisons, where, fill-likes, casts."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "freqs", torch.exp(-math.log(10000.0) * torch.arange(0, 8, dtype=torch.float32) / 8)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = x * self.freqs
        unary = (
            torch.exp(x.clamp(-3, 3))
            + torch.log(y.abs() + 1)
            + torch.sqrt(x.abs())
            + torch.rsqrt(y.abs() + 0.5)
            + x.abs()
            + x.square()
        )
        binary = (
            torch.maximum(x, y)
            - torch.minimum(x, y) / (y.abs() + 1)
            + torch.pow(x.abs(), 1.5)
            + x.clamp(-0.5, 0.5)
            - 1.0
        )
        reduced = x.mean(-1) + y.sum(-1) + x.amax(-1)
        chosen = (
            torch.where(x > y, x, y)
            + torch.where(x <= 0, torch.ones_like(x), torch.zeros_like(x))
            + (x == y).float()
            + (x != y).float()
            + torch.full_like(x, 0.25)
        )
        ints = ((x > 0).to(torch.int32) * 3 - 1).to(torch.float32)
        return torch.cat([torch.sin(t), torch.cos(t)], -1), unary, binary, reduced, chosen, ints


class Embedding(nn.Module):
    """Embedding lookup with int32 ids (gather) plus a learned position table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(20, 8)
        self.pos = nn.Parameter(torch.randn(5, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) + self.pos


class Overflow(nn.Module):
    """Not a match for torch in fp16: ``h * h`` passes 65504 for ``|x| > 0.853``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 300.0
        return (h * h) / 1000.0


def _family_cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], list[str]]]:
    def attention_args() -> tuple[torch.Tensor, ...]:
        mask = torch.randn(2, 1, 6, 6)
        mask[..., -2:] = -1e4  # masked-out keys, representable in fp16
        return torch.randn(2, 6, 16), mask

    return {
        "dense": (Dense, lambda: (torch.randn(2, 5, 16),), ["x"]),
        "attention": (Attention, attention_args, ["x", "mask"]),
        "conv": (
            Convs,
            lambda: (torch.randn(1, 4, 8, 8), torch.randn(1, 3, 4, 6, 6)),
            ["img", "vid"],
        ),
        "layout": (Layout, lambda: (torch.randn(2, 3, 4),), ["x"]),
        "elementwise": (Elementwise, lambda: (torch.randn(3, 8), torch.randn(3, 8)), ["x", "y"]),
        "embedding": (
            Embedding,
            lambda: (torch.randint(0, 20, (2, 5), dtype=torch.int32),),
            ["ids"],
        ),
        "overflow": (Overflow, lambda: (torch.tensor([[0.1, 0.5, 1.0, -2.0]]),), ["x"]),
    }


FAMILIES = _family_cases()
MATCHING = [family for family in FAMILIES if family != "overflow"]


class Zoo(nn.Module):
    """All families side by side in one graph: one conversion per precision keeps the file
    fast (conversion cost is mostly per program)."""

    def __init__(self, members: dict[str, nn.Module], arity: dict[str, int]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.arity = arity

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        start = 0
        for family, member in self.members.items():
            result = member(*args[start : start + self.arity[family]])
            start += self.arity[family]
            outputs.extend(result if isinstance(result, tuple) else (result,))
        return tuple(outputs)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The zoo converted once per precision, with its inputs and torch's outputs per family."""
    torch.manual_seed(0)
    members = {family: make().eval() for family, (make, _, _) in FAMILIES.items()}
    family_args = {family: make_args() for family, (_, make_args, _) in FAMILIES.items()}
    arity = {family: len(args) for family, args in family_args.items()}
    names = [f"{family}_{n}" for family, (_, _, ns) in FAMILIES.items() for n in ns]
    args = tuple(a for family in FAMILIES for a in family_args[family])
    expected = {family: torch_outputs(members[family], family_args[family]) for family in FAMILIES}
    module = Zoo(members, arity).eval()
    root = tmp_path_factory.mktemp("zoo")
    paths = {p: convert(module, args, names, root / f"zoo_{p}.mlpackage", p) for p in PRECISIONS}
    inputs = {n: a.numpy() for n, a in zip(names, args, strict=True)}
    actual = {}
    for precision, path in paths.items():
        flat = interpret(path, names, args)
        actual[precision], start = {}, 0
        for family in FAMILIES:
            count = len(expected[family])
            actual[precision][family] = flat[start : start + count]
            start += count
        assert start == len(flat)
    return {"paths": paths, "inputs": inputs, "expected": expected, "actual": actual}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", MATCHING)
def test_family_matches_torch(zoo: dict[str, Any], family: str, precision: str) -> None:
    expected = zoo["expected"][family]
    actual = zoo["actual"][precision][family]
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got.shape == want.shape, index
        if precision == "fp32":
            assert got.dtype == np.float32
            assert rel_err(want, got) < 1e-5, (index, rel_err(want, got))
        else:
            assert got.dtype == np.float16  # declared fp16 outputs come back as fp16
            assert np.all(np.isfinite(got))
            assert psnr_db(want, got) > 50.0, (index, psnr_db(want, got))


def test_families_cover_the_stdit_op_set(zoo: dict[str, Any]) -> None:
    """The op types DESIGN.md lists for a converted STDiT3 block pair are all exercised."""
    seen: set[str] = set()
    for path in zoo["paths"].values():
        seen |= MILInterpreter(path).op_types()
    stdit_ops = {
        "const", "cast", "reshape", "tile", "transpose", "add", "mul", "real_div", "split",
        "squeeze", "layer_norm", "linear", "gelu", "abs", "square", "sqrt", "reduce_max",
        "reduce_mean", "scaled_dot_product_attention",
    }  # fmt: skip
    others = {
        "conv", "matmul", "softmax", "silu", "sigmoid", "rsqrt", "pow", "sin", "cos", "exp",
        "log", "concat", "stack", "slice_by_index", "gather", "pad",
        "upsample_nearest_neighbor", "select", "greater", "fill_like", "maximum", "minimum",
        "clip", "reduce_sum", "expand_dims", "reverse",
    }  # fmt: skip
    assert stdit_ops | others <= seen, sorted((stdit_ops | others) - seen)


# ---- modes that torch conversion does not reach, against coremltools' reference semantics ------


def test_builder_ops_match_coremltools_semantics(tmp_path: Path) -> None:
    """Op forms torch conversion does not produce. Each op in ``ops`` is also built with
    constant inputs, so coremltools' own value_inference gives the expected result."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((1, 3, 7, 6)).astype(np.float32)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    q = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    causal = np.tril(np.ones((3, 5), dtype=bool))
    idx = rng.integers(0, 6, size=(2, 3)).astype(np.int32)
    idx_3d = np.ascontiguousarray(np.broadcast_to(idx[:, None, :], (2, 4, 3)))
    channel_a = np.linspace(0.1, 0.4, 3).astype(np.float32)
    channel_b = np.linspace(1.0, 2.0, 3).astype(np.float32)
    nd_indices = np.array([[0, 1], [1, 3]], np.int32)

    def ops(x: Any, q: Any, k: Any, img: Any) -> dict[str, Callable[[], Any]]:
        # Builders, not vars: the reference builds every op on fresh copies of the inputs
        # (coremltools' thresholded_relu value_inference writes into its input).
        return {
            "gelu_tanh": lambda: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
            "gelu_sigmoid": lambda: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
            "pad_reflect": lambda: mb.pad(x=img, pad=[1, 2, 2, 1], mode="reflect"),
            "pad_replicate": lambda: mb.pad(x=img, pad=[1, 2, 2, 1], mode="replicate"),
            "slice_by_size": lambda: mb.slice_by_size(x=x, begin=[1, 1, 0], size=[1, -1, 3]),
            "slice_negative_stride": lambda: mb.slice_by_index(
                x=x,
                begin=[1, 3, 5],
                end=[0, 0, 0],
                stride=[1, -1, -2],
                end_mask=[True, True, True],
                squeeze_mask=[True, False, False],
            ),
            "split_num": lambda: mb.split(x=x, num_splits=2, axis=2)[1],
            "reshape_zero": lambda: mb.reshape(x=x, shape=[1, 0, -1, 0]),
            "layer_norm_axes": lambda: mb.layer_norm(x=x, axes=[0, 2], epsilon=1e-3),
            "sdpa_bool_mask": lambda: mb.scaled_dot_product_attention(
                query=q, key=k, value=k, attn_mask=causal
            ),
            "reduce_prod": lambda: mb.reduce_prod(x=x, axes=[0, 2], keep_dims=True),
            "reduce_argmax": lambda: mb.reduce_argmax(x=x, axis=1),
            "cumsum_reverse": lambda: mb.cumsum(x=x, axis=1, reverse=True),
            "gather_batch_dims": lambda: mb.gather(x=x, indices=idx, axis=2, batch_dims=1),
            "gather_along_axis": lambda: mb.gather_along_axis(x=x, indices=idx_3d, axis=2),
            "reverse": lambda: mb.reverse(x=x, axes=[0, 2]),
            "tile": lambda: mb.tile(x=x, reps=[1, 2, 1]),
            "slice_squeeze_negative": lambda: mb.slice_by_index(
                x=x,
                begin=[0, -1, 0],
                end=[0, 0, 0],
                squeeze_mask=[False, True, False],
                end_mask=[True, True, True],
            ),
            "leaky_relu": lambda: mb.leaky_relu(x=x, alpha=0.1),
            "elu": lambda: mb.elu(x=x, alpha=0.7),
            "clamped_relu": lambda: mb.clamped_relu(x=x, alpha=0.1, beta=0.5),
            "sigmoid_hard": lambda: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4),
            "linear_activation": lambda: mb.linear_activation(x=x, alpha=2.0, beta=-1.0),
            "scaled_tanh": lambda: mb.scaled_tanh(x=x, alpha=2.0, beta=0.5),
            "thresholded_relu": lambda: mb.thresholded_relu(x=x, alpha=0.3),
            "softplus": lambda: mb.softplus(x=x),
            "prelu": lambda: mb.prelu(x=img, alpha=channel_a),
            "softplus_parametric": lambda: mb.softplus_parametric(
                x=img, alpha=channel_a, beta=channel_b
            ),
            "reduce_l2_norm": lambda: mb.reduce_l2_norm(x=x, axes=[1]),
            "reduce_log_sum_exp": lambda: mb.reduce_log_sum_exp(x=x, axes=[2], keep_dims=True),
            "floor_div": lambda: mb.floor_div(x=x, y=np.float32(0.7)),
            "mod": lambda: mb.mod(x=x, y=np.float32(0.7)),
            "sign": lambda: mb.sign(x=x),
            "round": lambda: mb.round(x=mb.mul(x=x, y=np.float32(2.0))),
            "erf": lambda: mb.erf(x=x),
            "inverse": lambda: mb.inverse(x=x, epsilon=1e-3),
        }

    # coremltools' value_inference is wrong for these two (it ignores interleave, and crashes
    # on exclusive cumsum): expected values follow the op documentation instead.
    interleaved = np.empty((2, 8, 6), np.float32)
    interleaved[:, 0::2], interleaved[:, 1::2] = x, 2 * x
    expected: dict[str, np.ndarray] = {
        "cumsum_exclusive": np.cumsum(x, axis=1) - x,
        "concat_interleave": interleaved,
    }
    # conv has no value_inference. pad_type same / same_lower put the odd extra row after /
    # before (TF-style): H 7 -> 4 needs 2 rows (1 + 1); W 6 -> 3 needs 1 column.
    xt, wt = torch.from_numpy(img), torch.from_numpy(weight)
    expected["conv_same"] = F.conv2d(F.pad(xt, (0, 1, 1, 1)), wt, stride=2).numpy()
    expected["conv_same_lower"] = F.conv2d(F.pad(xt, (1, 0, 1, 1)), wt, stride=2).numpy()
    # Neither have these; their definitions match the torch functions.
    a_t, b_t = torch.from_numpy(channel_a), torch.from_numpy(channel_b)
    expected["gather_nd"] = x[[0, 1], [1, 3]]
    expected["instance_norm"] = F.instance_norm(xt, weight=a_t, bias=b_t, eps=1e-4).numpy()
    expected["batch_norm"] = F.batch_norm(xt, -a_t, b_t, b_t, a_t, eps=1e-3).numpy()
    expected["upsample_nearest"] = img.repeat(2, axis=2).repeat(3, axis=3)
    expected["pixel_shuffle"] = F.pixel_shuffle(torch.from_numpy(x.reshape(1, 8, 2, 3)), 2).numpy()

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def reference(dummy: Any) -> Any:
        for name in ops(x, q, k, img):  # constant inputs: values are inferred
            var = ops(x.copy(), q.copy(), k.copy(), img.copy())[name]()
            assert var.val is not None, name
            expected[name] = np.asarray(var.val)
        return dummy

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=x.shape),
            mb.TensorSpec(shape=q.shape),
            mb.TensorSpec(shape=k.shape),
            mb.TensorSpec(shape=img.shape),
        ],
        opset_version=ct.target.iOS18,
    )
    def program(xv: Any, qv: Any, kv: Any, imgv: Any) -> Any:
        outputs = [mb.identity(x=op(), name=name) for name, op in ops(xv, qv, kv, imgv).items()]
        exclusive = mb.cumsum(x=xv, axis=1, exclusive=True)
        interleaved = mb.concat(values=[xv, mb.mul(x=xv, y=2.0)], axis=1, interleave=True)
        return (
            *outputs,
            mb.identity(x=exclusive, name="cumsum_exclusive"),
            mb.identity(x=interleaved, name="concat_interleave"),
            mb.conv(x=imgv, weight=weight, strides=[2, 2], pad_type="same", name="conv_same"),
            mb.conv(
                x=imgv, weight=weight, strides=[2, 2], pad_type="same_lower", name="conv_same_lower"
            ),
            mb.gather_nd(x=xv, indices=nd_indices, name="gather_nd"),
            mb.instance_norm(
                x=imgv, gamma=channel_a, beta=channel_b, epsilon=1e-4, name="instance_norm"
            ),
            mb.batch_norm(
                x=imgv,
                mean=-channel_a,
                variance=channel_b,
                gamma=channel_b,
                beta=channel_a,
                epsilon=1e-3,
                name="batch_norm",
            ),
            mb.upsample_nearest_neighbor(
                x=imgv, scale_factor_height=2, scale_factor_width=3, name="upsample_nearest"
            ),
            mb.pixel_shuffle(
                x=mb.reshape(x=xv, shape=[1, 8, 2, 3]), upscale_factor=2, name="pixel_shuffle"
            ),
        )

    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
    )
    path = tmp_path / "builder.mlpackage"
    model.save(str(path))
    interp = MILInterpreter(path)
    out = interp.run({"xv": x, "qv": q, "kv": k, "imgv": img}, check_shapes=True)
    for name, want in expected.items():
        got = out[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_fp16_overflow_shows_as_inf(zoo: dict[str, Any]) -> None:
    x = zoo["inputs"]["overflow_x"]
    # The overflow family comes last in the zoo, so its output is the last one.
    (*_, y16) = run_mlpackage(zoo["paths"]["fp16"], zoo["inputs"]).values()
    (*_, y32) = run_mlpackage(zoo["paths"]["fp32"], zoo["inputs"]).values()
    np.testing.assert_allclose(y32, 90.0 * x**2, rtol=1e-5)
    assert np.all(np.isfinite(y32))
    assert np.isinf(y16[0, 2:]).all(), y16  # the intermediate overflowed, not the output
    np.testing.assert_allclose(y16[0, :2], 90.0 * x[0, :2] ** 2, rtol=2e-3)


# ---- quantized packages ------------------------------------------------------------------------


class LinearConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.conv = nn.Conv2d(64, 32, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), self.conv(img)


def _quant_configs() -> dict[str, tuple[str, Any]]:
    import coremltools.optimize.coreml as cto

    return {
        "int8": ("linear", cto.OpLinearQuantizerConfig(mode="linear_symmetric")),
        "int8-asym": ("linear", cto.OpLinearQuantizerConfig(mode="linear")),
        "int4-block": (
            "linear",
            cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=32),
        ),
        "palettize4-uniform": ("palettize", cto.OpPalettizerConfig(mode="uniform", nbits=4)),
        "palettize4-grouped": (
            "palettize",
            cto.OpPalettizerConfig(
                mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16
            ),
        ),
        "palettize4-kmeans": ("palettize", cto.OpPalettizerConfig(mode="kmeans", nbits=4)),
    }


@pytest.fixture(scope="module")
def quant_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    module = LinearConv().eval()
    args = (torch.randn(2, 64), torch.randn(1, 64, 4, 4))
    root = tmp_path_factory.mktemp("quant")
    path = convert(module, args, ["x", "img"], root / "float.mlpackage", "fp32")
    return {"module": module, "args": args, "root": root, "model": ct.models.MLModel(str(path))}


def _quantize(quant_base: dict[str, Any], name: str) -> Path:
    import coremltools.optimize.coreml as cto

    kind, op_config = _quant_configs()[name]
    if name.endswith("kmeans"):
        pytest.importorskip("sklearn", reason="k-means palettization needs scikit-learn")
    path = quant_base["root"] / f"{name}.mlpackage"
    if not path.exists():
        config = cto.OptimizationConfig(global_config=op_config)
        if kind == "linear":
            model = cto.linear_quantize_weights(quant_base["model"], config)
        else:
            model = cto.palettize_weights(quant_base["model"], config)
        model.save(str(path))
    return path


def _dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """Weights as coremltools itself decompresses them (independent of the interpreter)."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    program = load_mil(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))
    weights = {}
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            weights[op.name] = np.asarray(op.materialized_val_inference(), dtype=np.float32)
    return weights


@pytest.mark.parametrize("name", list(_quant_configs()))
def test_quantized_package_matches_dequantized_weights(
    quant_base: dict[str, Any], name: str
) -> None:
    path = _quantize(quant_base, name)
    interp = MILInterpreter(path)
    expected_op = (
        "constexpr_lut_to_dense" if "palettize" in name else "constexpr_blockwise_shift_scale"
    )
    assert expected_op in interp.op_types()
    module, (x, img) = quant_base["module"], quant_base["args"]
    weights = _dequantized_weights(path)
    fc_w = torch.from_numpy(next(v for k, v in weights.items() if "fc_weight" in k))
    conv_w = torch.from_numpy(next(v for k, v in weights.items() if "conv_weight" in k))
    with torch.no_grad():
        want_fc = F.linear(x, fc_w, module.fc.bias).numpy()
        want_conv = F.conv2d(img, conv_w, module.conv.bias, padding=1).numpy()
        float_fc, float_conv = (t.numpy() for t in module(x, img))
    out = interp.run({"x": x.numpy(), "img": img.numpy()})
    got_fc, got_conv = (out[n] for n in interp.output_names)
    assert rel_err(want_fc, got_fc) < 1e-4
    assert rel_err(want_conv, got_conv) < 1e-4
    # ... and the quantized model stays close to the float one.
    floor_db = 35.0 if name.startswith("int8") else 18.0
    assert psnr_db(float_fc, got_fc) > floor_db
    assert psnr_db(float_conv, got_conv) > floor_db
    assert psnr_db(float_fc, got_fc) < 200  # really quantized, not the float weights


def test_compressed_weights_are_decoded_once(
    quant_base: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _quantize(quant_base, "palettize4-uniform")
    calls = []
    factory = mi._KERNELS["constexpr_lut_to_dense"]

    def counting_factory(op: Any) -> Any:
        kernel = factory(op)

        def counted(*args: Any) -> Any:
            calls.append(op.op.name)
            return kernel(*args)

        return counted

    monkeypatch.setitem(mi._KERNELS, "constexpr_lut_to_dense", counting_factory)
    # A copy, so that no other interpreter's shared constants can be reused.
    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(path, copy)
    interp = MILInterpreter(copy)
    assert len(calls) == 2  # the Linear and the Conv weight, decoded at load
    x, img = (a.numpy() for a in quant_base["args"])
    interp.run({"x": x, "img": img})
    interp.run({"x": x, "img": img})
    assert len(calls) == 2
    # A second interpreter of the same package reuses the decoded weights.
    MILInterpreter(copy).run({"x": x, "img": img})
    assert len(calls) == 2


# ---- multifunction -----------------------------------------------------------------------------


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Merged(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * 2.0


def test_multifunction_package_runs_each_function(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, merged = Plain().eval(), Merged().eval()
    merged.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8)
    convert(plain, (x,), ["x"], tmp_path / "plain.mlpackage", "fp32")
    convert(merged, (x,), ["x"], tmp_path / "merged.mlpackage", "fp32")
    descriptor = ct.utils.MultiFunctionDescriptor()
    descriptor.add_function(str(tmp_path / "plain.mlpackage"), "main", "plain")
    descriptor.add_function(str(tmp_path / "merged.mlpackage"), "main", "tdtm")
    descriptor.default_function_name = "plain"
    path = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(descriptor, str(path))

    first = MILInterpreter(path, function="plain")
    second = MILInterpreter(path, function="tdtm")
    assert sorted(first.functions) == ["plain", "tdtm"]
    with torch.no_grad():
        for interp, module in ((first, plain), (second, merged)):
            (got,) = interp.run({"x": x.numpy()}).values()
            assert rel_err(module(x).numpy(), got) < 1e-5
    # The functions reference one blob of weights; the interpreters hold one tensor for it.
    assert {id(t) for t in first._shared} & {id(t) for t in second._shared}
    with pytest.raises(KeyError, match="plain, tdtm"):
        MILInterpreter(path)  # no "main" here; the error lists what exists


# ---- errors ------------------------------------------------------------------------------------


def test_unsupported_op_is_named(zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(mi._KERNELS, "softmax")
    interp = MILInterpreter(zoo["paths"]["fp32"])  # still loads, for inspection
    assert "softmax" in interp.op_types()
    with pytest.raises(UnsupportedMILOp) as caught:
        interp.check_supported()
    assert caught.value.op_types == {"softmax"}  # downstream ops are not blamed
    ((_, op_name, _),) = caught.value.problems
    message = str(caught.value)
    assert "softmax" in message and repr(op_name) in message and "no kernel" in message
    with pytest.raises(UnsupportedMILOp, match="softmax"):
        interp.run(zoo["inputs"])


def test_inputs_are_checked_and_cast(zoo: dict[str, Any]) -> None:
    interp = MILInterpreter(zoo["paths"]["fp32"])
    inputs = dict(zoo["inputs"])
    assert interp.input_names == list(inputs)
    specs = {spec.name: spec for spec in interp.input_specs}
    assert specs["embedding_ids"].dtype == np.int32
    assert specs["dense_x"].shape == (2, 5, 16)
    with pytest.raises(KeyError, match="missing"):
        interp.run({k: v for k, v in inputs.items() if k != "dense_x"})
    with pytest.raises(KeyError, match="unknown"):
        interp.run({**inputs, "extra": inputs["dense_x"]})
    with pytest.raises(ValueError, match="shape"):
        interp.run({**inputs, "embedding_ids": inputs["embedding_ids"][:1]})
    # int64 ids and float64 activations are cast to the declared int32 / fp32.
    widened = {
        k: v.astype(np.int64 if v.dtype == np.int32 else np.float64) for k, v in inputs.items()
    }
    got = interp.run(widened)
    want = interp.run(inputs)
    for name in interp.output_names:
        np.testing.assert_array_equal(got[name], want[name])


def test_predict_availability_reflects_platform() -> None:
    if sys.platform != "darwin":
        assert coreml_predict_available() is False
    else:
        assert isinstance(coreml_predict_available(), bool)


# ---- helpers, property-based against coremltools' reference implementations --------------------


@st.composite
def slice_params(draw: st.DrawFn) -> tuple[Any, ...]:
    rank = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    begin = draw(st.lists(st.integers(-6, 6), min_size=rank, max_size=rank))
    end = draw(st.lists(st.integers(-6, 6), min_size=rank, max_size=rank))
    stride = draw(st.lists(st.sampled_from([-3, -2, -1, 1, 2, 3]), min_size=rank, max_size=rank))
    begin_mask = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
    end_mask = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
    squeeze = [
        draw(st.booleans()) and -size <= b < size for size, b in zip(shape, begin, strict=True)
    ]
    return shape, begin, end, stride, begin_mask, end_mask, squeeze


@settings(max_examples=60, deadline=None)
@given(slice_params())
def test_slice_by_index_matches_coremltools(params: tuple[Any, ...]) -> None:
    from coremltools.converters.mil.mil.ops.defs._utils import solve_slice_by_index_slice

    shape, begin, end, stride, begin_mask, end_mask, squeeze = params
    x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    slices = solve_slice_by_index_slice(
        shape, begin, end, list(stride), begin_mask, end_mask, squeeze
    )
    want = x[slices]
    squeezed = tuple(i for i, s in enumerate(squeeze) if s)
    if squeezed:
        want = np.squeeze(want, axis=squeezed)
    got = mi._apply_slice(torch.from_numpy(x), begin, end, stride, begin_mask, end_mask, squeeze)
    np.testing.assert_array_equal(got.numpy(), want)


@st.composite
def lut_params(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int | None]:
    rank = draw(st.integers(1, 3))
    blocks = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    per_block = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    nbits = draw(st.sampled_from([1, 2, 4]))
    vector = draw(st.sampled_from([1, 1, 2, 3]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    shape = [b * p for b, p in zip(blocks, per_block, strict=True)]
    indices = rng.integers(0, 2**nbits, size=shape).astype(np.uint8)
    lut = rng.standard_normal((*blocks, 2**nbits, vector)).astype(np.float32)
    axis = draw(st.integers(-rank, rank - 1)) if vector > 1 else None
    return indices, lut, axis


@settings(max_examples=60, deadline=None)
@given(lut_params())
def test_lut_decoding_matches_coremltools(
    params: tuple[np.ndarray, np.ndarray, int | None],
) -> None:
    from coremltools.optimize._utils import lut_to_dense

    indices, lut, axis = params
    want = lut_to_dense(indices, lut, axis)
    got = mi._decode_lut(torch.from_numpy(indices), torch.from_numpy(lut), axis)
    np.testing.assert_array_equal(got.numpy(), want)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=3),
    st.sampled_from([np.float32, np.float16]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_shift_scale_decoding_matches_coremltools(
    dims: list[tuple[int, int]], scale_dtype: type, with_offset: bool, seed: int
) -> None:
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale,
    )

    rng = np.random.default_rng(seed)
    blocks = [b for b, _ in dims]
    shape = [b * size for b, size in dims]
    data = rng.integers(-128, 128, size=shape).astype(np.int8)
    scale = (rng.random(blocks) * 0.1 + 0.01).astype(scale_dtype)
    offset = rng.integers(-8, 8, size=blocks).astype(np.int8) if with_offset else None
    want = constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    got = mi._decode_shift_scale(
        torch.from_numpy(data),
        torch.from_numpy(scale),
        None if offset is None else torch.from_numpy(offset),
    )
    # Decoded in fp32 then rounded to the declared dtype, as the interpreter stores it.
    np.testing.assert_array_equal(got.to(torch.from_numpy(want).dtype).numpy(), want)


def test_reshape_zero_copies_right_aligned_dims() -> None:
    # The iOS17 reshape example: x (2, 50), shape [1, 0, -1, 0] -> (1, 1, 2, 50).
    assert mi._reshape_target([1, 0, -1, 0], (2, 50)) == [1, 1, -1, 50]
    assert torch.zeros(2, 50).reshape(mi._reshape_target([1, 0, -1, 0], (2, 50))).shape == (
        1,
        1,
        2,
        50,
    )
