"""Fidelity metrics: PSNR against the PyTorch fp32 reference, max abs error, finiteness."""

from __future__ import annotations

import math

import attrs
import numpy as np


@attrs.frozen
class Fidelity:
    """How an artifact's outputs compare with the reference outputs (all outputs pooled)."""

    psnr_db: float
    max_abs_err: float
    finite: bool


def psnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """PSNR in dB with the reference's peak absolute value as the signal peak.

    Same definition as Apple's ml-stable-diffusion check: 20*log10(peak / RMSE). Identical
    arrays give +inf; a non-finite ``actual`` gives -inf (never a pass).
    """
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs {actual.shape}")
    if not np.all(np.isfinite(actual)):
        return -math.inf
    rmse = math.sqrt(float(np.mean((reference - actual) ** 2))) if reference.size else 0.0
    if rmse == 0.0:
        return math.inf
    peak = float(np.max(np.abs(reference))) if reference.size else 0.0
    if peak == 0.0:
        return -math.inf
    return 20.0 * math.log10(peak / rmse)


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> Fidelity:
    """Pool every output tensor; the worst case decides (min PSNR, max error, any non-finite)."""
    missing = sorted(set(reference) - set(actual))
    if missing:
        raise ValueError(f"artifact did not produce output(s) {', '.join(missing)}")
    worst_psnr = math.inf
    worst_err = 0.0
    finite = True
    for name, ref in reference.items():
        got = np.asarray(actual[name])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            raise ValueError(f"output {name!r}: shape {got.shape} vs reference {ref.shape}")
        finite = finite and bool(np.all(np.isfinite(got)))
        worst_psnr = min(worst_psnr, psnr_db(ref, got))
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        worst_err = max(worst_err, float(np.nanmax(err)) if err.size else 0.0)
        if not np.all(np.isfinite(err)):
            worst_err = math.inf
    return Fidelity(psnr_db=worst_psnr, max_abs_err=worst_err, finite=finite)
