"""Shared fixtures: one tiny STDiT3 export reused by the tests that only read a bundle."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Exports take the profile's default shape unless a test asks for more: exporting every
# iphone15pro shape doubles each tiny export, and only tests/test_shapes.py (which asks
# for --shapes all) is about shapes
os.environ["SORA_EXPORT_SHAPES"] = "default"
# never the user's ~/.cache: the session's exports share one throw-away lowered-model cache
os.environ["SORA_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="sora-export-test-cache-")
atexit.register(shutil.rmtree, os.environ["SORA_EXPORT_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_lowered_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty lowered-model cache, so no test is served another test's
    lowering (tests that patch lowering or weights must see their own)."""
    monkeypatch.setenv("SORA_EXPORT_CACHE", str(tmp_path / "lowered-cache"))


@pytest.fixture(scope="session")
def tiny_stdit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sora-export --plugins stdit`` on the tiny model, verified, into a temp dir."""
    from sora_export.core.cli import main

    out = tmp_path_factory.mktemp("bundle") / "out"
    code = main(
        ["--plugins", "stdit", "--profile", "iphone15pro", "--shapes", "default", "-o", str(out)]
    )
    assert code == 0
    return out
