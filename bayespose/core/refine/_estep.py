"""E-step of the EM refinement for one gold-standard half set, and the angular sampling of an iteration.

:func:`e_step` runs :func:`bayespose.core.assign.engine.assign_poses` (the tested MMSE engine) against the half
set's reference: the HEALPix grid of ``healpix_order`` scored and the cells holding 0.999 of each particle's
posterior split ``levels`` times (RELION's oversampling), or, once the global search has converged, a local grid
around each particle's current pose; the frequency cut-off follows the current resolution. From each particle's
final-stage rotation posterior ``p_ik`` (marginalised over shifts) it keeps the candidate rotations for the
M-step (:class:`bayespose.core.refine._mstep._Support`), and returns the MMSE / MAP / MLE poses and statistics as
:class:`bayespose.core.results.ParticleResults` (origins in Å).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.assign import NoiseModel, PoseAssignment, PoseSearch, assign_poses
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import RotationPrior
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.refine._mstep import _Support, direction_mass
from bayespose.core.refine.config import RefineConfig
from bayespose.core.results import ParticleResults

# the statistics an EM iteration fills (ParticleResults fields), besides the poses of every estimator
STATISTICS = ("pmax", "n_significant", "expected_error_deg", "concentration", "log_evidence", "n_candidates")


def _angular_step(order: int) -> float:
    """Angular step (degrees) of HEALPix order ``order``: 360 / (6 · 2^order) (RELION's getAngularSampling)."""
    return 360.0 / (6 * 2 ** order)


def _needed_order(resolution_A: float, diameter_A: float) -> int:
    """Smallest HEALPix order whose step is at most ``resolution / diameter`` radians (a pose error of half a step
    then blurs the particle's edge by a quarter of the resolution)."""
    needed_deg = math.degrees(resolution_A / diameter_A)
    order = 0
    while _angular_step(order) > needed_deg and order < 8:
        order += 1
    return order


def _candidates(rotations: np.ndarray, probs: np.ndarray, mass: float, cap: int) -> tuple[np.ndarray, np.ndarray,
                                                                                           int]:
    """The most probable rotations holding ``mass`` of ``probs`` (at most ``cap``), renormalised, and the number
    that ``mass`` alone would need."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    needed = int(np.searchsorted(cumulative, mass * cumulative[-1]) + 1)
    count = min(needed, cap, len(order))
    sel = order[:count]
    p = probs[sel]
    return rotations[sel], p / p.sum(), needed


@dataclass
class Sampling:
    """The search of one iteration: coarse order, refinement levels or local grid, and the finest step (deg)."""

    order: int
    levels: int
    local_range_deg: float | None
    step_deg: float

    @property
    def finest_order(self) -> int:
        return self.order + self.levels

    def describe(self) -> str:
        if self.local_range_deg is not None:
            return f"local ±{self.local_range_deg:.1f}° step {self.step_deg:.2f}°"
        return f"global order {self.order}+{self.levels} (step {self.step_deg:.2f}°)"


def sampling_for(config: RefineConfig, resolution: float, diameter: float, local: bool,
                 expected_error_deg: float | None = None) -> Sampling:
    """Angular sampling for the current resolution and pose accuracy (see :class:`RefineConfig`).

    The finest order is the finer of what the resolution needs (:func:`_needed_order`) and what
    the poses support: while the grid step exceeds ``expected_error_deg`` (the particles' median posterior
    expected error of the previous iteration, which never falls below ``CELL_SPREAD`` = 0.46 steps), the grid and
    not the data limits the poses, so the step is halved (RELION's auto-refine likewise keeps refining its
    sampling while its angular accuracy allows, down to ~0.9° here). Between ``healpix_order + 1`` and
    ``max_healpix_order``."""
    top = config.max_healpix_order
    finest = max(_needed_order(resolution, diameter), config.healpix_order + 1)
    if expected_error_deg is not None and math.isfinite(expected_error_deg):
        while finest < top and _angular_step(finest) > expected_error_deg:
            finest += 1
    finest = max(min(finest, top), config.healpix_order)
    step = _angular_step(finest)
    if local:
        return Sampling(finest, 0, config.local_range_deg or 3.0 * step, step)
    return Sampling(config.healpix_order, finest - config.healpix_order, None, step)


@dataclass
class HalfEStep:
    """What the E-step of one half set gives the rest of the iteration: the per-particle poses and statistics
    (half-set rows; origins in Å; ``n_candidates`` = rotations given to the M-step), the M-step's support and the
    posterior mass per viewing-direction pixel (None unless asked for)."""

    results: ParticleResults
    support: _Support
    direction_mass: np.ndarray | None


def e_step(particles: ParticleSet, images: np.ndarray | None, reference: np.ndarray, noise: NoiseModel,
           sampling: Sampling, radius: float, prior: RotationPrior | None, config: RefineConfig,
           device: torch.device, progress, direction_order: int | None = None) -> HalfEStep:
    """E-step of one half set ``particles`` (its own indexing; images (n, D, D) in memory or None) against
    ``reference`` (D, D, D): :func:`assign_poses` on ``sampling`` up to ``radius`` (Fourier px) with the noise
    model and ``prior``, then each particle's candidate support. ``direction_order``: also sum the rotation
    posteriors per viewing-direction pixel of that HEALPix order (the prior's M-step)."""
    box, px = particles.box, particles.pixel_size
    local = sampling.local_range_deg is not None  # a local grid has no coarse HEALPix order of its own
    # broad_finer_grid off: a posterior that stays broad must end on the coarse grid, whose untruncated soft
    # weights the M-step inserts through the shared-grid path (a broad posterior on the finer grid would be cut to
    # max_candidates rotations)
    search = PoseSearch(healpix_order=0 if local else sampling.order, refine_levels=sampling.levels,
                        broad_finer_grid=False,
                        max_resolution_A=box * px / radius, shift_range_px=config.shift_range_px,
                        shift_step_px=config.shift_step_px, symmetry=config.symmetry,
                        local_range_deg=sampling.local_range_deg,
                        local_step_deg=sampling.step_deg if sampling.local_range_deg is not None else None,
                        device=str(device), threads=config.threads)
    n = len(particles)
    e_progress = progress("E-step") if progress else None
    centers = particles.origins_px if (local and particles.origins_A is not None) else np.zeros((n, 2))
    grid = None if local else healpix_grid(sampling.order).rotations
    support = _Support(particles, images, reference, noise, radius, centers, [], [], [], [], [], grid)
    ncand = np.zeros(n, dtype=np.int64)
    mass = np.zeros(12 * 4 ** direction_order) if direction_order is not None else None

    def take(index: np.ndarray, marginals: dict) -> None:
        """One batch's final-stage rotation posteriors -> its candidate supports (and direction mass); the
        posteriors themselves are not kept (memory O(batch), not O(N · K))."""
        for i in index:
            rotations, probs = marginals[int(i)]
            ncand[i] = _add_support(support, int(i), rotations, probs, config, grid)
        if mass is not None:
            mass[:] += direction_mass(marginals, direction_order)

    result = assign_poses(particles, reference, search, prior, images, noise, progress=e_progress,
                          seed=config.seed, on_marginals=take, distributed=True)
    ncand = parallel.all_reduce_sum(ncand)  # each particle's count comes from the one process that scored it
    mass = parallel.all_reduce_sum(mass) if mass is not None else None
    return HalfEStep(_particle_results(result, ncand), support, mass)


def _add_support(support: _Support, i: int, rotations: np.ndarray, probs: np.ndarray, config: RefineConfig,
                 grid: np.ndarray | None) -> int:
    """Particle ``i``'s M-step support from its rotation posterior ``probs`` (K,) on ``rotations`` (K, 3, 3): its
    candidate rotations (float32) with their renormalised probabilities, or, for a broad posterior on the whole
    coarse grid in soft mode, that posterior (float32); returns its number of candidate rotations."""
    rot, p, needed = _candidates(rotations, probs, config.candidate_mass, config.max_candidates)
    if (needed > config.max_candidates and config.mode == "soft" and grid is not None
            and len(rotations) == len(grid) and (rotations is grid or np.array_equal(rotations, grid))):
        support.broad_rows.append(i)
        support.broad_p.append((probs / probs.sum()).astype(np.float32))
        return len(grid)
    support.rows.append(i)
    support.cand_rot.append(rot.astype(np.float32))
    support.cand_p.append(p.astype(np.float32))
    return len(p)


def _particle_results(assignment: PoseAssignment, n_candidates: np.ndarray) -> ParticleResults:
    """The assignment's poses and statistics (the fields it shares with ParticleResults) and ``n_candidates``."""
    shared = {f.name: getattr(assignment, f.name) for f in fields(ParticleResults)}
    shared["n_candidates"] = n_candidates
    return ParticleResults(**shared)
