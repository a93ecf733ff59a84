"""Open-Sora v1.2 rectified-flow sampler (RFLOW) with Linear Proportional Leap (LPL).

This is the reference an on-device runtime mirrors: :func:`sample` is plain PyTorch around a
velocity callable, and :func:`manifest_section` writes every number the runtime needs
(transformed timesteps, step sizes, leap factors, LPL parameters) plus the exact update and
leap rules as text, so that no Python runs on the device.

Conventions (Open-Sora v1.2): ``t`` runs from ``num_timesteps`` (pure noise) towards 0
(data); the model predicts the velocity ``x0 - eps`` of the path
``x_t = (1 - t/1000) * x0 + (t/1000) * eps``, so each step *adds* ``v * dt``.

Differences from the upstream Python, on purpose:

- Timesteps and the transform ratio are computed in float64 from exact pixel sizes.
  Open-Sora computes the ratio in the inference dtype (bf16 by default), which rounds
  sqrt(20) = 4.4721 to 4.46875 for 68 frames; the values here are the exact ones.
- Dynamic LPL measures the cosine similarity over the whole flattened velocity of each
  batch element (On-device Sora's script looks at one 2-D slice ``v[0, 0, 0]``), and
  starts tracking from the second step, while the leap itself is gated by
  ``min_fraction`` (see :func:`sample`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

__all__ = [
    "LPLSettings",
    "SampleResult",
    "SamplerSettings",
    "VelocityFn",
    "euler_step_sizes",
    "guided_velocity",
    "manifest_section",
    "sample",
    "timestep_ratio",
    "timesteps",
]

logger = logging.getLogger(__name__)

LPLMode = Literal["off", "static", "dynamic"]
VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``velocity_fn(z, t)``: ``z`` [B,4,T,h,w], ``t`` [B] (0..num_timesteps) -> guided v like ``z``."""

# Denominator floor of the cosine similarity: only matters for an all-zero velocity.
_COSINE_EPS = 1e-12
# Frames per VAE micro-batch and latent frames it yields (Open-Sora's hard-coded ratio).
_VAE_MICRO_FRAMES = 17
_VAE_MICRO_LATENT_FRAMES = 5
# Base resolution of the timestep transform (pixels).
_BASE_RESOLUTION = 512 * 512


def _check_unit_interval(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must lie in [0, 1], got {value!r}")


@attrs.frozen
class LPLSettings:
    """How (and whether) the sampler leaps to the end of the trajectory.

    - ``off``: plain Euler for all steps.
    - ``static``: ``static_steps`` Euler steps, then the leap at step ``static_steps``.
    - ``dynamic``: leap once the guided velocity stops changing direction, but never
      before ``min_steps(num_steps)`` Euler steps; see :func:`sample` for the exact rule.
    """

    mode: LPLMode = attrs.field(
        default="dynamic", validator=attrs.validators.in_(("off", "static", "dynamic"))
    )
    static_steps: int = attrs.field(default=15, validator=attrs.validators.ge(0))
    min_fraction: float = attrs.field(default=0.5, validator=_check_unit_interval)
    tolerance: float = attrs.field(default=1e-3, validator=attrs.validators.ge(0.0))
    patience: int = attrs.field(default=3, validator=attrs.validators.ge(1))

    def min_steps(self, num_steps: int) -> int:
        """Euler steps taken before a dynamic leap may happen: ``ceil(min_fraction*num_steps)``.

        Rounded to 9 decimals first so that e.g. 0.28*25 = 7.000000000000001 gives 7, not 8.
        """
        return math.ceil(round(self.min_fraction * num_steps, 9))


@attrs.frozen
class SamplerSettings:
    """RFLOW settings; the defaults are Open-Sora v1.2's inference config plus dynamic LPL."""

    num_steps: int = attrs.field(default=30, validator=attrs.validators.ge(1))
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    lpl: LPLSettings = LPLSettings()


@attrs.frozen
class SampleResult:
    """Outcome of :func:`sample`.

    ``model_evaluations`` counts calls of the velocity callable (each one is a doubled-batch
    model run when built by :func:`guided_velocity`); it equals ``leapt_at + 1`` after a
    leap and ``num_steps`` otherwise. ``leapt_at`` is the step index whose velocity was
    used for the leap (also the number of Euler steps taken before it), or None.
    ``cosine_history[k]`` is the similarity between the velocities of steps k and k+1, so it
    has ``model_evaluations - 1`` entries.
    """

    latent: Tensor
    model_evaluations: int
    leapt_at: int | None
    cosine_history: list[float]


def _latent_frame_factor(num_frames: int) -> int:
    """Open-Sora's ``F``: 1 for an image, else ``num_frames // 17 * 5``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return 1
    if num_frames < _VAE_MICRO_FRAMES:
        # Upstream would compute F = 0, a zero ratio and all-zero timesteps: refuse instead.
        raise ValueError(
            f"the timestep transform needs 1 or >= {_VAE_MICRO_FRAMES} frames, got {num_frames}"
        )
    return num_frames // _VAE_MICRO_FRAMES * _VAE_MICRO_LATENT_FRAMES


def timestep_ratio(*, height: int, width: int, num_frames: int) -> float:
    """The transform ratio ``r = sqrt(H*W / 512**2) * sqrt(F)`` (H, W pixels; F see module)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1 pixel, got {height}x{width}")
    frames = _latent_frame_factor(num_frames)
    return math.sqrt(height * width / _BASE_RESOLUTION) * math.sqrt(frames)


def timesteps(
    settings: SamplerSettings, *, height: int, width: int, num_frames: int
) -> list[float]:
    """The ``num_steps`` timesteps ``t'_i`` in sampling order (descending, first = 1000).

    ``t_i = (1 - i/N) * num_timesteps`` for i = 0..N-1; with the transform enabled,
    ``s = t/num_timesteps``, ``s' = r*s / (1 + (r-1)*s)`` and ``t' = num_timesteps * s'``
    with ``r`` from :func:`timestep_ratio`. Sizes are pixel sizes of the generated video.
    """
    n = settings.num_steps
    scale = float(settings.num_timesteps)
    raw = [(1.0 - i / n) * scale for i in range(n)]
    if not settings.use_timestep_transform:
        return raw
    r = timestep_ratio(height=height, width=width, num_frames=num_frames)
    out = []
    for t in raw:
        s = t / scale
        out.append(scale * (r * s / (1.0 + (r - 1.0) * s)))
    return out


def euler_step_sizes(ts: Sequence[float], num_timesteps: int) -> list[float]:
    """Factor multiplying ``v`` at each step: ``(t'_i - t'_{i+1}) / T``, last ``t'_last / T``."""
    scale = float(num_timesteps)
    return [
        (ts[i] - ts[i + 1]) / scale if i + 1 < len(ts) else ts[i] / scale for i in range(len(ts))
    ]


def _batch_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over the batch of ``<a_k, b_k> / max(|a_k|*|b_k|, 1e-12)`` on flattened elements."""
    # float64 so the reference is independent of the model dtype; tolerance >> rounding.
    a64 = a.detach().flatten(1).to(torch.float64)
    b64 = b.detach().flatten(1).to(torch.float64)
    dot = (a64 * b64).sum(dim=1)
    norms = a64.norm(dim=1) * b64.norm(dim=1)
    return float((dot / norms.clamp_min(_COSINE_EPS)).mean())


@attrs.define
class _PlateauTracker:
    """Counts consecutive cosine measurements that fail to beat the best by ``tolerance``."""

    tolerance: float
    best: float = -math.inf
    stalled: int = 0

    def update(self, cosine: float) -> None:
        if cosine > self.best + self.tolerance:
            self.best = cosine
            self.stalled = 0
        else:
            self.stalled += 1


def sample(
    velocity_fn: VelocityFn,
    z: Tensor,
    settings: SamplerSettings,
    *,
    height: int,
    width: int,
    num_frames: int,
) -> SampleResult:
    """Integrate from noise ``z`` [B,4,T,h,w] to a clean latent with Euler steps and LPL.

    With ``t'_0 > ... > t'_{N-1}`` from :func:`timesteps` and ``T = num_timesteps``, step i
    evaluates ``v_i = velocity_fn(z_i, t'_i)`` (``t`` as a [B] tensor of ``z``'s dtype), then
    either takes the Euler step ``z_{i+1} = z_i + v_i * (t'_i - t'_{i+1}) / T`` (the last step
    uses ``t'_{N-1} / T``) or *leaps*: ``z_0 = z_i + v_i * t'_i / T`` and stops. A leap
    reuses ``v_i``, so it costs no extra evaluation; a leap at the last step would equal the
    plain Euler step, so leaps are only taken at steps ``i <= N-2``.

    Leap rule at step i (evaluated after ``v_i``):

    - ``off``: never.
    - ``static``: ``i == static_steps`` (15 of 30 gives 16 evaluations).
    - ``dynamic``: for every ``i >= 1`` the sampler measures
      ``c_i = mean_b cos(v_i[b], v_{i-1}[b])`` over each flattened batch element. A running
      ``best`` starts at -inf; if ``c_i > best + tolerance`` then ``best = c_i`` and
      ``stalled = 0``, else ``stalled += 1``. Leap when ``i >= ceil(min_fraction * N)`` and
      ``stalled >= patience``. Measurements before the minimum count too, so a trajectory
      that is already straight leaps exactly at ``max(ceil(min_fraction*N), patience+1)``
      (when that is at most N-2).

    Runs under ``torch.no_grad()``; ``z`` is not modified in place.
    """
    ts = timesteps(settings, height=height, width=width, num_frames=num_frames)
    step_sizes = euler_step_sizes(ts, settings.num_timesteps)
    lpl = settings.lpl
    min_steps = lpl.min_steps(len(ts))
    tracker = _PlateauTracker(tolerance=lpl.tolerance)
    history: list[float] = []
    previous: Tensor | None = None
    last_step = len(ts) - 1

    with torch.no_grad():
        for i, t in enumerate(ts):
            t_batch = torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device)
            v = velocity_fn(z, t_batch)
            if v.shape != z.shape:
                raise ValueError(
                    f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(z.shape)}"
                )
            if previous is not None:
                cosine = _batch_cosine(v, previous)
                history.append(cosine)
                tracker.update(cosine)
            previous = v

            if i < last_step:
                if lpl.mode == "static":
                    leap = i == lpl.static_steps
                elif lpl.mode == "dynamic":
                    leap = i >= min_steps and tracker.stalled >= lpl.patience
                else:
                    leap = False
                if leap:
                    logger.debug("LPL leap at step %d of %d (t'=%.3f)", i, len(ts), t)
                    latent = z + v * (t / settings.num_timesteps)
                    return SampleResult(latent, i + 1, i, history)
            z = z + v * step_sizes[i]

    return SampleResult(z, len(ts), None, history)


def _pair(name: str, cond_value: Any, null_value: Any, batch: int) -> Any:
    """Stack a conditional and an unconditional input along the batch dimension."""
    if not isinstance(cond_value, Tensor) or cond_value.ndim == 0:
        # Scalars (e.g. pixel height as an int) are shared by both halves of the batch.
        return cond_value
    for label, value in (("cond", cond_value), ("null", null_value)):
        if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{label}[{name!r}] must have batch size {batch}, got {shape}")
    return torch.cat([cond_value, null_value], dim=0)


def guided_velocity(
    model: Callable[..., Tensor],
    cond: Mapping[str, Any],
    null: Mapping[str, Any],
    cfg_scale: float,
    in_channels: int = 4,
) -> VelocityFn:
    """Wrap an STDiT3-like model into the classifier-free-guided ``velocity_fn`` of :func:`sample`.

    ``cond`` holds the model's keyword inputs for the prompt (``y`` [B,1,L,C], ``mask``
    [B,L], ``fps``, ``height``, ``width``); ``null`` holds the unconditional ones, at least
    ``y`` (the null caption). Every batched tensor in ``cond`` is stacked as
    ``[cond; null]`` where ``null`` provides that key, else duplicated as ``[cond; cond]``
    (Open-Sora duplicates the text mask for the null caption); scalars and 0-d tensors pass
    unchanged. The model runs once per call as
    ``model([z; z], [t; t], y=..., mask=..., fps=..., height=..., width=...)``; its output
    keeps channels ``0..in_channels-1``, the first B rows are ``v_c``, the last B ``v_u``,
    and the result is ``v_u + cfg_scale * (v_c - v_u)``.
    """
    if "y" not in cond or "y" not in null:
        raise ValueError("both cond and null must provide the caption embedding 'y'")
    unknown = sorted(set(null) - set(cond))
    if unknown:
        raise ValueError(f"null has inputs that cond lacks: {unknown}")
    cond = dict(cond)
    null = dict(null)

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        batch = z.shape[0]
        inputs = {
            name: _pair(name, value, null.get(name, value), batch) for name, value in cond.items()
        }
        out = model(torch.cat([z, z], dim=0), torch.cat([t, t], dim=0), **inputs)
        if out.shape[0] != 2 * batch or out.shape[1] < in_channels:
            raise ValueError(
                f"model output {tuple(out.shape)} lacks batch {2 * batch} or {in_channels} channels"
            )
        pred = out[:, :in_channels]
        v_cond, v_uncond = pred[:batch], pred[batch:]
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return velocity


_ALGORITHM = (
    "Rectified flow, Euler, N = num_steps, T = num_timesteps. z starts as N(0, I) of shape "
    "latent (batch first). For step i = 0..N-1 with t = timesteps[i]: run the model on batch "
    "[z; z] with timestep [t; t], y = [y_cond; y_null], mask = [mask; mask] (same text mask "
    "for both halves), keep output channels 0..3, split the batch into v_c (first half) and "
    "v_u (second half), v = v_u + cfg_scale * (v_c - v_u). Euler: z = z + v * dt[i] where "
    "dt[i] = (timesteps[i] - timesteps[i+1]) / T and dt[N-1] = timesteps[N-1] / T. "
    "Leap (LPL), only for i <= N-2 and replacing that step's Euler update: "
    "z = z + v * leap_dt[i] with leap_dt[i] = timesteps[i] / T, reusing the velocity of step "
    "i (no extra model run), then stop; z is the clean latent. "
    "lpl.mode 'off': never leap. 'static': leap at i == static_steps (model runs = "
    "static_steps + 1). 'dynamic': for every i >= 1, c = mean over batch elements b of "
    "dot(v_i[b], v_{i-1}[b]) / max(|v_i[b]| * |v_{i-1}[b]|, 1e-12), each element flattened; "
    "best starts at -infinity and stalled at 0; if c > best + tolerance then best = c and "
    "stalled = 0, else stalled += 1; leap at step i when i >= min_steps and stalled >= "
    "patience, with min_steps = ceil(min_fraction * N) given as an integer."
)


def _shape_entry(settings: SamplerSettings, shape: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in ("height", "width", "num_frames", "latent") if key not in shape]
    if missing:
        raise ValueError(f"sampler shape {dict(shape)!r} lacks {missing}")
    latent = [int(d) for d in shape["latent"]]
    if len(latent) != 4:
        raise ValueError(f"latent must be [C, T, h, w], got {latent}")
    height, width, frames = int(shape["height"]), int(shape["width"]), int(shape["num_frames"])
    ts = timesteps(settings, height=height, width=width, num_frames=frames)
    static_leap = settings.lpl.static_steps
    return {
        "height": height,
        "width": width,
        "num_frames": frames,
        "latent": latent,
        "timesteps": ts,
        "dt": euler_step_sizes(ts, settings.num_timesteps),
        "leap_dt": [t / settings.num_timesteps for t in ts],
        "static_leap_step": static_leap if static_leap <= len(ts) - 2 else None,
    }


def manifest_section(settings: SamplerSettings, shapes: list[dict]) -> dict[str, Any]:
    """The manifest's ``sampler`` section: JSON-serialisable, everything a runtime needs.

    ``shapes`` lists the exported shapes as ``{"height", "width", "num_frames"}`` in pixels
    plus ``"latent": [4, T, h, w]``. Each gets its ``timesteps`` (equal to
    :func:`timesteps`), per-step Euler factors ``dt`` and leap factors ``leap_dt`` (already
    divided by ``num_timesteps``), and ``static_leap_step`` (None when the static leap would
    fall on the last step). ``lpl.min_steps`` is precomputed so runtimes need no rounding.
    """
    lpl = settings.lpl
    return {
        "scheduler": "rflow",
        "prediction": "velocity x0 - eps; x_t = (1 - t/T) * x0 + (t/T) * eps",
        "num_steps": settings.num_steps,
        "num_timesteps": settings.num_timesteps,
        "cfg_scale": settings.cfg_scale,
        "use_timestep_transform": settings.use_timestep_transform,
        "lpl": {
            "mode": lpl.mode,
            "static_steps": lpl.static_steps,
            "min_fraction": lpl.min_fraction,
            "min_steps": lpl.min_steps(settings.num_steps),
            "tolerance": lpl.tolerance,
            "patience": lpl.patience,
        },
        "shapes": [_shape_entry(settings, shape) for shape in shapes],
        "algorithm": _ALGORITHM,
    }
