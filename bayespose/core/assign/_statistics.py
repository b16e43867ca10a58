"""Estimators and per-particle statistics from one stage's posterior (Xu et al. 2026, sec. 2.3 and App. B2).

* MLE: argmax over (k, j) of the log-likelihood; MAP: argmax of log-likelihood + log pi (not the quadrature);
* MMSE rotation: the SVD projection onto SO(3) of ``M = Σ_k p_k R_k`` (eq. 15-19), after folding every rotation to
  its symmetry mate nearest the MAP rotation when the map has a point-group symmetry;
* MMSE origin: the posterior mean of o_j.

Per particle also: ``pmax`` (largest posterior probability of one (rotation, shift) cell, RELION's
rlnMaxValueProbDistribution), ``n_significant`` (number of grid rotations that hold 99 % of the rotation
posterior), ``expected_error_deg`` (posterior mean of the geodesic angle between the (folded) rotation and the
MMSE rotation: the posterior expected angular error), ``concentration`` (sum of the singular values of M / 3:
1 for a point mass, ~0 for a uniform posterior) and ``log_evidence`` (log p(Y_i) up to the Gaussian
normalisation constant). The fields and their star / Scipion names are those of
:data:`bayespose.core.results.COLUMNS`.

Rotations are RELION ``A`` matrices; origins ``rlnOriginX/YAngst`` in Å (px inside the engine).
"""

from __future__ import annotations

import numpy as np
import torch

from bayespose.core.assign._scoring import _StageScores
from bayespose.core.geometry.rotations import project_to_so3
from bayespose.core.geometry.symmetry import nearest_symmetry_mate
from bayespose.core.results import ESTIMATORS, ParticleResults

__all__ = ["ESTIMATORS", "CELL_SPREAD"]

CELL_SPREAD = 0.46  # mean angle between a uniform rotation and its nearest grid point, in grid spacings


def _stage_results(scores: _StageScores, rotations: np.ndarray, centers_px: np.ndarray, deltas: np.ndarray,
                   group: np.ndarray, spacing_deg: float, pixel_size: float) -> tuple[ParticleResults, np.ndarray]:
    """Estimators and statistics of one stage (grid spacing ``spacing_deg``) for its B particles: their results
    (origins in Å: shift centres ``centers_px`` (B, 2) plus lattice offsets ``deltas`` (J, 2), px, times
    ``pixel_size``) and their rotation posteriors ``p_rot`` (B, K) on ``rotations`` ((K, 3, 3) or (B, K, 3, 3))."""
    log_z = torch.logsumexp(scores.log_rot, dim=1)
    p_rot = torch.exp(scores.log_rot - log_z[:, None]).cpu().numpy().astype(np.float64)
    p_shift = torch.exp(scores.log_shift - log_z[:, None]).cpu().numpy().astype(np.float64)
    k_total = rotations.shape[-3]
    shared = rotations.ndim == 3
    out = ParticleResults()
    for name in ("map", "mle"):
        flat = scores.best[name][1].cpu().numpy()
        jj, kk = flat // k_total, flat % k_total
        setattr(out, f"{name}_rotations", rotations[kk] if shared else rotations[np.arange(len(kk)), kk])
        setattr(out, f"{name}_origins_A", (centers_px + deltas[jj]) * pixel_size)
    out.pmax = torch.exp(scores.best["post"][0] - log_z).cpu().numpy()
    out.log_evidence = (log_z + scores.const).cpu().numpy()
    out.mmse_origins_A = (centers_px + p_shift @ deltas) * pixel_size
    stats = _rotation_statistics(p_rot, rotations, out.map_rotations, group, shared, spacing_deg)
    out.mmse_rotations, out.expected_error_deg = stats["mmse_rot"], stats["experr"]
    out.n_significant, out.concentration = stats["nsig"], stats["conc"]
    return out, p_rot


def _rotation_statistics(p_rot: np.ndarray, rotations: np.ndarray, map_rot: np.ndarray, group: np.ndarray,
                         shared: bool, spacing_deg: float = 0.0, min_prob: float = 1e-9) -> dict:
    """MMSE rotation (folded to the MAP's symmetry mates), expected angular error, significant count, concentration.

    ``p_rot`` (B, K) rotation posteriors; ``rotations`` (K, 3, 3) shared or (B, K, 3, 3); ``map_rot`` (B, 3, 3).
    Cells with probability below ``min_prob`` (in total < K · min_prob of the mass) are left out of the sums.
    The expected error counts each cell's mass as spread over the cell: a cell at angle d from the MMSE rotation
    contributes ``sqrt(d² + (CELL_SPREAD · spacing)²)`` (measured: a uniform rotation lies 0.46 spacings from the
    nearest HEALPix-grid rotation on average). Without it a posterior sharper than the grid would claim ~0°
    uncertainty while the grid itself limits the accuracy.
    """
    b = p_rot.shape[0]
    rows, cols = np.nonzero(p_rot > min_prob)
    weights = p_rot[rows, cols]
    rots = rotations[cols] if shared else rotations[rows, cols]  # (nnz, 3, 3)
    if len(group) > 1:  # fold every rotation to its symmetry mate nearest the MAP rotation
        rots = nearest_symmetry_mate(rots, map_rot[rows], group)
    m = np.zeros((b, 3, 3))
    np.add.at(m, rows, weights[:, None, None] * rots)
    mmse = project_to_so3(m)
    cos = (np.einsum("nij,nij->n", mmse[rows], rots) - 1.0) / 2.0
    angle = np.sqrt(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))) ** 2 + (CELL_SPREAD * spacing_deg) ** 2)
    experr = np.bincount(rows, weights=weights * angle, minlength=b) / np.maximum(
        np.bincount(rows, weights=weights, minlength=b), 1e-300)
    ordered = -np.sort(-p_rot, axis=1)
    nsig = (np.cumsum(ordered, axis=1) < 0.99).sum(axis=1) + 1
    conc = np.minimum(np.linalg.svd(m, compute_uv=False).sum(axis=1) / 3.0, 1.0)  # <= 1 up to rounding
    return {"mmse_rot": mmse, "experr": experr, "nsig": np.minimum(nsig, p_rot.shape[1]), "conc": conc}


def _significant_cells(p_rot: np.ndarray, mass: float) -> list[np.ndarray]:
    """Per particle, the smallest set of cells holding ``mass`` of the posterior (most probable first)."""
    order = np.argsort(-p_rot, axis=1)
    cumulative = np.cumsum(np.take_along_axis(p_rot, order, axis=1), axis=1)
    counts = (cumulative < mass).sum(axis=1) + 1
    return [order[i, :c] for i, c in enumerate(counts)]
