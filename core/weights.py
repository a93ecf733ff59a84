"""Seeded random weights keyed by parameter name, for exports without a checkpoint.

Each tensor is drawn from a generator seeded by ``(seed, crc32(full_key))``, so a chunk
built alone gets exactly the values the same keys have in the whole model: chaining
separately built chunks reproduces the unchunked model even with random weights.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import torch
from torch import nn

from sora_export.core.checkpoint import CheckpointReader

_NORM_HINTS = ("norm", "ln_", "layernorm", "layer_norm")


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


def seeded_value(key: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """A deterministic, well-scaled random value for a tensor named ``key``.

    Matrices and kernels: N(0, 1/fan_in) (activations keep unit scale through depth);
    norm scales: 1 + N(0, 0.02); norm shifts and biases: N(0, 0.02); other vectors and
    tables: N(0, 0.1). Float32.
    """
    out = torch.empty(tuple(shape))
    _seeded_fill_(out, key, seed)
    return out


def _seeded_fill_(t: torch.Tensor, key: str, seed: int) -> None:
    """Overwrite the float32 tensor ``t`` with :func:`seeded_value` ``(key, t.shape, seed)``,
    in place: the same normal draws (``randn`` is ``normal_`` on a new tensor) scaled by
    the same in-place operations, so bit for bit the same values without a temporary."""
    g = _generator(seed, key)
    shape = tuple(t.shape)
    lowered = key.lower()
    is_norm = any(h in lowered for h in _NORM_HINTS)
    with torch.no_grad():
        t.normal_(generator=g)
        if is_norm and key.endswith("weight") and len(shape) == 1:
            t.mul_(0.02).add_(1.0)
        elif key.endswith("bias"):
            t.mul_(0.02)
        elif len(shape) >= 2 and not key.endswith(("embedding", "table")):
            t.div_(math.sqrt(math.prod(shape[1:])))
        else:
            t.mul_(0.1)


def seeded_fill_(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Overwrite every persistent tensor of ``module`` in place with :func:`seeded_value`
    of its key (``prefix`` + the module's own key): float32 tensors are filled where they
    are (no temporaries: a full-size STDiT3 block pair is 0.2 GB of them), others get the
    value converted to their dtype."""
    for key, t in module.state_dict().items():
        if t.dtype == torch.float32 and t.is_contiguous():
            _seeded_fill_(t, prefix + key, seed)
        else:
            with torch.no_grad():
                t.copy_(seeded_value(prefix + key, t.shape, seed).to(t.dtype))


def seeded_init_(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Overwrite every persistent tensor of ``module`` in place with :func:`seeded_value`.

    ``prefix`` is prepended to the module's own keys, so that a part whose keys are
    already global (``spatial_blocks.3....``) and the whole model agree.
    """
    seeded_fill_(module, seed, prefix)
    return module


def _has_non_persistent_buffers(module: nn.Module) -> bool:
    return any(m._non_persistent_buffers_set for m in module.modules())


def _allocated(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` allocated on the CPU without running its initialisers: constructed
    on the meta device (no memory, no init kernels) and allocated empty. Modules with
    non-persistent buffers (computed at construction) are built on the CPU instead, since
    allocating them empty would lose those values."""
    with torch.device("meta"):
        module = factory()
    if _has_non_persistent_buffers(module):
        return factory()
    return module.to_empty(device="cpu")


def materialize(
    factory: Callable[[], nn.Module],
    values: Callable[[nn.Module], Mapping[str, torch.Tensor]],
) -> nn.Module:
    """Build a module without paying for a throw-away random init, then load its weights
    strictly from ``values(module)``."""
    module = _allocated(factory)
    module.load_state_dict(dict(values(module)), strict=True)
    return module


def seeded_values(seed: int, prefix: str = "") -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """A ``values`` callback for :func:`materialize` giving :func:`seeded_value` weights."""

    def values(module: nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: seeded_value(prefix + k, v.shape, seed).to(v.dtype)
            for k, v in module.state_dict().items()
        }

    return values


@attrs.frozen
class WeightSource:
    """Where a chunk's weights come from: a checkpoint (path + key prefix) or a seed.

    Picklable, so a chunk's builder can travel to a worker process; the checkpoint is
    opened lazily (once per process) and only the module's own keys are read.
    """

    path: Path | None = None
    prefix: str = ""
    seed: int = 0
    optional: tuple[str, ...] = ()
    aliases: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def is_random(self) -> bool:
        return self.path is None

    def values(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.path is None:
            return seeded_values(self.seed)(module)
        keys = list(module.state_dict().keys())
        return open_checkpoint(self.path).state_dict(
            keys, self.prefix, optional=self.optional, aliases=self.aliases
        )

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Construct ``factory()`` and load this source's weights into it, strictly
        (random weights: drawn straight into the allocated tensors)."""
        if self.path is None:
            module = _allocated(factory)
            seeded_fill_(module, self.seed)
            return module
        return materialize(factory, self.values)


@functools.lru_cache(maxsize=8)
def open_checkpoint(path: Path) -> CheckpointReader:
    """One reader per checkpoint path per process (opening reads only headers)."""
    return CheckpointReader(path)
