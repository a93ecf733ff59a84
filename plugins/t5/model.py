"""T5 v1.1 encoder (t5-v1_1-xxl as used by Open-Sora v1.2), split into exportable parts.

The encoder is written as three modules so that a 4.7B-parameter model can be captured and
converted a few blocks at a time:

    T5Embed      input_ids, attention_mask -> hidden, position_bias
    T5Blocks     hidden, position_bias     -> hidden          (blocks start..stop-1)
    T5FinalNorm  hidden                    -> last_hidden_state

`T5Encoder` chains them. Every module's ``state_dict`` uses the Hugging Face T5 encoder key
names (``shared.weight``, ``encoder.block.{i}.…``, ``encoder.final_layer_norm.weight``), so a
part loads with ``strict=True`` from the subset of checkpoint keys it reports in its own
``state_dict()``. `normalize_t5_keys` maps the keys of a real checkpoint onto ours.

Export constraints shaped the code: shapes are static, there is no data-dependent Python
control flow, the relative-position bucket table is a constant computed at construction
(the bias *values* are a weight, gathered from it in the graph), token ids are int32 (Core ML
has no int64 inputs) and the attention mask is a float 0/1 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASK_BIAS",
    "T5_CONFIGS",
    "T5Blocks",
    "T5Config",
    "T5Embed",
    "T5Encoder",
    "T5FinalNorm",
    "make_fp16_overflowing",
    "normalize_t5_keys",
    "relative_position_buckets",
    "remap_t5_state_dict",
    "split_blocks",
]

# Additive bias on padded keys. Finite on purpose: torch.finfo(float32).min becomes -inf when
# cast to fp16, and -inf rows or 0 * -inf give NaN; finfo(float16).min (-65504) overflows to
# -inf as soon as a negative score is added. -1e4 (what transformers used before switching to
# finfo.min) is exact in fp16, leaves ~55k of headroom for the unscaled T5 scores, and
# exp(-1e4) underflows to exactly 0 in fp16 and fp32, so padded keys get zero weight.
MASK_BIAS: float = -1.0e4


def _positive(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"T5Config.{attribute.name} must be positive, got {value}")


@attrs.frozen
class T5Config:
    """Sizes of a T5 v1.1 encoder (gated-gelu FFN, no biases, shared relative position bias).

    ``max_length`` is the static sequence length the exported graphs are built for; the
    modules also accept any shorter length.
    """

    vocab_size: int = attrs.field(validator=_positive)
    d_model: int = attrs.field(validator=_positive)
    d_kv: int = attrs.field(validator=_positive)
    d_ff: int = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    relative_attention_num_buckets: int = attrs.field(default=32, validator=_positive)
    relative_attention_max_distance: int = attrs.field(default=128, validator=_positive)
    layer_norm_epsilon: float = 1e-6
    max_length: int = attrs.field(default=300, validator=_positive)

    def __attrs_post_init__(self) -> None:
        buckets = self.relative_attention_num_buckets
        if buckets < 4 or buckets % 2:
            raise ValueError(
                f"T5Config.relative_attention_num_buckets must be even and >= 4, got {buckets}"
            )
        if self.relative_attention_max_distance <= buckets // 4:
            raise ValueError(
                "T5Config.relative_attention_max_distance must exceed "
                f"relative_attention_num_buckets // 4 ({buckets // 4}), "
                f"got {self.relative_attention_max_distance}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads (num_heads * d_kv)."""
        return self.num_heads * self.d_kv

    def param_count_block(self) -> int:
        """Parameters of one encoder block (q, k, v, o, gated FFN, two norms).

        The same for every block: block 0's relative_attention_bias is owned by `T5Embed` and
        counted in `param_count_embedding`.
        """
        attention = 4 * self.d_model * self.inner_dim
        ffn = 3 * self.d_model * self.d_ff
        norms = 2 * self.d_model
        return attention + ffn + norms

    def param_count_embedding(self) -> int:
        """Parameters of `T5Embed`: the shared token embedding plus the relative bias table."""
        return self.vocab_size * self.d_model + self.relative_attention_num_buckets * self.num_heads

    def param_count_total(self) -> int:
        """Parameters of the whole encoder: embedding, all blocks and the final norm."""
        return (
            self.param_count_embedding() + self.num_layers * self.param_count_block() + self.d_model
        )


T5_CONFIGS: dict[str, T5Config] = {
    # Seconds to build, capture and convert; still exercises multi-head attention, several
    # blocks (so chunking has something to split) and padding.
    "tiny": T5Config(
        vocab_size=128, d_model=64, d_kv=32, d_ff=128, num_layers=4, num_heads=2, max_length=16
    ),
    # google/t5-v1_1-xxl (DeepFloyd/t5-v1_1-xxl), the text encoder of Open-Sora v1.2.
    "full": T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        max_length=300,
    ),
}  # fmt: skip


def relative_position_buckets(
    length: int, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bidirectional T5 bucket index for every (query i, key j) pair, as int64 [length, length].

    Relative position is j - i. Half of the buckets hold positive offsets; within each half,
    offsets below ``num_buckets // 4`` get a bucket each, larger ones share logarithmically
    wider buckets up to ``max_distance``, beyond which they all land in the last bucket.

    Computed in float32 torch arithmetic in the same order as Mesh TensorFlow / transformers:
    an offset whose log ratio lands on an integer truncates differently in float32 and
    float64 for some settings (e.g. offset 8 with 18 buckets, distance 128; the standard
    32 / 128 agree either way), and trained bias tables assume the float32 result.
    """
    half = num_buckets // 2
    max_exact = half // 2
    positions = torch.arange(length, dtype=torch.long, device="cpu")
    relative = positions[None, :] - positions[:, None]
    buckets = (relative > 0).to(torch.long) * half
    distance = relative.abs()
    # log(0) = -inf for distance 0 is harmless: those entries take the exact branch below.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).to(torch.long)
    large = large.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class _KeyScope(nn.Module):
    """Holds children only, so that parameters get Hugging Face T5 key paths. No forward."""


class T5RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias.

    The mean square is taken in float32 whatever the input dtype (as transformers does), then
    the normalised value is cast to the weight's dtype before scaling.
    """

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, hidden: Tensor) -> Tensor:
        hidden32 = hidden.to(torch.float32)
        variance = hidden32.pow(2).mean(-1, keepdim=True)
        normed = hidden32 * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention without biases and without 1/sqrt(d_kv) scaling.

    The scaling is folded into the trained q weights; the additive ``position_bias``
    [B or 1, H, L, L] carries both the relative position bias and the key padding mask.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        # Same statistics as the transformers T5 initialiser (factor 1.0), so seeded random
        # weights produce activations of a realistic scale.
        nn.init.normal_(self.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
        nn.init.normal_(self.k.weight, std=cfg.d_model**-0.5)
        nn.init.normal_(self.v.weight, std=cfg.d_model**-0.5)
        nn.init.normal_(self.o.weight, std=cfg.inner_dim**-0.5)

    def _heads(self, projected: Tensor) -> Tensor:
        # [B, L, H*D] -> [B, H, L, D]; unflatten uses config constants, not traced shapes.
        return projected.unflatten(-1, (self.num_heads, self.d_kv)).transpose(1, 2)

    def forward(self, hidden: Tensor, position_bias: Tensor) -> Tensor:
        query = self._heads(self.q(hidden))
        key = self._heads(self.k(hidden))
        value = self._heads(self.v(hidden))
        scores = torch.matmul(query, key.transpose(-1, -2)) + position_bias
        # Softmax in float32 so an fp16 run does not lose the row maximum's precision.
        weights = F.softmax(scores.float(), dim=-1).to(value.dtype)
        attended = torch.matmul(weights, value).transpose(1, 2).flatten(2)
        return self.o(attended)


class T5GatedFFN(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases (T5 v1.1 "gated-gelu")."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        nn.init.normal_(self.wi_0.weight, std=cfg.d_model**-0.5)
        nn.init.normal_(self.wi_1.weight, std=cfg.d_model**-0.5)
        nn.init.normal_(self.wo.weight, std=cfg.d_ff**-0.5)

    def forward(self, hidden: Tensor) -> Tensor:
        gated = F.gelu(self.wi_0(hidden), approximate="tanh") * self.wi_1(hidden)
        return self.wo(gated)


class T5SelfAttentionLayer(nn.Module):
    """Pre-norm residual self-attention (``layer.0`` of a block)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.SelfAttention = T5SelfAttention(cfg)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden: Tensor, position_bias: Tensor) -> Tensor:
        return hidden + self.SelfAttention(self.layer_norm(hidden), position_bias)


class T5FeedForwardLayer(nn.Module):
    """Pre-norm residual gated FFN (``layer.1`` of a block)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5GatedFFN(cfg)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5Block(nn.Module):
    """One encoder block. Unlike transformers, fp16 activations are NOT clamped: an overflow
    must surface as inf so the export's fidelity check catches it."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg), T5FeedForwardLayer(cfg)])

    def forward(self, hidden: Tensor, position_bias: Tensor) -> Tensor:
        hidden = self.layer[0](hidden, position_bias)
        return self.layer[1](hidden)


class T5Embed(nn.Module):
    """Token embedding and the attention bias shared by every block.

    State-dict keys: ``shared.weight`` [vocab, d_model] and
    ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`` [buckets, heads].

    ``forward(input_ids, attention_mask)``:
      input_ids       int32 (or int64) [B, L], L <= cfg.max_length
      attention_mask  float [B, L], 1.0 for tokens, 0.0 for padding
    returns ``(hidden, position_bias)``: hidden [B, L, d_model] in the weight dtype (fp32
    normally); position_bias [B, H, L, L] = relative position bias + MASK_BIAS on padded keys.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.shared.weight, std=1.0)
        attention = _KeyScope()
        attention.relative_attention_bias = nn.Embedding(
            cfg.relative_attention_num_buckets, cfg.num_heads
        )
        nn.init.normal_(attention.relative_attention_bias.weight, std=cfg.d_model**-0.5)
        layer0 = _KeyScope()
        layer0.SelfAttention = attention
        block0 = _KeyScope()
        block0.layer = nn.ModuleList([layer0])
        self.encoder = _KeyScope()
        self.encoder.block = nn.ModuleDict({"0": block0})
        # A plain attribute, not a buffer, on purpose: it is derived from the config, so it
        # must survive meta-device construction, to_empty() and load_state_dict(assign=True),
        # all of which would leave a buffer empty or uninitialised. torch.export records it
        # as a constant tensor.
        self.bucket_index = relative_position_buckets(
            cfg.max_length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )

    @property
    def relative_attention_bias(self) -> nn.Embedding:
        """The learned [buckets, heads] bias table (block 0's, shared by every block)."""
        return self.encoder.block["0"].layer[0].SelfAttention.relative_attention_bias

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        length = input_ids.shape[-1]
        if length > self.cfg.max_length:
            raise ValueError(
                f"sequence length {length} exceeds T5Config.max_length {self.cfg.max_length}"
            )
        hidden = F.embedding(input_ids, self.shared.weight)
        table = self.relative_attention_bias.weight
        # No-op slices and moves are skipped rather than traced: torch.export records them as
        # aten.alias, which coremltools 9 cannot convert.
        buckets = self.bucket_index
        if length != self.cfg.max_length:
            buckets = buckets[:length, :length]
        if buckets.device != table.device:
            buckets = buckets.to(table.device)
        if attention_mask.dtype != table.dtype:
            attention_mask = attention_mask.to(table.dtype)
        relative = F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]
        key_mask = (1.0 - attention_mask) * MASK_BIAS  # [B, L]
        # The permuted gather makes the sum non-contiguous; a contiguous position_bias keeps
        # a Blocks graph captured from it convertible (Core ML rejects other dim orders).
        return hidden, (relative + key_mask[:, None, None, :]).contiguous()


class T5Blocks(nn.Module):
    """Encoder blocks ``start .. stop-1`` with their global key names
    (``encoder.block.{i}.layer.{0,1}.…``), so any contiguous group loads from the checkpoint.

    ``forward(hidden [B, L, d_model], position_bias [B, H, L, L]) -> hidden [B, L, d_model]``.
    """

    def __init__(self, cfg: T5Config, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop <= cfg.num_layers:
            raise ValueError(
                f"block range [{start}, {stop}) is empty or outside 0..{cfg.num_layers}"
            )
        self.cfg = cfg
        self.start = start
        self.stop = stop
        self.encoder = _KeyScope()
        self.encoder.block = nn.ModuleDict({str(i): T5Block(cfg) for i in range(start, stop)})

    def block(self, index: int) -> T5Block:
        """The block with global index ``index`` (start <= index < stop)."""
        return self.encoder.block[str(index)]

    def forward(self, hidden: Tensor, position_bias: Tensor) -> Tensor:
        for index in range(self.start, self.stop):
            hidden = self.block(index)(hidden, position_bias)
        return hidden


class T5FinalNorm(nn.Module):
    """The encoder's final RMSNorm; key ``encoder.final_layer_norm.weight``."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.encoder = _KeyScope()
        self.encoder.final_layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.encoder.final_layer_norm(hidden)


_PARTS = ("embed", "blocks", "final_norm")
_RELATIVE_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _part_of(key: str) -> str:
    """Which child of T5Encoder owns the Hugging Face key ``key``."""
    if key.startswith("shared.") or key == _RELATIVE_BIAS_KEY:
        return "embed"
    if key.startswith("encoder.final_layer_norm."):
        return "final_norm"
    return "blocks"


class T5Encoder(nn.Module):
    """`T5Embed` -> `T5Blocks(0, num_layers)` -> `T5FinalNorm`.

    Its ``state_dict`` / ``load_state_dict`` use the flat Hugging Face keys (the children's
    keys without the ``embed.`` / ``blocks.`` / ``final_norm.`` level), so a whole encoder and
    its parts read the same checkpoint. ``named_parameters`` still shows the child level.

    ``forward(input_ids [B, L], attention_mask [B, L]) -> last_hidden_state [B, L, d_model]``.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = T5Embed(cfg)
        self.blocks = T5Blocks(cfg, 0, cfg.num_layers)
        self.final_norm = T5FinalNorm(cfg)
        self.register_state_dict_post_hook(_flatten_part_keys)
        self.register_load_state_dict_pre_hook(_route_part_keys)
        self.register_load_state_dict_post_hook(_report_flat_keys)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden, position_bias = self.embed(input_ids, attention_mask)
        hidden = self.blocks(hidden, position_bias)
        return self.final_norm(hidden)


def _flatten_part_keys(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: dict
) -> None:
    for part in _PARTS:
        part_prefix = f"{prefix}{part}."
        for key in [k for k in state_dict if k.startswith(part_prefix)]:
            state_dict[prefix + key[len(part_prefix) :]] = state_dict.pop(key)


def _route_part_keys(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object
) -> None:
    # Keys outside the flat layout (including a stray "embed.…") are routed too and then
    # reported by strict loading as unexpected, not silently dropped.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        state_dict[f"{prefix}{_part_of(local)}.{local}"] = state_dict.pop(key)


def _report_flat_keys(module: nn.Module, incompatible: Any) -> None:
    # Missing/unexpected keys are reported in the flat checkpoint layout the caller used.
    # (A size-mismatch message is composed inside torch and still names the child level.)
    # ``incompatible`` is torch's private _IncompatibleKeys; its lists are edited in place.
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [_strip_part(key) for key in keys]


def _strip_part(key: str) -> str:
    """``[prefix.]embed.shared.weight`` -> ``[prefix.]shared.weight``; other keys unchanged."""
    for part in _PARTS:
        for root in ("shared.", "encoder."):
            marker = f"{part}.{root}"
            if key.startswith(marker):
                return key[len(part) + 1 :]
            head, found, tail = key.partition(f".{marker}")
            if found:
                return f"{head}.{root}{tail}"
    return key


def split_blocks(cfg: T5Config, max_params_per_chunk: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` block ranges covering ``0 .. cfg.num_layers``.

    Each range holds at least one block and at most ``max_params_per_chunk`` parameters;
    blocks are packed greedily, which gives the fewest chunks because all blocks are the same
    size. Raises ValueError if a single block exceeds the budget.
    """
    per_block = cfg.param_count_block()
    if per_block > max_params_per_chunk:
        raise ValueError(
            f"one T5 block has {per_block:,} parameters, more than the chunk budget "
            f"{max_params_per_chunk:,}"
        )
    blocks_per_chunk = max_params_per_chunk // per_block
    return [
        (start, min(start + blocks_per_chunk, cfg.num_layers))
        for start in range(0, cfg.num_layers, blocks_per_chunk)
    ]


def normalize_t5_keys(state_dict_keys: Iterable[str]) -> dict[str, str]:
    """Map a T5 checkpoint's keys onto ours: returns ``{our_key: checkpoint_key}``.

    Accepts the layouts transformers writes for T5EncoderModel, T5Model and
    T5ForConditionalGeneration:

    - ``shared.weight`` comes from ``shared.weight`` if present, else from its tied copy
      ``encoder.embed_tokens.weight``; when both exist the tied copy is ignored.
    - ``decoder.*``, ``decoder.embed_tokens.weight`` and ``lm_head.weight`` (the decoder side
      of an encoder-decoder checkpoint) are ignored.
    - Every other key maps to itself, so a loader that builds
      ``{ours: checkpoint[theirs]}`` and calls ``load_state_dict(strict=True)`` reports
      unknown keys as unexpected and absent ones as missing instead of dropping them.
    """
    keys = list(state_dict_keys)
    present = set(keys)
    mapping: dict[str, str] = {}
    for key in keys:
        if key.startswith("decoder.") or key == "lm_head.weight":
            continue
        if key == "encoder.embed_tokens.weight":
            if "shared.weight" not in present:
                mapping["shared.weight"] = key
            continue
        mapping[key] = key
    return mapping


def remap_t5_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` re-keyed with `normalize_t5_keys`, ready for ``load_state_dict``."""
    return {ours: state_dict[theirs] for ours, theirs in normalize_t5_keys(state_dict).items()}


def make_fp16_overflowing(
    model_or_blocks: T5Encoder | T5Blocks, block_index: int, factor: float
) -> None:
    """Scale block ``block_index``'s FFN in place so its ``wo`` output grows by ``factor``.

    ``wi_1`` and ``wo`` are each multiplied by sqrt(factor): the gated FFN is linear in
    ``wi_1``, so the ``wo`` output scales by exactly ``factor`` (up to rounding), while the
    weights and the activations before ``wo`` grow only by sqrt(factor) and stay finite in
    fp16 for moderate factors (1e5 on the tiny seeded model). This reproduces T5 v1.1's real
    fp16 failure: the ``wo`` output passes 65504 and becomes inf; fp32 stays finite.
    Deterministic: no randomness, same result for the same weights and factor.
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    blocks = model_or_blocks.blocks if isinstance(model_or_blocks, T5Encoder) else model_or_blocks
    if not blocks.start <= block_index < blocks.stop:
        raise ValueError(
            f"block {block_index} is not in this module's range [{blocks.start}, {blocks.stop})"
        )
    ffn = blocks.block(block_index).layer[1].DenseReluDense
    root = math.sqrt(factor)
    with torch.no_grad():
        ffn.wi_1.weight.mul_(root)
        ffn.wo.weight.mul_(root)
