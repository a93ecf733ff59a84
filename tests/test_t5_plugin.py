"""The ``t5`` component plugin: chunk plans, Hugging Face checkpoints, refusals, fp16 safety."""

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
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration

from sora_export.core import engine
from sora_export.core.checkpoint import CheckpointReader
from sora_export.core.cli import main
from sora_export.core.errors import UsageError
from sora_export.core.registry import Registry
from sora_export.core.types import ExportRequest, bytes_per_param
from sora_export.core.verify.chain import run_chain
from sora_export.core.weights import WeightSource, seeded_init_
from sora_export.plugins.t5.model import (
    T5_CONFIGS,
    T5Blocks,
    T5Config,
    T5Embed,
    T5Encoder,
    make_fp16_overflowing,
)
from sora_export.plugins.t5.plugin import (
    EOS_ID,
    PAD_ID,
    WARMUP_MAX_PARAMS,
    T5Description,
    config_from_checkpoint,
    plan_chunks,
    prompt_inputs,
    warmup_blocks,
)

TINY = T5_CONFIGS["tiny"]


def _registry() -> Registry:
    # the entry point normally provides the plugin; naming the module too is harmless
    return Registry.discover(extra_modules=["sora_export.plugins.t5.plugin"])


def _chain_output(chunks, cfg: T5Config, seed: int) -> torch.Tensor:
    ids, mask = prompt_inputs(cfg, seed)
    values = run_chain(chunks, {"input_ids": ids, "attention_mask": mask})
    return values[f"t5/{chunks[-1].name}:y"]


# -- planning and chaining (seeded weights) -------------------------------------------------
def test_tiny_plan_chains_to_whole_encoder(tmp_path: Path) -> None:
    plan = engine.plan(ExportRequest(plugins=("t5",), output=tmp_path / "o", seed=4), _registry())
    (component,) = plan.components
    assert component.spec.order == 10 and "t5-xxl" in component.spec.aliases
    chunks = list(component.chunks)
    assert chunks[0].name == "embed" and chunks[-1].name == "final-norm"
    assert component.description.cfg == TINY
    chained = _chain_output(chunks, TINY, seed=4)
    whole = seeded_init_(T5Encoder(TINY), seed=4).eval()
    with torch.no_grad():
        expected = whole(*prompt_inputs(TINY, 4))
    assert chained.shape == (1, TINY.max_length, TINY.d_model)
    torch.testing.assert_close(chained, expected, atol=1e-6, rtol=1e-6)
    assert not (tmp_path / "o").exists(), "planning must not write anything"


def test_one_block_per_chunk_chains_and_wires() -> None:
    cfg = attrs.evolve(TINY, num_layers=3)
    desc = T5Description(cfg, WeightSource(seed=2))
    budget = int(cfg.param_count_block() * bytes_per_param("fp16") * 1.5)
    chunks = plan_chunks(desc, budget, "fp16", seed=2)
    assert [c.name for c in chunks] == [
        "embed",
        "blocks-00-00",
        "blocks-01-01",
        "blocks-02-02",
        "final-norm",
    ]
    assert chunks[2].wiring == {
        "hidden": "t5/blocks-00-00:hidden_out",
        "position_bias": "t5/embed:position_bias",
    }
    assert chunks[1].wiring["hidden"] == "t5/embed:hidden"
    assert chunks[-1].wiring == {"hidden": "t5/blocks-02-02:hidden_out"}
    for chunk in chunks:  # Core ML forbids one name as input and output of a function
        assert not {s.name for s in chunk.inputs} & {s.name for s in chunk.outputs}
    whole = seeded_init_(T5Encoder(cfg), seed=2).eval()
    with torch.no_grad():
        expected = whole(*prompt_inputs(cfg, 2))
    torch.testing.assert_close(_chain_output(chunks, cfg, 2), expected, atol=1e-6, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    layers=st.integers(1, 30),
    budget_blocks=st.floats(1.0, 40.0),
    policy=st.sampled_from(["fp32", "fp16", "int8", "palettize4"]),
)
def test_block_chunks_cover_layers_within_budget(
    layers: int, budget_blocks: float, policy: str
) -> None:
    cfg = attrs.evolve(TINY, num_layers=layers)
    budget = int(cfg.param_count_block() * bytes_per_param(policy) * budget_blocks)
    chunks = plan_chunks(T5Description(cfg, WeightSource(seed=0)), budget, policy, seed=0)
    blocks = [c for c in chunks if c.name.startswith("blocks-")]
    ranges = [tuple(c.meta["blocks"]) for c in blocks]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    for (_, a1), (b0, b1) in itertools.pairwise(ranges):
        assert a1 == b0 and b1 > b0
    for chunk in blocks:
        start, stop = chunk.meta["blocks"]
        assert chunk.name == f"blocks-{start:02d}-{stop - 1:02d}"
        assert chunk.params * bytes_per_param(policy) <= budget
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # every wired source is produced earlier in the plan
    produced = {f"pipeline:{n}" for n in ("input_ids", "attention_mask")}
    for chunk in chunks:
        assert set(chunk.wiring.values()) <= produced, chunk.key
        produced |= {f"{chunk.key}:{s.name}" for s in chunk.outputs}


def test_a_block_larger_than_the_budget_is_a_usage_error() -> None:
    desc = T5Description(TINY, WeightSource(seed=0))
    with pytest.raises(UsageError, match="chunk budget"):
        plan_chunks(desc, TINY.param_count_block(), "fp16", seed=0)  # half a block at fp16


def test_full_size_plan_without_building(tmp_path: Path) -> None:
    request = ExportRequest(plugins=("t5-xxl",), output=tmp_path / "o", size="full")
    (component,) = engine.plan(request, _registry()).components
    cfg = component.description.cfg
    assert cfg == T5_CONFIGS["full"] and cfg.max_length == 300
    chunks = component.chunks
    embed = chunks[0]
    assert embed.params == 32128 * 4096 + 32 * 64
    assert [s.shape for s in embed.outputs] == [(1, 300, 4096), (1, 64, 300, 300)]
    assert [(s.name, s.dtype) for s in embed.inputs] == [
        ("input_ids", "int32"),
        ("attention_mask", "float32"),
    ]
    assert chunks[-1].outputs[0].name == "y" and chunks[-1].outputs[0].shape == (1, 300, 4096)
    # iphone15pro sizes t5 for int8: (3.3 GB - 0.7 GB) / 2 per chunk, 1 byte per weight
    budget = component.context.profile.per_chunk_budget_bytes
    assert component.context.policy == "int8"
    per_chunk = budget // cfg.param_count_block()
    assert all(c.meta["blocks"][1] - c.meta["blocks"][0] <= per_chunk for c in chunks[1:-1])
    assert sum(c.params for c in chunks) == cfg.param_count_total()
    # earlier XXL blocks are too costly to run for example inputs: only the embed output
    assert all(c.meta["example_warmup_blocks"] == 0 for c in chunks[1:])


# -- example inputs ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 400), vocab=st.integers(3, 40000), seed=st.integers(0, 10**6))
def test_prompt_inputs_look_like_a_padded_tokenised_prompt(
    length: int, vocab: int, seed: int
) -> None:
    cfg = attrs.evolve(TINY, vocab_size=vocab, max_length=length)
    ids, mask = prompt_inputs(cfg, seed)
    assert ids.dtype == torch.int32 and mask.dtype == torch.float32
    assert ids.shape == mask.shape == (1, length)
    valid = int(mask.sum())
    assert torch.equal(mask[0, :valid], torch.ones(valid))  # ones, then zeros
    assert torch.equal(ids[0, valid:], torch.full((length - valid,), PAD_ID, dtype=torch.int32))
    prompt = ids[0, :valid]
    if length >= 2:
        assert prompt[-1] == EOS_ID and abs(valid - 1 - length // 3) <= 1
        prompt = prompt[:-1]
    assert bool(((prompt >= 2) & (prompt < vocab)).all())
    again = prompt_inputs(cfg, seed)
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)


def test_example_inputs_match_specs_and_run_the_earlier_blocks() -> None:
    chunks = plan_chunks(
        T5Description(TINY, WeightSource(seed=6)),
        int(TINY.param_count_block() * 2 * 2.5),  # two blocks per chunk at fp16
        "fp16",
        seed=6,
    )
    assert [c.name for c in chunks] == ["embed", "blocks-00-01", "blocks-02-03", "final-norm"]
    ids, mask = prompt_inputs(TINY, 6)
    embed = seeded_init_(T5Embed(TINY), seed=6).eval()
    with torch.no_grad():
        hidden, bias = embed(ids, mask)
        after_two = seeded_init_(T5Blocks(TINY, 0, 2), seed=6).eval()(hidden, bias)
    for chunk in chunks:
        made = chunk.example_inputs()
        for spec, tensor in zip(chunk.inputs, made, strict=True):
            assert tuple(tensor.shape) == spec.shape, (chunk.name, spec.name)
            assert str(tensor.dtype).removeprefix("torch.") == spec.dtype
        # builders and input makers travel to worker processes
        assert pickle.loads(pickle.dumps(chunk.build)) == chunk.build
        assert pickle.loads(pickle.dumps(chunk.example_inputs)) == chunk.example_inputs
    torch.testing.assert_close(chunks[1].example_inputs()[0], hidden)
    torch.testing.assert_close(chunks[2].example_inputs()[0], after_two)
    torch.testing.assert_close(chunks[2].example_inputs()[1], bias)


def test_warmup_stops_where_blocks_get_expensive() -> None:
    assert warmup_blocks(TINY, TINY.num_layers) == TINY.num_layers
    full = T5_CONFIGS["full"]
    assert full.param_count_block() > WARMUP_MAX_PARAMS
    assert warmup_blocks(full, 0) == 0 and warmup_blocks(full, 1) == 0
    mid = attrs.evolve(TINY, d_model=1024, d_kv=64, num_heads=16, d_ff=2816)  # 13.6M a block
    fits = WARMUP_MAX_PARAMS // mid.param_count_block()
    assert warmup_blocks(mid, fits) == fits and warmup_blocks(mid, fits + 1) == 0


# -- Hugging Face checkpoints -------------------------------------------------------------
def _hf_config(cfg: T5Config) -> HFT5Config:
    config = HFT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=2,
        num_heads=cfg.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return config


def _write_shards(state: dict[str, torch.Tensor], folder: Path, fmt: str) -> None:
    """Two shards plus an index, the way save_pretrained lays out a large checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    # clone: tied tensors share storage, which safetensors refuses to write twice
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    keys = sorted(state)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    names = [f"{stem}-0000{i}-of-00002.{suffix}" for i in (1, 2)]
    index = f"{stem}.{suffix}.index.json"
    weight_map = {}
    for shard, part in zip(names, (keys[::2], keys[1::2]), strict=True):
        tensors = {k: state[k] for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(folder / shard))
        else:
            torch.save(tensors, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def hf_seq2seq() -> T5ForConditionalGeneration:
    torch.manual_seed(21)
    return T5ForConditionalGeneration(_hf_config(TINY)).eval()


@pytest.mark.parametrize("layout", ["seq2seq-safetensors", "encoder-bin-no-shared"])
def test_hugging_face_checkpoint_chains_to_transformers(
    tmp_path: Path, hf_seq2seq: T5ForConditionalGeneration, layout: str
) -> None:
    state = hf_seq2seq.state_dict()
    if layout == "seq2seq-safetensors":
        assert any(k.startswith("decoder.") for k in state) and "lm_head.weight" in state
        assert "encoder.embed_tokens.weight" in state and "shared.weight" in state
        _write_shards(state, tmp_path / "hf", "safetensors")
    else:
        # an encoder-only checkpoint that stores the embedding under its tied name only
        encoder = T5EncoderModel(_hf_config(TINY))
        encoder.load_state_dict(
            {k: v for k, v in state.items() if k == "shared.weight" or k.startswith("encoder.")}
        )
        state = {k: v for k, v in encoder.state_dict().items() if k != "shared.weight"}
        _write_shards(state, tmp_path / "hf", "bin")
        (tmp_path / "hf" / "config.json").write_text(_hf_config(TINY).to_json_string())
    request = ExportRequest(plugins=("t5",), output=tmp_path / "o", weights={"t5": tmp_path / "hf"})
    (component,) = engine.plan(request, _registry()).components
    cfg = component.description.cfg
    assert cfg == attrs.evolve(TINY, max_length=300)  # a checkpoint gets Open-Sora's length
    ids, mask = prompt_inputs(cfg, 0)
    got = _chain_output(component.chunks, cfg, 0)
    with torch.no_grad():
        want = hf_seq2seq.encoder(input_ids=ids.long(), attention_mask=mask).last_hidden_state
    valid = mask[0].bool()
    assert int(valid.sum()) == 101
    torch.testing.assert_close(got[:, valid], want[:, valid], atol=1e-5, rtol=1e-5)


def test_prefix_and_config_json_are_checked(tmp_path: Path, hf_seq2seq) -> None:
    state = {"text_encoder." + k: v for k, v in hf_seq2seq.state_dict().items()}
    _write_shards(state, tmp_path / "hf", "safetensors")
    reader = CheckpointReader(tmp_path / "hf")
    cfg = config_from_checkpoint(reader, "text_encoder.", 16, {"num_heads": TINY.num_heads})
    assert cfg == TINY
    with pytest.raises(UsageError, match=r"num_heads=8 but the tensor shapes give 2"):
        config_from_checkpoint(reader, "text_encoder.", 16, {"num_heads": 8})
    with pytest.raises(UsageError, match="feed_forward_proj='relu'"):
        config_from_checkpoint(reader, "text_encoder.", 16, {"feed_forward_proj": "relu"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"d_ff": 99}))
    with pytest.raises(UsageError, match=r"d_ff=99 but the tensor shapes give 128"):
        engine.plan(
            ExportRequest(plugins=("t5",), output=tmp_path / "o", weights={"t5": tmp_path / "hf"}),
            _registry(),
        )


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    model = seeded_init_(T5Encoder(TINY), seed=13)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _cli_refuses(tmp_path: Path, weights: Path, capsys) -> str:
    out = tmp_path / "out"
    code = main(["--plugins", "t5", "--weights", f"t5={weights}", "-o", str(out)])
    assert code == 2
    assert not out.exists() and not out.with_name("out.partial").exists()
    return capsys.readouterr().err


def test_missing_key_is_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    del state["encoder.block.2.layer.1.DenseReluDense.wo.weight"]
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    err = _cli_refuses(tmp_path, path, capsys)
    assert "missing key" in err and "encoder.block.2.layer.1.DenseReluDense.wo.weight" in err


def test_wrong_shape_is_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    state["encoder.final_layer_norm.weight"] = torch.ones(7)
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    err = _cli_refuses(tmp_path, path, capsys)
    assert "encoder.final_layer_norm.weight" in err and "[7]" in err and "[64]" in err


def test_unexpected_and_v1_0_checkpoints_are_named(tmp_path: Path, tiny_state, capsys) -> None:
    state = dict(tiny_state)
    state["encoder.block.1.layer.0.SelfAttention.extra"] = torch.zeros(3)
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    err = _cli_refuses(tmp_path, path, capsys)
    assert "unexpected key" in err and "encoder.block.1.layer.0.SelfAttention.extra" in err
    # T5 v1.0 has one ReLU input projection "wi" instead of the gated wi_0/wi_1
    state = {k.replace(".wi_0.", ".wi."): v for k, v in tiny_state.items() if ".wi_1." not in k}
    v10 = tmp_path / "t5-v1_0.pt"
    torch.save(state, v10)
    assert "T5 v1.0" in _cli_refuses(tmp_path, v10, capsys)
    # something that is not a T5 encoder at all
    other = tmp_path / "other.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(2, 2)}, str(other))
    assert "do not look like this component's checkpoint" in _cli_refuses(tmp_path, other, capsys)


# -- through the engine and the CLI (Core ML lowering, MIL interpreter verification) -------
_PROFILE = """
name = "t5-two-blocks"
description = "fp16 everywhere; chunks of two tiny T5 blocks; 16-token prompts"
targets = ["coreml"]
deployment_target = "iOS18"
compute_units = "CPU_AND_GPU"
memory_budget_bytes = 1_000_000_000
activation_reserve_bytes = 100_000_000
chunk_budget_bytes = {budget}

[quantization]
default = "fp16"

[psnr_thresholds_db]
fp32 = 60.0
fp16 = 35.0

[[shapes]]
name = "64x64x17"
height = 64
width = 64
num_frames = 17
default = true

[plugins.t5]
max_length = {length}
"""


def test_fp16_overflow_is_kept_in_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = seeded_init_(T5Encoder(TINY), seed=0)
    make_fp16_overflowing(model, block_index=3, factor=1e5)
    weights = tmp_path / "overflowing.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    profile = tmp_path / "profile.toml"
    budget = int(TINY.param_count_block() * bytes_per_param("fp16") * 2.5)
    profile.write_text(_PROFILE.format(budget=budget, length=TINY.max_length))
    request = ExportRequest(
        plugins=("t5",), profile=str(profile), output=tmp_path / "out", weights={"t5": weights}
    )
    plan = engine.plan(request, _registry())
    assert plan.verify, "tiny exports are verified by default"
    result = engine.run(plan, _registry())
    assert result.ok and (tmp_path / "out" / "manifest.json").exists()
    by_name = {r.name: r for r in result.results}
    assert list(by_name) == ["embed", "blocks-00-01", "blocks-02-03", "final-norm"]
    for name in ("embed", "blocks-00-01"):
        assert by_name[name].quantization == "fp16" and not by_name[name].notes, name
        assert by_name[name].verification.passed
    overflowing = by_name["blocks-02-03"]
    assert overflowing.quantization == "fp32"
    assert any("fp16 would overflow" in note for note in overflowing.notes), overflowing.notes
    assert overflowing.verification.passed and overflowing.verification.finite
    # final-norm's example input went through the overflowing block, so an fp16 final norm
    # would square values beyond the fp16 range: it must not be shipped in fp16 either
    final = by_name["final-norm"]
    assert final.quantization == "fp32" and final.notes, final
    assert final.verification.passed


def test_cli_exports_tiny_t5(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    # --quantize fp16: the default profile asks int8 for t5, which needs the quantization plugin
    code = main(["--plugins", "t5", "--quantize", "fp16", "-o", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == ["t5"]
    chunks = manifest["components"][0]["chunks"]
    assert [c["name"] for c in chunks] == ["embed", "blocks-00-03", "final-norm"]
    for chunk in chunks:
        assert (out / chunk["path"]).is_dir() and chunk["bytes"] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["random_weights"] == ["t5"]
    assert all(c["verification"]["passed"] for c in report["chunks"])
