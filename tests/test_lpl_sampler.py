"""Tests of the RFLOW + LPL reference sampler (sora_export.plugins.lpl.sampler)."""

from __future__ import annotations

import itertools
import json
import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_export.plugins.lpl.sampler import (
    LPLSettings,
    SamplerSettings,
    euler_step_sizes,
    guided_velocity,
    manifest_section,
    sample,
    timesteps,
)

# On-device Sora's case: 256x256 pixels, 68 frames -> latent [4, 20, 32, 32].
VIDEO = {"height": 256, "width": 256, "num_frames": 68}
LATENT_SHAPE = (2, 4, 5, 8, 8)  # small stand-in latent; the sampler is shape-agnostic


def linear_flow(dtype: torch.dtype = torch.float32, seed: int = 0):
    """x_t = (1 - t/1000) x0 + (t/1000) eps, whose exact velocity is the constant x0 - eps."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(LATENT_SHAPE, generator=gen, dtype=dtype)
    eps = torch.randn(LATENT_SHAPE, generator=gen, dtype=dtype)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (z.shape[0],)
        return x0 - eps

    return x0, eps, velocity


class Counting:
    """Wraps a velocity callable and counts its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(z, t)


# --- timesteps -------------------------------------------------------------------------


def test_timesteps_match_hand_computed_values_for_256px_68_frames() -> None:
    ts = timesteps(SamplerSettings(num_steps=30), **VIDEO)
    # r = sqrt(256*256/512^2) * sqrt(68//17*5) = 0.5*sqrt(20) = sqrt(5);
    # t'(s) = 1000 * r*s / (1 + (r-1)*s).
    assert len(ts) == 30
    assert ts[0] == pytest.approx(1000.0, abs=1e-9)
    # s = 29/30: 1000 * 2.1615323 / 2.1948657
    assert ts[1] == pytest.approx(984.8130420201, abs=1e-6)
    # s = 1/2: 1000 * sqrt5 / (1 + sqrt5), the golden-ratio value 690.983...
    assert ts[15] == pytest.approx(690.9830056250526, abs=1e-6)
    assert ts[29] == pytest.approx(71.5860901285812, abs=1e-6)
    assert all(a > b for a, b in itertools.pairwise(ts))


def test_timesteps_without_transform_are_uniform() -> None:
    ts = timesteps(SamplerSettings(num_steps=30, use_timestep_transform=False), **VIDEO)
    assert ts == pytest.approx([1000.0 - 1000.0 * i / 30 for i in range(30)], abs=1e-9)
    # A 512x512 image has ratio 1, so the transform is the identity there.
    image = timesteps(SamplerSettings(num_steps=10), height=512, width=512, num_frames=1)
    assert image == pytest.approx([1000.0 - 100.0 * i for i in range(10)], abs=1e-9)


def test_timesteps_refuse_frame_counts_that_zero_the_ratio() -> None:
    with pytest.raises(ValueError, match="frames"):
        timesteps(SamplerSettings(), height=256, width=256, num_frames=16)


def test_min_steps_is_not_fooled_by_float_rounding() -> None:
    assert 0.28 * 25 > 7  # the trap: 7.000000000000001, whose plain ceil is 8
    assert LPLSettings(min_fraction=0.28).min_steps(25) == 7
    assert LPLSettings(min_fraction=0.5).min_steps(31) == 16
    assert LPLSettings(min_fraction=0.0).min_steps(30) == 0


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError):
        LPLSettings(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LPLSettings(min_fraction=1.5)
    with pytest.raises(ValueError):
        LPLSettings(patience=0)
    with pytest.raises(ValueError):
        SamplerSettings(num_steps=0)


# --- exactly linear flow ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "static", "dynamic"])
def test_linear_flow_returns_x0_in_every_mode(mode: str) -> None:
    x0, eps, velocity = linear_flow()
    counted = Counting(velocity)
    result = sample(counted, eps.clone(), SamplerSettings(lpl=LPLSettings(mode=mode)), **VIDEO)
    torch.testing.assert_close(result.latent, x0, atol=1e-5, rtol=0)
    assert result.model_evaluations == counted.calls
    assert len(result.cosine_history) == counted.calls - 1
    if mode == "off":
        assert (counted.calls, result.leapt_at) == (30, None)
    elif mode == "static":
        assert (counted.calls, result.leapt_at) == (16, 15)  # 15 Euler steps + the leap
    else:
        # Straight from the start: leap at the first allowed step, ceil(0.5 * 30) = 15.
        assert (counted.calls, result.leapt_at) == (16, 15)


def test_sample_does_not_modify_its_input_and_checks_the_velocity_shape() -> None:
    _, eps, velocity = linear_flow()
    before = eps.clone()
    sample(velocity, eps, SamplerSettings(num_steps=4), **VIDEO)
    assert torch.equal(eps, before)
    with pytest.raises(ValueError, match="shape"):
        sample(lambda z, t: z[:, :2], eps, SamplerSettings(num_steps=4), **VIDEO)


# --- a flow that straightens over time -------------------------------------------------


def straightening_flow(seed: int = 0):
    """v(s) = (x0 - eps) + 2 s^4 (cos(4 pi s) w1 + sin(4 pi s) w2), s = t/1000.

    The added component rotates (so consecutive velocities disagree) and its amplitude
    vanishes as s -> 0, so the path is strongly curved early and nearly linear late.
    """
    gen = torch.Generator().manual_seed(seed)
    x0, eps, w1, w2 = (
        torch.randn(LATENT_SHAPE, generator=gen, dtype=torch.float64) for _ in "1234"
    )
    omega = 4 * math.pi

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(torch.float64) / 1000).view(-1, 1, 1, 1, 1)
        swirl = torch.cos(omega * s) * w1 + torch.sin(omega * s) * w2
        return (x0 - eps) + 2 * s**4 * swirl

    return x0, eps, velocity


def test_dynamic_lpl_stops_early_on_a_straightening_flow_with_small_error() -> None:
    _, eps, velocity = straightening_flow()
    base = SamplerSettings(use_timestep_transform=False, lpl=LPLSettings(mode="off"))
    euler = sample(velocity, eps, base, **VIDEO)
    dynamic = sample(velocity, eps, attrs.evolve(base, lpl=LPLSettings()), **VIDEO)
    static = sample(velocity, eps, attrs.evolve(base, lpl=LPLSettings(mode="static")), **VIDEO)

    def relative_error(latent: torch.Tensor) -> float:
        return float((latent - euler.latent).norm() / euler.latent.norm())

    # Measured: dynamic leaps after 22 of 30 evaluations with 0.39% endpoint error against
    # 30-step Euler; static 15/30 is 5.4% off because the path is still curved at step 15.
    assert euler.model_evaluations == 30
    assert 16 < dynamic.model_evaluations < 30
    assert dynamic.leapt_at == dynamic.model_evaluations - 1
    assert relative_error(dynamic.latent) < 0.01
    assert relative_error(dynamic.latent) < relative_error(static.latent) / 5
    # The trajectory straightens: the similarity rises towards 1 before the leap.
    assert dynamic.cosine_history[0] < 0.95 < 0.9995 < dynamic.cosine_history[-1]


# --- invariants under random settings ------------------------------------------------


def replay_dynamic_rule(history: list[float], lpl: LPLSettings, num_steps: int) -> int | None:
    """Independent re-statement of the documented dynamic rule, as a runtime would code it."""
    best, stalled = -math.inf, 0
    for i in range(1, num_steps - 1):
        c = history[i - 1]
        if c > best + lpl.tolerance:
            best, stalled = c, 0
        else:
            stalled += 1
        if i >= lpl.min_steps(num_steps) and stalled >= lpl.patience:
            return i
    return None


@settings(max_examples=40, deadline=None)
@given(
    num_steps=st.integers(1, 40),
    min_fraction=st.floats(0.0, 1.0),
    patience=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_dynamic_lpl_invariants(
    num_steps: int, min_fraction: float, patience: int, seed: int
) -> None:
    lpl = LPLSettings(min_fraction=min_fraction, patience=patience)
    cfg = SamplerSettings(num_steps=num_steps, lpl=lpl)
    min_steps = lpl.min_steps(num_steps)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(LATENT_SHAPE, generator=gen)
    jitter = 2 * torch.rand(num_steps, generator=gen)
    # Occasional reversals make some similarities negative, which the rule must handle.
    sign = torch.where(torch.rand(num_steps, generator=gen) < 0.2, -1.0, 1.0)

    def noisy(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # A fixed direction (sometimes reversed) plus noise of a step-dependent random size,
        # so the similarities go up and down.
        step = min(range(num_steps), key=lambda i: abs(ts[i] - float(t[0])))
        return sign[step] * direction + jitter[step] * torch.randn(LATENT_SHAPE, generator=gen)

    ts = timesteps(cfg, **VIDEO)
    counted = Counting(noisy)
    result = sample(counted, torch.zeros(LATENT_SHAPE), cfg, **VIDEO)
    assert result.model_evaluations == counted.calls <= num_steps
    assert result.model_evaluations >= min(min_steps + 1, num_steps)
    assert len(result.cosine_history) == result.model_evaluations - 1
    if result.leapt_at is None:
        assert result.model_evaluations == num_steps
    else:
        assert min_steps <= result.leapt_at <= num_steps - 2
        assert result.model_evaluations == result.leapt_at + 1
    # Replaying the documented rule on the recorded similarities gives the same leap.
    padded = result.cosine_history + [1.0] * num_steps  # values after a leap are never read
    assert replay_dynamic_rule(padded, lpl, num_steps) == result.leapt_at

    # On an exactly straight flow the leap comes at the earliest point the rule allows.
    x0, eps, velocity = linear_flow()
    straight = sample(velocity, eps, cfg, **VIDEO)
    earliest = max(min_steps, patience + 1)
    assert straight.leapt_at == (earliest if earliest <= num_steps - 2 else None)
    torch.testing.assert_close(straight.latent, x0, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(num_steps=st.integers(1, 40), static_steps=st.integers(0, 45))
def test_static_lpl_leaps_after_static_steps(num_steps: int, static_steps: int) -> None:
    x0, eps, velocity = linear_flow()
    cfg = SamplerSettings(
        num_steps=num_steps, lpl=LPLSettings(mode="static", static_steps=static_steps)
    )
    result = sample(velocity, eps, cfg, **VIDEO)
    if static_steps <= num_steps - 2:
        assert (result.leapt_at, result.model_evaluations) == (static_steps, static_steps + 1)
    else:
        assert (result.leapt_at, result.model_evaluations) == (None, num_steps)
    torch.testing.assert_close(result.latent, x0, atol=1e-5, rtol=0)


# --- manifest ------------------------------------------------------------------------


def test_manifest_section_is_json_and_matches_timesteps() -> None:
    cfg = SamplerSettings()
    shapes = [
        {**VIDEO, "latent": [4, 20, 32, 32]},
        {"height": 240, "width": 424, "num_frames": 51, "latent": [4, 15, 30, 53]},
    ]
    section = manifest_section(cfg, shapes)
    decoded = json.loads(json.dumps(section, allow_nan=False))
    assert decoded == section
    assert section["cfg_scale"] == 7.0
    assert section["lpl"] == {
        "mode": "dynamic",
        "static_steps": 15,
        "min_fraction": 0.5,
        "min_steps": 15,
        "tolerance": 1e-3,
        "patience": 3,
    }
    assert "leap" in section["algorithm"] and "cfg_scale" in section["algorithm"]
    for shape, entry in zip(shapes, section["shapes"], strict=True):
        pixels = {k: shape[k] for k in ("height", "width", "num_frames")}
        ts = timesteps(cfg, **pixels)
        assert entry["timesteps"] == ts
        assert entry["latent"] == shape["latent"]
        assert entry["dt"] == euler_step_sizes(ts, 1000)
        assert sum(entry["dt"]) == pytest.approx(1.0)  # the steps cover the whole path
        assert entry["leap_dt"] == pytest.approx([t / 1000 for t in ts])
        assert entry["static_leap_step"] == 15
    with pytest.raises(ValueError, match="latent"):
        manifest_section(cfg, [dict(VIDEO)])


# --- classifier-free guidance ----------------------------------------------------------


def test_guided_velocity_combines_cfg_exactly_and_keeps_in_channels() -> None:
    batch, tokens, width = 2, 6, 8
    seen: dict = {}

    def fake_stdit(x, timestep, y, mask, fps, height, width):
        seen.update(x=x, timestep=timestep, y=y, mask=mask, fps=fps, height=height, width=width)
        # Channels 0-3: x times the caption's constant value; 4-7 (sigma) a sentinel.
        scale = y[:, 0, 0, 0].view(-1, 1, 1, 1, 1)
        return torch.cat([x * scale, torch.full_like(x, 1e6)], dim=1)

    cond = {
        "y": torch.full((batch, 1, tokens, width), 2.0),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]),
        "fps": torch.full((batch,), 24.0),
        "height": 256,
        "width": 256,
    }
    null = {"y": torch.full((batch, 1, tokens, width), 3.0)}
    velocity = guided_velocity(fake_stdit, cond, null, cfg_scale=7.0, in_channels=4)

    z = torch.randint(-8, 8, (batch, 4, 3, 4, 4)).float()
    t = torch.tensor([900.0, 900.0])
    v = velocity(z, t)
    # v_c = 2z, v_u = 3z: v = 3z + 7 * (2z - 3z) = -4z, exact in float for small integers.
    assert torch.equal(v, -4 * z)
    assert torch.equal(seen["x"], torch.cat([z, z]))
    assert torch.equal(seen["timestep"], torch.cat([t, t]))
    assert torch.equal(seen["y"], torch.cat([cond["y"], null["y"]]))
    assert torch.equal(seen["mask"], torch.cat([cond["mask"], cond["mask"]]))
    assert torch.equal(seen["fps"], torch.full((2 * batch,), 24.0))
    assert (seen["height"], seen["width"]) == (256, 256)


def test_guided_velocity_refuses_mismatched_inputs() -> None:
    y = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match="'y'"):
        guided_velocity(lambda *a, **k: None, {"y": y}, {}, 7.0)
    with pytest.raises(ValueError, match="cond lacks"):
        guided_velocity(lambda *a, **k: None, {"y": y}, {"y": y, "fps": y}, 7.0)
    velocity = guided_velocity(lambda x, t, **k: x, {"y": y}, {"y": y[:1]}, 7.0)
    with pytest.raises(ValueError, match="batch size 2"):
        velocity(torch.zeros(2, 4, 1, 2, 2), torch.zeros(2))


# --- end to end with a tiny STDiT3 -----------------------------------------------------


def tiny_stdit3_velocity(batch: int, seed: int):
    """A seeded tiny STDiT3 behind guided_velocity, for 64x64 pixels, 17 frames (latent 5x8x8).

    Returns ``(velocity_fn, z, calls)``; ``calls[0]`` counts model runs.
    """
    from sora_export.plugins.stdit3.model import STDIT3_CONFIGS, STDiT3

    torch.manual_seed(seed)
    cfg = STDIT3_CONFIGS["tiny"]
    model = STDiT3(cfg).eval()
    calls = [0]

    def counted_model(*args, **kwargs):
        calls[0] += 1
        return model(*args, **kwargs)

    mask = torch.zeros(batch, cfg.model_max_length)
    mask[:, :5] = 1  # five valid text tokens, the rest padding
    cond = {
        "y": torch.randn(batch, 1, cfg.model_max_length, cfg.caption_channels),
        "mask": mask,
        "fps": torch.full((batch,), 24.0),
        "height": torch.full((batch,), 64.0),
        "width": torch.full((batch,), 64.0),
    }
    null = {"y": model.y_embedder.y_embedding[None, None].expand(batch, -1, -1, -1)}
    z = torch.randn(batch, cfg.in_channels, 5, 8, 8)
    return guided_velocity(counted_model, cond, null, cfg_scale=7.0), z, calls


TINY = {"height": 64, "width": 64, "num_frames": 17}


@pytest.mark.parametrize(
    ("lpl", "expected"),
    [
        (LPLSettings(mode="off"), (None, 4)),
        (LPLSettings(mode="static", static_steps=2), (2, 3)),
        # min_steps = 2; tolerance 1 makes every measurement after the first a stall.
        (LPLSettings(mode="dynamic", patience=1, tolerance=1.0), (2, 3)),
    ],
)
def test_tiny_stdit3_sampling_is_finite_and_counts_evaluations(
    lpl: LPLSettings, expected: tuple[int | None, int]
) -> None:
    velocity, z, calls = tiny_stdit3_velocity(batch=2, seed=0)
    result = sample(velocity, z, SamplerSettings(num_steps=4, lpl=lpl), **TINY)
    assert result.latent.shape == z.shape
    assert torch.isfinite(result.latent).all()
    assert not torch.equal(result.latent, z)
    assert (result.leapt_at, result.model_evaluations) == expected
    assert calls[0] == result.model_evaluations
