"""What TDTM saves in one STDiT3 denoising step: attention FLOPs and CPU wall time.

FLOPs are counted from the model config (2 FLOPs per multiply-add) for the attention
matmuls only, ``Q K^T`` and ``A V``, separately for the spatial self-attention (per frame,
``S`` tokens), the temporal self-attention (per position, ``T`` frames) and the
cross-attention (every video token against the ``L`` text tokens), over all blocks, with
and without merging frame pairs (``T -> ceil(T/2)``). The linear layers that run on merged
tokens are counted too, for scale. The wall time is PyTorch on the CPU for one full-size
(XL/2) spatial+temporal block pair, plain and patched, median of a few runs.

    python examples/benchmarks/tdtm_flops.py [--runs 3] [--threads 2] [--skip-timing]

The default shape is the iphone15pro profile's: 256x256, 68 frames -> latent 20x32x32 ->
T=20, H'=W'=16, N=5120 tokens, with the classifier-free-guidance batch of 2.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import attrs
import torch
from rich.console import Console
from rich.table import Table

from sora_export.core.types import ExportShape
from sora_export.plugins.stdit3.model import STDIT3_CONFIGS, STDiT3Blocks, STDiT3Config
from sora_export.plugins.stdit3.plugin import CFG_BATCH, token_shape
from sora_export.plugins.tdtm.merge import apply_tdtm, merged_frames

# Piped output (logs, files) gets a width that fits the tables, not 80 columns.
console = Console(highlight=False, width=None if Console().is_terminal else 120)


@attrs.frozen
class StepFlops:
    """FLOPs of one model evaluation (all blocks), by part."""

    spatial: int
    temporal: int
    cross: int
    projections: int  # qkv, proj, q_linear, cross proj: the linears that see merged tokens
    fixed: int  # kv_linear on the text and the MLP: never merged

    @property
    def self_attention(self) -> int:
        return self.spatial + self.temporal

    @property
    def attention(self) -> int:
        return self.spatial + self.temporal + self.cross

    @property
    def total(self) -> int:
        return self.attention + self.projections + self.fixed


def step_flops(
    cfg: STDiT3Config, batch: int, frames: int, rows: int, cols: int, merged: bool
) -> StepFlops:
    """FLOPs of one STDiT3 evaluation's blocks at a token grid, optionally frame-merged."""
    c, text = cfg.hidden_size, cfg.model_max_length
    attn_frames = merged_frames(frames) if merged else frames
    seq = rows * cols
    tokens_attn = batch * attn_frames * seq  # tokens the attention steps see
    tokens = batch * frames * seq  # tokens the MLP sees
    # Q K^T and A V each cost (queries x keys x C) multiply-adds, summed over heads.
    spatial = 2 * 2 * batch * attn_frames * seq * seq * c
    temporal = 2 * 2 * batch * seq * attn_frames * attn_frames * c
    cross = 2 * 2 * tokens_attn * text * c
    # Spatial and temporal blocks alike: qkv (3C^2) + proj (C^2) + q_linear (C^2) + proj (C^2).
    projections = 2 * tokens_attn * 6 * c * c
    fixed = 2 * (batch * text * 2 * c * c + tokens * 2 * c * cfg.mlp_hidden)
    blocks = 2 * cfg.depth  # a spatial and a temporal block per pair
    return StepFlops(
        spatial=cfg.depth * spatial,  # only spatial blocks run spatial attention
        temporal=cfg.depth * temporal,
        cross=blocks * cross,
        projections=blocks * projections,
        fixed=blocks * fixed,
    )


def time_block_pair(
    cfg: STDiT3Config, grid: tuple[int, ...], runs: int, seed: int = 0
) -> tuple[float, float]:
    """Median seconds of one block pair, plain then TDTM-patched (same weights, inputs)."""
    torch.manual_seed(seed)
    plain = STDiT3Blocks(cfg, 0, 1).eval()
    merged = apply_tdtm(copy.deepcopy(plain))
    c, text = cfg.hidden_size, cfg.model_max_length
    tokens = torch.randn(*grid)
    t_mlp = torch.randn(grid[0], 6 * c)
    y_tokens = torch.randn(grid[0], text, c)
    y_bias = torch.zeros(grid[0], 1, 1, text)
    medians = []
    with torch.inference_mode():
        for module in (plain, merged):
            module(tokens, t_mlp, y_tokens, y_bias)  # warm-up: allocator, kernels
            seconds = []
            for _ in range(runs):
                start = time.perf_counter()
                module(tokens, t_mlp, y_tokens, y_bias)
                seconds.append(time.perf_counter() - start)
            medians.append(statistics.median(seconds))
    return medians[0], medians[1]


def _gflops(n: int) -> str:
    return f"{n / 1e9:,.1f}"


def flops_table(plain: StepFlops, merged: StepFlops, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    for col in ("part", "plain GFLOPs", "TDTM GFLOPs", "plain / TDTM"):
        table.add_column(col, justify="left" if col == "part" else "right")
    rows = [
        ("spatial self-attention (QK^T, AV)", plain.spatial, merged.spatial),
        ("temporal self-attention (QK^T, AV)", plain.temporal, merged.temporal),
        ("self-attention (both)", plain.self_attention, merged.self_attention),
        ("cross-attention (QK^T, AV)", plain.cross, merged.cross),
        ("attention matmuls, all", plain.attention, merged.attention),
        ("attention projections (qkv, proj, q_linear)", plain.projections, merged.projections),
        ("unmerged: kv_linear on text, MLP", plain.fixed, merged.fixed),
        ("blocks total", plain.total, merged.total),
    ]
    for name, a, b in rows:
        table.add_row(name, _gflops(a), _gflops(b), f"{a / b:.2f}x")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-timing", action="store_true", help="FLOPs only")
    args = parser.parse_args(argv)

    cfg = STDIT3_CONFIGS["full"]
    shape = ExportShape("256x256x68", height=256, width=256, num_frames=68)
    grid = token_shape(cfg, shape)  # (batch, T', H', W', C)
    batch, frames, rows, cols, _ = grid
    plain = step_flops(cfg, batch, frames, rows, cols, merged=False)
    merged = step_flops(cfg, batch, frames, rows, cols, merged=True)
    console.print(
        f"STDiT3-XL/2: depth {cfg.depth}, C {cfg.hidden_size}, {cfg.num_heads} heads, text "
        f"{cfg.model_max_length} tokens; latent {shape.latent_frames}x{shape.latent_hw[0]}x"
        f"{shape.latent_hw[1]} -> T={frames}, H'xW'={rows}x{cols}, "
        f"N={frames * rows * cols} tokens; batch {batch} (CFG {CFG_BATCH}); "
        f"TDTM attention sees T={merged_frames(frames)}"
    )
    console.print(flops_table(plain, merged, "one denoising step, all 28 block pairs"))

    if args.skip_timing:
        return 0
    torch.set_num_threads(args.threads)
    console.print(
        f"timing one XL/2 block pair on the CPU ({args.threads} threads, median of "
        f"{args.runs} runs after a warm-up) ..."
    )
    t_plain, t_merged = time_block_pair(cfg, grid, args.runs)
    pair_plain = step_flops(attrs.evolve(cfg, depth=1), batch, frames, rows, cols, False)
    pair_merged = step_flops(attrs.evolve(cfg, depth=1), batch, frames, rows, cols, True)
    table = Table(title="one XL/2 block pair, PyTorch CPU", header_style="bold")
    for col in ("variant", "median s", "GFLOPs (counted)", "speed-up"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    table.add_row("plain", f"{t_plain:.2f}", _gflops(pair_plain.total), "1.00x")
    table.add_row(
        "tdtm", f"{t_merged:.2f}", _gflops(pair_merged.total), f"{t_plain / t_merged:.2f}x"
    )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
