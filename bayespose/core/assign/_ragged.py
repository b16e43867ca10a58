"""Per-particle rotation sets of different sizes, scored in groups of particles with similar sizes.

The refinement levels and the seeded first grid of :func:`~bayespose.core.assign.assign_poses` give each particle
of a batch its own rotations: the children of its significant cells, or the cells near a pose network's
predictions. The engine pads them into one (B, K) block (K = the largest set of the batch; padding carries
log q = -inf), and :meth:`_Scorer.score` gathers, multiplies and folds every padded column. Measured on the 3J9G
fragment benchmark (box 64, SNR 0.1, order 2 + 2 levels): the padded blocks held 3.3x the useful rotations.

:func:`score_ragged` sorts the rows of such a block by their number of valid rotations, cuts them into groups in
which the widest row has at most twice the valid rotations of the narrowest (groups of at least ``min_rows``
rows, so that the per-call cost stays amortised), scores each group's block trimmed to its own width with the
unchanged :meth:`_Scorer.score` (one :class:`~bayespose.core.assign._scoring.ScoringCall` per group) and puts the
results back into the (B, K) layout. Every (particle, rotation, shift) score is the same as in the padded block;
only the order in which chunks of rotations are summed (floating-point rounding of the shift marginals) differs.
Rows whose valid rotations are not the leading columns are scored as one padded block, as before.
"""

from __future__ import annotations

import numpy as np
import torch

from bayespose.core.assign._scoring import _Batch, _Scorer, _StageScores

__all__ = ["score_ragged", "row_groups"]


def row_groups(widths: np.ndarray, min_rows: int = 8) -> list[np.ndarray]:
    """Rows (indices) of each group, widest rows first: a group ends before the first row with at most half of
    its widest row's width once it has ``min_rows`` rows. Rows of width 0 join the last group."""
    widths = np.asarray(widths)
    order = np.argsort(-widths, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (i - start >= min_rows and 2 * widths[order[i]] <= widths[order[start]]
                               and widths[order[i]] > 0):
            groups.append(order[start:i])
            start = i
    return groups


def score_ragged(scorer: _Scorer, batch: _Batch, radius: float, rotations: np.ndarray, log_q: np.ndarray,
                 log_pi: np.ndarray, lattice_ids: np.ndarray | None, stage: int = 0,
                 min_rows: int = 8) -> _StageScores:
    """:meth:`_Scorer.score` of per-particle rotations (B, K, 3, 3) with log quadrature ``log_q`` (B, K)
    (-inf = padding), log prior ``log_pi`` (B, K) and lattice ids (B, K) (None: projected per particle), scored in
    groups of rows of similar widths (module doc). Returns the scores in the (B, K) layout of a single call."""
    log_q = np.asarray(log_q)
    b, k = log_q.shape
    valid = np.isfinite(log_q)
    widths = valid.sum(1)
    compact = bool((valid == (np.arange(k)[None] < widths[:, None])).all())
    groups = row_groups(widths, min_rows) if compact else []
    if len(groups) <= 1 and (not compact or widths.max() == k):
        return scorer.score(batch, radius, rotations, log_q, log_pi, lattice_ids=lattice_ids, stage=stage)
    log_pi = np.broadcast_to(np.asarray(log_pi), (b, k))
    dev = scorer.device
    out_rot = torch.full((b, k), -float("inf"), device=dev)
    out_shift, out_const, best = None, torch.empty(b, device=dev), {}
    for rows in groups:
        w = max(int(widths[rows].max()), 1)
        part = scorer.score(batch.rows(rows), radius, rotations[rows, :w], log_q[rows, :w], log_pi[rows, :w],
                            lattice_ids=None if lattice_ids is None else lattice_ids[rows, :w], stage=stage)
        at = torch.as_tensor(rows, device=dev)
        out_rot[at, :w] = part.log_rot
        if out_shift is None:
            out_shift = torch.empty((b, part.log_shift.shape[1]), device=dev)
        out_shift[at] = part.log_shift
        out_const[at] = part.const
        for name, (value, index) in part.best.items():
            if name not in best:
                best[name] = (torch.empty(b, device=dev), torch.empty(b, dtype=torch.long, device=dev))
            best[name][0][at] = value
            best[name][1][at] = (index // w) * k + index % w  # flat j * w + kk -> j * K + kk
    return _StageScores(out_rot, out_shift, best, out_const)
