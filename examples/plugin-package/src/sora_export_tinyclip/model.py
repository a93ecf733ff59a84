"""A CLIP-style text encoder, written as three exportable parts.

The model is the text tower of CLIP: token embedding plus a learned position embedding,
``layers`` pre-LayerNorm transformer blocks with causal self-attention, and a final
LayerNorm. It is split into parts so that a chunk holds only some of its weights:

    TinyClipEmbed      input_ids [B, L] int32 -> hidden [B, L, width]
    TinyClipLayers     hidden -> hidden                       (layers start..stop-1)
    TinyClipFinalNorm  hidden -> last_hidden_state [B, L, width]

`TinyClipTextModel` is the same computation in one module. Every part's ``state_dict`` uses
the key names of Hugging Face's ``CLIPTextModel`` below its ``text_model.`` prefix
(``embeddings.token_embedding.weight``, ``encoder.layers.{i}.self_attn.q_proj.weight``,
``final_layer_norm.weight``), so a part loads strictly from the subset of checkpoint keys it
reports in its own ``state_dict()``, and a transformers checkpoint loads as it is.

Export constraints shaped the code: static shapes, no data-dependent Python control flow,
int32 token ids (Core ML has no int64 inputs), and the causal mask left to
``scaled_dot_product_attention(is_causal=True)`` so no mask tensor crosses a chunk boundary.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONFIGS",
    "HEAD_DIM",
    "TinyClipConfig",
    "TinyClipEmbed",
    "TinyClipFinalNorm",
    "TinyClipLayers",
    "TinyClipTextModel",
    "split_layers",
]

#: Width of one attention head in every released CLIP text tower (512/8, 768/12, 1024/16).
#: Checkpoints do not record the head count, so it is derived from the width with this.
HEAD_DIM = 64

Activation = Literal["quick_gelu", "gelu"]


def _positive(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"TinyClipConfig.{attribute.name} must be positive, got {value}")


@attrs.frozen
class TinyClipConfig:
    """Sizes of the text encoder. ``width`` must be a multiple of ``heads``."""

    vocab_size: int = attrs.field(validator=_positive)
    width: int = attrs.field(validator=_positive)
    heads: int = attrs.field(validator=_positive)
    layers: int = attrs.field(validator=_positive)
    max_length: int = attrs.field(validator=_positive)
    mlp_width: int = attrs.field(validator=_positive)
    eps: float = 1e-5
    activation: Activation = attrs.field(
        default="quick_gelu", validator=attrs.validators.in_(("quick_gelu", "gelu"))
    )

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    def param_count_embed(self) -> int:
        """Parameters of `TinyClipEmbed`: token and position tables."""
        return (self.vocab_size + self.max_length) * self.width

    def param_count_layer(self) -> int:
        """Parameters of one transformer layer (q, k, v, out with biases, MLP, two norms)."""
        attention = 4 * (self.width * self.width + self.width)
        mlp = 2 * self.width * self.mlp_width + self.mlp_width + self.width
        norms = 4 * self.width
        return attention + mlp + norms

    def param_count_final_norm(self) -> int:
        return 2 * self.width

    def param_count_total(self) -> int:
        return (
            self.param_count_embed()
            + self.layers * self.param_count_layer()
            + self.param_count_final_norm()
        )


CONFIGS: dict[str, TinyClipConfig] = {
    # Exports in seconds, yet has several layers for chunking to split and two heads.
    "tiny": TinyClipConfig(
        vocab_size=1000, width=128, heads=2, layers=4, max_length=16, mlp_width=512
    ),
    # The text tower of OpenAI CLIP ViT-B/32 (63M parameters).
    "base": TinyClipConfig(
        vocab_size=49408, width=512, heads=8, layers=12, max_length=77, mlp_width=2048
    ),
}


class _KeyScope(nn.Module):
    """Holds children only, so parameters get Hugging Face key paths. No forward."""


class Embeddings(nn.Module):
    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        # positions 0..L-1 are a slice of the table: no position-id tensor to export
        positions = self.position_embedding.weight[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions


class SelfAttention(nn.Module):
    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, length, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class MLP(nn.Module):
    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.activation == "quick_gelu":
            h = h * torch.sigmoid(1.702 * h)  # OpenAI CLIP's sigmoid approximation of GELU
        else:
            h = F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """One pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TinyClipEmbed(nn.Module):
    """``forward(input_ids int32 [B, L]) -> hidden [B, L, width]``; keys ``embeddings.*``."""

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embeddings(input_ids)


class TinyClipLayers(nn.Module):
    """Layers ``start .. stop-1`` with their global keys (``encoder.layers.{i}.*``).

    ``forward(hidden [B, L, width]) -> hidden [B, L, width]``.
    """

    def __init__(self, cfg: TinyClipConfig, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop <= cfg.layers:
            raise ValueError(f"layer range [{start}, {stop}) is empty or outside 0..{cfg.layers}")
        self.start = start
        self.stop = stop
        self.encoder = _KeyScope()
        self.encoder.layers = nn.ModuleDict({str(i): EncoderLayer(cfg) for i in range(start, stop)})

    def layer(self, index: int) -> nn.Module:
        """The layer with global index ``index`` (``start <= index < stop``)."""
        return self.encoder.layers[str(index)]

    def forward(self, hidden: Tensor) -> Tensor:
        for index in range(self.start, self.stop):
            hidden = self.layer(index)(hidden)
        return hidden


class TinyClipFinalNorm(nn.Module):
    """``forward(hidden) -> last_hidden_state``; key ``final_layer_norm.*``."""

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.final_layer_norm(hidden)


class TinyClipTextModel(nn.Module):
    """The whole encoder in one module, with the same keys as the three parts together.

    ``forward(input_ids int32 [B, L]) -> last_hidden_state [B, L, width]``. Used to check
    that chained chunks compute the unchunked model and to list every expected key.
    """

    def __init__(self, cfg: TinyClipConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = _KeyScope()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return self.final_layer_norm(hidden)


def split_layers(cfg: TinyClipConfig, max_params: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` layer ranges covering ``0 .. cfg.layers``.

    Each range holds at least one layer and at most ``max_params`` parameters; layers are
    packed greedily, which gives the fewest chunks because all layers are the same size.
    Raises ValueError if one layer alone exceeds ``max_params``.
    """
    per_layer = cfg.param_count_layer()
    if per_layer > max_params:
        raise ValueError(
            f"one layer has {per_layer:,} parameters, more than the chunk budget {max_params:,}"
        )
    step = max_params // per_layer
    return [(start, min(start + step, cfg.layers)) for start in range(0, cfg.layers, step)]
