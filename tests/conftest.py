"""Shared fixtures: one tiny STDiT3 export reused by the tests that only read a bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
