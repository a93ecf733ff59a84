"""Building blocks of STDiT3, written for capture with ``torch.export``.

Every module here is weight-compatible with its Open-Sora v1.2 counterpart: its parameter
names and shapes are the checkpoint's. Every function is pure and shape-static: Python
control flow depends only on shapes and configuration, never on tensor values, and no input
is modified in place. Fixed tables (sin-cos frequencies, RoPE frequencies) are computed in
the graph from ``arange`` rather than stored as buffers, so a model built on the meta device
and filled by ``load_state_dict(..., assign=True)`` has nothing left uninitialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Additive attention bias for padded text tokens. It must stay finite in fp16 (max 65504):
#: ``torch.finfo(torch.float32).min`` becomes ``-inf`` once a converter casts the graph to
#: fp16, and ``-inf - (-inf)`` in the softmax's max-subtraction yields NaN. ``exp(-1e4)``
#: underflows to exactly 0 in fp16 and fp32 alike, so padded keys get zero weight, which is
#: what Open-Sora's packed (valid tokens only) attention computes.
TEXT_MASK_BIAS = -1.0e4

#: Width of the sinusoidal timestep (and fps) features fed to the embedder MLPs.
FREQUENCY_EMBEDDING_SIZE = 256


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of scalar timesteps, laid out ``[cos | sin]``.

    ``t`` is ``[B]`` (any float dtype, fractional values allowed); the result is ``[B, dim]``
    in fp32 with ``freqs_i = exp(-ln(max_period) * i / (dim // 2))``. Odd ``dim`` gets one
    trailing zero column, as upstream does.
    """
    half = dim // 2
    # Same operation order as upstream (scale the arange, then divide) for bitwise parity.
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_inv_freq(half_dim: int, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies ``10000^(-2k/half_dim)``, k = 0..half_dim/2-1, in fp32."""
    exponent = torch.arange(0, half_dim, 2, dtype=torch.float32, device=device) / half_dim
    return 1.0 / (10000.0**exponent)


def position_embedding_2d(
    grid_h: int,
    grid_w: int,
    height: Tensor,
    width: Tensor,
    dim: int,
    input_sq_size: int,
) -> Tensor:
    """Open-Sora's resolution-aware 2-D sin-cos embedding, ``[B, grid_h, grid_w, dim]`` fp32.

    ``height`` and ``width`` are ``[B]`` pixel sizes. With ``base = round(sqrt(h*w))`` and
    ``scale = sqrt(height*width) / input_sq_size``, a token in row ``r``, column ``c`` has
    coordinates ``row = r / scale * base / grid_h`` and ``col = c / scale * base / grid_w``.
    Channels ``[0, dim/2)`` encode ``col`` as ``[sin | cos]``, channels ``[dim/2, dim)``
    encode ``row`` the same way (upstream names them the other way round, but its meshgrid
    puts the column coordinate first).

    Upstream takes the scale from the first batch element only; here each sample uses its
    own size, which is identical whenever a batch shares one resolution (always the case in
    Open-Sora's sampler, including classifier-free guidance).
    """
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    base_size = round(math.sqrt(grid_h * grid_w))
    # sqrt(h)*sqrt(w) rather than sqrt(h*w): a 1080x1920 product overflows fp16.
    scale = (
        torch.sqrt(height.to(torch.float32)) * torch.sqrt(width.to(torch.float32)) / input_sq_size
    )
    device = height.device
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)[None] / scale[:, None]
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)[None] / scale[:, None]
    rows = rows * (base_size / grid_h)
    cols = cols * (base_size / grid_w)
    inv_freq = sincos_inv_freq(dim // 2, device)
    row_args = rows[..., None] * inv_freq  # [B, grid_h, dim/4]
    col_args = cols[..., None] * inv_freq  # [B, grid_w, dim/4]
    row_emb = torch.cat([torch.sin(row_args), torch.cos(row_args)], dim=-1)
    col_emb = torch.cat([torch.sin(col_args), torch.cos(col_args)], dim=-1)
    batch = height.shape[0]
    half = dim // 2
    return torch.cat(
        [
            col_emb[:, None, :, :].expand(batch, grid_h, grid_w, half),
            row_emb[:, :, None, :].expand(batch, grid_h, grid_w, half),
        ],
        dim=-1,
    )


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> Tensor:
    """The ``head_dim // 2`` RoPE frequencies ``theta^(-2i/head_dim)`` (fp32).

    These are the values Open-Sora stores as ``rope.freqs``; they are fixed, never trained.
    """
    exponent = torch.arange(0, head_dim, 2)[: head_dim // 2].to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(seq_len: int, head_dim: int, device: torch.device | None = None):
    """``(cos, sin)`` tables ``[seq_len, head_dim]`` (fp32) for positions ``0..seq_len-1``.

    Each frequency is repeated twice in a row (``f0, f0, f1, f1, ...``): RoPE rotates the
    interleaved channel pairs ``(0, 1), (2, 3), ...``, not the two halves of the head.
    """
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = positions[:, None] * rope_inv_freq(head_dim).to(device)[None]
    angles = angles.repeat_interleave(2, dim=-1)
    return torch.cos(angles), torch.sin(angles)


def rotate_interleaved_pairs(x: Tensor) -> Tensor:
    """Map each channel pair ``(a, b)`` to ``(-b, a)`` (a quarter turn of every pair)."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack((-second, first), dim=-1).flatten(-2)


def apply_rope(x: Tensor) -> Tensor:
    """Rotary position embedding over the sequence axis ``-2`` of ``x`` ``[..., N, D]``.

    Positions are ``0..N-1``; pairs are interleaved (see :func:`rope_cos_sin`). The tables
    are built in fp32 and cast to ``x``'s dtype, as upstream does.
    """
    cos, sin = rope_cos_sin(x.shape[-2], x.shape[-1], x.device)
    return x * cos.to(x.dtype) + rotate_interleaved_pairs(x) * sin.to(x.dtype)


def t2i_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN-single modulation ``x * (1 + scale) + shift`` (shapes broadcast)."""
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, then cast back and scaled by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``; keys ``fc1.*`` and ``fc2.*`` as in timm's ``Mlp``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``[batch, N, C]`` sequences.

    ``qkv`` is laid out ``[q | k | v]``, each ``[heads, head_dim]``. With ``qk_norm`` the
    queries and keys are RMS-normalised per head (fp32); with ``rope`` they are then rotated
    by :func:`apply_rope` (Open-Sora's temporal blocks). Softmax scale is ``head_dim^-0.5``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope = rope
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, seq, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q), apply_rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class CrossAttention(nn.Module):
    """Multi-head attention from video tokens to text tokens.

    Open-Sora packs the valid text tokens of the whole batch into one sequence and uses a
    block-diagonal mask; here every sample attends to its own padded text sequence with an
    additive key bias (0 for valid tokens, :data:`TEXT_MASK_BIAS` for padding), which gives
    the same result without data-dependent shapes. ``kv_linear`` is laid out ``[k | v]``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y_tokens: Tensor, y_bias: Tensor) -> Tensor:
        """``x`` [B, N, C] queries, ``y_tokens`` [B, L, C], ``y_bias`` [B, 1, 1, L]."""
        batch, seq, dim = x.shape
        text_len = y_tokens.shape[1]
        q = self.q_linear(x).reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(y_tokens).reshape(batch, text_len, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=y_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class PatchEmbed3D(nn.Module):
    """Zero-pad T, H, W at the end to multiples of the patch, then a strided Conv3d.

    Returns tokens ``[B, T', H', W', C]`` (Open-Sora flattens the same values in T, H, W
    order; keeping the grid axes lets later graphs reshape without Python-side sizes).
    """

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        _, _, frames, rows, cols = x.shape
        pad = ((-cols) % pw, (-rows) % ph, (-frames) % pt)
        if any(pad):
            x = F.pad(x, (0, pad[0], 0, pad[1], 0, pad[2]))
        return self.proj(x).permute(0, 2, 3, 4, 1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (:func:`timestep_embedding`, 256 wide) then ``Linear, SiLU, Linear``.

    Used for both the diffusion timestep and fps (Open-Sora's ``SizeEmbedder`` computes the
    same thing for one scalar per sample). Keys ``mlp.0.*`` and ``mlp.2.*``.
    """

    def __init__(self, dim: int, frequency_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; holds the null caption ``y_embedding``.

    ``y_embedding`` ``[model_max_length, caption_channels]`` is the unconditional caption
    used for classifier-free guidance; it is a persistent buffer because checkpoints carry
    it. The projection is applied to whatever caption is passed in.
    """

    def __init__(self, caption_channels: int, dim: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, dim)
        self.register_buffer(
            "y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5
        )

    def forward(self, caption: Tensor) -> Tensor:
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt-style output head: modulate with the pre-``t_block`` embedding, then project.

    ``(shift, scale) = scale_shift_table + t``; ``x = LN(x) * (1 + scale) + shift``;
    ``linear`` maps C to ``prod(patch) * out_channels`` features.
    """

    def __init__(self, dim: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, tokens: Tensor, t: Tensor) -> Tensor:
        """``tokens`` [B, T, H', W', C], ``t`` [B, C] -> [B, T, H', W', prod(patch)*out]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        # [B, 1, C] -> [B, 1, 1, 1, C] to broadcast over the (T, H', W') grid.
        shift, scale = shift[:, None, None], scale[:, None, None]
        return self.linear(t2i_modulate(self.norm_final(tokens), shift, scale))


def unpatchify(features: Tensor, patch_size: tuple[int, int, int], out_channels: int) -> Tensor:
    """``[B, T', H', W', (pt ph pw c)]`` -> ``[B, c, T'*pt, H'*ph, W'*pw]``.

    Feature order within a patch is ``(pt, ph, pw, c)`` as in Open-Sora. Written with
    tensors of rank at most 5 because Core ML rejects higher ranks.
    """
    pt, ph, pw = patch_size
    batch, frames, rows, cols, _ = features.shape
    x = features.reshape(batch, frames, rows * cols, pt, ph * pw * out_channels)
    x = x.permute(0, 1, 3, 2, 4)  # time patch next to time: [B, T', pt, S, ...]
    x = x.reshape(batch * frames * pt, rows, cols, ph, pw * out_channels)
    x = x.permute(0, 1, 3, 2, 4)  # [B*T, H', ph, W', pw*c]
    x = x.reshape(batch * frames * pt, rows * ph, cols * pw, out_channels)
    x = x.reshape(batch, frames * pt, rows * ph, cols * pw, out_channels)
    return x.permute(0, 4, 1, 2, 3)
