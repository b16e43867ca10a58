"""Deep-prior MMSE: Bayesian pose assignment restricted to a pose network's predicted regions.

DESIGN.md "Deep pose prediction" and paper 002 App. F (local refinement from predicted poses): the network's
distribution narrows the search to a few regions of SO(3), and the MMSE engine (:mod:`bayespose.core.posterior`)
scores only there, with the network's distribution as the prior.

Search regions (``method``):

* ``"cells"`` (default): a seeded coarse-to-fine search. The cells of the engine's HEALPix grid
  (``search.healpix_order``) whose centre lies within ``local_range_deg`` of any of the particle's predicted
  top-K rotations are scored first, then refined ``search.refine_levels`` times exactly as in the global search
  (:func:`~bayespose.core.posterior.assign_poses` ``seed_cells``). Every cell is projected once for all particles,
  so a scored rotation costs what it costs in the global search. Default range: the network grid's spacing
  (the predicted cells and their neighbours); 20° for the quaternion model.
* ``"balls"``: local lattices of radius ``local_range_deg`` (step range / 3) around each of the top-K rotations
  (:func:`assign_poses` ``centers``; the union of the balls, each region scored once). Per-particle rotations
  are projected per particle, which costs far more per scored rotation on a CPU. Default range: 0.75 grid
  spacings (a HEALPix cell's corners lie within about 0.7 spacings of its centre), 20° for quaternions.

Priors: ``so3grid`` prediction -> :class:`~bayespose.core.priors.GridPrior` on ``healpix_grid(grid_order)`` with
the predicted log probabilities (a rotation gets the probability of the network cell containing it);
``quaternion`` prediction -> isotropic Gaussian on SO(3) around the predicted rotation, ``eta = range / 3`` rad.

Shifts: the shift lattice of ``search`` around each particle's input origin. Symmetry: ``search.symmetry``
(default: the prediction's); the MMSE folds the mates.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from ..grids import healpix_grid
from ..particles import ParticleSet
from ..posterior import PoseAssignment, PoseSearch, assign_poses
from ..priors import GridPrior, IGSO3Prior
from .predict import PosePrediction

__all__ = ["deep_prior_assign", "default_local_range_deg", "cells_near", "METHODS"]

QUATERNION_RANGE_DEG = 20.0


METHODS = ("cells", "balls")


def default_local_range_deg(prediction: PosePrediction, method: str = "cells") -> float:
    """Default radius (degrees) of the searched regions around the predicted rotations (module doc)."""
    if prediction.grid_order is None:
        return QUATERNION_RANGE_DEG
    spacing = healpix_grid(prediction.grid_order).spacing_deg
    return spacing if method == "cells" else 0.75 * spacing


def cells_near(rotations: np.ndarray, order: int, range_deg: float, chunk: int = 256) -> np.ndarray:
    """Cells of ``healpix_grid(order)`` whose centre lies within ``range_deg`` of any of the rotations
    (N, K, 3, 3) of each particle: (N, C) indices, padded with -1 (C = the largest count; the nearest cell of
    each rotation is always included)."""
    grid = healpix_grid(order).rotations.reshape(-1, 9)
    cos_limit = 1.0 + 2.0 * math.cos(math.radians(range_deg))  # trace at the limit angle
    n, k = rotations.shape[:2]
    rows = []
    for s in range(0, n, chunk):
        r = rotations[s:s + chunk].reshape(-1, 9)
        trace = (r @ grid.T).reshape(-1, k, len(grid))  # tr(R^T G) = cos-related, (B, K, G)
        near = (trace >= cos_limit).any(1)
        nearest = np.argmax(trace, axis=2)  # (B, K)
        near[np.repeat(np.arange(len(near)), k), nearest.ravel()] = True
        rows.extend(np.flatnonzero(row) for row in near)
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])


def deep_prior_assign(particles: ParticleSet, prediction: PosePrediction, volume: np.ndarray,
                      search: PoseSearch | None = None, images: np.ndarray | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      local_range_deg: float | None = None, top_k: int | None = None,
                      method: str = "cells") -> PoseAssignment:
    """MMSE pose assignment of ``particles`` against ``volume`` restricted to the network's predicted regions.

    ``search``: grid, refinement, shift and noise settings (``healpix_order``/``refine_levels`` for ``cells``;
    ``local_step_deg`` (default range / 3) for ``balls``; ``symmetry`` default the prediction's).
    ``local_range_deg``: radius of the regions around the predicted rotations (default
    :func:`default_local_range_deg`). ``top_k``: use only the first ``top_k`` predicted rotations (default: all
    in the prediction). ``method``: ``cells`` or ``balls`` (module doc). Returns the
    :class:`~bayespose.core.posterior.PoseAssignment`; ``timings["scored_rotations_per_particle"]`` and
    ``timings["total_s"]`` measure the work (compare with a global :func:`assign_poses`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = len(particles)
    if len(prediction) != n:
        raise ValueError(f"prediction has {len(prediction)} particles, the set {n}")
    centres = np.asarray(prediction.top_rotations, dtype=np.float64)
    if centres.ndim != 4 or centres.shape[-2:] != (3, 3):
        raise ValueError(f"prediction.top_rotations must be (N, K, 3, 3), got {centres.shape}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        centres = centres[:, :top_k]
    range_deg = float(local_range_deg) if local_range_deg is not None else default_local_range_deg(prediction,
                                                                                                   method)
    if not 0 < range_deg <= 90:
        raise ValueError(f"local range must be in (0, 90] degrees, got {range_deg}")
    search = search or PoseSearch()
    symmetry = search.symmetry if search.symmetry.upper() != "C1" else prediction.symmetry
    if prediction.log_probabilities is not None:
        prior = GridPrior(int(prediction.grid_order), prediction.log_probabilities)
    else:
        prior = IGSO3Prior(np.asarray(prediction.rotations, dtype=np.float64), math.radians(range_deg) / 3.0)
    if method == "cells":
        search = replace(search, local_range_deg=None, symmetry=symmetry)
        seeds = cells_near(centres, search.healpix_order, range_deg)
        return assign_poses(particles, volume, search, prior, images=images, progress=progress, seed_cells=seeds)
    search = replace(search, local_range_deg=range_deg, local_step_deg=search.local_step_deg or range_deg / 3.0,
                     symmetry=symmetry)
    # the engine centres the shift lattice on the input origins (zeros when the particles have none)
    target = particles if particles.origins_A is not None else replace(particles, origins_A=np.zeros((n, 2)))
    return assign_poses(target, volume, search, prior, images=images, progress=progress, centers=centres)
