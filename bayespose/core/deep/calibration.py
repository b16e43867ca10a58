"""Calibrated confidence of a grid pose network: temperature scaling and reliability.

A network trained with cross-entropy is often over-confident on data it has not seen (Guo et al. 2017, "On
calibration of modern neural networks", ICML, arXiv:1706.04599): a 180° flip can get most of the predicted mass.
Temperature scaling divides all logits by one number ``T`` fitted on held-out particles (minimum cross-entropy of
their true grid cells): the ranking of the cells, hence the mode, does not change, but the predicted masses become
probabilities that match observed frequencies.

Reliability (:func:`mass_within`, :func:`reliability_table`): for a radius X, the predicted probability mass
within X degrees of the predicted mode against the observed fraction of particles whose mode is within X degrees
of the true pose. A calibrated network lies on the diagonal.

Rotations are RELION ``A`` matrices; log probabilities (N, K) on a grid of K rotations; angles in degrees.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bayespose.core.geometry.symmetry import symmetry_group

__all__ = ["fit_temperature", "mass_within", "reliability_table", "RELIABILITY_RADII_DEG"]

RELIABILITY_RADII_DEG = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0)
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean cross-entropy (nats) of soft ``targets`` (N, K) under ``softmax(logits / T)``, in float64."""
    logp = torch.log_softmax(logits.double() / temperature, dim=1)
    return float(-(targets.double() * logp).sum(1).mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, iterations: int = 40) -> float:
    """The temperature ``T`` in [0.05, 20] that minimises the mean cross-entropy of ``targets`` (N, K) (rows
    summing to 1, e.g. the true grid cell) under ``softmax(logits / T)`` (``logits`` (N, K)); golden-section
    search on log T (the cross-entropy is convex in 1/T). Returns 1.0 for an empty set."""
    if len(logits) == 0:
        return 1.0
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _cross_entropy(logits, targets, math.exp(a)), _cross_entropy(logits, targets, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _cross_entropy(logits, targets, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _cross_entropy(logits, targets, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))


def mass_within(log_probabilities: np.ndarray, grid_rotations: np.ndarray, modes: np.ndarray,
                radii_deg=RELIABILITY_RADII_DEG, symmetry: str = "C1", chunk: int = 256) -> np.ndarray:
    """Predicted probability mass (N, R) of the grid cells whose rotation lies within each radius (degrees) of
    each particle's mode (N, 3, 3), counting every symmetry mate of a cell once (its nearest)."""
    log_p = np.asarray(log_probabilities, dtype=np.float64)
    grid = np.asarray(grid_rotations, dtype=np.float64)
    radii = np.asarray(radii_deg, dtype=np.float64)
    group = symmetry_group(symmetry)
    out = np.zeros((len(log_p), len(radii)))
    for s in range(0, len(log_p), chunk):
        p = np.exp(log_p[s:s + chunk] - log_p[s:s + chunk].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        m = np.asarray(modes[s:s + chunk], dtype=np.float64).reshape(-1, 9)
        cos = np.full(p.shape, -1.0)
        for g in group:  # the nearest mate of each cell
            cos = np.maximum(cos, (m @ (grid @ g).reshape(-1, 9).T - 1.0) / 2.0)
        angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))  # (B, K)
        out[s:s + chunk] = np.stack([(p * (angle <= r)).sum(1) for r in radii], axis=1)
    return out


def reliability_table(mass: np.ndarray, errors_deg: np.ndarray, radii_deg=RELIABILITY_RADII_DEG) -> list[dict]:
    """One row per radius X: ``predicted`` (mean predicted mass within X of the mode, from :func:`mass_within`)
    against ``observed`` (fraction of particles with error <= X), and their difference; ``errors_deg`` (N,)."""
    errors = np.asarray(errors_deg, dtype=np.float64)
    return [{"radius_deg": float(r), "predicted": float(np.mean(mass[:, j])),
             "observed": float(np.mean(errors <= r)), "gap": float(np.mean(mass[:, j]) - np.mean(errors <= r))}
            for j, r in enumerate(radii_deg)]
