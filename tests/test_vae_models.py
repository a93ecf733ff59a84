"""Tests for the Open-Sora v1.2 VAE decoders (temporal + spatial), tiny configs unless noted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sora_export.plugins.vae.spatial import (
    SPATIAL_VAE_CONFIGS,
    SpatialAttention,
    SpatialVAEConfig,
    SpatialVAEDecoder,
    build_spatial_chunk,
    build_spatial_stage,
    decode_video,
    spatial_stage_names,
    spatial_stage_param_count,
    spatial_stage_shapes,
)
from sora_export.plugins.vae.temporal import (
    TEMPORAL_VAE_CONFIGS,
    CausalConv3d,
    TemporalVAEConfig,
    TemporalVAEDecoder,
    build_temporal_chunk,
    build_temporal_stage,
    depth_to_time,
    temporal_stage_names,
    temporal_stage_param_count,
    temporal_stage_shapes,
)

TINY_T = TEMPORAL_VAE_CONFIGS["tiny"]
TINY_S = SPATIAL_VAE_CONFIGS["tiny"]
FULL_T = TEMPORAL_VAE_CONFIGS["full"]
FULL_S = SPATIAL_VAE_CONFIGS["full"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny convolutions are dominated by thread hand-off on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _seeded_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint-like state dict: every parameter random (norm affines included)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key in ("shift", "scale"):
            state[key] = value.clone()
        elif value.ndim == 1 and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif value.ndim == 1:
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
    return state


def _load_stage(stage: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    subset = {k: state[k] for k in stage.state_dict()}
    stage.load_state_dict(subset, strict=True)
    return stage.eval()


# --------------------------------------------------------------------------- stage chaining


def test_temporal_stages_chain_equals_whole_decoder() -> None:
    torch.manual_seed(0)
    whole = TemporalVAEDecoder(TINY_T).eval()
    state = _seeded_state(whole, seed=1)
    whole.load_state_dict(state, strict=True)
    stages = [
        _load_stage(build_temporal_stage(TINY_T, n), state) for n in temporal_stage_names(TINY_T)
    ]

    stage_keys = [set(s.state_dict()) for s in stages]
    assert set().union(*stage_keys) == set(state)
    assert sum(len(k) for k in stage_keys) == len(state)  # disjoint

    z = torch.randn(2, 4, 5, 6, 5)
    with torch.no_grad():
        expected = whole(z)
        x = z
        for stage in stages:
            x = stage(x)
        fused = _load_stage(build_temporal_chunk(TINY_T, ["up.2", "up.1", "up.0"]), state)
        mid = stages[1](stages[0](z))
        via_chunk = stages[-1](fused(stages[2](mid)))
    assert expected.shape == (2, 4, 17, 6, 5)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_chunk, expected, rtol=0, atol=1e-6)


def test_spatial_stages_chain_equals_whole_decoder() -> None:
    torch.manual_seed(0)
    whole = SpatialVAEDecoder(TINY_S).eval()
    state = _seeded_state(whole, seed=2)
    whole.load_state_dict(state, strict=True)
    stages = [
        _load_stage(build_spatial_stage(TINY_S, n), state) for n in spatial_stage_names(TINY_S)
    ]

    stage_keys = [set(s.state_dict()) for s in stages]
    assert set().union(*stage_keys) == set(state)
    assert sum(len(k) for k in stage_keys) == len(state)

    x = torch.randn(3, 4, 5, 6)
    with torch.no_grad():
        expected = whole(x)
        y = x
        for stage in stages:
            y = stage(y)
        fused = _load_stage(build_spatial_chunk(TINY_S, ["in", "mid", "up.0"]), state)
        via_chunk = x
        for stage in [fused, *stages[3:]]:
            via_chunk = stage(via_chunk)
    assert expected.shape == (3, 3, 40, 48)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_chunk, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda names: build_temporal_chunk(TINY_T, names), ["res", "up.2"]),
        (lambda names: build_temporal_chunk(TINY_T, names), ["up.2", "up.3"]),
        (lambda names: build_temporal_chunk(TINY_T, names), ["up.9"]),
        (lambda names: build_spatial_chunk(TINY_S, names), ["mid", "in"]),
        (lambda names: build_spatial_chunk(TINY_S, names), []),
    ],
)
def test_chunks_must_be_known_consecutive_stages(build, names) -> None:
    with pytest.raises(ValueError, match="stage"):
        build(names)


# --------------------------------------------------------------------- full-size key layout


def _conv(cin: int, cout: int, k: int, dims: int, bias: bool = True) -> int:
    return cin * cout * k**dims + (cout if bias else 0)


def _expected_temporal_params(cfg: TemporalVAEConfig) -> int:
    """Independent count of VAE_Temporal's decoder + post_quant_conv, layer by layer."""

    def res(cin: int, cout: int) -> int:
        n = 2 * cin + _conv(cin, cout, 3, 3, False) + 2 * cout + _conv(cout, cout, 3, 3, False)
        return n + (_conv(cin, cout, 1, 3, False) if cin != cout else 0)

    lat, top = cfg.latent_channels, cfg.filters * cfg.channel_multipliers[-1]
    total = _conv(lat, lat, 1, 3) + _conv(lat, top, 3, 3)
    total += cfg.num_res_blocks * res(top, top)
    prev = top
    for i in reversed(range(len(cfg.channel_multipliers))):
        ch = cfg.filters * cfg.channel_multipliers[i]
        total += res(prev, ch) + (cfg.num_res_blocks - 1) * res(ch, ch)
        if i > 0 and cfg.temporal_downsample[i - 1]:
            total += _conv(ch, 2 * ch, 3, 3)
        prev = ch
    return total + 2 * prev + _conv(prev, cfg.out_channels, 3, 3)


def _expected_spatial_params(cfg: SpatialVAEConfig) -> int:
    """Independent count of diffusers' AutoencoderKL decoder + post_quant_conv."""

    def res(cin: int, cout: int) -> int:
        n = 2 * cin + _conv(cin, cout, 3, 2) + 2 * cout + _conv(cout, cout, 3, 2)
        return n + (_conv(cin, cout, 1, 2) if cin != cout else 0)

    lat, chans = cfg.latent_channels, list(cfg.block_out_channels)
    top = chans[-1]
    total = _conv(lat, lat, 1, 2) + _conv(lat, top, 3, 2)
    total += 2 * res(top, top) + 2 * top + 4 * (top * top + top)  # mid resnets + attention
    prev = top
    for i, ch in enumerate(reversed(chans)):
        total += res(prev, ch) + cfg.layers_per_block * res(ch, ch)
        if i < len(chans) - 1:
            total += _conv(ch, ch, 3, 2)
        prev = ch
    return total + 2 * prev + _conv(prev, cfg.out_channels, 3, 2)


def test_full_temporal_layout_on_meta() -> None:
    with torch.device("meta"):
        decoder = TemporalVAEDecoder(FULL_T)
    n_params = sum(p.numel() for p in decoder.parameters())
    assert n_params == 165_265_944 == _expected_temporal_params(FULL_T)
    per_stage = [temporal_stage_param_count(FULL_T, n) for n in temporal_stage_names(FULL_T)]
    assert sum(per_stage) == n_params
    assert all(count > 0 for count in per_stage)

    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert len(shapes) == 136  # 134 checkpoint decoder/post_quant keys + shift + scale
    expected = {
        "shift": (1, 4, 1, 1, 1),
        "scale": (1, 4, 1, 1, 1),
        "post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
        "post_quant_conv.conv.bias": (4,),
        "decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
        "decoder.conv1.conv.bias": (512,),
        "decoder.res_blocks.0.conv1.conv.weight": (512, 512, 3, 3, 3),
        "decoder.res_blocks.3.norm2.weight": (512,),
        "decoder.block_res_blocks.3.0.conv1.conv.weight": (512, 512, 3, 3, 3),
        "decoder.block_res_blocks.2.0.conv3.conv.weight": (256, 512, 1, 1, 1),
        "decoder.block_res_blocks.1.3.conv2.conv.weight": (256, 256, 3, 3, 3),
        "decoder.block_res_blocks.0.0.conv3.conv.weight": (128, 256, 1, 1, 1),
        "decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
        "decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
        "decoder.conv_blocks.1.conv.bias": (512,),
        "decoder.norm1.weight": (128,),
        "decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    absent = [
        "decoder.conv_blocks.0.conv.weight",
        "decoder.block_res_blocks.3.0.conv3.conv.weight",
        "decoder.res_blocks.0.conv1.conv.bias",
    ]
    assert not set(absent) & set(shapes)
    torch.testing.assert_close(
        TemporalVAEDecoder(TINY_T).shift.flatten(), torch.tensor([-0.10, 0.34, 0.27, 0.98])
    )


def test_full_spatial_layout_on_meta() -> None:
    with torch.device("meta"):
        decoder = SpatialVAEDecoder(FULL_S)
    n_params = sum(p.numel() for p in decoder.parameters())
    assert n_params == 49_490_199 == _expected_spatial_params(FULL_S)
    per_stage = [spatial_stage_param_count(FULL_S, n) for n in spatial_stage_names(FULL_S)]
    assert sum(per_stage) == n_params

    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert len(shapes) == 140
    expected = {
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid_block.attentions.0.group_norm.weight": (512,),
        "decoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "decoder.mid_block.attentions.0.to_v.bias": (512,),
        "decoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "decoder.mid_block.resnets.1.conv2.weight": (512, 512, 3, 3),
        "decoder.up_blocks.0.resnets.2.norm1.weight": (512,),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.3.resnets.0.conv1.weight": (128, 256, 3, 3),
        "decoder.conv_norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in shapes
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in shapes)


# ------------------------------------------------------------------------------ frame counts


def test_temporal_micro_chunk_gives_17_frames_and_honours_num_frames() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 4, 5, 3, 4)
    full = TemporalVAEDecoder(TINY_T, num_frames=20).eval()
    default = TemporalVAEDecoder(TINY_T).eval()
    default.load_state_dict(full.state_dict(), strict=True)
    with torch.no_grad():
        all_frames, kept = full(z), default(z)
    assert all_frames.shape == (1, 4, 20, 3, 4)
    assert kept.shape == (1, 4, 17, 3, 4)
    # Upstream drops from the front: the 17 kept are the last 17 of the 20.
    torch.testing.assert_close(kept, all_frames[:, :, 3:], rtol=0, atol=0)
    for bad in (16, 21):
        with pytest.raises(ValueError, match="num_frames"):
            TemporalVAEDecoder(TINY_T, num_frames=bad)


def test_decode_video_t15_gives_51_frames_with_real_tiny_models() -> None:
    torch.manual_seed(0)
    temporal, spatial = TemporalVAEDecoder(TINY_T).eval(), SpatialVAEDecoder(TINY_S).eval()
    z = torch.randn(1, 4, 15, 2, 3)
    with torch.no_grad():
        video = decode_video(temporal, spatial, z)
        padded = decode_video(temporal, spatial, z, micro_batch=4, static_batch=True)
        # Chunk 2 on its own must equal frames 17..33 of the video (chunks are independent).
        second = spatial(temporal(z[:, :, 5:10])[0].transpose(0, 1))
    assert video.shape == (1, 3, 51, 16, 24)
    torch.testing.assert_close(padded, video, rtol=0, atol=1e-5)
    torch.testing.assert_close(video[0, :, 17:34], second.transpose(0, 1), rtol=0, atol=1e-5)


def _fake_temporal(z: torch.Tensor) -> torch.Tensor:
    """Decoder stand-in with the real time layout: frame 4i+j <- latent i; drops 3 in front."""
    return z.repeat_interleave(4, dim=2)[:, :, 3:]


def _fake_spatial(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x[:, :3], scale_factor=8, mode="nearest")


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 23), batch=st.integers(1, 2), micro_batch=st.integers(1, 5))
def test_decode_video_frame_rule(t: int, batch: int, micro_batch: int) -> None:
    z = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(batch, 4, t, 2, 2)
    video = decode_video(_fake_temporal, _fake_spatial, z, micro_batch, static_batch=True)
    full, rest = divmod(t, 5)
    expected_frames = 17 * full + (4 * rest - 3 if rest else 0)
    assert video.shape == (batch, 3, expected_frames, 16, 16)
    # Each chunk: its first latent frame yields 1 video frame, every later one 4.
    expected_src = []
    for start in range(0, t, 5):
        n = min(5, t - start)
        expected_src += [start] + [start + i for i in range(1, n) for _ in range(4)]
    assert video[0, 0, :, 0, 0].tolist() == [float(s) for s in expected_src]


def test_decode_video_num_frames_follows_upstream_rule() -> None:
    z = torch.arange(7, dtype=torch.float32).view(1, 1, 7, 1, 1).expand(1, 4, 7, 1, 1)

    def undropped(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.repeat_interleave(4, dim=2)

    # 7 latents = 5 + 2; 23 frames = 17 + 6: upstream keeps the last 6 of 8 in chunk 2.
    video = decode_video(undropped, _fake_spatial, z, num_frames=23)
    assert video[0, 0, 17:, 0, 0].tolist() == [5.0, 5.0, 6.0, 6.0, 6.0, 6.0]
    with pytest.raises(ValueError, match="larger num_frames"):
        decode_video(_fake_temporal, _fake_spatial, z, num_frames=23)
    for bad in (20, 26, 40):
        with pytest.raises(ValueError, match="num_frames"):
            decode_video(undropped, _fake_spatial, z, num_frames=bad)


# ---------------------------------------------------------------------------- export + ops


@pytest.mark.parametrize(
    ("stage", "example"),
    [
        (lambda: build_temporal_stage(TINY_T, "up.3"), (1, 64, 5, 4, 4)),
        (lambda: build_temporal_stage(TINY_T, "out"), (1, 16, 20, 4, 4)),
        (lambda: build_spatial_stage(TINY_S, "mid"), (2, 32, 4, 4)),
        (lambda: build_spatial_stage(TINY_S, "up.0"), (2, 32, 4, 4)),
    ],
)
def test_torch_export_of_tiny_stage(stage, example) -> None:
    torch.manual_seed(0)
    module = stage().eval()
    x = torch.randn(example)
    program = torch.export.export(module, (x,)).run_decompositions({})
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), module(x), rtol=0, atol=1e-6)
    # Core ML handles at most rank-5 tensors; no intermediate may exceed that.
    ranks = [
        len(node.meta["val"].shape)
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor)
    ]
    assert max(ranks) <= 5


def test_stage_shapes_match_modules() -> None:
    torch.manual_seed(0)
    t_shapes = temporal_stage_shapes(TINY_T, (1, 4, 5, 3, 2))
    x = torch.randn(1, 4, 5, 3, 2)
    s_shapes = spatial_stage_shapes(TINY_S, (2, 4, 3, 2))
    y = torch.randn(2, 4, 3, 2)
    with torch.no_grad():
        for name in temporal_stage_names(TINY_T):
            assert tuple(x.shape) == t_shapes[name][0]
            x = build_temporal_stage(TINY_T, name)(x)
            assert tuple(x.shape) == t_shapes[name][1], name
        for name in spatial_stage_names(TINY_S):
            assert tuple(y.shape) == s_shapes[name][0]
            y = build_spatial_stage(TINY_S, name)(y)
            assert tuple(y.shape) == s_shapes[name][1], name
    full = temporal_stage_shapes(FULL_T, (1, 4, 5, 32, 32))
    assert full["up.3"][1] == (1, 512, 10, 32, 32)
    assert full["out"][1] == (1, 4, 17, 32, 32)
    assert spatial_stage_shapes(FULL_S, (4, 4, 32, 32))["out"][1] == (4, 3, 256, 256)


# --------------------------------------------------------------- golden pieces of behaviour


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 7), k=st.integers(0, 6), kt=st.sampled_from([1, 3]))
def test_causal_conv_output_ignores_future_frames(t: int, k: int, kt: int) -> None:
    k = min(k, t - 1)
    torch.manual_seed(t * 10 + k)
    conv = CausalConv3d(3, 2, (kt, 3, 3)).eval()
    x = torch.randn(1, 3, t, 4, 5)
    changed = x.clone()
    changed[:, :, k + 1 :] = torch.randn_like(changed[:, :, k + 1 :]) * 10
    with torch.no_grad():
        a, b = conv(x), conv(changed)
    assert a.shape == (1, 2, t, 4, 5)
    torch.testing.assert_close(a[:, :, : k + 1], b[:, :, : k + 1], rtol=0, atol=0)
    if k + 1 < t and kt > 1:
        assert not torch.equal(a[:, :, k + 1], b[:, :, k + 1])
    # Frame 0 sees zero padding in front: same as convolving a zero-prefixed clip.
    zero_front = F.pad(x, (1, 1, 1, 1, kt - 1, 0))
    ref = F.conv3d(zero_front, conv.conv.weight, conv.conv.bias)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 3),
    factor=st.sampled_from([1, 2, 4]),
    t=st.integers(1, 4),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
)
def test_depth_to_time_channel_layout(c: int, factor: int, t: int, h: int, w: int) -> None:
    x = torch.randn(2, c * factor, t, h, w)
    y = depth_to_time(x, factor)
    assert y.shape == (2, c, t * factor, h, w)
    # Layout (C, ts): input channel ci*factor + s at time ti -> channel ci, time ti*factor + s.
    for ci in range(c):
        for s in range(factor):
            for ti in range(t):
                assert torch.equal(y[:, ci, ti * factor + s], x[:, ci * factor + s, ti])


def test_spatial_attention_is_single_head_softmax_with_residual() -> None:
    torch.manual_seed(0)
    attn = SpatialAttention(16, TINY_S).eval()
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        tokens = attn.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
        ref = attn.to_out[0](weights @ v).transpose(1, 2).reshape(x.shape) + x
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_spatial_in_stage_divides_by_sd_scaling_factor() -> None:
    stage = build_spatial_stage(TINY_S, "in").eval()
    with torch.no_grad():
        stage.post_quant_conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        stage.post_quant_conv.bias.zero_()
        stage.decoder.conv_in.weight.zero_()
        stage.decoder.conv_in.weight[0, 0, 1, 1] = 1.0  # centre tap: channel 0 passthrough
        stage.decoder.conv_in.bias.zero_()
        x = torch.randn(1, 4, 3, 3)
        out = stage(x)
    torch.testing.assert_close(out[:, 0], x[:, 0] / 0.18215)
