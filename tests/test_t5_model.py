"""Tests of the exportable T5 v1.1 encoder against transformers and the export contracts."""

from __future__ import annotations

import copy
import itertools
import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from sora_export.plugins.t5.model import (
    MASK_BIAS,
    T5_CONFIGS,
    T5Blocks,
    T5Config,
    T5Embed,
    T5Encoder,
    T5FinalNorm,
    make_fp16_overflowing,
    normalize_t5_keys,
    relative_position_buckets,
    remap_t5_state_dict,
    split_blocks,
)

TINY = T5_CONFIGS["tiny"]
# Longer than max_distance with few buckets, so the logarithmic and clipped buckets are used.
TINY_LONG = attrs.evolve(
    TINY, relative_attention_num_buckets=8, relative_attention_max_distance=20, max_length=40
)


def hf_config(cfg: T5Config, **extra: object) -> HFT5Config:
    config = HFT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        **extra,
    )
    config._attn_implementation = "eager"
    return config


def random_inputs(cfg: T5Config, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """int32 ids and a float mask whose rows have 0, 3 and 7 padded positions at the end."""
    generator = torch.Generator().manual_seed(seed)
    length = cfg.max_length
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=generator, dtype=torch.int32)
    mask = torch.ones(batch, length)
    for row in range(1, batch):
        mask[row, length - (3 if row == 1 else 7) :] = 0.0
    return ids, mask


def loaded_encoder(cfg: T5Config, seed: int = 0) -> T5Encoder:
    torch.manual_seed(seed)
    return T5Encoder(cfg).eval()


def part_state(part: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``full`` that ``part`` declares, as a chunk loader selects them."""
    return {key: full[key] for key in part.state_dict()}


# --- numerical equality with transformers -------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY_LONG], ids=["tiny", "tiny-long"])
def test_encoder_matches_transformers(cfg: T5Config) -> None:
    torch.manual_seed(0)
    reference = T5EncoderModel(hf_config(cfg)).eval()
    ours = T5Encoder(cfg).eval()
    ours.load_state_dict(remap_t5_state_dict(reference.state_dict()), strict=True)
    ids, mask = random_inputs(cfg, batch=3)

    with torch.no_grad():
        expected = reference(input_ids=ids.long(), attention_mask=mask.long()).last_hidden_state
        actual = ours(ids, mask)

    valid = mask.bool()
    assert actual.dtype == torch.float32
    assert actual.shape == (3, cfg.max_length, cfg.d_model)
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_full_encoder_decoder_checkpoint_loads_encoder_only() -> None:
    """A T5ForConditionalGeneration state dict (decoder, lm_head, tied embed_tokens) loads."""
    torch.manual_seed(0)
    reference = T5ForConditionalGeneration(hf_config(TINY, tie_word_embeddings=False)).eval()
    checkpoint = reference.state_dict()
    assert any(key.startswith("decoder.") for key in checkpoint)
    ours = T5Encoder(TINY).eval()
    ours.load_state_dict(remap_t5_state_dict(checkpoint), strict=True)
    ids, mask = random_inputs(TINY)

    with torch.no_grad():
        expected = reference.encoder(input_ids=ids.long(), attention_mask=mask.long())
        actual = ours(ids, mask)

    valid = mask.bool()
    torch.testing.assert_close(
        actual[valid], expected.last_hidden_state[valid], atol=1e-5, rtol=1e-5
    )


def test_normalize_t5_keys_uses_tied_copy_when_shared_is_absent() -> None:
    keys = [
        "encoder.embed_tokens.weight",
        "encoder.final_layer_norm.weight",
        "decoder.embed_tokens.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
        "lm_head.weight",
        "something.unknown",
    ]
    assert normalize_t5_keys(keys) == {
        "shared.weight": "encoder.embed_tokens.weight",
        "encoder.final_layer_norm.weight": "encoder.final_layer_norm.weight",
        "something.unknown": "something.unknown",
    }
    both = normalize_t5_keys(["encoder.embed_tokens.weight", "shared.weight"])
    assert both == {"shared.weight": "shared.weight"}


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 320),
    half_buckets=st.integers(2, 32),
    max_distance=st.integers(2, 256),
)
def test_bucket_table_matches_transformers(
    length: int, half_buckets: int, max_distance: int
) -> None:
    num_buckets = 2 * half_buckets
    positions = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None],
        bidirectional=True,
        num_buckets=num_buckets,
        max_distance=max(max_distance, half_buckets // 2 + 1),
    )
    actual = relative_position_buckets(
        length, num_buckets, max(max_distance, half_buckets // 2 + 1)
    )
    assert torch.equal(actual, expected)


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(18, 128), (38, 288), (102, 36)])
def test_bucket_table_uses_float32_rounding(num_buckets: int, max_distance: int) -> None:
    """For these settings float64 logs truncate some offsets into a different bucket than
    the float32 arithmetic of transformers (e.g. offset 8 with 18 buckets, distance 128)."""
    length = 2 * max_distance
    positions = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None],
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert torch.equal(relative_position_buckets(length, num_buckets, max_distance), expected)


def test_bucket_table_full_size_matches_transformers() -> None:
    """The exact table the exported T5-XXL embeds (300 tokens, 32 buckets, distance 128)."""
    full = T5_CONFIGS["full"]
    positions = torch.arange(full.max_length)
    expected = T5Attention._relative_position_bucket(positions[None, :] - positions[:, None])
    actual = relative_position_buckets(full.max_length)
    assert torch.equal(actual, expected)
    assert int(actual.min()) == 0 and int(actual.max()) == 31


# --- composition and loading ---------------------------------------------------------------


def test_chained_parts_equal_encoder() -> None:
    encoder = loaded_encoder(TINY_LONG)
    checkpoint = encoder.state_dict()
    # Budget for two blocks per chunk: groups (0, 2), (2, 4).
    ranges = split_blocks(TINY_LONG, 2 * TINY_LONG.param_count_block())
    assert ranges == [(0, 2), (2, 4)]

    embed = T5Embed(TINY_LONG).eval()
    embed.load_state_dict(part_state(embed, checkpoint), strict=True)
    groups = []
    for start, stop in ranges:
        group = T5Blocks(TINY_LONG, start, stop).eval()
        group.load_state_dict(part_state(group, checkpoint), strict=True)
        groups.append(group)
    final_norm = T5FinalNorm(TINY_LONG).eval()
    final_norm.load_state_dict(part_state(final_norm, checkpoint), strict=True)
    ids, mask = random_inputs(TINY_LONG)

    with torch.no_grad():
        hidden, position_bias = embed(ids, mask)
        for group in groups:
            hidden = group(hidden, position_bias)
        chained = final_norm(hidden)
        whole = encoder(ids, mask)

    assert position_bias.shape == (2, TINY_LONG.num_heads, 40, 40)
    torch.testing.assert_close(chained, whole, atol=0.0, rtol=0.0)


def test_parts_partition_the_encoder_keys() -> None:
    checkpoint_keys = set(loaded_encoder(TINY).state_dict())
    part_keys = [
        set(T5Embed(TINY).state_dict()),
        *(set(T5Blocks(TINY, i, i + 1).state_dict()) for i in range(TINY.num_layers)),
        set(T5FinalNorm(TINY).state_dict()),
    ]
    assert set().union(*part_keys) == checkpoint_keys
    assert sum(len(keys) for keys in part_keys) == len(checkpoint_keys)
    assert "encoder.block.3.layer.1.DenseReluDense.wo.weight" in part_keys[4]


def test_loading_is_strict_about_missing_unexpected_and_shape() -> None:
    checkpoint = loaded_encoder(TINY).state_dict()

    missing = dict(checkpoint)
    del missing["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*: "encoder\.block\.2\.layer\.1'):
        T5Encoder(TINY).load_state_dict(missing, strict=True)

    unexpected = dict(checkpoint)
    unexpected["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        torch.zeros(32, 2)
    )
    with pytest.raises(
        RuntimeError, match=r'Unexpected key\(s\).*: "encoder\.block\.1\.layer\.0\.SelfA'
    ):
        T5Encoder(TINY).load_state_dict(unexpected, strict=True)

    wrong_shape = dict(checkpoint)
    wrong_shape["shared.weight"] = torch.zeros(TINY.vocab_size + 1, TINY.d_model)
    with pytest.raises(RuntimeError, match=r"size mismatch for (embed\.)?shared\.weight"):
        T5Encoder(TINY).load_state_dict(wrong_shape, strict=True)

    blocks = T5Blocks(TINY, 1, 3)
    with pytest.raises(RuntimeError, match=r"Missing key.*block\.2"):
        blocks.load_state_dict(
            {k: v for k, v in part_state(blocks, checkpoint).items() if ".2." not in k}
        )


def test_encoder_keys_stay_flat_when_nested() -> None:
    """Inside a parent module the flat layout gets the parent's prefix, and loads back."""
    parent = torch.nn.Module()
    parent.text_encoder = loaded_encoder(TINY)
    state = parent.state_dict()
    assert "text_encoder.shared.weight" in state
    assert "text_encoder.encoder.final_layer_norm.weight" in state
    assert not any(".embed." in key or ".blocks." in key for key in state)

    other = torch.nn.Module()
    other.text_encoder = T5Encoder(TINY)
    other.load_state_dict(state, strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key

    del state["text_encoder.encoder.block.0.layer.0.layer_norm.weight"]
    with pytest.raises(RuntimeError, match=r'"text_encoder\.encoder\.block\.0\.layer\.0\.layer_'):
        other.load_state_dict(state, strict=True)


def test_meta_construction_then_assign_loads_working_modules() -> None:
    """The lazy-loading path: build on meta, load only this part's weights, run."""
    encoder = loaded_encoder(TINY)
    checkpoint = encoder.state_dict()
    with torch.device("meta"):
        embed = T5Embed(TINY)
        blocks = T5Blocks(TINY, 0, TINY.num_layers)
        final_norm = T5FinalNorm(TINY)
    for part in (embed, blocks, final_norm):
        part.load_state_dict(part_state(part, checkpoint), strict=True, assign=True)
        part.eval()
    ids, mask = random_inputs(TINY)

    with torch.no_grad():
        actual = final_norm(blocks(*embed(ids, mask)))
        expected = encoder(ids, mask)

    torch.testing.assert_close(actual, expected, atol=0.0, rtol=0.0)


# --- sizes and chunking ----------------------------------------------------------------------


def test_full_config_parameter_count_on_meta() -> None:
    full = T5_CONFIGS["full"]
    with torch.device("meta"):
        encoder = T5Encoder(full)
    count = sum(p.numel() for p in encoder.parameters())
    # opensora-v1.2.md section 4: 4,762,310,656 (shared embedding counted once).
    assert count == 4_762_310_656 == full.param_count_total()
    assert sum(p.numel() for p in encoder.embed.parameters()) == full.param_count_embedding()
    block_counts = {
        sum(p.numel() for p in b.parameters()) for b in encoder.blocks.encoder.block.values()
    }
    assert block_counts == {full.param_count_block()} == {192_946_176}

    shapes = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert len(shapes) == 24 * 9 + 3
    assert shapes["shared.weight"] == (32128, 4096)
    assert shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (
        32,
        64,
    )
    assert shapes["encoder.block.23.layer.0.SelfAttention.q.weight"] == (4096, 4096)
    assert shapes["encoder.block.5.layer.1.DenseReluDense.wi_0.weight"] == (10240, 4096)
    assert shapes["encoder.block.5.layer.1.DenseReluDense.wo.weight"] == (4096, 10240)
    assert shapes["encoder.final_layer_norm.weight"] == (4096,)


@settings(max_examples=60, deadline=None)
@given(
    num_layers=st.integers(1, 48),
    d_model=st.integers(1, 16),
    d_ff=st.integers(1, 32),
    budget_blocks=st.floats(1.0, 60.0),
)
def test_split_blocks_properties(
    num_layers: int, d_model: int, d_ff: int, budget_blocks: float
) -> None:
    cfg = T5Config(
        vocab_size=8, d_model=d_model, d_kv=2, d_ff=d_ff, num_layers=num_layers, num_heads=2
    )
    per_block = cfg.param_count_block()
    budget = int(per_block * budget_blocks)
    ranges = split_blocks(cfg, budget)

    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(stop - start >= 1 for start, stop in ranges)
    assert all((stop - start) * per_block <= budget for start, stop in ranges)
    # Fewest chunks possible for equal-sized blocks.
    assert len(ranges) == math.ceil(num_layers / (budget // per_block))


def test_split_blocks_rejects_budget_below_one_block() -> None:
    with pytest.raises(ValueError, match="more than the chunk budget"):
        split_blocks(TINY, TINY.param_count_block() - 1)


def test_split_blocks_full_size_example() -> None:
    # ~1 GB fp16 chunks: 2 blocks (386M params) fit under 400M, so 12 chunks of 2.
    ranges = split_blocks(T5_CONFIGS["full"], 400_000_000)
    assert ranges == [(i, i + 2) for i in range(0, 24, 2)]


# --- masking ---------------------------------------------------------------------------------


def test_padded_tokens_do_not_change_valid_outputs() -> None:
    encoder = loaded_encoder(TINY_LONG)
    ids, mask = random_inputs(TINY_LONG)
    other_ids = ids.clone()
    other_ids[mask == 0] = (other_ids[mask == 0] + 5) % TINY_LONG.vocab_size

    with torch.no_grad():
        first = encoder(ids, mask)
        second = encoder(other_ids, mask)

    valid = mask.bool()
    # Exactly equal: exp(MASK_BIAS) underflows to 0, so padded keys have zero weight.
    torch.testing.assert_close(first[valid], second[valid], atol=0.0, rtol=0.0)
    assert not torch.equal(first[~valid], second[~valid])


def test_position_bias_stays_finite_in_fp16() -> None:
    embed = loaded_encoder(TINY).embed.half()
    ids, mask = random_inputs(TINY)
    with torch.no_grad():
        hidden, position_bias = embed(ids, mask.half())
    assert hidden.dtype == position_bias.dtype == torch.float16
    assert torch.isfinite(position_bias).all()
    padded_bias = position_bias[1, :, :, -1]
    assert (padded_bias < MASK_BIAS / 2).all()


def test_int32_and_int64_ids_agree() -> None:
    encoder = loaded_encoder(TINY)
    ids, mask = random_inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), encoder(ids.long(), mask), atol=0, rtol=0)


def test_shorter_sequences_allowed_longer_rejected() -> None:
    encoder = loaded_encoder(TINY)
    ids, mask = random_inputs(TINY)
    with torch.no_grad():
        assert encoder(ids[:, :5], mask[:, :5]).shape == (2, 5, TINY.d_model)
    too_long = torch.zeros(1, TINY.max_length + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"exceeds T5Config\.max_length"):
        encoder(too_long, torch.ones(1, TINY.max_length + 1))


def test_block_range_validated() -> None:
    with pytest.raises(ValueError, match="block range"):
        T5Blocks(TINY, 2, 2)
    with pytest.raises(ValueError, match="block range"):
        T5Blocks(TINY, 0, TINY.num_layers + 1)


# --- fp16 overflow ---------------------------------------------------------------------------


def _run_recording_wo(
    blocks: T5Blocks, block_index: int, hidden: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks output plus the input and output of ``wo`` in block ``block_index``."""
    seen: dict[str, torch.Tensor] = {}

    def record(_module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0], output

    wo = blocks.block(block_index).layer[1].DenseReluDense.wo
    handle = wo.register_forward_hook(record)
    try:
        with torch.no_grad():
            out = blocks(hidden, bias)
    finally:
        handle.remove()
    return out, seen["input"], seen["output"]


def test_fp16_overflow_demonstration() -> None:
    encoder = loaded_encoder(TINY)
    ids, mask = random_inputs(TINY)
    with torch.no_grad():
        hidden, bias = encoder.embed(ids, mask)
    blocks = encoder.blocks
    _, _, wo_before = _run_recording_wo(blocks, 1, hidden, bias)

    # Unscaled, the fp16 run is finite: the failure below is caused by the scaling.
    clean_half = copy.deepcopy(blocks).half()
    clean_out, _, _ = _run_recording_wo(clean_half, 1, hidden.half(), bias.half())
    assert torch.isfinite(clean_out).all()

    factor = 1.0e5
    make_fp16_overflowing(encoder, 1, factor)

    out32, _, wo32 = _run_recording_wo(blocks, 1, hidden, bias)
    assert torch.isfinite(out32).all()
    assert torch.isfinite(encoder(ids, mask)).all()
    assert wo32.abs().max() > torch.finfo(torch.float16).max
    torch.testing.assert_close(wo32 / factor, wo_before, rtol=1e-4, atol=1e-5)

    half = copy.deepcopy(blocks).half()
    assert all(torch.isfinite(p).all() for p in half.parameters())
    out16, wo_in16, wo_out16 = _run_recording_wo(half, 1, hidden.half(), bias.half())
    assert torch.isfinite(wo_in16).all()  # the overflow happens in wo, not before it
    assert torch.isinf(wo_out16).any()
    assert not torch.isfinite(out16).all()


def test_make_fp16_overflowing_is_deterministic_and_range_checked() -> None:
    first, second = loaded_encoder(TINY), loaded_encoder(TINY)
    make_fp16_overflowing(first, 2, 49.0)
    make_fp16_overflowing(second.blocks, 2, 49.0)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    untouched = loaded_encoder(TINY).state_dict()
    wo_key = "encoder.block.2.layer.1.DenseReluDense.wo.weight"
    torch.testing.assert_close(first.state_dict()[wo_key], untouched[wo_key] * 7.0)

    with pytest.raises(ValueError, match="not in this module's range"):
        make_fp16_overflowing(T5Blocks(TINY, 0, 2), 3, 10.0)
    with pytest.raises(ValueError, match="factor must be positive"):
        make_fp16_overflowing(first, 2, 0.0)


# --- export ----------------------------------------------------------------------------------


def test_torch_export_of_blocks_embed_and_norm() -> None:
    encoder = loaded_encoder(TINY)
    ids, mask = random_inputs(TINY)
    with torch.no_grad():
        hidden, bias = encoder.embed(ids, mask)
        blocks = T5Blocks(TINY, 1, 3).eval()
        blocks.load_state_dict(part_state(blocks, encoder.state_dict()))

        program = torch.export.export(blocks, (hidden, bias)).run_decompositions({})
        torch.testing.assert_close(program.module()(hidden, bias), blocks(hidden, bias))

        embed_program = torch.export.export(encoder.embed, (ids, mask)).run_decompositions({})
        for exported, eager in zip(embed_program.module()(ids, mask), (hidden, bias), strict=True):
            torch.testing.assert_close(exported, eager)

        norm_program = torch.export.export(encoder.final_norm, (hidden,))
        torch.testing.assert_close(norm_program.module()(hidden), encoder.final_norm(hidden))

    user_inputs = [spec.arg.name for spec in embed_program.graph_signature.input_specs]
    assert "input_ids" in user_inputs
