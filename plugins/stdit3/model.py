"""STDiT3 (Open-Sora v1.2's diffusion transformer) as export-ready chunk parts.

Video tokens travel between the parts in the frame layout ``[B, T, H', W', C]``, and every
:class:`STDiT3Block` is three separate sub-steps, each a method that takes and returns that
layout: :meth:`STDiT3Block.self_attention_step` (reshapes to per-frame sequences
``[B*T, H'*W', C]`` for a spatial block or per-position sequences ``[B*H'*W', T, C]`` for a
temporal one and calls ``self.attn``), :meth:`STDiT3Block.cross_attention_step` (flattens to
``[B, T*H'*W', C]`` and calls ``self.cross_attn``) and :meth:`STDiT3Block.mlp_step` (calls
``self.mlp`` per token). The modulation, gating and residual additions stay in
:meth:`STDiT3Block.forward`, outside the steps. A token-merging patch (TDTM) can therefore
wrap a step: average consecutive frames of its input (``T -> T/2`` on axis 1), call the
original step, and copy each merged frame back to both of its source frames, without
knowing anything about spatial vs temporal reshapes, heads or weights.

The whole model, :class:`STDiT3`, is literally :class:`STDiT3Input` ->
:class:`STDiT3Blocks` ``(0, depth)`` -> :class:`STDiT3Output` sharing the same submodules,
so chaining separately exported chunks computes the unchunked model by construction. Each
part's ``state_dict`` keys are exactly Open-Sora's checkpoint keys for the weights it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import torch
from torch import Tensor, nn

from sora_export.plugins.stdit3.layers import (
    FREQUENCY_EMBEDDING_SIZE,
    TEXT_MASK_BIAS,
    CaptionEmbedder,
    CrossAttention,
    Mlp,
    PatchEmbed3D,
    SelfAttention,
    T2IFinalLayer,
    TimestepEmbedder,
    position_embedding_2d,
    rope_inv_freq,
    t2i_modulate,
    unpatchify,
)

#: Checkpoint keys that Open-Sora writes but that hold no learned state here: the RoPE
#: frequencies are fixed (``rope_inv_freq``) and recomputed in the graph.
OPTIONAL_KEYS: tuple[str, ...] = ("rope.freqs",)


@attrs.frozen
class STDiT3Config:
    """Architecture hyper-parameters of STDiT3 (defaults: Open-Sora v1.2 except size).

    ``out_channels`` is 8 because Open-Sora predicts sigma too (``pred_sigma=True``); the
    sampler keeps channels 0-3.
    """

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 4
    out_channels: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def param_count_block(self) -> int:
        """Parameters of one spatial or temporal block (both have the same)."""
        c, m = self.hidden_size, self.mlp_hidden
        table = 6 * c
        self_attn = (3 * c * c + 3 * c) + (c * c + c)
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        cross_attn = (c * c + c) + (2 * c * c + 2 * c) + (c * c + c)
        mlp = (m * c + m) + (c * m + c)
        return table + self_attn + qk_norm + cross_attn + mlp

    def param_count_block_pair(self) -> int:
        """State-dict elements of one spatial + temporal block pair."""
        return 2 * self.param_count_block()

    def param_count_input(self) -> int:
        """State-dict elements of :class:`STDiT3Input`.

        Includes the ``y_embedding`` buffer (the null caption), because a checkpoint
        carries it and the input chunk must hold it in memory like any weight.
        """
        c = self.hidden_size
        patch = c * self.in_channels * self.patch_volume + c
        embedder = (FREQUENCY_EMBEDDING_SIZE * c + c) + (c * c + c)  # timestep and fps alike
        t_block = 6 * c * c + 6 * c
        caption = (self.caption_channels * c + c) + (c * c + c)
        null_caption = self.model_max_length * self.caption_channels
        return patch + 2 * embedder + t_block + caption + null_caption

    def param_count_output(self) -> int:
        """State-dict elements of :class:`STDiT3Output`."""
        c = self.hidden_size
        features = self.patch_volume * self.out_channels
        return 2 * c + c * features + features

    def param_count_total(self) -> int:
        """State-dict elements of the whole model (``rope.freqs`` excluded)."""
        return (
            self.param_count_input()
            + self.depth * self.param_count_block_pair()
            + self.param_count_output()
        )


STDIT3_CONFIGS: dict[str, STDiT3Config] = {
    # Small enough to build, run and export in a couple of seconds; captions are as wide
    # as the tiny T5's output (d_model 64, 16 tokens) so tiny pipelines chain.
    "tiny": STDiT3Config(
        depth=4, hidden_size=64, num_heads=4, caption_channels=64, model_max_length=16
    ),
    # STDiT3-XL/2 as released ("OpenSora-STDiT-v3").
    "full": STDiT3Config(depth=28, hidden_size=1152, num_heads=16),
}


def split_block_pairs(cfg: STDiT3Config, max_params_per_chunk: int) -> list[tuple[int, int]]:
    """Greedy ``(start, stop)`` ranges of block pairs covering ``0..cfg.depth``.

    Consecutive and non-overlapping; each chunk holds as many pairs as fit in
    ``max_params_per_chunk`` state-dict elements, but always at least one pair (a budget
    smaller than one pair yields one pair per chunk).
    """
    if max_params_per_chunk <= 0:
        raise ValueError(f"max_params_per_chunk must be positive, got {max_params_per_chunk}")
    per_chunk = max(1, max_params_per_chunk // cfg.param_count_block_pair())
    return [(start, min(start + per_chunk, cfg.depth)) for start in range(0, cfg.depth, per_chunk)]


def drop_optional_keys(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A copy of ``state_dict`` without :data:`OPTIONAL_KEYS` (under ``prefix``).

    For callers that compare key sets themselves; ``load_state_dict`` on the modules in this
    file already accepts those keys (and checks their values).
    """
    optional = {prefix + key for key in OPTIONAL_KEYS}
    return {key: value for key, value in state_dict.items() if key not in optional}


class _AcceptsOptionalKeys(nn.Module):
    """Lets ``load_state_dict(strict=True)`` accept Open-Sora's ``rope.freqs`` if present.

    The key is consumed only when its values are the fixed RoPE frequencies; anything else
    is reported as a load error rather than silently ignored. Subclasses set ``self.cfg``.
    """

    cfg: STDiT3Config

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        key = prefix + "rope.freqs"
        if key in state_dict:
            freqs = state_dict[key]
            head_dim = self.cfg.head_dim
            if freqs.device.type != "meta":
                expected = rope_inv_freq(head_dim)
                if freqs.shape != expected.shape or not torch.allclose(
                    freqs.detach().to("cpu", torch.float32), expected, rtol=1e-3, atol=0.0
                ):
                    error_msgs.append(
                        f"{key}: expected the fixed RoPE frequencies 10000^(-2i/{head_dim}) "
                        f"of shape {tuple(expected.shape)}, got other values or shape "
                        f"{tuple(freqs.shape)}"
                    )
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class STDiT3Block(nn.Module):
    """One spatial (``temporal=False``) or temporal (``temporal=True``) transformer block.

    Operates on tokens ``[B, T, H', W', C]``; see the module docstring for the three
    sub-steps. Keys: ``scale_shift_table``, ``attn.*``, ``cross_attn.*``, ``mlp.*``.
    """

    def __init__(self, cfg: STDiT3Config, temporal: bool) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(c, cfg.num_heads, qk_norm=cfg.qk_norm, rope=temporal)
        self.cross_attn = CrossAttention(c, cfg.num_heads)
        self.norm2 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(c, cfg.mlp_hidden, c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def self_attention_step(self, x: Tensor) -> Tensor:
        """``self.attn`` over frames (spatial) or over time (temporal); layout kept."""
        batch, frames, rows, cols, dim = x.shape
        if self.temporal:
            seq = x.permute(0, 2, 3, 1, 4).reshape(batch * rows * cols, frames, dim)
            out = self.attn(seq).reshape(batch, rows, cols, frames, dim)
            return out.permute(0, 3, 1, 2, 4)
        seq = x.reshape(batch * frames, rows * cols, dim)
        return self.attn(seq).reshape(batch, frames, rows, cols, dim)

    def cross_attention_step(self, x: Tensor, y_tokens: Tensor, y_bias: Tensor) -> Tensor:
        """``self.cross_attn`` from all tokens of a sample to its text; layout kept."""
        batch, frames, rows, cols, dim = x.shape
        out = self.cross_attn(x.reshape(batch, frames * rows * cols, dim), y_tokens, y_bias)
        return out.reshape(batch, frames, rows, cols, dim)

    def mlp_step(self, x: Tensor) -> Tensor:
        """``self.mlp`` applied per token; layout kept."""
        return self.mlp(x)

    def forward(self, x: Tensor, t_mlp: Tensor, y_tokens: Tensor, y_bias: Tensor) -> Tensor:
        """``x`` [B,T,H',W',C], ``t_mlp`` [B,6C], ``y_tokens`` [B,L,C], ``y_bias`` [B,1,1,L]."""
        batch = x.shape[0]
        modulation = self.scale_shift_table[None] + t_mlp.reshape(batch, 6, -1)
        # Each [B, 1, C] -> [B, 1, 1, 1, C] to broadcast over the (T, H', W') grid.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            part[:, None, None] for part in modulation.chunk(6, dim=1)
        )
        x = x + gate_msa * self.self_attention_step(
            t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        )
        x = x + self.cross_attention_step(x, y_tokens, y_bias)
        return x + gate_mlp * self.mlp_step(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class STDiT3Input(_AcceptsOptionalKeys):
    """Embeddings: patches + position, timestep + fps, caption, and the text mask bias.

    Keys: ``x_embedder.*``, ``t_embedder.*``, ``fps_embedder.*``, ``t_block.1.*``,
    ``y_embedder.*`` (including the ``y_embedding`` null caption).
    """

    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.model_max_length)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor,
        fps: Tensor,
        height: Tensor,
        width: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Embed the model inputs.

        Args: ``x`` [B, in, T, H, W] latent; ``timestep`` [B] in 0..1000; ``y``
        [B, 1, L, caption_channels]; ``mask`` [B, L] 1 for valid text tokens, 0 for padding
        (any position, not only a suffix); ``fps``, ``height``, ``width`` [B] (pixel sizes).

        Returns ``(tokens, t, t_mlp, y_tokens, y_bias)``: tokens [B, T', H', W', C] with the
        position embedding added; t [B, C] (timestep + fps embedding, for the output part);
        t_mlp [B, 6C] (block modulation); y_tokens [B, L, C]; y_bias [B, 1, 1, L], 0 for
        valid tokens and :data:`TEXT_MASK_BIAS` for padding.
        """
        dtype = self.x_embedder.proj.weight.dtype
        tokens = self.x_embedder(x.to(dtype))
        _, _, rows, cols, dim = tokens.shape
        pos = position_embedding_2d(rows, cols, height, width, dim, self.cfg.input_sq_size)
        tokens = tokens + pos[:, None].to(dtype)

        t = self.t_embedder(timestep) + self.fps_embedder(fps)
        t_mlp = self.t_block(t)

        y_tokens = self.y_embedder(y.to(dtype)).squeeze(1)
        y_bias = ((1.0 - mask.to(torch.float32)) * TEXT_MASK_BIAS)[:, None, None, :]
        # Contiguous outputs, so they can serve directly as example inputs of the next chunk's
        # capture (Core ML rejects inputs with a permuted dim order).
        return (
            tokens.contiguous(),
            t.contiguous(),
            t_mlp.contiguous(),
            y_tokens.contiguous(),
            y_bias.to(dtype).contiguous(),
        )


class STDiT3Blocks(_AcceptsOptionalKeys):
    """Block pairs ``start..stop-1``, each spatial ``i`` then temporal ``i``.

    Keys ``spatial_blocks.{i}.*`` and ``temporal_blocks.{i}.*`` with the global index ``i``.
    """

    def __init__(self, cfg: STDiT3Config, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop <= cfg.depth:
            raise ValueError(f"block range {start}..{stop} is not within 0..{cfg.depth}")
        self.cfg = cfg
        self.start, self.stop = start, stop
        indices = [str(i) for i in range(start, stop)]
        self.spatial_blocks = nn.ModuleDict({i: STDiT3Block(cfg, temporal=False) for i in indices})
        self.temporal_blocks = nn.ModuleDict({i: STDiT3Block(cfg, temporal=True) for i in indices})

    def forward(self, tokens: Tensor, t_mlp: Tensor, y_tokens: Tensor, y_bias: Tensor) -> Tensor:
        """Run the pairs in order; ``tokens`` [B, T', H', W', C] in and out."""
        for index in range(self.start, self.stop):
            tokens = self.spatial_blocks[str(index)](tokens, t_mlp, y_tokens, y_bias)
            tokens = self.temporal_blocks[str(index)](tokens, t_mlp, y_tokens, y_bias)
        return tokens.contiguous()


class STDiT3Output(_AcceptsOptionalKeys):
    """Final layer and unpatchify to ``[B, out_channels, T, H, W]`` in fp32.

    Keys ``final_layer.*``. ``latent_hw`` is the latent (H, W) to crop to, undoing the
    patch embedder's padding of odd sizes; ``None`` keeps the padded size. Time is never
    cropped (Open-Sora v1.2's temporal patch is 1).
    """

    def __init__(self, cfg: STDiT3Config, latent_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_hw = latent_hw
        self.final_layer = T2IFinalLayer(cfg.hidden_size, cfg.patch_volume, cfg.out_channels)

    def forward(
        self, tokens: Tensor, t: Tensor, latent_hw: tuple[int, int] | None = None
    ) -> Tensor:
        """``tokens`` [B, T', H', W', C], ``t`` [B, C] -> [B, out, T, H, W] fp32.

        ``latent_hw`` overrides the crop target given at construction.
        """
        features = self.final_layer(tokens, t)
        video = unpatchify(features, self.cfg.patch_size, self.cfg.out_channels)
        crop = latent_hw if latent_hw is not None else self.latent_hw
        if crop is not None:
            video = video[:, :, :, : crop[0], : crop[1]]
        return video.to(torch.float32).contiguous()


class STDiT3(_AcceptsOptionalKeys):
    """The whole STDiT3: :class:`STDiT3Input` -> :class:`STDiT3Blocks` -> :class:`STDiT3Output`.

    The parts' submodules are registered directly on this module, so its ``state_dict``
    keys are exactly Open-Sora's (``rope.freqs`` is accepted on load but not produced).
    Weights are initialised randomly (PyTorch defaults, random modulation tables), not with
    upstream's training init, which zeroes some projections and would hide wiring errors.
    Conditioning frames (upstream's ``x_mask``) are not supported: plain text-to-video only.
    """

    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        # A plain tuple is not registered as a submodule; the parts' children are registered
        # below under their checkpoint names and shared with the parts.
        self._parts = (
            STDiT3Input(cfg),
            STDiT3Blocks(cfg, 0, cfg.depth),
            STDiT3Output(cfg),
        )
        for part in self._parts:
            for name, child in part.named_children():
                self.add_module(name, child)

    @property
    def input_part(self) -> STDiT3Input:
        return self._parts[0]

    @property
    def blocks_part(self) -> STDiT3Blocks:
        return self._parts[1]

    @property
    def output_part(self) -> STDiT3Output:
        return self._parts[2]

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor,
        fps: Tensor,
        height: Tensor,
        width: Tensor,
    ) -> Tensor:
        """Velocity prediction ``[B, out_channels, T, H, W]`` (fp32) for latent ``x``.

        Inputs as :meth:`STDiT3Input.forward`; the output is cropped to ``x``'s size.
        """
        tokens, t, t_mlp, y_tokens, y_bias = self.input_part(
            x, timestep, y, mask, fps, height, width
        )
        tokens = self.blocks_part(tokens, t_mlp, y_tokens, y_bias)
        return self.output_part(tokens, t, latent_hw=(x.shape[3], x.shape[4]))
