"""The ``tinyclip`` component plugin: a CLIP-style text encoder chunked for export.

Chunks, in pipeline order (batch 1: a prompt is encoded once):

    embed          input_ids int32 [1, L] -> hidden [1, L, width]
    layers-AA-BB   hidden -> hidden_out       (layers AA..BB, as many as the budget holds)
    final-norm     hidden -> last_hidden_state [1, L, width]

Without ``--weights`` the ``tiny`` config (``--size tiny``) or CLIP ViT-B/32's text tower
(``--size full``) is built with seeded random weights. With ``--weights tinyclip=PATH`` (a
``.safetensors``/torch file, or a Hugging Face directory such as one written by
``CLIPTextModel.save_pretrained``) the sizes are read from the tensor shapes, the head count
and activation from a ``config.json`` beside the weights (else ``width // 64`` and
``quick_gelu``), and every key is checked before anything is exported.
"""

from __future__ import annotations

import json
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
    ExportPlan,
    PlannedComponent,
    RunResult,
    TensorSpec,
    bytes_per_param,
)
from sora_export.core.weights import WeightSource

from sora_export_tinyclip.model import (
    CONFIGS,
    HEAD_DIM,
    TinyClipConfig,
    TinyClipEmbed,
    TinyClipFinalNorm,
    TinyClipLayers,
    TinyClipTextModel,
    split_layers,
)

NAME = "tinyclip"
BATCH = 1
# Where the text tower sits in checkpoints: bare, a CLIPTextModel / CLIPModel save
# (``text_model.``), a wrapper around one, or a DataParallel save.
PREFIXES = ("", "text_model.", "model.text_model.", "module.")
_PROBE = "embeddings.token_embedding.weight"
# Older transformers versions saved the position ids as a persistent buffer.
IGNORED_PREFIXES = ("embeddings.position_ids",)


@attrs.frozen
class TinyClipDescription:
    """What planning learned: the config and where the weights come from."""

    cfg: TinyClipConfig
    weights: WeightSource


# -- describe: config from the size or from the checkpoint -------------------------------
def read_hf_config(weights: Path) -> Mapping[str, Any]:
    """The text settings of a Hugging Face directory's ``config.json`` (its ``text_config``
    for a whole CLIPModel); empty for a single file or a directory without one."""
    path = weights / "config.json"
    if not weights.is_dir() or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(path)!r} is not a readable JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} is not a JSON object")
    text = data.get("text_config", data)
    return text if isinstance(text, dict) else {}


def config_from_checkpoint(
    reader: CheckpointReader, prefix: str, hf_config: Mapping[str, Any]
) -> TinyClipConfig:
    """Sizes from tensor shapes (no tensor is read); heads, activation and eps from
    ``hf_config`` when it states them. Raises UsageError naming the key or field at fault."""
    where = str(reader.path)

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in reader:
            raise UsageError(f"weights {where!r} do not match the model: missing key {key!r}")
        return tuple(reader.shape(prefix + key))

    vocab_size, width = shape(_PROBE)
    max_length = shape("embeddings.position_embedding.weight")[0]
    layers = 0
    while prefix + f"encoder.layers.{layers}.self_attn.q_proj.weight" in reader:
        layers += 1
    if layers == 0:
        raise UsageError(f"weights {where!r}: no encoder.layers.* keys under {prefix!r}")
    mlp_width = shape("encoder.layers.0.mlp.fc1.weight")[0]
    heads = hf_config.get("num_attention_heads", max(1, width // HEAD_DIM))
    activation = hf_config.get("hidden_act", "quick_gelu")
    eps = hf_config.get("layer_norm_eps", 1e-5)
    try:
        return TinyClipConfig(
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            max_length=max_length,
            mlp_width=mlp_width,
            eps=eps,
            activation=activation,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"weights {where!r}: not a usable text encoder config: {exc}") from exc


def describe(ctx: ComponentBuildContext) -> TinyClipDescription:
    """The config and weight source for a build context; checks a checkpoint strictly."""
    if ctx.weights is None:
        cfg = CONFIGS["base" if ctx.size == "full" else "tiny"]
        return TinyClipDescription(cfg, WeightSource(seed=ctx.seed))
    weights = Path(ctx.weights)
    reader = CheckpointReader(weights)
    prefix = reader.detect_prefix(PREFIXES, _PROBE)
    cfg = config_from_checkpoint(reader, prefix, read_hf_config(weights))
    with torch.device("meta"):  # key names and shapes without allocating the model
        expected = {k: tuple(v.shape) for k, v in TinyClipTextModel(cfg).state_dict().items()}
    reader.validate(expected, prefix=prefix, ignore_prefixes=IGNORED_PREFIXES)
    return TinyClipDescription(cfg, WeightSource(path=weights, prefix=prefix))


# -- picklable builders and input makers -------------------------------------------------
@attrs.frozen
class PartBuilder:
    """Builds one part (``embed``, ``layers`` start..stop-1, ``final-norm``) with only its
    own weights. A module-level attrs class, so a chunk can travel to a worker process."""

    cfg: TinyClipConfig
    part: str
    weights: WeightSource
    start: int = 0
    stop: int = 0

    def factory(self) -> Callable[[], torch.nn.Module]:
        if self.part == "embed":
            return lambda: TinyClipEmbed(self.cfg)
        if self.part == "layers":
            return lambda: TinyClipLayers(self.cfg, self.start, self.stop)
        if self.part == "final-norm":
            return lambda: TinyClipFinalNorm(self.cfg)
        raise ValueError(f"unknown {NAME} part {self.part!r}")

    def __call__(self) -> torch.nn.Module:
        return self.weights.build(self.factory())


def prompt_ids(cfg: TinyClipConfig, seed: int) -> torch.Tensor:
    """A deterministic tokenised prompt, int32 [1, L], laid out as CLIP's tokenizer does:
    start token (``vocab_size - 2``), about L/3 ids from ``[0, vocab_size - 2)``, end token
    (``vocab_size - 1``), then the end token again as padding."""
    length = cfg.max_length
    bos, eos = cfg.vocab_size - 2, cfg.vocab_size - 1
    words = max(0, min(length - 2, length // 3))
    g = torch.Generator().manual_seed(seed + 11)
    ids = torch.full((BATCH, length), eos, dtype=torch.int32)
    ids[0, 0] = bos
    ids[0, 1 : 1 + words] = torch.randint(0, bos, (words,), generator=g, dtype=torch.int32)
    return ids


@attrs.frozen
class PartInputs:
    """Example inputs of a part: the prompt for ``embed``; for the others, what the model
    computes from that prompt up to the part (embed, then layers ``0 .. start-1``, built
    and freed one at a time), so every chunk is checked at realistic activation scales."""

    cfg: TinyClipConfig
    part: str
    weights: WeightSource
    seed: int
    start: int = 0

    def __call__(self) -> tuple[torch.Tensor, ...]:
        ids = prompt_ids(self.cfg, self.seed)
        if self.part == "embed":
            return (ids,)
        with torch.no_grad():
            hidden = PartBuilder(self.cfg, "embed", self.weights)().eval()(ids)
            for index in range(self.start):
                layer = PartBuilder(self.cfg, "layers", self.weights, index, index + 1)()
                hidden = layer.eval()(hidden)
                del layer
        return (hidden,)


# -- chunk plan ---------------------------------------------------------------------------
def plan_chunks(
    desc: TinyClipDescription, budget_bytes: int, policy: str, seed: int
) -> list[Chunk]:
    """``embed``, layer groups within ``budget_bytes`` at ``policy``, then ``final-norm``.

    Raises UsageError if one layer does not fit the budget.
    """
    cfg = desc.cfg
    ids = TensorSpec("input_ids", (BATCH, cfg.max_length), "int32")
    hidden = TensorSpec("hidden", (BATCH, cfg.max_length, cfg.width))
    # Core ML forbids one name as both input and output of a function
    hidden_out = TensorSpec("hidden_out", (BATCH, cfg.max_length, cfg.width))
    max_params = int(budget_bytes / bytes_per_param(policy))
    try:
        groups = split_layers(cfg, max_params)
    except ValueError as exc:
        raise UsageError(
            f"{NAME}: {exc} ({budget_bytes:,} bytes at {policy}); pick a profile with a "
            "larger chunk budget or a smaller quantization policy"
        ) from exc

    chunks = [
        Chunk(
            component=NAME,
            index=0,
            name="embed",
            build=PartBuilder(cfg, "embed", desc.weights),
            example_inputs=PartInputs(cfg, "embed", desc.weights, seed),
            inputs=(ids,),
            outputs=(hidden,),
            params=cfg.param_count_embed(),
            wiring={"input_ids": "pipeline:input_ids"},
            meta={"part": "embed", "config": attrs.asdict(cfg)},
        )
    ]
    previous = f"{NAME}/embed:hidden"
    for start, stop in groups:
        name = f"layers-{start:02d}-{stop - 1:02d}"
        chunks.append(
            Chunk(
                component=NAME,
                index=len(chunks),
                name=name,
                build=PartBuilder(cfg, "layers", desc.weights, start, stop),
                example_inputs=PartInputs(cfg, "layers", desc.weights, seed, start),
                inputs=(hidden,),
                outputs=(hidden_out,),
                params=(stop - start) * cfg.param_count_layer(),
                wiring={"hidden": previous},
                meta={"part": "layers", "layers": [start, stop]},
            )
        )
        previous = f"{NAME}/{name}:hidden_out"
    chunks.append(
        Chunk(
            component=NAME,
            index=len(chunks),
            name="final-norm",
            build=PartBuilder(cfg, "final-norm", desc.weights),
            example_inputs=PartInputs(cfg, "final-norm", desc.weights, seed, cfg.layers),
            inputs=(hidden,),
            outputs=(TensorSpec("last_hidden_state", (BATCH, cfg.max_length, cfg.width)),),
            params=cfg.param_count_final_norm(),
            wiring={"hidden": previous},
            meta={"part": "final-norm"},
        )
    )
    return chunks


# -- hooks --------------------------------------------------------------------------------
@hookimpl
def sora_export_register_components(register: Callable[[ComponentSpec], None]) -> None:
    register(
        ComponentSpec(
            name=NAME,
            description="CLIP-style text encoder (tiny; CLIP ViT-B/32 text tower at full size)",
            order=10,
            describe=describe,
            aliases=("clip-text",),
        )
    )


@hookimpl
def sora_export_chunk_component(component: PlannedComponent) -> list[Chunk] | None:
    if component.spec.name != NAME:
        return None  # another plugin's component
    desc: TinyClipDescription = component.description
    ctx = component.context
    return plan_chunks(desc, ctx.chunk_budget_bytes, ctx.policy, ctx.seed)


@hookimpl
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any] | None:
    component = next((c for c in plan.components if c.spec.name == NAME), None)
    if component is None:
        return None
    cfg: TinyClipConfig = component.description.cfg
    # what a runtime needs to tokenise a prompt the way the example inputs were made
    return {
        NAME: {
            "max_length": cfg.max_length,
            "vocab_size": cfg.vocab_size,
            "bos_id": cfg.vocab_size - 2,
            "eos_id": cfg.vocab_size - 1,
            "pad_id": cfg.vocab_size - 1,
        }
    }
