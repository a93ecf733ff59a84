"""coremltools' fp16 range check vs sora-export's bounded one, on one big constant.

coremltools' ``add_fp16_cast`` pass asks ``FP16ComputePrecision.fp16_overflow`` of every op
with a constant fp32 input whether a value exceeds fp16's range. Its answer indexes the
whole tensor with ``np.where`` (two int64 arrays, 16 bytes per weight). The Core ML backend
swaps in :func:`sora_export.core.backends.coreml.fp16_overflow`, the same rule slice by
slice. This prints both checks' wall time and peak extra memory (tracemalloc: numpy
reports its buffers) on a ``gather`` from T5-XXL's embedding table (32128 x 4096, random).

    python examples/benchmarks/fp16_overflow.py [--rows 32128] [--cols 4096]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sora_export.core.backends.coreml import fp16_overflow, quiet_coremltools

console = Console(highlight=False, width=None if Console().is_terminal else 120)


def gather_op(rows: int, cols: int) -> Any:
    """The ``gather`` op of a program looking tokens up in a [rows, cols] fp32 table."""
    quiet_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    table = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 300), dtype=types.int32)])
    def prog(ids: Any) -> Any:
        return mb.gather(x=table, indices=ids, axis=0)

    return next(op for op in prog.functions["main"].operations if op.op_type == "gather")


def measure(check: Callable[[Any], bool], op: Any) -> tuple[bool, float, int]:
    """(answer, seconds, peak bytes allocated beyond what existed before)."""
    tracemalloc.start()
    start = time.perf_counter()
    answer = check(op)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return answer, seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=32128)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args()
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    op = gather_op(args.rows, args.cols)
    table = Table(
        title=f"fp16 range check of a {args.rows} x {args.cols} fp32 constant "
        f"({args.rows * args.cols * 4 / 1e9:.2f} GB)",
        header_style="bold",
    )
    for col in ("check", "overflows", "wall s", "peak extra memory"):
        table.add_column(col)
    answers = set()
    for name, check in (
        ("coremltools FP16ComputePrecision.fp16_overflow", FP16ComputePrecision.fp16_overflow),
        ("sora_export fp16_overflow (sliced)", fp16_overflow),
    ):
        answer, seconds, peak = measure(check, op)
        answers.add(answer)
        table.add_row(name, str(answer), f"{seconds:.2f}", f"{peak / 1e9:.2f} GB")
    console.print(table)
    if len(answers) != 1:
        raise SystemExit("the two checks disagree")


if __name__ == "__main__":
    main()
