"""The ``sora-export`` command line (contract in docs/cli.md).

``sora-export --plugins stdit,tdtm [options]`` exports; ``sora-export verify BUNDLE`` and
``sora-export inspect BUNDLE`` work on an existing bundle. Exit status: 0 success, 1 an
export or verification failed, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from sora_export.core import quick_exit, runtime
from sora_export.core.errors import SoraExportError, UsageError
from sora_export.core.shapes import parse_shapes_option
from sora_export.core.types import QUANT_POLICIES, TARGETS, ExportRequest, default_shapes

if TYPE_CHECKING:
    from sora_export.core.workers import WorkerPool

SUBCOMMANDS = ("verify", "inspect")


def _weights_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"expected COMPONENT=PATH (e.g. stdit3=ckpt.safetensors), got {text!r}"
        )
    return name.strip(), Path(path)


def _jobs_arg(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--jobs takes a whole number or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("--jobs must be at least 1")
    return value


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _size_arg(text: str) -> int:
    """``4G``, ``4GB``, ``3500M``, ``4e9``: bytes (decimal units, as the report prints)."""
    raw = text.strip().upper().removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS and raw[-1:] != "" else ""
    number = raw[: len(raw) - len(unit)] if unit else raw
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 4G or 3500M, got {text!r}"
        ) from None
    if value < 100e6:
        raise argparse.ArgumentTypeError(f"{text!r} is too little memory to export anything")
    return int(value)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sora-export",
        description="Export Open-Sora v1.2 components to Core ML / ONNX bundles.",
        epilog="Subcommands: 'sora-export verify BUNDLE', 'sora-export inspect BUNDLE'.",
    )
    p.add_argument(
        "--plugins", help="comma-separated plugins, e.g. stdit,tdtm (see --list-plugins)"
    )
    p.add_argument("--profile", default="iphone15pro", help="device profile name or .toml file")
    p.add_argument("-o", "--output", type=Path, default=Path("sora-export-out"))
    p.add_argument(
        "--weights",
        action="append",
        type=_weights_arg,
        default=[],
        metavar="COMPONENT=PATH",
        help="checkpoint for a component (.safetensors, .pt/.pth/.bin, or a HF directory)",
    )
    p.add_argument(
        "--size",
        choices=("tiny", "full"),
        default="tiny",
        help="config for components without --weights (random weights)",
    )
    p.add_argument(
        "--target",
        action="append",
        choices=TARGETS,
        default=[],
        help="export target (repeatable); default from the profile",
    )
    p.add_argument("--quantize", choices=QUANT_POLICIES, help="override the profile's policy")
    p.add_argument(
        "--shapes",
        default=None,
        metavar="all|default|NAME[,NAME...]",
        help="which of the profile's [[shapes]] every chunk accepts "
        "(default: $SORA_EXPORT_SHAPES, else all)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check every artifact against PyTorch (default: on for --size tiny)",
    )
    p.add_argument(
        "--jobs",
        type=_jobs_arg,
        default=None,
        metavar="N|auto",
        help="chunks exported in parallel (default auto: from cores, memory and the plan)",
    )
    p.add_argument(
        "--max-memory",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="memory all export processes together may use, e.g. 4G (default 75%% of RAM); "
        "chunks are made small enough to fit",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache of lowered models (default $SORA_EXPORT_CACHE or ~/.cache/sora-export)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the lowered-model cache"
    )
    p.add_argument(
        "--whole-chunks",
        action="store_true",
        help="convert every chunk as one graph, never part by part (needs more memory)",
    )
    p.add_argument(
        "--no-rebind",
        action="store_true",
        help="lower every part on its own, not by binding its weights into a shared template",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted export")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    p.add_argument(
        "--plugin-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="also load a plugin from this importable module (repeatable)",
    )
    p.add_argument("--list-plugins", action="store_true")
    p.add_argument("--list-profiles", action="store_true")
    return p


def _list_plugins(registry) -> None:
    from rich.table import Table

    from sora_export.core.report import console

    table = Table(title="plugins", header_style="bold")
    for col in ("plugin", "provides", "from", "hooks"):
        table.add_column(col)
    for info in registry.plugin_infos():
        provides = []
        for name in registry.names_of(info.name):
            if name in registry.components:
                provides.append(f"component {name}")
            elif name in registry.transforms:
                t = registry.transforms[name]
                needs = f" (needs {', '.join(t.requires)})" if t.requires else ""
                provides.append(f"transform {name}{needs}")
            else:
                provides.append(f"alias {name}")
        hooks = ", ".join(h.removeprefix("sora_export_") for h in info.hooks)
        table.add_row(info.name, "\n".join(provides) or "-", info.origin, hooks)
    console.print(table)


def _list_profiles(registry) -> None:
    from rich.table import Table

    from sora_export.core.report import console, human_bytes

    table = Table(title="device profiles", header_style="bold")
    for col in (
        "profile",
        "description",
        "targets",
        "deployment",
        "units",
        "chunk budget",
        "shapes",
    ):
        table.add_column(col)
    for name, prof in sorted(registry.profiles.items()):
        table.add_row(
            name,
            prof.description,
            ",".join(prof.targets),
            prof.deployment_target,
            prof.compute_units,
            human_bytes(prof.per_chunk_budget_bytes),
            ", ".join(s.name + ("*" if s.default else "") for s in prof.shapes),
        )
    console.print(table)


def run_export(argv: Sequence[str]) -> int:
    args = export_parser().parse_args(argv)
    workers = _early_workers(args)
    try:
        return _export(args, workers)
    finally:
        if workers is not None:
            workers.close()


def _early_workers(args: argparse.Namespace) -> WorkerPool | None:
    """Worker processes started before the plugins are discovered and the plan is made,
    when the run will be parallel: ``--jobs N`` (N > 1: N - 1 workers, this process being
    the N-th), or ``auto`` for full-size models (real or ``--size full``) on more than one
    core; tiny plans run in one process. Their
    start-up (seconds of imports) then overlaps ours. The engine uses them if the plan
    wants as many; the caller closes them. Started before this process imports torch
    (:mod:`sora_export.core.workers` does not), so the imports run side by side."""
    if args.list_plugins or args.list_profiles or not args.plugins or args.jobs == 1:
        return None
    from sora_export.core.workers import available_cores, start_workers

    if args.jobs is None and args.size != "full" and not args.weights:
        return None
    jobs = args.jobs or available_cores()
    if jobs < 2:
        return None
    return start_workers(jobs - 1, args.plugin_module)  # this process is one of the jobs


def _export(args: argparse.Namespace, workers: WorkerPool | None) -> int:
    from sora_export.core.registry import Registry

    registry = Registry.discover(args.plugin_module)
    if args.list_plugins:
        _list_plugins(registry)
        return 0
    if args.list_profiles:
        _list_profiles(registry)
        return 0
    if not args.plugins:
        raise UsageError("--plugins is required, e.g. --plugins stdit (see --list-plugins)")
    if args.force and args.resume:
        raise UsageError("--force and --resume exclude each other")
    from sora_export.core.cache import default_cache_dir

    weights: dict[str, Path] = {}
    for name, path in args.weights:
        if name in weights:
            raise UsageError(f"--weights given twice for {name!r}")
        weights[name] = path
    request = ExportRequest(
        plugins=tuple(p.strip() for p in args.plugins.split(",") if p.strip()),
        profile=args.profile,
        output=args.output,
        weights=weights,
        size=args.size,
        targets=tuple(args.target),
        quantize=args.quantize,
        verify=args.verify,
        jobs=args.jobs,
        host_memory_bytes=args.max_memory,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        whole_chunks=args.whole_chunks,
        rebind=not args.no_rebind,
        resume=args.resume,
        force=args.force,
        seed=args.seed,
        shapes=parse_shapes_option(args.shapes) if args.shapes else default_shapes(),
    )
    from sora_export.core import engine
    from sora_export.core.report import console, live_progress, plan_panel, print_report

    runtime.settle_imports()
    the_plan = engine.plan(request, registry)
    console.print(plan_panel(the_plan))
    try:
        with live_progress(the_plan) as sink:
            result = engine.run(the_plan, registry, sink, workers)
    except engine.ExportFailed as failed:
        print_report(failed.result)
        raise
    print_report(result)
    console.print(f"[green]bundle written to[/] {result.bundle}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torch.export and coremltools emit deprecation chatter about their own internals
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # core.report (imports the engine, so torch) only once needed: an export starts its
    # workers before this process imports torch (_early_workers)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from sora_export.core import bundle_cli

            return bundle_cli.main(argv[0], argv[1:])
        return run_export(argv)
    except SoraExportError as exc:
        from sora_export.core.report import err_console

        label = "usage error" if exc.exit_code == 2 else "error"
        err_console.print(f"[bold red]{label}:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        from sora_export.core.report import err_console

        err_console.print(
            "[bold red]interrupted[/]: finished chunks are kept in OUT.partial; "
            "rerun with --resume to finish"
        )
        return 130


def entry() -> None:
    """The ``sora-export`` command: :func:`main`, ending the process without tearing down
    the interpreter once everything is written, printed and cleaned up
    (:mod:`sora_export.core.quick_exit`). Torch's and the workers' allocators are tuned
    first (:mod:`sora_export.core.runtime`: before torch is imported)."""
    runtime.tune_environment()
    quick_exit.arm()
    code = main()
    quick_exit.set_code(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
