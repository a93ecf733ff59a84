"""The bounded fp16 range check answers exactly as coremltools' own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sora_export.core.backends import coreml
from sora_export.core.backends.coreml import bounded_fp16_overflow_check, quiet_coremltools

ct = quiet_coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.passes.defs.quantization import (  # noqa: E402
    FP16ComputePrecision,
)

ORIGINAL = FP16ComputePrecision.__dict__["fp16_overflow"].__func__

# magnitudes around every edge of the rule: fp16's largest finite value, the 1e38 floor
# above which values count as infinities, infinities and NaN themselves
EDGES = [0.0, 1.0, 65504.0, 65504.01, 65520.0, 1e5, 9.9e37, 1e38, 3e38, np.inf, np.nan]
VALUES = st.one_of(
    st.sampled_from(EDGES).flatmap(lambda v: st.sampled_from([v, -v])),
    st.floats(-1e6, 1e6, width=32),
)


def _add_op(weight: np.ndarray, other: np.ndarray | None = None):
    """The ``add`` op of a one-op program adding constants to its input."""
    shape = weight.shape

    @mb.program(input_specs=[mb.TensorSpec(shape=shape, dtype=types.fp32)])
    def prog(x):
        y = mb.add(x=x, y=weight)
        return y if other is None else mb.mul(x=y, y=other)

    return [op for op in prog.functions["main"].operations if op.op_type in ("add", "mul")]


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=9), elements=VALUES),
    st.integers(1, 7),
)
def test_same_answer_as_coremltools(weight: np.ndarray, slice_size: int) -> None:
    for op in _add_op(weight, np.float32(2.0)):
        expected = ORIGINAL(op)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(coreml, "OVERFLOW_SLICE", slice_size)  # many slices, edges between
            assert coreml.fp16_overflow(op) is expected


def test_check_is_swapped_in_only_within_the_block() -> None:
    (op,) = _add_op(np.full((3, 4), 70000.0, np.float32))
    with bounded_fp16_overflow_check():
        assert FP16ComputePrecision.fp16_overflow is coreml.fp16_overflow
        assert FP16ComputePrecision().is_valid_op(op) is False
    assert FP16ComputePrecision.__dict__["fp16_overflow"].__func__ is ORIGINAL
