"""Pose-accuracy metrics of the deep pose benchmarks (papers 002 eq. 3-6, 001 eq. 16).

All rotations are RELION ``A`` matrices; angles in degrees. Symmetry-aware errors use the mates ``A @ L_g``
(:mod:`bayespose.core.geometry.symmetry`): ``angError_i = min_g angle(trueR_i^T predR_i L_g)`` (002 eq. 5, written
there as ``g trueR predR^T`` in their left-acting convention; the two agree since the group is closed under inverses).
"""

from __future__ import annotations

import numpy as np
import torch

from bayespose.core.geometry.symmetry import symmetric_angle_deg
from bayespose.core.imaging.forward import PreparedVolume, prepare_volume, project_fourier

__all__ = ["angular_errors_deg", "pose_error_metrics", "reprojection_rmse"]


def angular_errors_deg(pred_rotations: np.ndarray, true_rotations: np.ndarray, symmetry: str = "C1") -> np.ndarray:
    """Per-particle angular error (N,) in degrees, minimised over the symmetry mates (CESPED eq. 4-5): checks the
    shapes, then :func:`~bayespose.core.geometry.symmetry.symmetric_angle_deg`."""
    pred = np.asarray(pred_rotations, dtype=np.float64)
    true = np.asarray(true_rotations, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[1:] != (3, 3):
        raise ValueError(f"pred and true rotations must both be (N, 3, 3), got {pred.shape} and {true.shape}")
    return symmetric_angle_deg(true, pred, symmetry)


def pose_error_metrics(pred_rotations: np.ndarray, true_rotations: np.ndarray, symmetry: str = "C1",
                       weights: np.ndarray | None = None) -> dict:
    """Summary of the angular errors (degrees, symmetry-aware) of predicted vs true poses (N, 3, 3).

    Returns ``mane_deg`` (mean angular error, 002 eq. 3), ``wmane_deg`` (confidence-weighted mean, eq. 6, with
    ``weights`` (N,) >= 0, e.g. the network confidence or RELION's pmax; equals ``mane_deg`` without weights),
    ``median_deg``, ``frac_below_5``, ``frac_below_10``, ``frac_below_15`` (fractions in [0, 1]) and ``n``.
    """
    err = angular_errors_deg(pred_rotations, true_rotations, symmetry)
    if len(err) == 0:
        raise ValueError("no poses to compare")
    if weights is None:
        wmane = float(err.mean())
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != err.shape or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"weights must be (N,) = {err.shape}, non-negative, with a positive sum")
        wmane = float((w * err).sum() / w.sum())
    return {"mane_deg": float(err.mean()), "wmane_deg": wmane, "median_deg": float(np.median(err)),
            "frac_below_5": float((err < 5).mean()), "frac_below_10": float((err < 10).mean()),
            "frac_below_15": float((err < 15).mean()), "n": int(len(err))}


def reprojection_rmse(volume: np.ndarray | PreparedVolume, pred_rotations: np.ndarray,
                      true_rotations: np.ndarray, normalise: bool = True, batch_size: int = 256) -> float:
    """Reprojection RMSE (001 eq. 16): ``sqrt(mean_i ||P(R_pred,i) V - P(R_true,i) V||²)`` over clean, centred,
    CTF-free projections of ``volume`` (D, D, D) (a map or a prepared volume).

    Well defined for any symmetry (a symmetry mate gives the same projection). With ``normalise`` (default) the
    result is divided by ``sqrt(mean_i ||P(R_true,i) V||²)``: a relative error, independent of the map's scale
    (0 = perfect). Computed in Fourier space (Parseval over the rfft2 half plane).
    """
    pred = np.asarray(pred_rotations, dtype=np.float64)
    true = np.asarray(true_rotations, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"pred and true rotations must both be (N, 3, 3), got {pred.shape} and {true.shape}")
    prepared = volume if isinstance(volume, PreparedVolume) else prepare_volume(np.asarray(volume, np.float32))
    d = prepared.box
    # rfft2 half plane: columns 1 .. (d-1)//2 stand for two coefficients each (Parseval)
    weight = np.full(d // 2 + 1, 2.0)
    weight[0] = 1.0
    if d % 2 == 0:
        weight[-1] = 1.0
    w = torch.as_tensor(weight, dtype=torch.float32)
    diff2 = signal2 = 0.0
    for s in range(0, len(pred), batch_size):
        a = project_fourier(prepared, pred[s:s + batch_size]).cpu()
        b = project_fourier(prepared, true[s:s + batch_size]).cpu()
        diff2 += float(((a - b).abs() ** 2 * w).sum()) / d ** 2  # sum over pixels of the squared difference
        signal2 += float((b.abs() ** 2 * w).sum()) / d ** 2
    rmse = np.sqrt(diff2 / len(pred))
    if normalise:
        rmse /= np.sqrt(signal2 / len(pred))
    return float(rmse)
