"""Run a component's chunks in manifest order, feeding each from its wiring.

``wiring`` maps a chunk input to ``pipeline:NAME`` or ``COMPONENT/CHUNK:OUTPUT``; this is
how a runtime on the device chains the packages, and how tests and the bundle check prove
that the chunks together compute the unchunked model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from sora_export.core.types import Chunk

ChunkRunner = Callable[[Chunk, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def torch_runner(chunk: Chunk, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build the chunk's module (its weights only), run it in fp32, free it."""
    module = chunk.build().eval()
    with torch.no_grad():
        out = module(*(inputs[s.name] for s in chunk.inputs))
    outs = out if isinstance(out, tuple | list) else (out,)
    return {s.name: o for s, o in zip(chunk.outputs, outs, strict=True)}


def run_chain(
    chunks: Sequence[Chunk],
    pipeline_inputs: Mapping[str, torch.Tensor],
    runner: ChunkRunner = torch_runner,
) -> dict[str, torch.Tensor]:
    """Run ``chunks`` in order; returns every output as ``"COMPONENT/CHUNK:OUTPUT"``."""
    values: dict[str, torch.Tensor] = {f"pipeline:{k}": v for k, v in pipeline_inputs.items()}
    for chunk in chunks:
        feed = {}
        for spec in chunk.inputs:
            source = chunk.wiring.get(spec.name, f"pipeline:{spec.name}")
            if source not in values:
                raise KeyError(f"{chunk.key}: input {spec.name!r} wired to unknown {source!r}")
            feed[spec.name] = values[source]
        for name, value in runner(chunk, feed).items():
            values[f"{chunk.key}:{name}"] = value
    return values
