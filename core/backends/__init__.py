"""Backends: small objects with the same verbs (lower, save, run) per export target.

Capture (``torch.export``) is shared: one captured program feeds every target.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from sora_export.core.types import Chunk, DeviceProfile


class Backend(Protocol):
    """What the engine needs from an export target."""

    name: str
    suffix: str  # ".mlpackage" or ".onnx"

    def lower(
        self,
        program: torch.export.ExportedProgram,
        chunk: Chunk,
        profile: DeviceProfile,
        precision: str,
        enumerated: Mapping[str, Sequence[tuple[int, ...]]] | None = None,
    ) -> Any:
        """Turn a captured program into the target's in-memory model at ``precision``.

        ``enumerated`` (shape-polymorphic programs): each varying input's shapes, the
        default first; the model must accept exactly those.
        """
        ...

    def save(self, models: dict[str, Any], path: Path) -> tuple[str, ...]:
        """Write ``{function_name: model}`` to ``path`` (a temp path; the engine renames).

        Returns the function names stored. Several functions share one copy of weights.
        """
        ...

    def save_lowered(self, model: Any, path: Path) -> None:
        """Write one lowered (not yet quantized) model to ``path`` for the engine's cache."""
        ...

    def load_lowered(self, path: Path) -> Any:
        """Read back a model written by :meth:`save_lowered`, ready to quantize or save."""
        ...

    def load(self, path: Path, function: str) -> Any:
        """Prepare (and cache) a saved artifact's function for running."""
        ...

    def run(self, path: Path, inputs: dict[str, Any], function: str) -> dict[str, Any]:
        """Run a saved artifact on numpy inputs (for verification); loads if needed."""
        ...

    @staticmethod
    def runner_name() -> str:
        """What runs the artifacts here (``mil-interpreter``, ``onnxruntime``, ...)."""
        ...


def capture(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    dynamic_shapes: Any = None,
) -> Any:
    """Capture a module with torch.export and decompose to the core ATen op set.

    torch.export is used instead of torch.jit.trace because coremltools fails on traced
    shape arithmetic (``B, N, _ = x.shape`` followed by ``view``) with torch 2.13.
    ``dynamic_shapes`` (torch.export's argument, e.g. ``torch.export.Dim`` per varying
    axis) makes a shape-polymorphic program.
    """
    with torch.no_grad():
        program = torch.export.export(
            module, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False
        )
    program = program.run_decompositions({torch.ops.aten.gelu.default: _gelu_explicit})
    _drop_aliases(program)
    return program


def _gelu_explicit(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU with the tanh approximation spelled out.

    coremltools 9 lowers ``aten.gelu(approximate="tanh")`` from torch.export as the exact
    (erf) GELU, silently changing STDiT3's and T5's numbers; the explicit formula survives
    conversion (and ONNX export) as intended. The exact form is written with erf (calling
    aten.gelu here would recurse into this decomposition).
    """
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def _drop_aliases(program: Any) -> None:
    """Remove ``aten.alias`` nodes (no-op views, e.g. a full-size slice or a same-dtype
    cast) that coremltools cannot convert; each use is rewired to the aliased tensor."""
    graph = program.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if changed:
        graph.lint()
        program.graph_module.recompile()


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of all files under a directory (an .mlpackage)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_sha256(path: Path) -> str:
    """SHA-256 over a file, or over the relative paths and contents of a directory."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def atomic_replace(tmp: Path, final: Path) -> None:
    """Move a finished temp artifact into place; a reader never sees a half-written one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        remove_path(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    else:
        os.replace(tmp, final)


def get_backend(name: str) -> Backend:
    if name == "coreml":
        from sora_export.core.backends.coreml import CoreMLBackend

        return CoreMLBackend()
    if name == "onnx":
        from sora_export.core.backends.onnx import ONNXBackend

        return ONNXBackend()
    raise ValueError(f"unknown target {name!r}")
