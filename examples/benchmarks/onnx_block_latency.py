"""ONNX Runtime CPU latency of one STDiT3-XL/2 block pair, plain vs TDTM-merged.

Builds the first block chunk of the full-size STDiT3 (one spatial+temporal block pair, seeded
weights) the way the export engine does: ``plan_chunks`` for the iphone15pro default shape
(256x256x68 -> latent 20x32x32 -> tokens [2, 20, 16, 16, 1152], CFG batch 2, caption length
300), with the chunk's own example inputs. The TDTM variant is ``apply_tdtm`` on a deep copy.
Each variant is captured (``core.backends.capture``), lowered with ``ONNXBackend`` under the
android-arm64 profile, saved into a temp directory and timed in an ONNX Runtime CPU session
(one warm-up run, then the median of ``--runs``). PyTorch CPU latency of the same modules is
shown for reference, with the max abs difference between ONNX Runtime and PyTorch outputs.

    python examples/benchmarks/onnx_block_latency.py [--runs 3] [--threads 2] \\
        [--precision fp32|fp16]

Takes a few minutes and about 5 GB of RAM at peak (exporting a 42.5M-parameter chunk to ONNX).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from sora_export.core.backends import capture
from sora_export.core.backends.onnx import ONNXBackend
from sora_export.core.registry import Registry
from sora_export.core.types import Chunk, DeviceProfile, bytes_per_param
from sora_export.core.weights import WeightSource
from sora_export.plugins.stdit3.model import STDIT3_CONFIGS
from sora_export.plugins.stdit3.plugin import STDiT3Description, plan_chunks
from sora_export.plugins.tdtm.merge import apply_tdtm

# Piped output (logs, files) gets a width that fits the table, not 80 columns.
console = Console(highlight=False, width=None if Console().is_terminal else 120)


@attrs.frozen
class VariantResult:
    """Median latencies (seconds) and ORT-vs-PyTorch agreement of one variant."""

    name: str
    torch_seconds: float
    ort_seconds: float
    export_seconds: float  # capture + lower + save
    max_abs_diff: float
    max_abs_ref: float


def median_seconds(run: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``run`` over ``runs`` calls, after one untimed warm-up call."""
    run()  # warm-up: allocator, kernel selection, ORT's lazy initialisation
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def block_pair_chunk(seed: int = 0) -> Chunk:
    """The first STDiT3-XL/2 block chunk, planned with a budget of exactly one pair."""
    cfg = STDIT3_CONFIGS["full"]
    shape = Registry.discover().profile("iphone15pro").default_shape
    desc = STDiT3Description(cfg, WeightSource(seed=seed), shape)
    budget = int(cfg.param_count_block_pair() * bytes_per_param("fp32"))
    chunk = plan_chunks(desc, budget, "fp32", seed)[1]
    if chunk.meta.get("blocks") != [0, 1]:  # index 0 is the input chunk
        raise RuntimeError(f"expected block pair 0 as chunk 1, got {chunk.key} {chunk.meta}")
    return chunk


def measure_variant(
    name: str,
    module: torch.nn.Module,
    chunk: Chunk,
    inputs: tuple[torch.Tensor, ...],
    profile: DeviceProfile,
    args: argparse.Namespace,
    workdir: Path,
) -> VariantResult:
    """Time ``module`` in PyTorch, export it to ONNX, time it in ONNX Runtime, compare."""
    console.print(f"[bold]{name}[/]: PyTorch ({args.runs} runs) ...")
    with torch.inference_mode():
        torch_seconds = median_seconds(lambda: module(*inputs), args.runs)
        reference = module(*inputs).numpy()

    console.print(f"[bold]{name}[/]: capture, lower ({args.precision}), save ...")
    start = time.perf_counter()
    backend = ONNXBackend()
    program = capture(module, inputs)
    model = backend.lower(program, chunk, profile, args.precision)
    del program
    artifact = workdir / f"{name}.onnx"
    backend.save({"main": model}, artifact)
    del model
    export_seconds = time.perf_counter() - start

    console.print(f"[bold]{name}[/]: ONNX Runtime ({args.runs} runs) ...")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(
        str(artifact / "main.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    feeds = {spec.name: t.numpy() for spec, t in zip(chunk.inputs, inputs, strict=True)}
    ort_seconds = median_seconds(lambda: session.run(None, feeds), args.runs)
    (output,) = session.run(None, feeds)
    return VariantResult(
        name=name,
        torch_seconds=torch_seconds,
        ort_seconds=ort_seconds,
        export_seconds=export_seconds,
        max_abs_diff=float(np.abs(output - reference).max()),
        max_abs_ref=float(np.abs(reference).max()),
    )


def results_table(results: list[VariantResult], title: str) -> Table:
    table = Table(title=title, header_style="bold")
    columns = (
        "variant",
        "ORT s",
        "ORT speed-up",
        "torch s",
        "torch speed-up",
        "max |ORT - torch|",
        "max |torch out|",
        "export s",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    plain = results[0]
    for r in results:
        table.add_row(
            r.name,
            f"{r.ort_seconds:.3f}",
            f"{plain.ort_seconds / r.ort_seconds:.2f}x",
            f"{r.torch_seconds:.3f}",
            f"{plain.torch_seconds / r.torch_seconds:.2f}x",
            f"{r.max_abs_diff:.2e}",
            f"{r.max_abs_ref:.2f}",
            f"{r.export_seconds:.0f}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant and runtime")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op and torch threads")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    console.print("building the block-pair chunk and its example inputs ...")
    chunk = block_pair_chunk()
    plain = chunk.build().eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    merged = apply_tdtm(copy.deepcopy(plain))
    # contiguous, as the engine feeds them (Core ML and ORT want the default layout)
    inputs = tuple(t.contiguous() for t in chunk.example_inputs())
    profile = Registry.discover().profile("android-arm64")
    shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in chunk.inputs)
    console.print(f"chunk {chunk.key}: {chunk.params / 1e6:.1f}M params; inputs {shapes}")

    results = []
    with tempfile.TemporaryDirectory(prefix="onnx-block-latency-") as tmp:
        for name, module in (("plain", plain), ("tdtm", merged)):
            results.append(measure_variant(name, module, chunk, inputs, profile, args, Path(tmp)))
    title = (
        f"one STDiT3-XL/2 block pair on the CPU, {args.threads} threads: ONNX Runtime "
        f"({args.precision}, opset {profile.onnx_opset}) and PyTorch (fp32), seconds are "
        f"medians of {args.runs} runs after 1 warm-up"
    )
    console.print(results_table(results, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
