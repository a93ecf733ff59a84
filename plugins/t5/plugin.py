"""The ``t5`` component plugin (alias ``t5-xxl``): the T5 v1.1 encoder chunked for export.

Chunks, in pipeline order (batch 1: the prompt is encoded once per video; the null caption
of classifier-free guidance comes from STDiT3's ``y_embedding``, not from T5):

    embed           input_ids int32 [1, L], attention_mask float32 [1, L]
                    -> hidden [1, L, d_model], position_bias [1, H, L, L]
    blocks-AA-BB    hidden, position_bias -> hidden_out   (blocks AA..BB, sized to the budget)
    final-norm      hidden -> y [1, L, d_model]

``L`` is the config's ``max_length`` (300 at full size, what Open-Sora pads prompts to).

With ``--weights t5=PATH`` (a Hugging Face directory such as DeepFloyd/t5-v1_1-xxl with
sharded ``pytorch_model-*.bin`` or ``*.safetensors`` plus an index, or one file) the
configuration is read from the tensor shapes (and checked against a ``config.json`` in the
directory, if any), encoder-decoder checkpoints are accepted with their decoder ignored,
and every encoder key is checked before anything is exported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from sora_export.core.checkpoint import CheckpointReader
from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import (
    Chunk,
    ComponentBuildContext,
    ComponentSpec,
    PlannedComponent,
    TensorSpec,
    bytes_per_param,
    chained_parts,
)
from sora_export.core.weights import WeightSource
from sora_export.plugins.t5.model import (
    T5_CONFIGS,
    T5Blocks,
    T5Config,
    T5Embed,
    T5Encoder,
    T5FinalNorm,
    normalize_t5_keys,
    split_blocks,
)

NAME = "t5"
BATCH = 1  # the prompt is encoded once; the null caption is STDiT3's y_embedding
EOS_ID = 1
PAD_ID = 0
OPEN_SORA_MAX_LENGTH = 300  # Open-Sora v1.2 pads every prompt to 300 tokens
# Where a T5 encoder sits in checkpoints seen in the wild: bare (transformers), a
# DataParallel/DeepSpeed wrapper, or a text-to-video pipeline's text encoder.
PREFIXES = ("", "module.", "text_encoder.", "model.")
# Present in every T5 checkpoint (encoder-only or encoder-decoder) and nowhere else.
_PROBE = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_SHARED = "shared.weight"
_TIED_SHARED = "encoder.embed_tokens.weight"
# The decoder side of an encoder-decoder checkpoint, and the tied copy of the embedding
# (read through an alias when shared.weight is absent, otherwise redundant).
IGNORED_PREFIXES = ("decoder.", "lm_head.", "encoder.embed_tokens.")
_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.")
# transformers' names for the tanh-approximated gated GELU that T5 v1.1 uses.
_GATED_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")
# Example inputs of a deep chunk run the preceding blocks (one at a time) only while they
# hold at most this many parameters: every tiny config qualifies, while at full size one
# T5-XXL block alone (193M) is over it, and re-running up to 23 blocks for every chunk
# would cost minutes per chunk. Over the limit, a chunk sees the embed part's output.
WARMUP_MAX_PARAMS = 50_000_000


@attrs.frozen
class T5Description:
    """What planning learned about the component: its config and where its weights are."""

    cfg: T5Config
    weights: WeightSource


# -- describe: config from the profile or from the checkpoint's shapes ---------------------
def _max_length_option(ctx: ComponentBuildContext) -> int | None:
    """``[plugins.t5] max_length`` from the profile, validated; None when unset."""
    value = ctx.profile.options(NAME).get("max_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(
            f"profile {ctx.profile.name!r}: [plugins.{NAME}] max_length must be a positive "
            f"integer, got {value!r}"
        )
    return value


def _read_hf_config(weights: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face directory, or None for files / no config."""
    path = weights / "config.json"
    if not weights.is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(path)!r} is not a readable JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} is not a JSON object")
    return data


def config_from_checkpoint(
    reader: CheckpointReader,
    prefix: str,
    max_length: int,
    hf_config: Mapping[str, Any] | None = None,
) -> T5Config:
    """Read the encoder's sizes from tensor shapes (no tensor is loaded).

    ``vocab_size``/``d_model`` come from ``shared.weight`` (or its tied copy
    ``encoder.embed_tokens.weight``), ``num_layers`` from the highest ``encoder.block.N``,
    ``d_ff`` from block 0's ``wi_0``, buckets and heads from the relative attention bias
    [buckets, heads], ``d_kv`` from ``q.weight`` rows / heads. Values that shapes cannot
    give (``relative_attention_max_distance``, ``layer_norm_epsilon``) come from
    ``hf_config`` when present, else T5 v1.1's 128 and 1e-6; every size ``hf_config``
    states must agree with the shapes. Raises UsageError naming the key or field at fault.
    """
    where = str(reader.path)

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in reader:
            raise UsageError(f"weights {where!r} do not match the model: missing key {key!r}")
        return tuple(reader.shape(prefix + key))

    if prefix + _SHARED in reader:
        vocab_size, d_model = shape(_SHARED)
    elif prefix + _TIED_SHARED in reader:
        vocab_size, d_model = shape(_TIED_SHARED)
    else:
        raise UsageError(
            f"weights {where!r} do not match the model: missing key {prefix + _SHARED!r} "
            f"(nor its tied copy {prefix + _TIED_SHARED!r})"
        )
    checkpoint_keys = reader.keys()  # a list; the reader itself is not iterable
    blocks = [
        int(m.group(1))
        for k in checkpoint_keys
        if k.startswith(prefix) and (m := _BLOCK_KEY.match(k[len(prefix) :]))
    ]
    num_layers = max(blocks) + 1  # the probe key guarantees block 0 exists
    ffn = "encoder.block.0.layer.1.DenseReluDense."
    if prefix + ffn + "wi_0.weight" not in reader and prefix + ffn + "wi.weight" in reader:
        raise UsageError(
            f"weights {where!r} are a T5 v1.0 checkpoint (ReLU FFN 'wi'); this encoder is "
            "T5 v1.1 (gated-gelu FFN 'wi_0'/'wi_1'), e.g. DeepFloyd/t5-v1_1-xxl"
        )
    d_ff = shape(ffn + "wi_0.weight")[0]
    buckets, num_heads = shape(_PROBE)
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if inner % num_heads:
        raise UsageError(
            f"weights {where!r}: q.weight has {inner} rows, not a multiple of the "
            f"{num_heads} heads of the relative attention bias"
        )
    from_shapes = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": inner // num_heads,
        "d_ff": d_ff,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "relative_attention_num_buckets": buckets,
    }
    extra: dict[str, Any] = {}
    if hf_config is not None:
        for field, value in from_shapes.items():
            stated = hf_config.get(field)
            if stated is not None and stated != value:
                raise UsageError(
                    f"weights {where!r}: config.json says {field}={stated!r} but the tensor "
                    f"shapes give {value}"
                )
        proj = hf_config.get("feed_forward_proj")
        if proj is not None and proj not in _GATED_GELU:
            raise UsageError(
                f"weights {where!r}: config.json says feed_forward_proj={proj!r}; this "
                f"encoder is T5 v1.1 ({_GATED_GELU[0]!r})"
            )
        for field in ("relative_attention_max_distance", "layer_norm_epsilon"):
            if hf_config.get(field) is not None:
                extra[field] = hf_config[field]
    try:
        return T5Config(**from_shapes, **extra, max_length=max_length)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"weights {where!r}: not a usable T5 configuration: {exc}") from exc


def describe(ctx: ComponentBuildContext) -> T5Description:
    """Config and weight source for a build context; validates a checkpoint strictly.

    Sequence length: the profile's ``[plugins.t5] max_length`` if set; otherwise the size's
    config (16 tiny, 300 full) for seeded weights, and 300 (Open-Sora's caption length)
    for a checkpoint, whose shapes do not fix it.
    """
    max_length = _max_length_option(ctx)
    if ctx.weights is None:
        cfg = T5_CONFIGS["full" if ctx.size == "full" else "tiny"]
        if max_length is not None:
            cfg = attrs.evolve(cfg, max_length=max_length)
        return T5Description(cfg, WeightSource(seed=ctx.seed))
    weights = Path(ctx.weights)
    reader = CheckpointReader(weights)
    prefix = reader.detect_prefix(PREFIXES, _PROBE)
    cfg = config_from_checkpoint(
        reader, prefix, max_length or OPEN_SORA_MAX_LENGTH, _read_hf_config(weights)
    )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in T5Encoder(cfg).state_dict().items()}
    checkpoint_keys = reader.keys()  # a list; the reader itself is not iterable
    ours_to_theirs = normalize_t5_keys(
        k[len(prefix) :] for k in checkpoint_keys if k.startswith(prefix)
    )
    aliases = {ours: theirs for ours, theirs in ours_to_theirs.items() if ours != theirs}
    reader.validate(expected, prefix=prefix, ignore_prefixes=IGNORED_PREFIXES, aliases=aliases)
    return T5Description(cfg, WeightSource(path=weights, prefix=prefix, aliases=aliases))


# -- picklable builders and input makers -------------------------------------------------
@attrs.frozen
class PartBuilder:
    """Builds one T5 part (``embed``, ``blocks`` start..stop-1, ``final-norm``) with only
    its own weights."""

    cfg: T5Config
    part: str
    weights: WeightSource
    start: int = 0
    stop: int = 0

    def factory(self) -> Callable[[], torch.nn.Module]:
        if self.part == "embed":
            return lambda: T5Embed(self.cfg)
        if self.part == "blocks":
            return lambda: T5Blocks(self.cfg, self.start, self.stop)
        if self.part == "final-norm":
            return lambda: T5FinalNorm(self.cfg)
        raise ValueError(f"unknown T5 part {self.part!r}")

    def __call__(self) -> torch.nn.Module:
        return self.weights.build(self.factory())


def prompt_inputs(cfg: T5Config, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic tokenised prompt as Open-Sora feeds T5: ``(input_ids, attention_mask)``.

    ``input_ids`` int32 [1, L]: about L/3 ids drawn from [2, vocab) (0 and 1 are T5's pad
    and EOS), then EOS (1), then pad (0). ``attention_mask`` float32 [1, L]: 1 on the
    prompt and its EOS, 0 on padding. Same ``cfg`` and ``seed`` give the same tensors.
    """
    if cfg.vocab_size <= EOS_ID + 1:
        raise ValueError(f"vocab_size {cfg.vocab_size} leaves no ids besides pad and EOS")
    length = cfg.max_length
    prompt = max(1, min(length - 1, length // 3))
    g = torch.Generator().manual_seed(seed + 5)
    ids = torch.full((BATCH, length), PAD_ID, dtype=torch.int32)
    ids[0, :prompt] = torch.randint(
        EOS_ID + 1, cfg.vocab_size, (prompt,), generator=g, dtype=torch.int32
    )
    mask = torch.zeros(BATCH, length)
    valid = min(length, prompt + 1)
    if prompt < length:
        ids[0, prompt] = EOS_ID
    mask[0, :valid] = 1.0
    return ids, mask


def warmup_blocks(cfg: T5Config, start: int) -> int:
    """How many of the blocks before ``start`` a chunk's example inputs run through:
    all of them if they hold at most WARMUP_MAX_PARAMS parameters, else none."""
    return start if start * cfg.param_count_block() <= WARMUP_MAX_PARAMS else 0


@attrs.frozen
class PartInputs:
    """Example inputs for a part, in its chunk's input order.

    ``embed`` gets :func:`prompt_inputs`. The other parts get what the model computes from
    that prompt: the embed part's output, run through blocks ``0 .. warmup-1`` (built and
    freed one at a time) so a deep chunk sees realistic activation scales. ``warmup`` is 0
    when running the earlier blocks is too costly (see :data:`WARMUP_MAX_PARAMS`).
    """

    cfg: T5Config
    part: str
    weights: WeightSource
    seed: int
    warmup: int = 0

    def __call__(self) -> tuple[torch.Tensor, ...]:
        ids, mask = prompt_inputs(self.cfg, self.seed)
        if self.part == "embed":
            return ids, mask
        with torch.no_grad():
            embed = PartBuilder(self.cfg, "embed", self.weights)().eval()
            hidden, position_bias = embed(ids, mask)
            del embed
            for index in range(self.warmup):
                block = PartBuilder(self.cfg, "blocks", self.weights, index, index + 1)()
                hidden = block.eval()(hidden, position_bias)
                del block
        if self.part == "blocks":
            return hidden, position_bias
        return (hidden,)


# -- chunk plan ---------------------------------------------------------------------------
def plan_chunks(desc: T5Description, budget_bytes: int, policy: str, seed: int) -> list[Chunk]:
    """``embed``, block groups within ``budget_bytes`` at ``policy``, then ``final-norm``.

    Raises UsageError if one block does not fit the budget.
    """
    cfg = desc.cfg
    length, d, heads = cfg.max_length, cfg.d_model, cfg.num_heads
    ids = TensorSpec("input_ids", (BATCH, length), "int32")
    mask = TensorSpec("attention_mask", (BATCH, length), "float32")
    hidden = TensorSpec("hidden", (BATCH, length, d))
    # Core ML forbids a name used as both input and output of one function
    hidden_out = TensorSpec("hidden_out", (BATCH, length, d))
    position_bias = TensorSpec("position_bias", (BATCH, heads, length, length))
    max_params = int(budget_bytes / bytes_per_param(policy))
    try:
        groups = split_blocks(cfg, max_params)
    except ValueError as exc:
        raise UsageError(
            f"{NAME}: {exc} ({budget_bytes:,} bytes at {policy}); pick a profile with a "
            "larger chunk budget or a smaller quantization policy"
        ) from exc

    def inputs_for(part: str, start: int = 0) -> PartInputs:
        return PartInputs(cfg, part, desc.weights, seed, warmup_blocks(cfg, start))

    embed_key = f"{NAME}/embed"
    chunks = [
        Chunk(
            component=NAME,
            index=0,
            name="embed",
            build=PartBuilder(cfg, "embed", desc.weights),
            example_inputs=inputs_for("embed"),
            inputs=(ids, mask),
            outputs=(hidden, position_bias),
            params=cfg.param_count_embedding(),
            wiring={s.name: f"pipeline:{s.name}" for s in (ids, mask)},
            meta={"config": attrs.asdict(cfg), "eos_id": EOS_ID, "pad_id": PAD_ID},
        )
    ]
    previous = f"{embed_key}:hidden"
    for start, stop in groups:
        name = f"blocks-{start:02d}-{stop - 1:02d}"
        group = Chunk(
            component=NAME,
            index=len(chunks),
            name=name,
            build=PartBuilder(cfg, "blocks", desc.weights, start, stop),
            example_inputs=inputs_for("blocks", start),
            inputs=(hidden, position_bias),
            outputs=(hidden_out,),
            params=(stop - start) * cfg.param_count_block(),
            wiring={"hidden": previous, "position_bias": f"{embed_key}:position_bias"},
            meta={"blocks": [start, stop], "example_warmup_blocks": warmup_blocks(cfg, start)},
        )
        # one part per encoder block, converted separately and stitched (see Chunk.parts);
        # the blocks share one template (block 0's relative bias lives in the embed chunk)
        blocks = [
            (
                f"block-{i:02d}",
                PartBuilder(cfg, "blocks", desc.weights, i, i + 1),
                cfg.param_count_block(),
                {"blocks": [i, i + 1]},
            )
            for i in range(start, stop)
        ]
        chunks.append(
            attrs.evolve(
                group,
                parts=chained_parts(group, blocks, {"hidden": "hidden_out"}, template="block"),
            )
        )
        previous = f"{NAME}/{name}:hidden_out"
    chunks.append(
        Chunk(
            component=NAME,
            index=len(chunks),
            name="final-norm",
            build=PartBuilder(cfg, "final-norm", desc.weights),
            example_inputs=inputs_for("final-norm", cfg.num_layers),
            inputs=(hidden,),
            outputs=(TensorSpec("y", (BATCH, length, d)),),
            params=d,
            wiring={"hidden": previous},
            meta={"example_warmup_blocks": warmup_blocks(cfg, cfg.num_layers)},
        )
    )
    return chunks


@hookimpl
def sora_export_register_components(register: Callable[[ComponentSpec], None]) -> None:
    register(
        ComponentSpec(
            name=NAME,
            description="T5 v1.1 text encoder (t5-v1_1-xxl at full size), encoder only",
            order=10,
            describe=describe,
            aliases=("t5-xxl",),
        )
    )


@hookimpl
def sora_export_chunk_component(component: PlannedComponent) -> list[Chunk] | None:
    if component.spec.name != NAME:
        return None
    desc: T5Description = component.description
    ctx = component.context
    return plan_chunks(desc, ctx.chunk_budget_bytes, ctx.policy, ctx.seed)
