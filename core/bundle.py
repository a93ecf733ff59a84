"""The bundle's JSON files: manifest.json, report.json and the resume progress file.

Pure functions from plan and results to JSON-able dicts and back; the engine decides
when to write them.
"""

from __future__ import annotations

import json
import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attrs

from sora_export.core.errors import UsageError
from sora_export.core.shapes import enumerated_shapes
from sora_export.core.types import (
    Artifact,
    Chunk,
    ChunkResult,
    ExportPlan,
    ExportRequest,
    RunResult,
    TensorSpec,
    Verification,
)

BUNDLE_FORMAT = "sora-export-bundle"
BUNDLE_VERSION = 1


def package_version() -> str:
    try:
        return version("sora-export")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def dataflow(plan: ExportPlan) -> list[dict[str, str]]:
    """Edges between components of the bundle, from ``ComponentSpec.links``.

    Each edge names the producing chunk output (the last chunk of the producer that outputs
    it), every chunk input it feeds, and the transform a runtime applies in between.
    """
    producers: dict[str, dict[str, str]] = {}
    for comp in plan.components:
        for chunk in comp.chunks:
            for source in chunk.wiring.values():  # a component's pipeline inputs
                if source.startswith("pipeline:"):
                    producers.setdefault(comp.spec.name, {})[source[9:]] = source
            for spec in chunk.outputs:
                producers.setdefault(comp.spec.name, {})[spec.name] = f"{chunk.key}:{spec.name}"
    edges = []
    for comp in plan.components:
        for chunk in comp.chunks:
            for name, source in chunk.wiring.items():
                link = comp.spec.links.get(source.removeprefix("pipeline:"))
                if not source.startswith("pipeline:") or link is None:
                    continue
                producer, _, output = link.source.partition(":")
                if output in producers.get(producer, {}):
                    edges.append(
                        {
                            "from": producers[producer][output],
                            "to": f"{chunk.key}:{name}",
                            "transform": link.transform,
                        }
                    )
    return edges


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def verification_to_json(v: Verification) -> dict[str, Any]:
    return {
        **attrs.asdict(v),
        "psnr_db": _finite(v.psnr_db),
        "max_abs_err": _finite(v.max_abs_err),
        "psnr_by_shape": {k: _finite(x) for k, x in v.psnr_by_shape.items()},
    }


def result_to_json(r: ChunkResult) -> dict[str, Any]:
    return {
        "chunk": r.chunk_key,
        "component": r.component,
        "name": r.name,
        "target": r.target,
        "path": r.artifact.path if r.artifact else None,
        "bytes": r.artifact.bytes if r.artifact else 0,
        "sha256": r.artifact.sha256 if r.artifact else None,
        "functions": list(r.artifact.functions) if r.artifact else [],
        "params": r.params,
        "quantization": r.quantization,
        "compression_vs_fp32": round(r.params * 4 / r.artifact.bytes, 3)
        if r.artifact and r.artifact.bytes
        else None,
        "timings": {k: round(v, 4) for k, v in r.timings.items()},
        "peak_rss_bytes": r.peak_rss_bytes,
        "verification": None if r.verification is None else verification_to_json(r.verification),
        "error": r.error,
        "notes": list(r.notes),
        "cached": r.cached,
        "strategy": r.strategy,
        "strategy_note": r.strategy_note,
        "lowered_cache": r.lowered_cache,
        "ok": r.ok,
    }


def _num(x: Any) -> float:
    return float(x)  # JSON keeps inf as the string "inf"/"-inf", which float() reads


def result_from_json(d: dict[str, Any]) -> ChunkResult:
    v = d.get("verification")
    verification = None
    if v is not None:
        verification = Verification(
            backend=v["backend"],
            psnr_db=_num(v["psnr_db"]),
            max_abs_err=_num(v["max_abs_err"]),
            finite=v["finite"],
            threshold_db=v["threshold_db"],
            passed=v["passed"],
            seconds=v.get("seconds", 0.0),
            reference_seconds=v.get("reference_seconds", 0.0),
            note=v.get("note", ""),
            error=v.get("error", ""),
            psnr_by_shape={k: _num(x) for k, x in v.get("psnr_by_shape", {}).items()},
        )
    artifact = None
    if d.get("path"):
        artifact = Artifact(
            target=d["target"],
            path=d["path"],
            bytes=d["bytes"],
            sha256=d["sha256"],
            functions=tuple(d.get("functions", ["main"])),
        )
    return ChunkResult(
        chunk_key=d["chunk"],
        component=d["component"],
        name=d["name"],
        target=d["target"],
        artifact=artifact,
        params=d["params"],
        quantization=d["quantization"],
        timings=d.get("timings", {}),
        peak_rss_bytes=d.get("peak_rss_bytes", 0),
        verification=verification,
        error=d.get("error"),
        notes=tuple(d.get("notes", ())),
        cached=bool(d.get("cached", False)),
        strategy=d.get("strategy", "static"),
        strategy_note=d.get("strategy_note", ""),
        lowered_cache=d.get("lowered_cache", ""),
    )


def _tensor_json(spec: TensorSpec) -> dict[str, Any]:
    return spec.to_json()


def request_to_json(request: ExportRequest) -> dict[str, Any]:
    """What ``sora-export verify`` needs to rebuild the PyTorch references of a bundle."""
    return {
        "plugins": list(request.plugins),
        "profile": request.profile,
        "size": request.size,
        "seed": request.seed,
        "weights": {k: str(Path(v).resolve()) for k, v in request.weights.items()},
        "targets": list(request.targets),
        "quantize": request.quantize,
        "shapes": list(request.shapes),
    }


def shapes_section(chunk: Chunk, result: ChunkResult | None) -> dict[str, Any]:
    """Per export shape: the chunk's input/output specs there and, per variant, the
    artifact function a runtime calls at that shape."""
    per_shape = result is not None and result.strategy == "per-shape"
    return {
        name: {
            "inputs": [_tensor_json(s) for s in at.inputs],
            "outputs": [_tensor_json(s) for s in at.outputs],
            "functions": {v: chunk.function_for(v, name, per_shape) for v in chunk.functions},
        }
        for name, at in chunk.shape_chunks().items()
    }


def chunk_enumerated_shapes(chunk: Chunk) -> dict[str, list[list[int]]]:
    """Each varying input's shapes over the chunk's export shapes, the default first."""
    at = list(chunk.shape_chunks().values())
    names = [s.name for s in chunk.inputs]
    cases = [[s.shape for s in c.inputs] for c in at]
    return {k: [list(x) for x in v] for k, v in enumerated_shapes(names, cases).items()}


def build_manifest(plan: ExportPlan, result: RunResult) -> dict[str, Any]:
    by_chunk: dict[tuple[str, str], ChunkResult] = {
        (r.chunk_key, r.target): r for r in result.results
    }
    components = []
    for comp in plan.components:
        for target in plan.targets:
            chunks = []
            for chunk in comp.chunks:
                r = by_chunk.get((chunk.key, target))
                chunks.append(
                    {
                        "name": chunk.name,
                        "index": chunk.index,
                        "path": r.artifact.path if r and r.artifact else None,
                        "inputs": [_tensor_json(s) for s in chunk.inputs],
                        "outputs": [_tensor_json(s) for s in chunk.outputs],
                        "wiring": dict(chunk.wiring),
                        "params": chunk.params,
                        "bytes": r.artifact.bytes if r and r.artifact else 0,
                        "sha256": r.artifact.sha256 if r and r.artifact else None,
                        "functions": list(r.artifact.functions)
                        if r and r.artifact
                        else list(chunk.functions),
                        "quantization": r.quantization if r else None,
                        "meta": _jsonable(chunk.meta),
                        # how the artifact takes the export shapes (see docs/architecture.md)
                        "strategy": r.strategy if r else None,
                        "strategy_note": r.strategy_note if r else "",
                        "enumerated_shapes": chunk_enumerated_shapes(chunk)
                        if r is not None and r.strategy == "dynamic"
                        else {},
                        "shapes": shapes_section(chunk, r),
                    }
                )
            components.append(
                {
                    "name": comp.spec.name,
                    "target": target,
                    "size": comp.context.size,
                    "random_weights": comp.context.weights is None,
                    "chunk_budget_bytes": comp.context.chunk_budget_bytes,
                    "weights": str(comp.context.weights) if comp.context.weights else None,
                    "chunks": chunks,
                }
            )
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "generator": f"sora-export {package_version()}",
        "profile": plan.profile.to_json(),
        "plugins": list(plan.plugins),
        "transforms": [t.name for t in plan.transforms],
        "pipeline": [c.spec.name for c in plan.components],
        # the export shapes every chunk accepts, the bundle's default first
        "shapes": [s.name for s in plan.shapes],
        "request": request_to_json(plan.request),
        "components": components,
        "dataflow": dataflow(plan),
        "sampler": {},
    }


def build_report(plan: ExportPlan, result: RunResult) -> dict[str, Any]:
    total_bytes = sum(r.artifact.bytes for r in result.results if r.artifact)
    return {
        "format": "sora-export-report",
        "version": BUNDLE_VERSION,
        "ok": result.ok,
        "total_seconds": round(result.seconds, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
        "total_bytes": total_bytes,
        "memory_budget_bytes": plan.profile.memory_budget_bytes,
        "per_chunk_budget_bytes": plan.profile.per_chunk_budget_bytes,
        "profile": plan.profile.name,
        "size": plan.request.size,
        "random_weights": [c.spec.name for c in plan.components if c.context.weights is None],
        "targets": list(plan.targets),
        "verify": plan.verify,
        "jobs": plan.jobs,
        "jobs_reason": plan.jobs_reason,
        "chunks": [result_to_json(r) for r in result.results],
        "pipeline_checks": [
            {
                "name": c.name,
                "target": c.target,
                "passed": c.passed,
                "verification": verification_to_json(c.verification),
            }
            for c in result.checks
        ],
    }


def read_manifest(bundle: Path) -> dict[str, Any]:
    """``bundle/manifest.json``, checked to be a sora-export manifest (else UsageError)."""
    path = bundle / "manifest.json"
    if not path.exists():
        raise UsageError(f"{str(bundle)!r} is not a sora-export bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if manifest.get("format") != "sora-export-bundle":
        raise UsageError(f"{str(path)!r} is not a sora-export manifest")
    return manifest
