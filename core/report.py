"""Rich terminal output: live progress per chunk and stage, and the export report table."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sora_export.core.engine import STAGES, Event, EventSink
from sora_export.core.types import ChunkResult, ExportPlan, RunResult


def _console(stderr: bool) -> Console:
    # Piped output (CI logs, files) gets a width that fits the report table, not 80 columns.
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 160
    return Console(stderr=stderr, highlight=False, width=width)


console = _console(stderr=False)
err_console = _console(stderr=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _psnr_text(r: ChunkResult) -> str:
    v = r.verification
    if v is None:
        return "[dim]-[/]"
    value = "inf" if math.isinf(v.psnr_db) and v.psnr_db > 0 else f"{v.psnr_db:.1f}"
    if not v.finite:
        value = "inf/NaN"
    colour = "green" if v.passed else "bold red"
    return f"[{colour}]{value}[/] [dim]≥{v.threshold_db:.0f}[/]"


def plan_panel(plan: ExportPlan) -> Panel:
    lines = [
        f"profile [bold]{plan.profile.name}[/] ({plan.profile.description})",
        f"components {', '.join(c.spec.name for c in plan.components)}"
        + (f"  transforms {', '.join(t.name for t in plan.transforms)}" if plan.transforms else ""),
        f"targets {', '.join(plan.targets)}  size {plan.request.size}  "
        f"chunks {len(plan.chunks)}  verify {'on' if plan.verify else 'off'}  "
        f"per-chunk budget {human_bytes(plan.profile.per_chunk_budget_bytes)}",
        f"jobs {plan.jobs}" + (f" [dim](auto: {plan.jobs_reason})[/]" if plan.jobs_reason else ""),
    ]
    if not plan.verify:
        lines.append(
            "[yellow]verification off[/]: artifacts are not compared with PyTorch and fp16 "
            "overflow is not measured (--verify to enable)"
        )
    capped = [
        f"{c.spec.name} {human_bytes(c.context.chunk_budget_bytes)}"
        for c in plan.components
        if c.context.chunk_budget_bytes < plan.profile.per_chunk_budget_bytes
    ]
    if capped:
        lines.append("chunks capped to what this machine can convert: " + ", ".join(capped))
    random = [c.spec.name for c in plan.components if c.context.weights is None]
    if random:
        lines.append(
            f"[bold yellow]RANDOM WEIGHTS[/] for {', '.join(random)}: this bundle is for "
            "testing the toolchain, not for generating video (pass --weights NAME=PATH)"
        )
    return Panel("\n".join(lines), title="sora-export", expand=False)


def _stage_text(r: ChunkResult) -> str:
    """Seconds per stage in one cell: build/capture/lower/quantize/save/verify."""
    return " ".join(f"{r.timings[s]:.1f}" if s in r.timings else "-" for s in STAGES)


def result_table(result: RunResult) -> Table:
    table = Table(
        title="export report",
        caption="stage seconds: " + " / ".join(STAGES),
        header_style="bold",
    )
    table.add_column("chunk", no_wrap=True)
    table.add_column("target")
    table.add_column("params", justify="right")
    table.add_column("precision")
    table.add_column("size (vs fp32)", justify="right", no_wrap=True)
    table.add_column("stage seconds", no_wrap=True)
    table.add_column("total s", justify="right")
    table.add_column("PSNR dB", justify="right", no_wrap=True)
    table.add_column("status")
    for r in result.results:
        status = "[green]ok[/]" if r.ok else "[bold red]FAILED[/]"
        if r.cached:
            status += " [dim](resumed)[/]"
        elif r.lowered_cache == "hit":
            status += " [dim](lowered: cache)[/]"
        if r.artifact and len(r.artifact.functions) > 1:
            status += f" [dim]{'+'.join(r.artifact.functions)}[/]"
        table.add_row(
            r.chunk_key,
            r.target,
            human_count(r.params),
            r.quantization,
            f"{human_bytes(r.artifact.bytes)} ({r.params * 4 / r.artifact.bytes:.1f}x)"
            if r.artifact and r.artifact.bytes
            else "-",
            _stage_text(r),
            f"{sum(r.timings.values()):.1f}",
            _psnr_text(r),
            status,
        )
    return table


def print_report(result: RunResult, out: Console = console) -> None:
    out.print(result_table(result))
    for r in result.results:
        for note in r.notes:
            out.print(f"[yellow]note[/] {r.chunk_key} ({r.target}): {escape(note)}")
        if r.error:
            out.print(f"[bold red]error[/] {r.chunk_key} ({r.target}): {escape(r.error)}")
        v = r.verification
        if v and v.error:
            out.print(f"[red]verify[/] {r.chunk_key} ({r.target}): {escape(v.error)}")
        if v and v.note:
            colour = "dim" if v.passed else "red"
            out.print(f"[{colour}]verify[/] {r.chunk_key} ({r.target}): {escape(v.note)}")
    for c in result.checks:
        v = c.verification
        status = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        detail = f": {escape(v.error or v.note)}" if (v.error or v.note) else ""
        out.print(
            f"pipeline check {c.name} ({c.target}): {v.psnr_db:.1f} dB "
            f"(≥{v.threshold_db:.0f}), max err {v.max_abs_err:.3g} {status}{detail}"
        )
    verified = [r.verification for r in result.results if r.verification]
    if verified:
        run = sum(v.seconds for v in verified)
        ref = sum(v.reference_seconds for v in verified)
        load = sum(v.load_seconds for v in verified)
        out.print(
            f"verification ran the artifacts in {run:.2f} s ({verified[0].backend}; "
            f"+{load:.2f} s loading) vs {ref:.2f} s for the PyTorch references"
        )
    total = sum(r.artifact.bytes for r in result.results if r.artifact)
    budget = result.plan.profile.memory_budget_bytes
    out.print(
        f"total {human_bytes(total)} in {len(result.results)} artifact(s); "
        f"{result.seconds:.1f} s; peak RSS {human_bytes(result.peak_rss_bytes)}; "
        f"device budget {human_bytes(budget)} "
        f"(per chunk {human_bytes(result.plan.profile.per_chunk_budget_bytes)})"
    )
    random = [c.spec.name for c in result.plan.components if c.context.weights is None]
    if random:
        out.print(f"[bold yellow]weights are RANDOM[/] for {', '.join(random)}")


@contextmanager
def live_progress(plan: ExportPlan, out: Console = console) -> Iterator[EventSink]:
    """A rich progress display fed by engine events: one bar over chunks, stage in text."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[chunk]}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} chunks"),
        TextColumn("[cyan]{task.fields[stage]}[/]"),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    )
    total = len(plan.chunks)
    task = progress.add_task("export", total=total, chunk="", stage="starting")
    done: set[str] = set()

    def sink(event: Event) -> None:
        if event.kind == "chunk-start":
            progress.update(task, chunk=event.chunk, stage="")
        elif event.kind == "stage":
            detail = f" {event.detail}" if event.detail else ""
            progress.update(task, chunk=event.chunk, stage=f"{event.stage}{detail}")
        elif event.kind == "chunk-done" and event.chunk not in done:
            done.add(event.chunk)
            progress.update(task, completed=len(done), stage="cached" if event.detail else "")

    with progress:
        yield sink
        progress.update(task, stage="done", chunk="")
