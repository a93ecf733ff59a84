"""``sora-export verify BUNDLE`` and ``sora-export inspect BUNDLE``.

``verify`` re-checks an existing bundle from its manifest: every artifact must exist with
the recorded SHA-256, and every chunk is re-run against a PyTorch reference rebuilt from
the manifest's request (same plugins, profile, size, seed and weights). With
``--pipeline`` it also runs the bundle-level checks of :mod:`sora_export.core.verify.pipeline`
(component chains by manifest wiring, the text-to-video pipeline) and writes a frame strip.
Exit 1 if any artifact or check fails.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from sora_export.core.backends import tree_sha256
from sora_export.core.bundle import read_manifest
from sora_export.core.errors import UsageError
from sora_export.core.types import ExportPlan, ExportRequest, Verification
from sora_export.core.verify.pipeline import FRAMES_FILE

if TYPE_CHECKING:
    from sora_export.core.registry import Registry


@attrs.frozen
class ArtifactCheck:
    component: str
    chunk: str
    target: str
    path: str
    integrity: str  # "ok", "missing", "altered"
    verification: Verification | None

    @property
    def passed(self) -> bool:
        return self.integrity == "ok" and (self.verification is None or self.verification.passed)


def plan_from_manifest(bundle: Path, manifest: dict[str, Any], registry: Registry) -> ExportPlan:
    """The export plan a bundle was made from, rebuilt from the manifest's ``request``
    (same plugins, profile, size, seed, weights; verification on)."""
    from sora_export.core import engine

    req = manifest.get("request", {})
    request = ExportRequest(
        plugins=tuple(req.get("plugins", ())),
        profile=req.get("profile", manifest["profile"]["name"]),
        output=bundle,
        weights={k: Path(v) for k, v in req.get("weights", {}).items()},
        size=req.get("size", "tiny"),
        targets=tuple(req.get("targets", ())),
        quantize=req.get("quantize"),
        verify=True,
        seed=req.get("seed", 0),
        # bundles written before export shapes existed hold the profile's default only
        shapes=tuple(req.get("shapes", ("default",))),
    )
    return engine.plan(request, registry)


def verify_bundle(bundle: Path, numeric: bool = True) -> list[ArtifactCheck]:
    """Check integrity of every artifact, and (``numeric``) re-run it against PyTorch."""
    from sora_export.core import engine
    from sora_export.core.registry import Registry

    manifest = read_manifest(bundle)
    plan = None
    if numeric:
        registry = Registry.discover()
        plan = plan_from_manifest(bundle, manifest, registry)
        chunks = {c.key: c for c in plan.chunks}
        active = set(plan.plugins)
    checks = []
    for comp in manifest["components"]:
        for entry in comp["chunks"]:
            key = f"{comp['name']}/{entry['name']}"
            rel = entry.get("path")
            path = bundle / rel if rel else None
            if path is None or not path.exists():
                checks.append(
                    ArtifactCheck(
                        comp["name"], entry["name"], comp["target"], str(rel), "missing", None
                    )
                )
                continue
            integrity = "ok" if tree_sha256(path) == entry["sha256"] else "altered"
            verification = None
            if plan is not None and key in chunks:
                chunk = chunks[key]
                cases, seconds = _references(chunk, registry, active, plan, entry)
                verification = engine.verify_cases(
                    path,
                    comp["target"],
                    cases,
                    plan.profile.threshold_for(entry.get("quantization") or "fp16"),
                    seconds,
                )
            checks.append(
                ArtifactCheck(
                    comp["name"], entry["name"], comp["target"], rel, integrity, verification
                )
            )
    return checks


def _references(chunk, registry, active, plan, entry):
    """Rebuild a chunk's PyTorch module(s) and fp32 reference outputs at every export shape
    and for each variant; the manifest's ``shapes`` section names the function to run."""
    from sora_export.core import engine

    cases = []
    seconds = 0.0
    recorded = entry.get("shapes", {})
    for name, at in chunk.shape_chunks().items():
        base = at.build().eval()
        inputs = tuple(t.contiguous() for t in at.example_inputs())
        functions = recorded.get(name, {}).get("functions", {})
        for variant, module in engine.patched_variants(at, base, registry, active, plan.profile):
            start = time.perf_counter()
            with torch.no_grad():
                out = module(*inputs)
            seconds += time.perf_counter() - start
            cases.append(
                engine._Case(
                    functions.get(variant, variant),
                    name,
                    engine._inputs_dict(at, inputs),
                    engine._outputs_dict(at, out),
                )
            )
        del base
    return cases, seconds


def _verify_main(argv: Sequence[str]) -> int:
    from rich.table import Table

    from sora_export.core.report import console

    p = argparse.ArgumentParser(prog="sora-export verify")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--integrity-only",
        action="store_true",
        help="check files and hashes only, without re-running PyTorch",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="also chain each component's artifacts by the manifest wiring and, with t5, "
        "stdit3 and both VAE decoders, generate a short video through the artifacts and "
        f"through PyTorch (frame strip in BUNDLE/{FRAMES_FILE})",
    )
    args = p.parse_args(argv)
    if args.pipeline and args.integrity_only:
        raise UsageError("--pipeline runs the artifacts; it cannot go with --integrity-only")
    checks = verify_bundle(args.bundle, numeric=not args.integrity_only)
    table = Table(title=f"verify {args.bundle}", header_style="bold")
    for col in ("chunk", "target", "integrity", "backend", "PSNR dB", "max abs err", "status"):
        table.add_column(col)
    for c in checks:
        v = c.verification
        table.add_row(
            f"{c.component}/{c.chunk}",
            c.target,
            c.integrity if c.integrity == "ok" else f"[bold red]{c.integrity}[/]",
            v.backend if v else "-",
            f"{v.psnr_db:.1f}" if v else "-",
            f"{v.max_abs_err:.3g}" if v else "-",
            "[green]pass[/]" if c.passed else "[bold red]FAIL[/]",
        )
    console.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(checks)} artifact(s) failed[/]")
    else:
        console.print(f"[green]all {len(checks)} artifact(s) passed[/]")
    pipeline_ok = _verify_pipeline(args.bundle) if args.pipeline else True
    return 0 if not failed and pipeline_ok else 1


# -- sora-export verify --pipeline -----------------------------------------------------------
def _verify_pipeline(bundle: Path) -> bool:
    """Run the bundle-level checks, print one table row per check, write the frame strip.

    Returns whether every check passed.
    """
    from rich.markup import escape
    from rich.table import Table

    from sora_export.core.registry import Registry
    from sora_export.core.report import console
    from sora_export.core.verify.pipeline import pipeline_checks, write_frames

    manifest = read_manifest(bundle)
    plan = plan_from_manifest(bundle, manifest, Registry.discover())
    checks = pipeline_checks(plan, bundle, manifest)
    table = Table(title=f"pipeline checks {bundle}", header_style="bold")
    for col in ("check", "target", "backend", "PSNR dB", "max abs err", "seconds", "status"):
        table.add_column(col)
    for c in checks:
        v = c.verification
        table.add_row(
            c.name,
            c.target,
            v.backend,
            f"{v.psnr_db:.1f} ≥{v.threshold_db:.0f}",
            f"{v.max_abs_err:.3g}",
            f"{v.seconds:.1f} / {v.reference_seconds:.1f}",
            "[green]pass[/]" if c.passed else "[bold red]FAIL[/]",
        )
    console.print(table)
    console.print("seconds: artifacts / PyTorch", style="dim")
    for c in checks:
        if c.verification.error or c.verification.note:
            detail = escape(c.verification.error or c.verification.note)
            console.print(f"[bold red]{c.name} ({c.target}):[/] {detail}", soft_wrap=True)
    frames = write_frames(checks, bundle / FRAMES_FILE)
    if frames is not None:
        console.print(f"frames (top: PyTorch, then each target) written to {frames}")
    failed = [c for c in checks if not c.passed]
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(checks)} pipeline check(s) failed[/]")
        return False
    console.print(f"[green]all {len(checks)} pipeline check(s) passed[/]")
    return True


def _inspect_main(argv: Sequence[str]) -> int:
    from rich.table import Table

    from sora_export.core.report import console, human_bytes, human_count

    p = argparse.ArgumentParser(prog="sora-export inspect")
    p.add_argument("bundle", type=Path)
    args = p.parse_args(argv)
    manifest = read_manifest(args.bundle)
    console.print(
        f"[bold]{args.bundle}[/]: profile {manifest['profile']['name']}, pipeline "
        f"{' -> '.join(manifest.get('pipeline', []))}, plugins {', '.join(manifest['plugins'])}"
    )
    table = Table(header_style="bold")
    for col in ("chunk", "target", "params", "size", "functions", "inputs", "outputs"):
        table.add_column(col)
    for comp in manifest["components"]:
        for ch in comp["chunks"]:
            table.add_row(
                f"{comp['name']}/{ch['name']}",
                comp["target"],
                human_count(ch["params"]),
                human_bytes(ch["bytes"]),
                ",".join(ch["functions"]),
                "\n".join(f"{i['name']} {i['shape']}" for i in ch["inputs"]),
                "\n".join(f"{o['name']} {o['shape']}" for o in ch["outputs"]),
            )
    console.print(table)
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    if command == "verify":
        return _verify_main(argv)
    return _inspect_main(argv)
