"""Open-Sora v1.2 spatial VAE decoder (SD-style AutoencoderKL), written for torch.export.

Frames are decoded independently: ``x`` [F, 4, h, w] (frames as the batch, latents as the
temporal decoder produced them) -> pixels [F, 3, 8h, 8w] in about [-1, 1]. The input is
divided by the SD scaling factor 0.18215 first, as Open-Sora's ``VideoAutoencoderKL`` does,
then ``post_quant_conv`` and the diffusers ``Decoder``.

The model is an ordered list of *stages* (see :func:`spatial_stage_names`), each one tensor
in, one tensor out. Every module built here has state-dict keys that are exactly the
checkpoint keys with the ``spatial_vae.module.`` prefix stripped (diffusers names such as
``decoder.mid_block.attentions.0.to_q.weight``), so a subset loads with ``strict=True``.

=========  ========================================================================
``in``     ``x / 0.18215``, ``post_quant_conv`` (1x1), ``decoder.conv_in`` (4 -> 512)
``mid``    ``decoder.mid_block``: ResNet, single-head self-attention, ResNet
``up.0``   ``decoder.up_blocks.0`` (512), nearest x2 + conv
``up.1``   ``decoder.up_blocks.1`` (512), nearest x2 + conv
``up.2``   ``decoder.up_blocks.2`` (512 -> 256), nearest x2 + conv
``up.3``   ``decoder.up_blocks.3`` (256 -> 128), no upsampler
``out``    ``decoder.conv_norm_out``, SiLU, ``decoder.conv_out`` (128 -> 3)
=========  ========================================================================

Export notes: 4-D tensors only; upsampling is ``F.interpolate(scale_factor=2,
mode="nearest")``; attention is one SDPA call on [F, 1, h*w, C]. Because nothing mixes
frames, a batch of frames may be padded freely (see :func:`decode_video`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sora_export.plugins.vae.temporal import MICRO_FRAME_SIZE, check_consecutive_stages

__all__ = [
    "SPATIAL_VAE_CONFIGS",
    "SpatialAttention",
    "SpatialResnetBlock",
    "SpatialVAEConfig",
    "SpatialVAEDecoder",
    "build_spatial_chunk",
    "build_spatial_stage",
    "decode_video",
    "spatial_stage_names",
    "spatial_stage_param_count",
    "spatial_stage_shapes",
]


@attrs.frozen
class SpatialVAEConfig:
    """Architecture of the spatial decoder; defaults are the real v1.2 (SDXL-derived) VAE."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    latent_channels: int = 4
    out_channels: int = 3
    scaling_factor: float = 0.18215

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def upscale(self) -> int:
        """Pixels per latent along H and W (8 for v1.2)."""
        return 2 ** (self.num_levels - 1)

    def up_channels(self, index: int) -> tuple[int, int]:
        """(input, output) channels of ``decoder.up_blocks.{index}``."""
        rev = self.block_out_channels[::-1]
        return rev[max(index - 1, 0)], rev[index]


SPATIAL_VAE_CONFIGS: dict[str, SpatialVAEConfig] = {
    # Same topology (4 levels, shortcut convs where channels drop) at export-in-seconds size.
    "tiny": SpatialVAEConfig(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8
    ),
    "full": SpatialVAEConfig(),
}


class SpatialResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GN, SiLU, conv, GN, SiLU, conv + skip."""

    def __init__(self, in_channels: int, out_channels: int, cfg: SpatialVAEConfig) -> None:
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return residual + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the h*w positions of each frame, with residual.

    Keys follow diffusers' ``Attention``: group_norm, to_q, to_k, to_v, to_out.0.
    """

    def __init__(self, channels: int, cfg: SpatialVAEConfig) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # [F, 1, h*w, C]: an explicit head axis of 1, as the ONNX exporter's SDPA needs 4-D.
        tokens = self.group_norm(x).reshape(b, 1, c, h * w).transpose(2, 3)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        # One head of width C, so SDPA's default 1/sqrt(C) scale is diffusers' scale.
        attn = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](attn).transpose(2, 3).reshape(b, c, h, w)
        return out + x


class _Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (diffusers Upsample2D with use_conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def spatial_stage_names(cfg: SpatialVAEConfig) -> list[str]:
    """Stage names in execution order: in, mid, up.0 .. up.{L-1}, out."""
    return ["in", "mid", *(f"up.{i}" for i in range(cfg.num_levels)), "out"]


class _SpatialDecoderPart(nn.Module):
    """A run of consecutive spatial-decoder stages under diffusers key names.

    Only the requested stages' modules exist; ``decoder.up_blocks`` is an ``nn.ModuleDict``
    keyed "0".."3", which gives the same keys as diffusers' ``nn.ModuleList``.
    """

    def __init__(self, cfg: SpatialVAEConfig, stages: Sequence[str]) -> None:
        super().__init__()
        check_consecutive_stages(stages, spatial_stage_names(cfg))
        self.cfg = cfg
        self.stage_names: tuple[str, ...] = tuple(stages)
        top = cfg.block_out_channels[-1]
        self.decoder = nn.Module()
        if "in" in stages:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
            self.decoder.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        if "mid" in stages:
            mid = nn.Module()
            mid.resnets = nn.ModuleList(
                [SpatialResnetBlock(top, top, cfg), SpatialResnetBlock(top, top, cfg)]
            )
            mid.attentions = nn.ModuleList([SpatialAttention(top, cfg)])
            self.decoder.mid_block = mid
        levels = [int(n.split(".")[1]) for n in stages if n.startswith("up.")]
        if levels:
            self.decoder.up_blocks = nn.ModuleDict()
        for i in levels:
            in_ch, out_ch = cfg.up_channels(i)
            block = nn.Module()
            block.resnets = nn.ModuleList(
                SpatialResnetBlock(in_ch if j == 0 else out_ch, out_ch, cfg)
                for j in range(cfg.layers_per_block + 1)
            )
            if i < cfg.num_levels - 1:
                block.upsamplers = nn.ModuleList([_Upsample(out_ch)])
            self.decoder.up_blocks[str(i)] = block
        if "out" in stages:
            bottom = cfg.block_out_channels[0]
            self.decoder.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, bottom, eps=cfg.norm_eps)
            self.decoder.conv_out = nn.Conv2d(bottom, cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.stage_names:
            x = self._run_stage(name, x)
        return x

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        dec = self.decoder
        if name == "in":
            # Division, not a multiply by the reciprocal, to match upstream bit for bit.
            return dec.conv_in(self.post_quant_conv(x / self.cfg.scaling_factor))
        if name == "mid":
            mid = dec.mid_block
            x = mid.resnets[0](x)
            x = mid.attentions[0](x)
            return mid.resnets[1](x)
        if name == "out":
            return dec.conv_out(F.silu(dec.conv_norm_out(x)))
        block = dec.up_blocks[name.split(".")[1]]
        for resnet in block.resnets:
            x = resnet(x)
        if hasattr(block, "upsamplers"):
            x = block.upsamplers[0](x)
        return x


class SpatialVAEDecoder(_SpatialDecoderPart):
    """The whole spatial decoder: [F, 4, h, w] latents -> [F, 3, 8h, 8w] pixels.

    State-dict keys are the union of all stages' keys (``post_quant_conv.*``,
    ``decoder.*``); the encoder and ``quant_conv`` are not part of it.
    """

    def __init__(self, cfg: SpatialVAEConfig) -> None:
        super().__init__(cfg, spatial_stage_names(cfg))


def build_spatial_stage(cfg: SpatialVAEConfig, name: str) -> nn.Module:
    """One stage as a module (one tensor in, one tensor out) with checkpoint key names."""
    return _SpatialDecoderPart(cfg, (name,))


def build_spatial_chunk(cfg: SpatialVAEConfig, names: Sequence[str]) -> nn.Module:
    """Consecutive stages fused into one module whose keys are the union of theirs."""
    return _SpatialDecoderPart(cfg, names)


def spatial_stage_param_count(cfg: SpatialVAEConfig, name: str) -> int:
    """Number of parameters of one stage, built on the meta device."""
    with torch.device("meta"):
        stage = build_spatial_stage(cfg, name)
    return sum(p.numel() for p in stage.parameters())


def spatial_stage_shapes(
    cfg: SpatialVAEConfig, latent_shape: Sequence[int]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every stage for latent frames [F, C, h, w]."""
    f, c, h, w = latent_shape
    if c != cfg.latent_channels:
        raise ValueError(f"expected {cfg.latent_channels} latent channels, got {c}")
    top = cfg.block_out_channels[-1]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    cur = (f, c, h, w)
    for name in spatial_stage_names(cfg):
        if name in ("in", "mid"):
            out = (f, top, h, w)
        elif name == "out":
            out = (f, cfg.out_channels, cur[2], cur[3])
        else:
            i = int(name.split(".")[1])
            grow = 2 if i < cfg.num_levels - 1 else 1
            out = (f, cfg.up_channels(i)[1], cur[2] * grow, cur[3] * grow)
        shapes[name] = (cur, out)
        cur = out
    return shapes


def _chunk_frame_counts(latent_frames: int, num_frames: int | None) -> list[tuple[int, int]]:
    """(latent frames, video frames) per temporal micro-chunk, following the v1.2 pipeline."""
    time_factor = 4
    micro_z = (MICRO_FRAME_SIZE + time_factor - 1) // time_factor
    lat = [min(micro_z, latent_frames - i) for i in range(0, latent_frames, micro_z)]
    if num_frames is None:
        return [(n, time_factor * n - (time_factor - 1)) for n in lat]
    counts: list[tuple[int, int]] = []
    left = num_frames
    for n in lat:
        want = min(MICRO_FRAME_SIZE, left)
        if not time_factor * (n - 1) < want <= time_factor * n:
            raise ValueError(
                f"num_frames={num_frames} does not fit {latent_frames} latent frames: a chunk "
                f"of {n} latent frames decodes to {time_factor * (n - 1) + 1}.."
                f"{time_factor * n} frames, but {want} were asked for"
            )
        counts.append((n, want))
        left -= want
    if left > 0:
        raise ValueError(f"num_frames={num_frames} needs more than {latent_frames} latent frames")
    return counts


def decode_video(
    temporal: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    z: Tensor,
    micro_batch: int = 4,
    *,
    num_frames: int | None = None,
    static_batch: bool = False,
) -> Tensor:
    """Reference v1.2 VAE decode: raw latent z [B, 4, T, h, w] -> video [B, 3, frames, 8h, 8w].

    Time is cut into micro-chunks of 5 latent frames (the last may be shorter); each goes
    through ``temporal`` (which applies shift/scale itself, like :class:`TemporalVAEDecoder`)
    and the LAST ``min(17, frames left)`` of its frames are kept, as upstream's front drop
    does. ``num_frames`` defaults to 17 per full chunk and 4n-3 for a final chunk of n
    latents (T=15 -> 51). ``temporal`` must return at least that many frames; pass one built
    with ``num_frames=20`` to reproduce upstream for any ``num_frames``. The frames then go
    through ``spatial`` in micro-batches of ``micro_batch``; with ``static_batch`` the last
    micro-batch is zero-padded to full size (for fixed-shape artifacts) and the padding
    discarded, which changes nothing because frames are decoded independently.
    """
    b, _, t = z.shape[:3]
    latents: list[Tensor] = []
    start = 0
    for n, want in _chunk_frame_counts(t, num_frames):
        decoded = temporal(z[:, :, start : start + n])
        start += n
        got = decoded.shape[2]
        if got < want:
            raise ValueError(
                f"temporal decoder returned {got} frames for {n} latent frames but {want} are "
                "needed; build it with a larger num_frames"
            )
        latents.append(decoded[:, :, got - want :])
    x = torch.cat(latents, dim=2)
    _, c, frames, h, w = x.shape
    # [B, C, F, h, w] -> [(B F), C, h, w]: batch-major, like upstream's rearrange.
    flat = x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
    pixels: list[Tensor] = []
    for i in range(0, flat.shape[0], micro_batch):
        part = flat[i : i + micro_batch]
        real = part.shape[0]
        if static_batch and real < micro_batch:
            part = torch.cat([part, part.new_zeros((micro_batch - real, *part.shape[1:]))])
        pixels.append(spatial(part)[:real])
    out = torch.cat(pixels)
    return out.reshape(b, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
