"""STDiT3 chunk plans: chaining the planned chunks equals the unchunked model (fp32)."""

from __future__ import annotations

import itertools
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.core import engine
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest, ExportShape
from sora_export.core.verify.chain import run_chain
from sora_export.core.weights import WeightSource, seeded_init_
from sora_export.plugins.stdit3.model import STDiT3, STDiT3Config
from sora_export.plugins.stdit3.plugin import (
    STDiT3Description,
    model_inputs,
    plan_chunks,
)

INPUT_NAMES = ("x", "timestep", "y", "mask", "fps", "height", "width")


def _chain_vs_whole(chunks, cfg: STDiT3Config, shape: ExportShape, seed: int) -> float:
    inputs = model_inputs(cfg, shape, seed)
    values = run_chain(chunks, dict(zip(INPUT_NAMES, inputs, strict=True)))
    chained = values[f"stdit3/{chunks[-1].name}:velocity"]
    whole = seeded_init_(STDiT3(cfg), seed).eval()
    with torch.no_grad():
        expected = whole(*inputs)
    assert chained.shape == expected.shape
    return float((chained - expected).abs().max())


def test_tiny_plan_chains_to_whole_model(tmp_path: Path) -> None:
    registry = Registry.discover()
    plan = engine.plan(ExportRequest(plugins=("stdit",), output=tmp_path / "o", seed=3), registry)
    (component,) = plan.components
    chunks = list(component.chunks)
    assert next(c.name for c in chunks) == "input" and chunks[-1].name == "output"
    desc = component.description
    assert _chain_vs_whole(chunks, desc.cfg, desc.shape, seed=3) < 1e-5
    assert not (tmp_path / "o").exists(), "planning must not write anything"


def test_xl_width_blocks_chain_to_whole_model() -> None:
    # XL/2 width and heads, three block pairs, one pair per chunk, a small video.
    cfg = STDiT3Config(
        depth=3, hidden_size=1152, num_heads=16, caption_channels=64, model_max_length=8
    )
    shape = ExportShape("small", height=64, width=48, num_frames=17)
    desc = STDiT3Description(cfg, WeightSource(seed=5), shape)
    budget = int(cfg.param_count_block_pair() * 2 * 1.5)  # fp16 bytes for 1.5 pairs
    chunks = plan_chunks(desc, budget, "fp16", seed=5)
    assert [c.name for c in chunks] == [
        "input",
        "blocks-00-00",
        "blocks-01-01",
        "blocks-02-02",
        "output",
    ]
    assert _chain_vs_whole(chunks, cfg, shape, seed=5) < 1e-4


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 40),
    budget_pairs=st.floats(0.1, 50.0),
    policy=st.sampled_from(["fp32", "fp16", "int8", "palettize4"]),
)
def test_block_chunks_cover_depth_within_budget(depth: int, budget_pairs: float, policy: str):
    from sora_export.core.types import bytes_per_param

    cfg = STDiT3Config(
        depth=depth, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16
    )
    pair_bytes = cfg.param_count_block_pair() * bytes_per_param(policy)
    budget = max(1, int(pair_bytes * budget_pairs))
    desc = STDiT3Description(cfg, WeightSource(seed=0), ExportShape("s", 64, 64, 17))
    chunks = plan_chunks(desc, budget, policy, seed=0)
    ranges = [tuple(c.meta["blocks"]) for c in chunks if c.name.startswith("blocks")]
    assert ranges[0][0] == 0 and ranges[-1][1] == depth
    for (a0, a1), (b0, _) in itertools.pairwise(ranges):
        assert a1 == b0 and a1 > a0
    for c in chunks:
        if c.name.startswith("blocks") and c.meta["blocks"][1] - c.meta["blocks"][0] > 1:
            assert c.params * bytes_per_param(policy) <= budget
    assert [c.index for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize("part", ["input", "blocks", "output"])
def test_example_inputs_match_specs(part: str) -> None:
    cfg = STDiT3Config(
        depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16
    )
    shape = ExportShape("s", 64, 64, 17)
    chunks = plan_chunks(STDiT3Description(cfg, WeightSource(seed=1), shape), 10**9, "fp16", 1)
    chunk = next(c for c in chunks if c.name.startswith(part))
    for spec, tensor in zip(chunk.inputs, chunk.example_inputs(), strict=True):
        assert tuple(tensor.shape) == spec.shape, spec.name


def test_host_memory_caps_chunk_size(tmp_path: Path) -> None:
    # full-size STDiT3 fits 15 block pairs per iPhone chunk; a 4 GB export host with two
    # workers can convert only ~150M parameters per chunk side by side (2 GB each, less
    # what a process holds before building anything), i.e. 3 pairs
    from sora_export.core.engine import EXPORT_BYTES_PER_PARAM, EXPORT_PROCESS_BYTES, chunk_budget

    registry = Registry.discover()
    request = ExportRequest(
        plugins=("stdit",),
        size="full",
        verify=False,
        jobs=2,
        host_memory_bytes=4_000_000_000,
        output=tmp_path / "o",
        whole_chunks=True,  # converted whole, a chunk must fit the host itself
    )
    plan = engine.plan(request, registry)
    blocks = [c for c in plan.chunks if c.name.startswith("blocks")]
    pair = plan.components[0].description.cfg.param_count_block_pair()
    per_worker = (4_000_000_000 / 2 - EXPORT_PROCESS_BYTES) / EXPORT_BYTES_PER_PARAM
    assert all(c.params <= per_worker for c in blocks)
    assert max(c.params for c in blocks) == 3 * pair
    roomy = attrs.evolve(request, host_memory_bytes=10**12, jobs=1)
    profile = plan.profile
    assert chunk_budget(profile, "fp16", roomy) == profile.per_chunk_budget_bytes
