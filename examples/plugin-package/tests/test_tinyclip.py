"""Tests of the example plugins, run from the package directory with ``python -m pytest``.

They import the package from ``src/`` (see ``pythonpath`` in pyproject.toml) and register
its modules by name, the way ``--plugin-module`` does, so nothing needs to be installed.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from sora_export.core import engine
from sora_export.core.backends import capture
from sora_export.core.errors import PluginError, UsageError
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest, RunResult, bytes_per_param
from sora_export.core.verify.chain import run_chain
from sora_export.core.weights import WeightSource

from sora_export_tinyclip import clamp
from sora_export_tinyclip.model import (
    CONFIGS,
    TinyClipConfig,
    TinyClipLayers,
    TinyClipTextModel,
    split_layers,
)
from sora_export_tinyclip.plugin import (
    NAME,
    TinyClipDescription,
    describe,
    plan_chunks,
    prompt_ids,
)

TINY = CONFIGS["tiny"]
MODULES = ["sora_export_tinyclip.plugin", "sora_export_tinyclip.clamp"]


def _registry() -> Registry:
    return Registry.discover(extra_modules=MODULES)


def _budget(layers_per_chunk: int, cfg: TinyClipConfig = TINY, policy: str = "fp16") -> int:
    """A chunk budget in bytes that holds exactly ``layers_per_chunk`` layers."""
    return int(layers_per_chunk * cfg.param_count_layer() * bytes_per_param(policy))


def _whole(cfg: TinyClipConfig, weights: WeightSource) -> torch.nn.Module:
    return weights.build(lambda: TinyClipTextModel(cfg)).eval()


def _chain(chunks, ids: torch.Tensor) -> torch.Tensor:
    values = run_chain(chunks, {"input_ids": ids})
    return values[f"{NAME}/final-norm:last_hidden_state"]


# -- the model and its chunk plan -----------------------------------------------------------
def test_param_counts_match_the_modules() -> None:
    model = TinyClipTextModel(TINY)
    assert sum(p.numel() for p in model.parameters()) == TINY.param_count_total()
    layers = TinyClipLayers(TINY, 1, 3)
    assert sum(p.numel() for p in layers.parameters()) == 2 * TINY.param_count_layer()


@given(layers=st.integers(1, 12), per_chunk=st.integers(1, 12))
def test_split_layers_covers_every_layer_within_budget(layers: int, per_chunk: int) -> None:
    cfg = attrs.evolve(TINY, layers=layers)
    budget = per_chunk * cfg.param_count_layer()
    groups = split_layers(cfg, budget)
    assert groups[0][0] == 0 and groups[-1][1] == layers
    for (_, stop), (start, _) in itertools.pairwise(groups):
        assert stop == start
    for start, stop in groups:
        assert 1 <= stop - start <= per_chunk
    assert len(groups) == -(-layers // per_chunk)


def test_a_layer_over_budget_is_a_usage_error() -> None:
    desc = TinyClipDescription(TINY, WeightSource(seed=0))
    with pytest.raises(UsageError, match="one layer has"):
        plan_chunks(desc, _budget(1) - 1, "fp16", 0)


def test_plan_names_wiring_and_shapes() -> None:
    desc = TinyClipDescription(TINY, WeightSource(seed=0))
    chunks = plan_chunks(desc, _budget(2), "fp16", seed=0)
    assert [c.name for c in chunks] == ["embed", "layers-00-01", "layers-02-03", "final-norm"]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert sum(c.params for c in chunks) == TINY.param_count_total()
    assert chunks[1].wiring == {"hidden": "tinyclip/embed:hidden"}
    assert chunks[2].wiring == {"hidden": "tinyclip/layers-00-01:hidden_out"}
    assert chunks[3].wiring == {"hidden": "tinyclip/layers-02-03:hidden_out"}
    for chunk in chunks:
        inputs = chunk.example_inputs()
        assert [tuple(t.shape) for t in inputs] == [s.shape for s in chunk.inputs]
        assert [str(t.dtype).removeprefix("torch.") for t in inputs] == [
            s.dtype for s in chunk.inputs
        ]
        module = chunk.build()
        # a chunk materialises only its own weights
        assert sum(p.numel() for p in module.parameters()) == chunk.params


def test_prompt_is_laid_out_like_clip_tokens() -> None:
    ids = prompt_ids(TINY, seed=3)
    assert ids.dtype == torch.int32 and ids.shape == (1, TINY.max_length)
    assert ids[0, 0] == TINY.vocab_size - 2
    words = TINY.max_length // 3
    assert ids[0, 1 + words :].eq(TINY.vocab_size - 1).all()
    assert torch.equal(ids, prompt_ids(TINY, seed=3))


def test_builders_and_input_makers_survive_pickling() -> None:
    desc = TinyClipDescription(TINY, WeightSource(seed=4))
    chunks = plan_chunks(desc, _budget(3), "fp16", seed=4)
    for chunk in chunks:
        copied = pickle.loads(pickle.dumps((chunk.build, chunk.example_inputs)))
        assert copied == (chunk.build, chunk.example_inputs)
    # and a copy builds the same weights and makes the same inputs
    build, inputs = pickle.loads(pickle.dumps((chunks[1].build, chunks[1].example_inputs)))
    with torch.no_grad():
        want = chunks[1].build().eval()(*chunks[1].example_inputs())
        got = build().eval()(*inputs())
    assert torch.equal(want, got)


@settings(max_examples=4, deadline=None)
@given(layers_per_chunk=st.integers(1, 4), seed=st.integers(0, 3))
def test_chained_chunks_equal_the_whole_model(layers_per_chunk: int, seed: int) -> None:
    weights = WeightSource(seed=seed)
    chunks = plan_chunks(TinyClipDescription(TINY, weights), _budget(layers_per_chunk), "fp16", 0)
    ids = prompt_ids(TINY, seed)
    with torch.no_grad():
        want = _whole(TINY, weights)(ids)
    torch.testing.assert_close(_chain(chunks, ids), want, rtol=0, atol=1e-5)


def test_attention_is_causal() -> None:
    model = _whole(TINY, WeightSource(seed=1))
    ids = prompt_ids(TINY, seed=1)
    changed = ids.clone()
    changed[0, -1] = 5  # only the last token differs
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])


# -- checkpoints --------------------------------------------------------------------------
def _context(weights: Path | None = None, size: str = "tiny"):
    plan = engine.plan(ExportRequest(plugins=(NAME,)), _registry())
    return attrs.evolve(plan.components[0].context, weights=weights, size=size)


def test_checkpoint_loads_under_a_prefix_and_chains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = TinyClipTextModel(TINY).eval()
    path = tmp_path / "clip.safetensors"
    save_file({f"text_model.{k}": v for k, v in reference.state_dict().items()}, str(path))
    desc = describe(_context(path))
    assert desc.cfg == TINY and desc.weights.prefix == "text_model."
    ids = prompt_ids(TINY, seed=0)
    with torch.no_grad():
        want = reference(ids)
    chunks = plan_chunks(desc, _budget(3), "fp16", 0)
    torch.testing.assert_close(_chain(chunks, ids), want, rtol=0, atol=1e-5)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    state = TinyClipTextModel(TINY).state_dict()
    del state["encoder.layers.2.mlp.fc2.bias"]
    state["final_layer_norm.weight"] = torch.ones(7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError) as info:
        describe(_context(path))
    message = str(info.value)
    assert "encoder.layers.2.mlp.fc2.bias" in message and "final_layer_norm.weight" in message


def test_transformers_clip_text_model_matches(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPTextConfig(
        vocab_size=TINY.vocab_size,
        hidden_size=TINY.width,
        intermediate_size=TINY.mlp_width,
        num_hidden_layers=TINY.layers,
        num_attention_heads=TINY.heads,
        max_position_embeddings=TINY.max_length,
        hidden_act="gelu",  # not the default, so it must come from config.json
        bos_token_id=TINY.vocab_size - 2,
        eos_token_id=TINY.vocab_size - 1,
        pad_token_id=TINY.vocab_size - 1,
    )
    torch.manual_seed(0)
    hf_model = transformers.CLIPTextModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "clip")
    desc = describe(_context(tmp_path / "clip"))
    assert desc.cfg.activation == "gelu" and desc.cfg.heads == TINY.heads
    ids = prompt_ids(TINY, seed=2)
    with torch.no_grad():
        want = hf_model(input_ids=ids.long()).last_hidden_state
    chunks = plan_chunks(desc, _budget(2), "fp16", 0)
    torch.testing.assert_close(_chain(chunks, ids), want, rtol=0, atol=1e-5)


# -- the clamp-activations transform ------------------------------------------------------
def _layer_chunks(seed: int = 0, layers_per_chunk: int = 2):
    desc = TinyClipDescription(TINY, WeightSource(seed=seed))
    chunks = plan_chunks(desc, _budget(layers_per_chunk), "fp16", 0)
    return [c for c in chunks if c.meta["part"] == "layers"]


def _patched(chunk, profile, limit: float | None = None) -> torch.nn.Module:
    if limit is not None:
        profile = attrs.evolve(profile, plugin_options={clamp.NAME: {"limit": limit}})
    module = chunk.build().eval()
    assert clamp.sora_export_patch_module(chunk, module, "main", profile) is None
    return module


@pytest.fixture(scope="module")
def profile():
    return _registry().profile("iphone15pro")


def test_clamp_is_exact_inside_the_limit(profile) -> None:
    for chunk in _layer_chunks(seed=5):
        (hidden,) = chunk.example_inputs()
        with torch.no_grad():
            want = chunk.build().eval()(hidden)
            got = _patched(chunk, profile)(hidden)
        assert want.abs().max() < clamp.DEFAULT_LIMIT
        assert torch.equal(got, want)


@given(limit=st.floats(1.0, 1000.0), scale=st.floats(10.0, 1e4))
@settings(max_examples=8, deadline=None)
def test_clamp_holds_every_layer_output_at_the_limit(profile, limit: float, scale: float) -> None:
    (chunk,) = _layer_chunks(layers_per_chunk=1)[:1]
    (hidden,) = chunk.example_inputs()
    big = hidden * scale  # the residual stream carries the outlier through the layer
    with torch.no_grad():
        plain = chunk.build().eval()(big)
        got = _patched(chunk, profile, limit)(big)
    assert got.abs().max() <= limit
    torch.testing.assert_close(got, plain.clamp(-limit, limit), rtol=0, atol=0)


def test_clamp_wraps_every_layer_once_and_nothing_else(profile) -> None:
    desc = TinyClipDescription(TINY, WeightSource(seed=0))
    chunks = plan_chunks(desc, _budget(4), "fp16", 0)
    for chunk in chunks:
        module = chunk.build()
        before = repr(module)
        for _ in range(2):
            clamp.sora_export_patch_module(chunk, module, "main", profile)
        if chunk.meta["part"] != "layers":
            assert repr(module) == before
            continue
        for index in range(TINY.layers):
            layer = module.layer(index)
            assert isinstance(layer, clamp.ClampOutput)
            assert not isinstance(layer.inner, clamp.ClampOutput)


def test_clamp_survives_capture(profile) -> None:
    (chunk,) = _layer_chunks(layers_per_chunk=4)
    program = capture(_patched(chunk, profile), chunk.example_inputs())
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("clamp" in t for t in targets) == TINY.layers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": "big"}, "must be a number"),
        ({"limit": 0}, "must be in"),
        ({"limit": 70000.0}, "must be in"),
        ({"limti": 10.0}, "unknown field"),
    ],
)
def test_bad_clamp_options_are_refused_at_planning(options, message, tmp_path: Path) -> None:
    registry = _registry()
    bad = attrs.evolve(registry.profile("iphone15pro"), plugin_options={clamp.NAME: options})
    registry.profiles["iphone15pro"] = bad
    request = ExportRequest(plugins=(NAME, clamp.NAME), output=tmp_path / "out")
    with pytest.raises(UsageError, match=message):
        engine.plan(request, registry)
    assert not (tmp_path / "out").exists()


def test_clamp_without_tinyclip_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="needs component"):
        engine.plan(ExportRequest(plugins=(clamp.NAME,)), _registry())


def test_manifest_sections(tmp_path: Path) -> None:
    registry = _registry()
    plan = engine.plan(ExportRequest(plugins=("clip-text", clamp.NAME)), registry)
    # the engine's packaging step on a run without chunk results: manifest.json gets the
    # sections the two package hooks return
    engine.package(plan, RunResult(plan=plan, bundle=tmp_path, results=()), registry, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    layer_chunks = [c.name for c in plan.components[0].chunks if c.meta["part"] == "layers"]
    assert manifest[clamp.NAME]["chunks"] == layer_chunks
    assert manifest[clamp.NAME]["limit"] == clamp.DEFAULT_LIMIT
    assert manifest[NAME]["eos_id"] == TINY.vocab_size - 1


def test_a_raising_patch_is_named_with_plugin_and_hook(profile) -> None:
    registry = _registry()
    # the registered name: the entry-point name once the package is installed, else the
    # module name given to --plugin-module
    plugin = registry.transforms[clamp.NAME].plugin
    (chunk,) = _layer_chunks(layers_per_chunk=4)
    with pytest.raises(PluginError) as info:
        registry.call(
            "sora_export_patch_module",
            {plugin},
            chunk=chunk,
            module=torch.nn.Identity(),  # not the module the patch expects
            variant="main",
            profile=profile,
        )
    assert str(info.value) == (
        f"plugin {plugin!r} failed in hook 'sora_export_patch_module': "
        "TypeError: tinyclip/layers-00-03: expected TinyClipLayers, got Identity"
    )
