"""Process settings (core/runtime.py) and the in-place seeded weights (core/weights.py)."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from sora_export.core import runtime
from sora_export.core.weights import (
    WeightSource,
    _generator,
    materialize,
    seeded_init_,
    seeded_value,
    seeded_values,
)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            {
                "THP_MEM_ALLOC_ENABLE": "1",
                "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
            },
        ),
        (  # what the user chose stays
            {"THP_MEM_ALLOC_ENABLE": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
            {"THP_MEM_ALLOC_ENABLE": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
        ),
    ],
)
def test_tune_environment_adds_and_keeps(before: dict, after: dict) -> None:
    env = dict(before, PATH="/bin")
    runtime.tune_environment(env)
    runtime.tune_environment(env)  # twice: nothing added twice
    assert env == dict(after, PATH="/bin")


def test_settle_imports_freezes_what_lives_now() -> None:
    frozen = gc.get_freeze_count()
    try:
        runtime.settle_imports()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def _documented(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """seeded_value as its docstring states it, drawn with torch.randn."""
    draw = torch.randn(shape, generator=_generator(seed, key))
    lowered = key.lower()
    if any(h in lowered for h in ("norm", "ln_")) and key.endswith("weight") and len(shape) == 1:
        return 1.0 + 0.02 * draw
    if key.endswith("bias"):
        return 0.02 * draw
    if len(shape) >= 2 and not key.endswith(("embedding", "table")):
        return draw / math.sqrt(math.prod(shape[1:]))
    return 0.1 * draw


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 40)
        self.norm = nn.LayerNorm(40)
        self.conv = nn.Conv3d(3, 5, (1, 2, 2))
        self.pos_table = nn.Parameter(torch.zeros(6, 4))
        self.gate = nn.Parameter(torch.zeros(7))
        self.half = nn.Linear(8, 4).to(torch.float16)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_weights_are_drawn_in_place_bit_for_bit(seed: int) -> None:
    """Random weights are drawn straight into the allocated tensors, yet are exactly the
    documented values, whichever way a module gets them."""
    built = WeightSource(seed=seed).build(_Mixed)
    loaded = materialize(_Mixed, seeded_values(seed))
    prefixed = seeded_init_(_Mixed(), seed, prefix="blocks.3.")
    for key, value in built.state_dict().items():
        want = _documented(key, tuple(value.shape), seed).to(value.dtype)
        assert value.dtype == want.dtype and torch.equal(value, want), key
        assert torch.equal(loaded.state_dict()[key], want), key
        shifted = _documented("blocks.3." + key, tuple(value.shape), seed).to(value.dtype)
        assert torch.equal(prefixed.state_dict()[key], shifted), key
    want = _documented("w.weight", (9, 4), seed)
    assert torch.equal(seeded_value("w.weight", (9, 4), seed), want)
