"""Temporal Dimension Token Merging (TDTM, from On-device Sora) for STDiT3 blocks.

In a merged block the self-attention step (spatial or temporal) and the cross-attention step
see the video with consecutive latent frames averaged in pairs (0+1, 2+3, ...), so they run
on ``ceil(T/2)`` frames; each merged result is then copied back to both frames of its pair.
With an odd ``T`` the last frame has no partner and passes through unmerged. The MLP step,
the modulation, the gates and the residual additions are untouched.

The tensors are in STDiT3's frame layout ``[B, T, H', W', C]`` (see
:mod:`sora_export.plugins.stdit3.model`), so merging is a reshape and a mean on axis 1 and
unmerging is an expand and a reshape: static shapes, no data-dependent control flow, which is
what ``torch.export`` and the Core ML / ONNX lowerings need.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sora_export.plugins.stdit3.model import STDiT3Block, STDiT3Blocks

__all__ = [
    "TokenMergedBlock",
    "apply_tdtm",
    "is_merged",
    "merge_frames",
    "merged_frames",
    "unmerge_frames",
]


def merged_frames(frames: int) -> int:
    """Frames after merging ``frames`` frames: ``ceil(frames / 2)``."""
    return -(-frames // 2)


def merge_frames(x: Tensor) -> Tensor:
    """Average consecutive frame pairs on axis 1: ``[B, T, ...] -> [B, ceil(T/2), ...]``.

    Output frame ``j`` is the mean of input frames ``2j`` and ``2j+1``; with an odd ``T`` the
    last output frame is the last input frame itself (bit for bit). ``T = 1`` returns ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"merge_frames needs a [B, T, ...] tensor, got shape {list(x.shape)}")
    frames = x.shape[1]
    pairs = frames // 2
    if pairs == 0:
        return x
    # Work on [B, T, rest] so no intermediate exceeds rank 4 (Core ML allows rank <= 5, and
    # splitting T of a [B, T, H', W', C] tensor into pairs would make rank 6).
    batch, rest = x.shape[0], x.shape[2:]
    flat = x.reshape(batch, frames, -1)
    merged = flat[:, : 2 * pairs].unflatten(1, (pairs, 2)).mean(dim=2)
    if frames % 2:
        # The unpaired last frame is kept as it is, not averaged with a copy of itself.
        merged = torch.cat((merged, flat[:, 2 * pairs :]), dim=1)
    merged = merged.reshape(batch, merged.shape[1], *rest)
    return merged


def unmerge_frames(x: Tensor, frames: int) -> Tensor:
    """Undo :func:`merge_frames`'s frame count: repeat each frame twice, keep ``frames``.

    ``[B, M, ...] -> [B, frames, ...]`` where ``M`` must equal ``ceil(frames / 2)``; output
    frames ``2j`` and ``2j+1`` are both copies of input frame ``j``.
    """
    if x.dim() < 2:
        raise ValueError(f"unmerge_frames needs a [B, M, ...] tensor, got shape {list(x.shape)}")
    merged = x.shape[1]
    if frames < 1 or merged_frames(frames) != merged:
        raise ValueError(
            f"cannot unmerge {merged} merged frame(s) to {frames} frame(s); "
            f"{frames} frame(s) merge to {merged_frames(frames)}"
        )
    if merged == frames:  # a single frame: nothing was merged
        return x
    batch, rest = x.shape[0], x.shape[2:]
    flat = x.reshape(batch, merged, 1, -1)  # rank <= 4 throughout, as in merge_frames
    repeated = flat.expand(batch, merged, 2, flat.shape[-1]).flatten(1, 2)
    if frames < 2 * merged:
        repeated = repeated[:, :frames]
    return repeated.reshape(batch, frames, *rest)


class TokenMergedBlock(STDiT3Block):
    """An :class:`STDiT3Block` whose attention steps run on frame-merged tokens.

    Never constructed directly: :func:`apply_tdtm` switches an existing block's class to
    this one, so the block keeps its parameters (same tensors, same ``state_dict`` keys) and
    only :meth:`self_attention_step` and :meth:`cross_attention_step` change. A deep copy
    of a merged block is a merged block with its own copied weights.
    """

    def self_attention_step(self, x: Tensor) -> Tensor:
        """Merge frame pairs, run the plain self-attention step, copy back to both frames."""
        return unmerge_frames(super().self_attention_step(merge_frames(x)), x.shape[1])

    def cross_attention_step(self, x: Tensor, y_tokens: Tensor, y_bias: Tensor) -> Tensor:
        """Merge frame pairs, run the plain cross-attention step, copy back to both frames."""
        out = super().cross_attention_step(merge_frames(x), y_tokens, y_bias)
        return unmerge_frames(out, x.shape[1])


def is_merged(block: STDiT3Block) -> bool:
    """Whether :func:`apply_tdtm` patched ``block``."""
    return isinstance(block, TokenMergedBlock)


def apply_tdtm(
    blocks_module: STDiT3Blocks, block_range: tuple[int, int] | None = None
) -> STDiT3Blocks:
    """Patch, in place, the block pairs of ``blocks_module`` that lie in ``block_range``.

    ``block_range`` is ``(start, stop)``, half-open over global block-pair indices (the
    ``i`` of ``spatial_blocks.{i}``); ``None`` means every pair. Both the spatial and the
    temporal block of each pair in the range become :class:`TokenMergedBlock`; pairs outside
    it are left exactly as they were. Weights are shared, not copied, and the module's
    ``state_dict`` keys do not change. Patching twice is the same as patching once.

    Returns ``blocks_module`` itself.
    """
    if not isinstance(blocks_module, STDiT3Blocks):
        raise TypeError(f"apply_tdtm patches STDiT3Blocks, got {type(blocks_module).__name__}")
    start, stop = (blocks_module.start, blocks_module.stop) if block_range is None else block_range
    if not 0 <= start <= stop:
        raise ValueError(
            f"block_range must be (start, stop) with 0 <= start <= stop, got {block_range}"
        )
    for index in range(max(start, blocks_module.start), min(stop, blocks_module.stop)):
        for group in (blocks_module.spatial_blocks, blocks_module.temporal_blocks):
            block = group[str(index)]
            if type(block) is STDiT3Block:
                # Changing the class, rather than wrapping the module or binding closures on
                # the instance, keeps parameters, state_dict keys, deepcopy and pickling
                # exactly as they are for a plain block.
                block.__class__ = TokenMergedBlock
            elif not is_merged(block):
                raise TypeError(
                    f"block {index} is a {type(block).__name__}, not a plain STDiT3Block; "
                    "TDTM patches only Open-Sora's block"
                )
    return blocks_module
