"""The ``stdit3`` component plugin (alias ``stdit``): STDiT3 chunked for export.

Chunks: ``input`` (patch/position/timestep/fps/caption embedders and t_block), then groups
of consecutive spatial+temporal block pairs sized to the profile's per-chunk budget, then
``output`` (final layer + unpatchify). With ``--weights stdit3=PATH`` the configuration is
read from the checkpoint's shapes and every key is checked before anything is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from sora_export.core.checkpoint import CheckpointReader
from sora_export.core.errors import UsageError
from sora_export.core.hookspecs import hookimpl
from sora_export.core.types import (
    Chunk,
    ComponentBuildContext,
    ComponentSpec,
    ExportPlan,
    ExportShape,
    PipelineLink,
    PlannedComponent,
    RunResult,
    TensorSpec,
    bytes_per_param,
    chained_parts,
)
from sora_export.core.weights import WeightSource, open_checkpoint, seeded_value
from sora_export.plugins.stdit3.model import (
    OPTIONAL_KEYS,
    STDIT3_CONFIGS,
    STDiT3,
    STDiT3Blocks,
    STDiT3Config,
    STDiT3Input,
    STDiT3Output,
    split_block_pairs,
)

NAME = "stdit3"
CFG_BATCH = 2  # classifier-free guidance runs the conditional and null caption together
PREFIXES = ("", "module.", "model.", "ema.")
_PROBE = "x_embedder.proj.weight"


@attrs.frozen
class STDiT3Description:
    """What planning learned about the component: config, weights, export shape."""

    cfg: STDiT3Config
    weights: WeightSource
    shape: ExportShape


def config_from_checkpoint(reader: CheckpointReader, prefix: str) -> STDiT3Config:
    """Read STDiT3's hyper-parameters from tensor shapes (no tensor is loaded)."""
    hidden = reader.shape(prefix + _PROBE)[0]
    depth = 0
    while prefix + f"spatial_blocks.{depth}.attn.qkv.weight" in reader:
        depth += 1
    if depth == 0:
        raise UsageError(f"weights {str(reader.path)!r}: no spatial_blocks.* keys found")
    head_dim_key = prefix + "spatial_blocks.0.attn.q_norm.weight"
    head_dim = reader.shape(head_dim_key)[0] if head_dim_key in reader else 72
    mlp_hidden = reader.shape(prefix + "spatial_blocks.0.mlp.fc1.weight")[0]
    caption_channels = reader.shape(prefix + "y_embedder.y_proj.fc1.weight")[1]
    max_length = reader.shape(prefix + "y_embedder.y_embedding")[0]
    in_channels = reader.shape(prefix + _PROBE)[1]
    out_features = reader.shape(prefix + "final_layer.linear.weight")[0]
    return STDiT3Config(
        depth=depth,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        mlp_ratio=mlp_hidden / hidden,
        in_channels=in_channels,
        out_channels=out_features // 4,
        caption_channels=caption_channels,
        model_max_length=max_length,
        qk_norm=head_dim_key in reader,
    )


def describe(ctx: ComponentBuildContext) -> STDiT3Description:
    if ctx.weights is None:
        cfg = STDIT3_CONFIGS["full" if ctx.size == "full" else "tiny"]
        return STDiT3Description(cfg, WeightSource(seed=ctx.seed), ctx.shape)
    reader = CheckpointReader(ctx.weights)
    prefix = reader.detect_prefix(PREFIXES, _PROBE)
    try:
        cfg = config_from_checkpoint(reader, prefix)
    except KeyError as exc:
        raise UsageError(f"weights {str(ctx.weights)!r}: missing key {exc.args[0]!r}") from exc
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in STDiT3(cfg).state_dict().items()}
    reader.validate(expected, prefix=prefix, optional=OPTIONAL_KEYS)
    source = WeightSource(path=Path(ctx.weights), prefix=prefix, optional=OPTIONAL_KEYS)
    return STDiT3Description(cfg, source, ctx.shape)


# -- picklable builders and input makers -------------------------------------------------
@attrs.frozen
class PartBuilder:
    """Builds one STDiT3 part with only its own weights."""

    cfg: STDiT3Config
    part: str  # "input" | "blocks" | "output"
    weights: WeightSource
    start: int = 0
    stop: int = 0
    latent_hw: tuple[int, int] | None = None

    def factory(self) -> Callable[[], torch.nn.Module]:
        if self.part == "input":
            return lambda: STDiT3Input(self.cfg)
        if self.part == "blocks":
            return lambda: STDiT3Blocks(self.cfg, self.start, self.stop)
        return lambda: STDiT3Output(self.cfg, self.latent_hw)

    def __call__(self) -> torch.nn.Module:
        return self.weights.build(self.factory())


def model_inputs(cfg: STDiT3Config, shape: ExportShape, seed: int) -> tuple[torch.Tensor, ...]:
    """Deterministic STDiT3 inputs at the export shape (CFG batch of 2, half-valid text)."""
    g = torch.Generator().manual_seed(seed + 7)
    t, (h, w) = shape.latent_frames, shape.latent_hw
    length = cfg.model_max_length
    x = torch.randn(CFG_BATCH, cfg.in_channels, t, h, w, generator=g)
    timestep = torch.tensor([700.0, 700.0])
    y = torch.randn(CFG_BATCH, 1, length, cfg.caption_channels, generator=g)
    mask = torch.zeros(CFG_BATCH, length)
    mask[0, : max(1, length // 2)] = 1.0
    mask[1, : max(1, length // 4)] = 1.0
    fps = torch.full((CFG_BATCH,), 24.0)
    height = torch.full((CFG_BATCH,), float(shape.height))
    width = torch.full((CFG_BATCH,), float(shape.width))
    return x, timestep, y, mask, fps, height, width


@attrs.frozen
class PartInputs:
    """Example inputs for a part: conditioning comes from running the (small) input part,
    so block and output chunks see realistic modulation, caption and mask values."""

    cfg: STDiT3Config
    part: str
    weights: WeightSource
    shape: ExportShape
    seed: int

    def __call__(self) -> tuple[torch.Tensor, ...]:
        inputs = model_inputs(self.cfg, self.shape, self.seed)
        if self.part == "input":
            return inputs
        embed = PartBuilder(self.cfg, "input", self.weights)()
        with torch.no_grad():
            tokens, t, t_mlp, y_tokens, y_bias = embed.eval()(*inputs)
        if self.part == "blocks":
            return tokens, t_mlp, y_tokens, y_bias
        return tokens, t


# -- chunk plan ---------------------------------------------------------------------------
def token_shape(cfg: STDiT3Config, shape: ExportShape) -> tuple[int, ...]:
    t, (h, w) = shape.latent_frames, shape.latent_hw
    pt, ph, pw = cfg.patch_size
    return (CFG_BATCH, -(-t // pt), -(-h // ph), -(-w // pw), cfg.hidden_size)


def plan_chunks(desc: STDiT3Description, budget_bytes: int, policy: str, seed: int) -> list[Chunk]:
    cfg, shape = desc.cfg, desc.shape
    b, c, length = CFG_BATCH, cfg.hidden_size, cfg.model_max_length
    t, (h, w) = shape.latent_frames, shape.latent_hw
    tokens = TensorSpec("tokens", token_shape(cfg, shape))
    # Core ML forbids a name used as both input and output of one function
    tokens_out = TensorSpec("tokens_out", token_shape(cfg, shape))
    cond = {
        "t": TensorSpec("t", (b, c)),
        "t_mlp": TensorSpec("t_mlp", (b, 6 * c)),
        "y_tokens": TensorSpec("y_tokens", (b, length, c)),
        "y_bias": TensorSpec("y_bias", (b, 1, 1, length)),
    }
    model_in = (
        TensorSpec("x", (b, cfg.in_channels, t, h, w)),
        TensorSpec("timestep", (b,)),
        TensorSpec("y", (b, 1, length, cfg.caption_channels)),
        TensorSpec("mask", (b, length)),
        TensorSpec("fps", (b,)),
        TensorSpec("height", (b,)),
        TensorSpec("width", (b,)),
    )

    def inputs_for(part: str) -> PartInputs:
        return PartInputs(cfg, part, desc.weights, shape, seed)

    chunks = [
        Chunk(
            component=NAME,
            index=0,
            name="input",
            build=PartBuilder(cfg, "input", desc.weights),
            example_inputs=inputs_for("input"),
            inputs=model_in,
            outputs=(tokens, cond["t"], cond["t_mlp"], cond["y_tokens"], cond["y_bias"]),
            params=cfg.param_count_input(),
            wiring={s.name: f"pipeline:{s.name}" for s in model_in},
            meta={"config": attrs.asdict(cfg)},
        )
    ]
    max_params = int(budget_bytes / bytes_per_param(policy))
    previous = f"{NAME}/input"
    for start, stop in split_block_pairs(cfg, max_params):
        name = f"blocks-{start:02d}-{stop - 1:02d}"
        blocks = Chunk(
            component=NAME,
            index=len(chunks),
            name=name,
            build=PartBuilder(cfg, "blocks", desc.weights, start, stop),
            example_inputs=inputs_for("blocks"),
            inputs=(tokens, cond["t_mlp"], cond["y_tokens"], cond["y_bias"]),
            outputs=(tokens_out,),
            params=(stop - start) * cfg.param_count_block_pair(),
            wiring={
                "tokens": f"{previous}:{'tokens' if start == 0 else 'tokens_out'}",
                "t_mlp": f"{NAME}/input:t_mlp",
                "y_tokens": f"{NAME}/input:y_tokens",
                "y_bias": f"{NAME}/input:y_bias",
            },
            meta={"blocks": [start, stop]},
        )
        # one part per block pair, converted separately (in parallel, cached pair by pair)
        # and stitched into this chunk's package; every pair is one architecture, so one
        # template is lowered and the pairs' weights are bound into it (core/rebind.py)
        pairs = [
            (
                f"pair-{i:02d}",
                PartBuilder(cfg, "blocks", desc.weights, i, i + 1),
                cfg.param_count_block_pair(),
                {"blocks": [i, i + 1]},
            )
            for i in range(start, stop)
        ]
        chunks.append(
            attrs.evolve(
                blocks,
                parts=chained_parts(blocks, pairs, {"tokens": "tokens_out"}, template="block-pair"),
            )
        )
        previous = f"{NAME}/{name}"
    chunks.append(
        Chunk(
            component=NAME,
            index=len(chunks),
            name="output",
            build=PartBuilder(cfg, "output", desc.weights, latent_hw=(h, w)),
            example_inputs=inputs_for("output"),
            inputs=(tokens, cond["t"]),
            outputs=(TensorSpec("velocity", (b, cfg.out_channels, t, h, w)),),
            params=cfg.param_count_output(),
            wiring={"tokens": f"{previous}:tokens_out", "t": f"{NAME}/input:t"},
            meta={"keep_channels": cfg.in_channels},
        )
    )
    return chunks


@hookimpl
def sora_export_register_components(register: Callable[[ComponentSpec], None]) -> None:
    register(
        ComponentSpec(
            name=NAME,
            description="STDiT3 diffusion transformer (Open-Sora v1.2, XL/2 at full size)",
            order=20,
            describe=describe,
            aliases=("stdit",),
            links={
                "y": PipelineLink(
                    "t5:y",
                    "guidance batch: stack [y, null caption (stdit3/null_caption.npy)] "
                    "on axis 0 and add axis 1 -> [2, 1, L, C]",
                ),
                "mask": PipelineLink(
                    "t5:attention_mask", "guidance batch: the text mask twice -> [2, L]"
                ),
            },
        )
    )


@hookimpl
def sora_export_chunk_component(component: PlannedComponent) -> list[Chunk] | None:
    if component.spec.name != NAME:
        return None
    desc: STDiT3Description = component.description
    ctx = component.context
    return plan_chunks(desc, ctx.chunk_budget_bytes, ctx.policy, ctx.seed)


NULL_CAPTION_KEY = "y_embedder.y_embedding"


def null_caption(desc: STDiT3Description) -> torch.Tensor:
    """The null caption ``[L, caption_channels]`` used for classifier-free guidance.

    torch.export drops this buffer from the input chunk (the forward never reads it), so a
    runtime gets it as a file beside the chunks instead.
    """
    source = desc.weights
    if source.is_random:
        shape = (desc.cfg.model_max_length, desc.cfg.caption_channels)
        return seeded_value(NULL_CAPTION_KEY, shape, source.seed)
    return open_checkpoint(source.path).get(source.prefix + NULL_CAPTION_KEY)


@hookimpl
def sora_export_package(plan: ExportPlan, result: RunResult, bundle: Path) -> dict[str, Any] | None:
    component = next((c for c in plan.components if c.spec.name == NAME), None)
    if component is None:
        return None
    caption = null_caption(component.description).to(torch.float32).numpy()
    folder = bundle / NAME
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "null_caption.npy", caption)
    return {
        NAME: {
            "null_caption": {
                "path": f"{NAME}/null_caption.npy",
                "shape": list(caption.shape),
                "dtype": "float32",
            },
            "cfg_batch": CFG_BATCH,
            "keep_channels": component.description.cfg.in_channels,
        }
    }
