"""Interrupted runs: finished chunks stay valid, nothing half-written, --resume finishes."""

from __future__ import annotations

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest

from sora_export.core import engine
from sora_export.core.hookspecs import hookimpl
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest

INTERRUPT = {"on": True}


def _interrupting_registry() -> Registry:
    """Registry with a plugin that raises Ctrl-C in block chunks while INTERRUPT is on.

    The same plugin stays registered for the resumed run (resume fingerprints include the
    active plugins), with the interruption switched off.
    """
    module = types.ModuleType("interrupt_plugin")

    @hookimpl
    def sora_export_patch_module(chunk, module, variant, profile):
        if INTERRUPT["on"] and chunk.name.startswith("blocks"):
            raise KeyboardInterrupt  # as if Ctrl-C arrived while this chunk was exported
        return None

    module.sora_export_patch_module = sora_export_patch_module
    sys.modules["interrupt_plugin"] = module
    return Registry.discover(["interrupt_plugin"])


def test_interrupt_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    request = ExportRequest(plugins=("stdit",), output=out, verify=False)
    INTERRUPT["on"] = True
    registry = _interrupting_registry()
    with pytest.raises(KeyboardInterrupt):
        engine.run(engine.plan(request, registry), registry)
    stage = out.with_name("out.partial")
    assert not out.exists(), "an unfinished bundle is never published"
    progress = json.loads((stage / "progress.json").read_text())
    assert list(progress) == ["stdit3/input@coreml"]
    leftovers = [p.name for p in (stage / "stdit3").iterdir()]
    assert leftovers == ["00-input.mlpackage"], leftovers  # no temp package left behind

    INTERRUPT["on"] = False
    registry = _interrupting_registry()
    resumed = engine.run(
        engine.plan(
            ExportRequest(plugins=("stdit",), output=out, verify=False, resume=True), registry
        ),
        registry,
    )
    cached = {r.name: r.cached for r in resumed.results}
    assert cached == {"input": True, "blocks-00-03": False, "output": False}
    assert (out / "manifest.json").exists() and not stage.exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["components"][0]["chunks"]) == 3


def test_changed_settings_invalidate_cached_chunks(tmp_path: Path) -> None:
    registry = Registry.discover()
    plan = engine.plan(ExportRequest(plugins=("stdit",), output=tmp_path / "o"), registry)
    chunk = plan.chunks[0]
    a = engine.chunk_fingerprint(plan, chunk, "coreml", "fp16")
    assert a == engine.chunk_fingerprint(plan, chunk, "coreml", "fp16")
    assert a != engine.chunk_fingerprint(plan, chunk, "coreml", "int8")
    assert a != engine.chunk_fingerprint(plan, chunk, "onnx", "fp16")
    other = engine.plan(ExportRequest(plugins=("stdit",), output=tmp_path / "o", seed=1), registry)
    assert a != engine.chunk_fingerprint(other, other.chunks[0], "coreml", "fp16")


def test_sigterm_becomes_an_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt), engine._sigterm_as_exception():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1) if hasattr(signal, "sigtimedwait") else None


def test_force_keeps_old_bundle_until_new_one_is_complete(
    tiny_stdit_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(tiny_stdit_bundle, out)
    before = (out / "manifest.json").read_bytes()
    INTERRUPT["on"] = True
    registry = _interrupting_registry()
    request = ExportRequest(plugins=("stdit",), output=out, force=True, verify=False)
    with pytest.raises(KeyboardInterrupt):
        engine.run(engine.plan(request, registry), registry)
    assert (out / "manifest.json").read_bytes() == before
    assert len(list((out / "stdit3").glob("*.mlpackage"))) == 3
