"""Open-Sora v1.2 temporal VAE decoder ("VAE_Temporal_SD"), written for torch.export.

The decoder turns a micro-chunk of raw diffusion latents ``z`` [B, 4, n, h, w] into the
spatial VAE's latents [B, 4, frames, h, w]: the pipeline's ``z * scale + shift`` first, then
``post_quant_conv``, the causal 3-D conv decoder with two depth-to-time upsamplings (x4 in
time, no spatial resampling), and finally the front-frame drop upstream applies with
``num_frames`` (5 latent frames -> 20 decoded -> 17 kept).

The model is an ordered list of *stages* (see :func:`temporal_stage_names`), each a module
taking one tensor and returning one tensor, so an export engine can group consecutive
stages into chunks by parameter budget. Every module built here, a single stage, a run of
stages or the whole decoder, has state-dict keys that are exactly the Open-Sora checkpoint
keys with the ``temporal_vae.`` prefix stripped (plus the top-level pipeline buffers
``shift`` and ``scale`` in the ``pre`` stage), so a checkpoint subset loads with
``load_state_dict(subset, strict=True)``.

Stages, in execution order (level indices follow the checkpoint, which runs them 3 -> 0):

========  ==========================================================================
``pre``   ``z * scale + shift``, ``post_quant_conv`` (1x1x1), ``decoder.conv1`` (4 -> 512)
``res``   ``decoder.res_blocks.*`` (4 ResBlocks at 512)
``up.3``  ``decoder.block_res_blocks.3.*`` (512) + ``decoder.conv_blocks.2`` + depth-to-time
``up.2``  ``decoder.block_res_blocks.2.*`` (256) + ``decoder.conv_blocks.1`` + depth-to-time
``up.1``  ``decoder.block_res_blocks.1.*`` (256); ``conv_blocks.0`` is an identity upstream
``up.0``  ``decoder.block_res_blocks.0.*`` (128)
``out``   ``decoder.norm1``, SiLU, ``decoder.conv_out`` (128 -> 4), drop the first frames
========  ==========================================================================

Export notes: every shape decision is made from the config and Python ints at build time;
no tensor has more than 5 dimensions (Core ML's limit), so depth-to-time folds H and W
together and GroupNorm runs on [B, C, T*H*W]; causal time padding is a constant pad at
the front of the time axis only.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MICRO_FRAME_SIZE",
    "OPEN_SORA_V12_SCALE",
    "OPEN_SORA_V12_SHIFT",
    "TEMPORAL_VAE_CONFIGS",
    "CausalConv3d",
    "FlatGroupNorm",
    "TemporalResBlock",
    "TemporalVAEConfig",
    "TemporalVAEDecoder",
    "build_temporal_chunk",
    "build_temporal_stage",
    "check_consecutive_stages",
    "depth_to_time",
    "temporal_stage_names",
    "temporal_stage_param_count",
    "temporal_stage_shapes",
]

# Pipeline normalisation of the v1.2 latents (VideoAutoencoderPipeline's shift / scale).
OPEN_SORA_V12_SHIFT: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
OPEN_SORA_V12_SCALE: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
# Video frames per temporal micro-chunk in the v1.2 pipeline (5 latent frames).
MICRO_FRAME_SIZE = 17


@attrs.frozen
class TemporalVAEConfig:
    """Architecture of the temporal VAE decoder.

    The defaults are the real Open-Sora v1.2 decoder (``TEMPORAL_VAE_CONFIGS["full"]``).
    ``temporal_downsample[i]`` says whether the encoder halves time after level ``i``; the
    decoder doubles time before level ``i`` correspondingly.
    """

    filters: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 4
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    norm_eps: float = 1e-5
    latent_channels: int = 4
    out_channels: int = 4
    shift: tuple[float, ...] = OPEN_SORA_V12_SHIFT
    scale: tuple[float, ...] = OPEN_SORA_V12_SCALE

    @property
    def num_levels(self) -> int:
        return len(self.channel_multipliers)

    @property
    def time_factor(self) -> int:
        """Decoded frames per latent frame before the front-frame drop (4 for v1.2)."""
        return 2 ** sum(self.temporal_downsample)

    def level_channels(self, level: int) -> int:
        return self.filters * self.channel_multipliers[level]

    def default_num_frames(self, latent_frames: int) -> int:
        """Frames a chunk of ``latent_frames`` decodes to by the encoder's convention.

        The causal encoder maps 1 + f*(n-1) frames to n latents (17 -> 5), so this is
        ``time_factor * n - (time_factor - 1)``; for a full v1.2 micro-chunk it is 17.
        """
        return self.time_factor * latent_frames - (self.time_factor - 1)


TEMPORAL_VAE_CONFIGS: dict[str, TemporalVAEConfig] = {
    # Same topology as v1.2 (4 levels, x4 time, conv3 shortcuts) at a size that exports
    # in seconds; two ResBlocks per level so block chaining is exercised.
    "tiny": TemporalVAEConfig(filters=16, num_res_blocks=2, num_groups=8),
    "full": TemporalVAEConfig(),
}


class CausalConv3d(nn.Module):
    """Conv3d that pads time only at the front, so output frame k sees frames <= k.

    Stride 1 (all the decoder needs): ``kernel_t - 1`` zero frames in front, ``k // 2``
    zeros on each side of H and W. The weight lives at ``conv.weight`` as upstream.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel must be odd, got {kernel_size}")
        self.time_pad = kt - 1
        # Spatial zero padding is folded into the conv; only time needs an explicit pad.
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2), bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return self.conv(x)


class FlatGroupNorm(nn.GroupNorm):
    """GroupNorm that normalises [B, C, *] as [B, C, prod(*)].

    Same statistics and keys as ``nn.GroupNorm`` (PyTorch reduces the trailing dims as one
    axis anyway), but Core ML's group_norm lowering adds a group axis, so a 5-D input would
    become a rank-6 tensor that Core ML rejects; flattening keeps it at rank 4.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        return F.group_norm(flat, self.num_groups, self.weight, self.bias, self.eps).reshape(
            x.shape
        )


class TemporalResBlock(nn.Module):
    """MAGVIT-style ResBlock: norm1, SiLU, conv1, norm2, SiLU, conv2 + (conv3) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        self.norm1 = FlatGroupNorm(cfg.num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = FlatGroupNorm(cfg.num_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = (
            CausalConv3d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        residual = x if self.conv3 is None else self.conv3(x)
        return h + residual


def depth_to_time(x: Tensor, factor: int) -> Tensor:
    """[B, C*factor, T, H, W] -> [B, C, T*factor, H, W], channel layout (C, factor).

    Equals einops ``"B (C ts) T H W -> B C (T ts) H W"``. H and W are folded so no
    intermediate exceeds 5 dimensions.
    """
    b, cf, t, h, w = x.shape
    c = cf // factor
    x = x.reshape(b, c, factor, t, h * w).permute(0, 1, 3, 2, 4)
    return x.reshape(b, c, t * factor, h, w)


def temporal_stage_names(cfg: TemporalVAEConfig) -> list[str]:
    """Stage names in execution order: pre, res, up.{L-1} .. up.0, out."""
    return ["pre", "res", *(f"up.{i}" for i in reversed(range(cfg.num_levels))), "out"]


def check_consecutive_stages(names: Sequence[str], all_names: list[str]) -> None:
    """Raise ValueError unless ``names`` is a non-empty run of consecutive stages."""
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {all_names}")
    if not names:
        raise ValueError("at least one stage is required")
    first = all_names.index(names[0])
    if list(names) != all_names[first : first + len(names)]:
        raise ValueError(f"stages must be consecutive and in order {all_names}, got {names}")


class _TemporalDecoderPart(nn.Module):
    """A run of consecutive stages of the temporal decoder under checkpoint key names.

    Only the modules of the requested stages are instantiated; module paths match the
    upstream ``VAE_Temporal`` tree (sparse indices use ``nn.ModuleDict`` keyed "0", "1",
    ... which yields the same state-dict keys as upstream's ``nn.ModuleList``).
    """

    def __init__(
        self,
        cfg: TemporalVAEConfig,
        stages: Sequence[str],
        latent_frames: int,
        num_frames: int | None,
    ) -> None:
        super().__init__()
        check_consecutive_stages(stages, temporal_stage_names(cfg))
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        if num_frames is None:
            num_frames = cfg.default_num_frames(latent_frames)
        decoded = cfg.time_factor * latent_frames
        if not decoded - cfg.time_factor < num_frames <= decoded:
            raise ValueError(
                f"{latent_frames} latent frames decode to {decoded} frames, so num_frames "
                f"must be in {decoded - cfg.time_factor + 1}..{decoded}, got {num_frames}"
            )
        self.cfg = cfg
        self.stage_names: tuple[str, ...] = tuple(stages)
        self.latent_frames = latent_frames
        self.num_frames = num_frames
        # Upstream's time_padding: (f - num_frames % f) % f leading frames are discarded.
        self.drop_frames = decoded - num_frames

        top = cfg.level_channels(cfg.num_levels - 1)
        self.decoder = nn.Module()
        if "pre" in stages:
            shape = (1, cfg.latent_channels, 1, 1, 1)
            self.register_buffer("shift", torch.tensor(cfg.shift).reshape(shape))
            self.register_buffer("scale", torch.tensor(cfg.scale).reshape(shape))
            self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)
            self.decoder.conv1 = CausalConv3d(cfg.latent_channels, top, 3)
        if "res" in stages:
            self.decoder.res_blocks = nn.ModuleList(
                TemporalResBlock(top, top, cfg) for _ in range(cfg.num_res_blocks)
            )
        levels = [int(n.split(".")[1]) for n in stages if n.startswith("up.")]
        if levels:
            self.decoder.block_res_blocks = nn.ModuleDict()
            self.decoder.conv_blocks = nn.ModuleDict()
        for level in levels:
            in_ch = top if level == cfg.num_levels - 1 else cfg.level_channels(level + 1)
            ch = cfg.level_channels(level)
            blocks = [TemporalResBlock(in_ch, ch, cfg)]
            blocks += [TemporalResBlock(ch, ch, cfg) for _ in range(cfg.num_res_blocks - 1)]
            self.decoder.block_res_blocks[str(level)] = nn.ModuleList(blocks)
            if self._upsamples_after(level):
                # conv_blocks.{level-1}: C -> 2C, then depth-to-time back to C at 2T.
                self.decoder.conv_blocks[str(level - 1)] = CausalConv3d(ch, ch * 2, 3)
        if "out" in stages:
            bottom = cfg.level_channels(0)
            self.decoder.norm1 = FlatGroupNorm(cfg.num_groups, bottom, eps=cfg.norm_eps)
            self.decoder.conv_out = CausalConv3d(bottom, cfg.out_channels, 3)

    def _upsamples_after(self, level: int) -> bool:
        return level > 0 and self.cfg.temporal_downsample[level - 1]

    def forward(self, x: Tensor) -> Tensor:
        for name in self.stage_names:
            x = self._run_stage(name, x)
        return x

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        dec = self.decoder
        if name == "pre":
            x = x * self.scale + self.shift
            return dec.conv1(self.post_quant_conv(x))
        if name == "res":
            for block in dec.res_blocks:
                x = block(x)
            return x
        if name == "out":
            x = dec.conv_out(F.silu(dec.norm1(x)))
            return x[:, :, self.drop_frames :]
        level = int(name.split(".")[1])
        for block in dec.block_res_blocks[str(level)]:
            x = block(x)
        if self._upsamples_after(level):
            x = depth_to_time(dec.conv_blocks[str(level - 1)](x), 2)
        return x


class TemporalVAEDecoder(_TemporalDecoderPart):
    """The whole temporal decoder (all stages); state-dict keys are their union.

    ``forward(z)``: raw latent chunk [B, latent_channels, n, h, w] (before the pipeline's
    shift/scale) -> [B, out_channels, num_frames, h, w]. ``latent_frames`` and
    ``num_frames`` (default :meth:`TemporalVAEConfig.default_num_frames`, 17 for 5) fix
    how many leading frames are dropped: ``time_factor * latent_frames - num_frames``.
    Calling it on a chunk of a different length drops the same number of frames.
    """

    def __init__(
        self, cfg: TemporalVAEConfig, latent_frames: int = 5, *, num_frames: int | None = None
    ) -> None:
        super().__init__(cfg, temporal_stage_names(cfg), latent_frames, num_frames)


def build_temporal_stage(
    cfg: TemporalVAEConfig, name: str, latent_frames: int = 5, *, num_frames: int | None = None
) -> nn.Module:
    """One stage as a module (one tensor in, one tensor out) with checkpoint key names.

    ``latent_frames`` / ``num_frames`` only matter for the ``out`` stage's frame drop.
    """
    return _TemporalDecoderPart(cfg, (name,), latent_frames, num_frames)


def build_temporal_chunk(
    cfg: TemporalVAEConfig,
    names: Sequence[str],
    latent_frames: int = 5,
    *,
    num_frames: int | None = None,
) -> nn.Module:
    """Consecutive stages fused into one module whose keys are the union of theirs.

    Equivalent to chaining the single stages; raises ValueError for gaps or disorder.
    """
    return _TemporalDecoderPart(cfg, names, latent_frames, num_frames)


def temporal_stage_param_count(cfg: TemporalVAEConfig, name: str) -> int:
    """Number of parameters (buffers excluded) of one stage, built on the meta device."""
    with torch.device("meta"):
        stage = build_temporal_stage(cfg, name)
    return sum(p.numel() for p in stage.parameters())


def temporal_stage_shapes(
    cfg: TemporalVAEConfig,
    latent_shape: Sequence[int],
    *,
    num_frames: int | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every stage for a latent chunk [B, C, n, h, w].

    Lets an exporter make example inputs for any stage without running the model.
    """
    b, c, n, h, w = latent_shape
    if c != cfg.latent_channels:
        raise ValueError(f"expected {cfg.latent_channels} latent channels, got {c}")
    if num_frames is None:
        num_frames = cfg.default_num_frames(n)
    top = cfg.level_channels(cfg.num_levels - 1)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    cur = (b, c, n, h, w)
    for name in temporal_stage_names(cfg):
        if name in ("pre", "res"):
            out = (b, top, n, h, w)
        elif name == "out":
            out = (b, cfg.out_channels, num_frames, h, w)
        else:
            level = int(name.split(".")[1])
            t = cur[2] * (2 if level > 0 and cfg.temporal_downsample[level - 1] else 1)
            out = (b, cfg.level_channels(level), t, h, w)
        shapes[name] = (cur, out)
        cur = out
    return shapes
