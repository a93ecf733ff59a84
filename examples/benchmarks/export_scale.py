"""Full-scale export benchmark: wall time and whole-process-tree peak RSS, side by side.

Runs ``sora-export`` as a subprocess per configuration (fresh process, cold caches of
this tool, the disk synced first) and samples the resident memory of the process and all
its workers every 0.2 s; also the CPU seconds the process tree used and the seconds the
hypervisor "stole" from this machine meanwhile (a busy host: wall times are then upper
bounds, and parallel runs suffer more). Prints a rich table and writes the figures as
JSON. With
``--repeat N`` the case runs N rounds (the jobs case alternating which configuration
runs first); the table gives medians (and ranges) and the speed-up or re-quantization
ratio is the median of the rounds' own ratios.

    python examples/benchmarks/export_scale.py                      # STDiT3-XL/2: jobs 1 vs 2
    python examples/benchmarks/export_scale.py --case requantize    # cold vs re-quantize
    python examples/benchmarks/export_scale.py --case one-graph     # all blocks in one graph
    python examples/benchmarks/export_scale.py --plugins t5 --quantize int8 --jobs 1
    python examples/benchmarks/export_scale.py --repeat 3            # medians of 3 rounds

Random weights at --size full; verification off (one fp32 reference forward of the full
STDiT3 costs minutes on a laptop CPU and is not what these figures are about).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sora_export.core.memory import TreePeakSampler

# piped output (logs, files) gets a width that fits the table, not 80 columns
console = Console(highlight=False, width=None if Console().is_terminal else 160)
REPO = Path(__file__).resolve().parents[2]


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave other guests while this one wanted it, all CPUs
    (``steal`` of /proc/stat), or None where there is no such file."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_export(args: list[str]) -> dict:
    """Run one export; return wall seconds, peak tree RSS, CPU seconds of the process
    tree (user + system), the machine's steal seconds meanwhile, and the report's totals."""
    command = [sys.executable, "-m", "sora_export.core.cli", *args]
    # earlier runs' writes still on their way to disk would slow this run's writes
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stolen = steal_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreePeakSampler(root=proc.pid) as sampler:
        output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steal = steal_seconds()
    if proc.returncode != 0:
        console.print(output[-4000:])
        raise SystemExit(f"export failed ({proc.returncode}): {' '.join(args)}")
    out = Path(args[args.index("-o") + 1])
    report = json.loads((out / "report.json").read_text())
    label = " ".join(
        f"{a} {args[i + 1]}"
        for i, a in enumerate(args)
        if a in ("--plugins", "--quantize", "--jobs", "--max-memory", "--shapes")
    )
    flags = [a for a in args if a in ("--whole-chunks", "--no-cache")]
    return {
        "label": " ".join([label, *flags]),
        "args": " ".join(args),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),  # workers count once reaped by the command
        "steal_seconds": None if steal is None or stolen is None else round(steal - stolen, 1),
        "peak_tree_rss_bytes": sampler.peak,
        "bundle_bytes": report["total_bytes"],
        "chunks": len(report["chunks"]),
        "cached_chunks": sum(1 for c in report["chunks"] if c["cached"]),
        "lowered_from_cache": sum(1 for c in report["chunks"] if c.get("lowered_cache") == "hit"),
        "jobs": report.get("jobs"),
    }


def one_graph_profile(folder: Path) -> Path:
    """iphone15pro with an unlimited chunk budget: every block pair in one graph."""
    text = (REPO / "plugins" / "profiles" / "iphone15pro.toml").read_text()
    text = text.replace('name = "iphone15pro"', 'name = "one-graph"')
    text = text.replace(
        "resident_chunks = 2", "resident_chunks = 2\nchunk_budget_bytes = 100_000_000_000"
    )
    path = folder / "one-graph.toml"
    path.write_text(text)
    return path


def one_round(args: argparse.Namespace, tmp: Path, index: int = 0) -> list[dict]:
    """Run the chosen case once in ``tmp``; one row per export. The jobs case runs its
    configurations in reverse order in odd rounds: a run right after another one (whose
    files fill the page cache, on a CPU that has been busy for a minute) was measured
    slower than the same run alone, and alternating shares that between them."""
    rows = []
    base = ["--plugins", args.plugins, "--size", args.size, "--no-verify"]
    base += ["--shapes", args.shapes]
    if args.max_memory:
        base += ["--max-memory", args.max_memory]
    if args.case == "jobs":
        order = list(args.jobs) if index % 2 == 0 else list(reversed(args.jobs))
        by_jobs = {}
        for jobs in order:
            out = tmp / f"jobs{jobs}"
            cold = ["--cache-dir", str(tmp / f"cache{jobs}")]  # each run starts cold
            policy = ["--quantize", args.quantize, "--jobs", str(jobs)]
            by_jobs[jobs] = run_export([*base, *cold, *policy, "-o", str(out)])
        rows.extend(by_jobs[jobs] for jobs in args.jobs)
    elif args.case == "requantize":
        # cold fp16 export, then the same chunks at int8 into another bundle: the second
        # run finds every lowered model in the cache and only quantizes and saves
        cache = ["--cache-dir", str(tmp / "cache"), "--jobs", "1"]
        rows.append(run_export([*base, *cache, "--quantize", "fp16", "-o", f"{tmp}/fp16"]))
        rows.append(run_export([*base, *cache, "--quantize", "int8", "-o", f"{tmp}/int8"]))
    else:
        profile = one_graph_profile(tmp)
        out = tmp / "one"
        policy = ["--quantize", args.quantize, "--profile", str(profile)]
        naive = ["--no-cache", "--whole-chunks", "--jobs", "1"]
        rows.append(run_export([*base, *naive, *policy, "-o", str(out)]))
    return rows


def _spread(values: list[float], unit: str, digits: int = 1) -> str:
    """Median, and the range when there is more than one value."""
    text = f"{statistics.median(values):.{digits}f}{unit}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=("jobs", "requantize", "one-graph"), default="jobs")
    p.add_argument("--plugins", default="stdit")
    p.add_argument("--quantize", default="fp16")
    p.add_argument("--jobs", type=int, nargs="*", default=[1, 2])
    p.add_argument("--size", default="full")
    p.add_argument("--max-memory", default=None, help="passed to sora-export (e.g. 4G)")
    p.add_argument(
        "--shapes", default="all", help="passed to sora-export (all: every profile shape)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the case (interleaved); medians, ranges and per-round ratios",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    rounds = []
    for _ in range(max(1, args.repeat)):
        with tempfile.TemporaryDirectory(prefix="sora-bench-") as tmp:
            rounds.append(one_round(args, Path(tmp), len(rounds)))
    title = f"sora-export at scale ({args.case}, {len(rounds)} round(s))"
    table = Table(title=title, header_style="bold")
    columns = ("command", "jobs", "wall s", "CPU s", "steal s", "peak RSS (tree)", "bundle")
    for col in (*columns, "chunks", "from cache"):
        table.add_column(col)
    for i, r in enumerate(rounds[0]):
        runs = [rows[i] for rows in rounds]
        table.add_row(
            r["label"],
            str(r["jobs"]),
            _spread([x["wall_seconds"] for x in runs], ""),
            _spread([x["cpu_seconds"] for x in runs], ""),
            _spread([x["steal_seconds"] or 0.0 for x in runs], ""),
            _spread([x["peak_tree_rss_bytes"] / 1e9 for x in runs], " GB", 2),
            f"{r['bundle_bytes'] / 1e9:.2f} GB",
            str(r["chunks"]),
            str(r["lowered_from_cache"]),
        )
    console.print(table)
    # ratios within each round (runs of one round are minutes apart: the machine's
    # slower and faster spells cancel better than across rounds)
    pairs = len(rounds[0]) == 2
    ratios = [rows[0]["wall_seconds"] / rows[1]["wall_seconds"] for rows in rounds] if pairs else []
    if pairs and args.case == "jobs":
        each = ", ".join(f"{x:.2f}" for x in ratios)
        console.print(
            f"speed-up jobs {args.jobs[1]} vs {args.jobs[0]}: "
            f"{statistics.median(ratios):.2f}x (rounds: {each})"
        )
    if pairs and args.case == "requantize":
        each = ", ".join(f"{1 / x:.2f}" for x in ratios)
        median = statistics.median(1 / x for x in ratios)
        console.print(f"re-quantize / cold: {median:.2f} (rounds: {each})")
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
