"""Deep-prior MMSE: Bayesian pose assignment restricted to a pose network's predicted regions, verified per
particle, with a global-search fallback for the particles the network got wrong.

Sanchez-Garcia et al. (2023), "CESPED: a new benchmark for supervised particle pose estimation in Cryo-EM",
doi:10.48550/arXiv.2311.06194, App. F (local refinement from predicted poses): the network's
distribution narrows the search to a few regions of SO(3), and the MMSE engine (:mod:`bayespose.core.assign`) scores
 only there, with the network's distribution as the prior. The settings of the three stages are one
:class:`DeepPriorSearch`; the grid, shift and noise settings those of the engine's
:class:`~bayespose.core.assign.PoseSearch`.

1. **Seeds** (where to search). ``so3grid`` predictions: the most probable network cells that together hold
   ``seed_mass`` of the predicted probability (at most ``max_seed_cells`` of them), so an uncertain prediction
   gets a wider search automatically; with ``seed_mass=None`` the prediction's fixed top-K rotations (``top_k``;
   the better choice for ``"balls"``, where every seed adds a per-particle lattice).
   ``quaternion`` predictions (no distribution): the top-K test-time-augmentation rotations.
2. **Search regions** (``method``):

   * ``"cells"`` (default): a seeded coarse-to-fine search. The cells of the engine's HEALPix grid
     (``search.healpix_order``) whose centre lies within ``local_range_deg`` of any seed rotation are scored first,
     then refined ``search.refine_levels`` times exactly as in the global search
     (:func:`~bayespose.core.assign.assign_poses` ``seed_cells``). Every cell is projected once for all
     particles, so a scored rotation costs what it costs in the global search. Default range: the network grid's
     spacing (the seed cells and their neighbours); 20° for the quaternion model.
   * ``"balls"``: local lattices of radius ``local_range_deg`` (step range / 3) around each seed rotation
     (:func:`assign_poses` ``centers``; the union of the balls, each region scored once). Per-particle rotations
     are projected per particle, which costs far more per scored rotation on a CPU. Default range: 0.75 grid
     spacings (a HEALPix cell's corners lie within about 0.7 spacings of its centre), 20° for quaternions.

3. **Verification and fallback** (``fallback_z``). A network can be confidently wrong (e.g. a view turned by 180°
   that its low-resolution input does not tell apart): then the true pose is never searched and the MMSE of the
   searched region is wrong however good the map. Each particle's best searched pose (R, o) (the MLE of the
   searched set: the question is whether the region holds a pose that explains the data) is checked with the
   **fit z-score** (:func:`fit_zscores`) ``z = (LLR - E + L) / sqrt(2 E)``, where
   ``LLR = Σ [2 Re(conj(Y) α C S_o P_R) - α² C² |P_R|²] / σ²`` is the log-likelihood gain of the pose over "no
   signal", ``E = Σ α² C² |P_R|² / σ²`` the expected signal energy at that pose (α: reference scale, C: CTF,
   σ²: noise power per shell, sums over the final stage's frequency band; the noise model of the assignment) and
   ``L`` the expected loss of a pose half the finest grid step away (the grid's own discretisation, which grows
   with E). At the true pose ``LLR = E + 2 Re<N, αCP>/σ²`` so ``(LLR - E) / sqrt(2E) ~ N(0, 1)``; at a wrong pose
   R' (true R) ``LLR - E ≈ -Σ α²C²|P_R - P_R'|²/σ² + (E_R - E_R')``, so z falls by the squared distance between
   the two projections in noise units, a quantity that the noise of the data does not mask (the ``|N|²`` term
   cancels). The z-score assumes the noise model, reference scale and projector are right: a scale off by a
   fraction ε shifts it by about ``-ε sqrt(2E)``, so at high SNR (large E) a right pose under a small model
   mismatch looks significantly wrong. Hence a second condition, on the **fit deficit**
   ``d = -(LLR - E + L) / E`` (the fraction of the expected signal energy the pose leaves unexplained; ``2ε`` for
   a scale error ε, about ``2 (1 - ρ)`` for a wrong pose whose projection correlates ρ with the true one): a
   particle is re-assigned by the global search of :func:`assign_poses` (HEALPix order and refinement of
   ``search``, uniform prior, the same noise model, shifts around the input origins), and gets its result, when
   ``z < fallback_z`` **and** ``d > fallback_deficit``. ``fallback_z`` (default ``AUTO_FALLBACK_Z``; higher =
   more particles fall back; None turns the check off) decides at low SNR, where ``sqrt(2/E)`` is large and
   a significant z means a large deficit anyway; ``fallback_deficit`` (default ``AUTO_FALLBACK_DEFICIT``; 0 = the
   z-score alone) at high SNR.

Measured (benchmarks/deep_poses.py section 4, benchmarks/results/deep/README.md: 300 test particles of the 3J9G
fragment, 64 px, CTF, so3grid network trained on 1500 others; global search = order 2 + 2 levels): the network
confidence does not separate right from wrong predictions (the wrong ones are as confident: 180° flips); the fit
z-score does. Adaptive seeds alone cut the mean error from 17.4° to 4.5° (SNR 0.1) and from 56° to 19° (SNR 0.03)
at 5-7 % of the global search's scored rotations; with the check at ``AUTO_FALLBACK_Z`` = -1.5 the default
matches the global search's mean and median error (SNR 0.1: 3.7° / 2.9°, SNR 0.03: 4.4° / 3.1°) with about a
quarter of its scored rotations (24-28 %) and a third of its scoring FLOPs. Stricter thresholds save work at
high SNR but lose accuracy at SNR 0.03 (-2.5: mean 6.1°). The deficit condition, measured on relion_project
particles (network trained on 4000 particles + map, 1000 test particles at SNR 0.1, box 64; 200 at box 128):
right poses had d <= 0.46 (box 128: 0.37), the 3 (1) wrong ones d >= 0.79 (0.69); the z-score alone sent 16 %
(25 %) of the particles to the global search, with d > 0.25 too 3.5 % (6 %), all wrong ones included; with the
same network on those particles at SNR 0.03 (99 of 300 wrong) it changed the fallbacks from 40.3 % to 39.0 % at
the same mean error (3.94° / 3.95°). Wall time (README, benchmarks/deep_poses.py relion_prior, the prediction from
:data:`~bayespose.core.deep.vocabulary.PRIOR_INPLANE_TURNS` turns): from an order-3 first grid the deep prior takes
0.32-0.37x the global search's time at the same mean error; at the default sampling (order 2 + 3 levels)
1.15-1.55x (box 64-256, five runs on a machine whose speed drifts), because what the network replaces is the global
search's cheap first two stages (a shared 15° grid, then order 3: a fifth of its time at box 64), and both spend
most of their time in the refinement levels around each particle's pose (orders 4 and 5), which no network
replaces: even a perfect prediction (all mass on the true cell, no network cost) gives 0.70-1.08 / 0.88-1.14 /
0.98-1.22x at box 64 / 128 / 256.

Priors: ``so3grid`` prediction -> :class:`~bayespose.core.geometry.priors.GridPrior` on ``healpix_grid(grid_order)``
with the predicted log probabilities (a rotation gets the probability of the network cell containing it);
``quaternion`` prediction -> isotropic Gaussian on SO(3) around the predicted rotation, ``eta = range / 3`` rad.

Shifts: the shift lattice of ``search`` around each particle's input origin. Symmetry: ``search.symmetry``
(default: the prediction's); the MMSE folds the mates.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from bayespose.core.assign import NoiseModel, PoseAssignment, PoseSearch, assign_poses
from bayespose.core.deep.predict import PosePrediction
from bayespose.core.deep.vocabulary import (
    AUTO_FALLBACK_DEFICIT,
    AUTO_FALLBACK_Z,
    DEFAULT_MAX_SEED_CELLS,
    DEFAULT_SEED_MASS,
    SEARCH_METHODS,
    SearchMethod,
    fallback_threshold,
)
from bayespose.core.geometry.grids import containing_cell, healpix_grid, neighbour_table
from bayespose.core.geometry.priors import GridPrior, IGSO3Prior
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, prepared_for, slice_coefficients
from bayespose.core.imaging.noise import scoring_frequencies
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.mrc import read_images
from bayespose.core.results import ParticleResults
from bayespose.core.runtime import choose_device, torch_threads

__all__ = ["deep_prior_assign", "DeepPriorSearch", "default_local_range_deg", "cells_near", "seed_rotations",
           "seed_cells", "fit_zscores", "fallback_threshold", "final_spacing_deg", "DeepPriorAssignment", "PoseFit",
           "SEARCH_METHODS", "AUTO_FALLBACK_Z", "AUTO_FALLBACK_DEFICIT", "DEFAULT_SEED_MASS", "DEFAULT_MAX_SEED_CELLS"]

QUATERNION_RANGE_DEG = 20.0


def default_local_range_deg(prediction: PosePrediction, method: SearchMethod = "cells") -> float:
    """Default radius (degrees) of the searched regions around the seed rotations (module doc)."""
    if prediction.grid_order is None:
        return QUATERNION_RANGE_DEG
    spacing = healpix_grid(prediction.grid_order).spacing_deg
    return spacing if method == "cells" else 0.75 * spacing


def cells_near(rotations: np.ndarray, order: int, range_deg: float, chunk: int | None = None) -> np.ndarray:
    """Cells of ``healpix_grid(order)`` whose centre lies within ``range_deg`` of any of the rotations
    (N, K, 3, 3) of each particle: (N, C) indices, padded with -1 (C = the largest count; the nearest cell of
    each rotation is always included). ``chunk``: particles per block (default: about 4 M traces per block)."""
    grid = healpix_grid(order).rotations.reshape(-1, 9)
    cos_limit = 1.0 + 2.0 * math.cos(math.radians(range_deg))  # trace at the limit angle
    n, k = rotations.shape[:2]
    chunk = chunk or max(1, 4_000_000 // (k * len(grid)))
    rows = []
    for s in range(0, n, chunk):
        r = rotations[s:s + chunk].reshape(-1, 9)
        trace = (r @ grid.T).reshape(-1, k, len(grid))  # tr(R^T G) = 1 + 2 cos(angle), (B, K, G)
        near = (trace >= cos_limit).any(1)
        nearest = np.argmax(trace, axis=2)  # (B, K)
        near[np.repeat(np.arange(len(near)), k), nearest.ravel()] = True
        rows.extend(np.flatnonzero(row) for row in near)
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])


def _top_cells(prediction: PosePrediction, seed_mass: float | None, max_seed_cells: int,
               top_k: int | None) -> tuple[np.ndarray | None, np.ndarray]:
    """Per particle the most probable cells of the prediction's grid (N, C) (rows padded by repeating the most
    probable cell) and their counts (N,), or (None, counts) when the seeds are the fixed top-K rotations."""
    if seed_mass is None or prediction.log_probabilities is None:
        k = prediction.top_rotations.shape[1] if top_k is None else min(top_k, prediction.top_rotations.shape[1])
        return None, np.full(len(prediction), k)
    if not 0 < seed_mass <= 1:
        raise ValueError(f"seed_mass must be in (0, 1] (a fraction of the predicted probability), got {seed_mass}")
    if max_seed_cells < 1:
        raise ValueError(f"max_seed_cells must be >= 1, got {max_seed_cells}")
    # in torch: numpy's partition and exp of N x 36864 far-negative log probabilities took 8 s for 1000 particles
    log_p = torch.as_tensor(np.asarray(prediction.log_probabilities))
    cap = min(int(max_seed_cells), log_p.shape[1])
    top_logp, top = torch.topk(log_p, cap, dim=1)  # most probable first
    p = torch.exp(top_logp - torch.logsumexp(log_p, dim=1, keepdim=True)).double().numpy()
    top = top.numpy()
    counts = np.minimum((np.cumsum(p, axis=1) < seed_mass).sum(1) + 1, cap)
    return np.where(np.arange(cap)[None] < counts[:, None], top, top[:, :1]), counts


def seed_rotations(prediction: PosePrediction, seed_mass: float | None = DEFAULT_SEED_MASS,
                   max_seed_cells: int = DEFAULT_MAX_SEED_CELLS,
                   top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rotations (N, C, 3, 3) around which each particle is searched and their count per particle (N,).

    With ``seed_mass`` in (0, 1] and a grid prediction (``log_probabilities`` set): per particle the most probable
    cells of ``healpix_grid(prediction.grid_order)`` until their summed probability reaches ``seed_mass``, at most
    ``max_seed_cells`` (at least 1); rows are padded by repeating the most probable cell (a repeated centre adds
    no region). Otherwise (``seed_mass`` None, or a quaternion prediction): the prediction's ``top_rotations``,
    the first ``top_k`` of them when given.
    """
    centres = np.asarray(prediction.top_rotations, dtype=np.float64)
    if centres.ndim != 4 or centres.shape[-2:] != (3, 3):
        raise ValueError(f"prediction.top_rotations must be (N, K, 3, 3), got {centres.shape}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    cells, counts = _top_cells(prediction, seed_mass, max_seed_cells, top_k)
    if cells is None:
        return centres[:, :counts[0]], counts
    return healpix_grid(int(prediction.grid_order)).rotations[cells], counts


def _unique_rows(cells: np.ndarray) -> np.ndarray:
    """Each row's distinct non-negative entries, compacted to the left and padded with -1 (N, C')."""
    srt = np.sort(cells, axis=1)
    keep = (srt >= 0) & np.concatenate([np.ones((len(srt), 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1)
    order = np.argsort(~keep, axis=1, kind="stable")
    width = max(int(keep.sum(1).max()), 1)
    out = np.take_along_axis(np.where(keep, srt, -1), order, axis=1)[:, :width]
    return out


def seed_cells(prediction: PosePrediction, order: int, range_deg: float,
               seed_mass: float | None = DEFAULT_SEED_MASS, max_seed_cells: int = DEFAULT_MAX_SEED_CELLS,
               top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The cells of ``healpix_grid(order)`` a seeded search scores first: (N, C) indices padded with -1, and the
    number of seeds per particle (N,).

    The seeds (:func:`seed_rotations`: the predicted cells holding ``seed_mass`` of the probability, or the top-K
    rotations) are mapped to the cell of ``order`` that contains them, and every cell whose centre lies within
    ``range_deg`` of such a cell is added (:func:`neighbour_table`; this covers seeds near a cell's border). When
    ``order`` is the prediction's own grid the seed cells are the predicted cells themselves.
    """
    cells, counts = _top_cells(prediction, seed_mass, max_seed_cells, top_k)
    if cells is not None and prediction.grid_order is not None and int(prediction.grid_order) == order:
        mapped = cells
    else:
        rotations, counts = seed_rotations(prediction, seed_mass, max_seed_cells, top_k)
        mapped = containing_cell(order, rotations)
    table = neighbour_table(int(order), round(float(range_deg), 6))
    return _unique_rows(table[mapped].reshape(len(mapped), -1)), counts


@dataclass
class PoseFit:
    """Per-particle fit of given poses (N,): ``llr`` log-likelihood gain over "no signal" (nats), ``energy`` the
    expected signal energy ``Σ α² C² |P|² / σ²`` (nats), ``grid_loss`` the expected log-likelihood lost by a pose
    ``tolerance_deg`` away (nats; 0 without tolerance), ``z = (llr - energy + grid_loss) / sqrt(2 energy)``
    (~N(0, 1) at the true pose when ``grid_loss`` is 0; module doc), ``radius_px`` the Fourier radius of the
    sums; :attr:`deficit` the fraction of the signal energy left unexplained."""

    llr: np.ndarray
    energy: np.ndarray
    z: np.ndarray
    radius_px: float
    grid_loss: np.ndarray | None = None

    @property
    def deficit(self) -> np.ndarray:
        """The fit deficit ``-(llr - energy + grid_loss) / energy`` (N,): the fraction of the expected signal energy
        the pose leaves unexplained (~0 at the true pose, up to ~2 at an unrelated one; module doc)."""
        loss = 0.0 if self.grid_loss is None else self.grid_loss
        return -(self.llr - self.energy + loss) / np.maximum(self.energy, 1e-12)


def fit_zscores(particles: ParticleSet, volume: np.ndarray | PreparedVolume, rotations: np.ndarray,
                origins_A: np.ndarray | None, noise: NoiseModel, radius_px: float, images: np.ndarray | None = None,
                device=None, batch_size: int = 256, tolerance_deg: float = 0.0, n_axes: int = 3,
                seed: int = 0) -> PoseFit:
    """The fit z-score of one pose per particle (module doc, stage 3) under the assignment's noise model.

    ``rotations`` (N, 3, 3) RELION ``A``; ``origins_A`` (N, 2) rlnOriginX/Y in Å (None: zeros); ``noise`` the
    :class:`~bayespose.core.assign.NoiseModel` of the assignment (noise power per shell in unnormalised DFT
    units, reference scale α); ``radius_px``: Fourier radius (px of the particle box) of the scored band, e.g.
    ``result.timings["radii_px"][-1]``. The sums run over the non-redundant half plane, DC excluded, as the
    engine's. ``tolerance_deg`` > 0: the poses come from a grid whose best point lies up to about this far from
    the truth (half the finest grid step), so the z-score is credited with the expected loss of such an offset,
    ``grid_loss = mean_a Σ α² C² |P_R - P_R·exp(δ a)|² / σ²`` over ``n_axes`` body-frame unit axes ``a`` (the
    three coordinate axes by default: the exact mean over all directions for a small turn; :func:`_body_turns`),
    ``δ = tolerance_deg``; without it, at high SNR (large E) a right pose on a coarse grid would look wrong.
    Cost: ``1 + n_axes`` projections per particle (with a tolerance), about what scoring as many rotations costs.
    """
    n = len(particles)
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"need one rotation (3, 3) per particle, got {rotations.shape} for {n} particles")
    if not radius_px > 0:
        raise ValueError(f"the Fourier radius must be > 0 px, got {radius_px}")
    dev = choose_device(device)
    prepared = prepared_for(volume, particles.box, dev)
    box, px = particles.box, particles.pixel_size
    freqs = scoring_frequencies(box, min(radius_px, box / 2.0))
    kx, ky = freqs.kx.to(dev), freqs.ky.to(dev)
    sigma2 = torch.as_tensor(noise.noise_power, dtype=torch.float32, device=dev)[freqs.shell.to(dev)]
    sigma2 = torch.clamp(sigma2, min=float(sigma2.max()) * 1e-6)  # as the engine
    origins_px = np.zeros((n, 2)) if origins_A is None else np.asarray(origins_A, dtype=np.float64) / px
    if tolerance_deg < 0 or n_axes < 1:
        raise ValueError(f"tolerance must be >= 0 degrees and n_axes >= 1, got {tolerance_deg}, {n_axes}")
    turns = _body_turns(n_axes, tolerance_deg, seed) if tolerance_deg > 0 else None  # (A, 3, 3)
    llr, energy, loss = np.zeros(n), np.zeros(n), np.zeros(n)
    for s in range(0, n, batch_size):
        index = np.arange(s, min(n, s + batch_size))
        imgs = images[index] if images is not None else read_images(particles, index)
        y = freqs.select(torch.fft.rfft2(torch.as_tensor(np.asarray(imgs, dtype=np.float32), device=dev)))
        ctf = (freqs.select(ctf_2d(particles.ctf.subset(index), px, box, rfft=True, device=dev))
               if particles.ctf is not None else torch.ones_like(y.real))
        model = noise.scale * ctf * slice_coefficients(prepared, rotations[index], kx, ky)  # α C P_R
        shift = torch.as_tensor(origins_px[index], dtype=torch.float32, device=dev)
        angle = (-2.0 * math.pi / box) * (shift[:, :1] * kx + shift[:, 1:] * ky)  # centres Y (moves it by +o)
        y_centred = y * torch.polar(torch.ones_like(angle), angle)
        e = model.abs() ** 2 / sigma2
        llr[index] = (2.0 * (y_centred * model.conj()).real / sigma2 - e).sum(1).double().cpu().numpy()
        energy[index] = e.sum(1).double().cpu().numpy()
        if turns is not None:
            for turn in turns:
                moved = noise.scale * ctf * slice_coefficients(prepared, rotations[index] @ turn, kx, ky)
                loss[index] += ((model - moved).abs() ** 2 / sigma2).sum(1).double().cpu().numpy() / len(turns)
    z = (llr - energy + loss) / np.sqrt(2.0 * np.maximum(energy, 1e-12))
    return PoseFit(llr=llr, energy=energy, z=z, radius_px=float(freqs.radius), grid_loss=loss)


def _body_turns(n_axes: int, angle_deg: float, seed: int) -> np.ndarray:
    """(n_axes, 3, 3) rotations by ``angle_deg`` about body-frame axes, the same for every particle: the three
    coordinate axes for ``n_axes == 3`` (the loss of a small turn is a quadratic form in the rotation vector, and
    its mean over three orthonormal axes is exactly its mean over all directions), else random unit axes (seeded).
    The same turns for every particle make each particle's z-score independent of the others in the call (a
    data-parallel or block-wise run gives every particle the z-score of a single run)."""
    from scipy.spatial.transform import Rotation

    axes = np.eye(3) if n_axes == 3 else np.random.default_rng(seed).standard_normal((n_axes, 3))
    axes = axes * (math.radians(angle_deg) / np.linalg.norm(axes, axis=1, keepdims=True))
    return Rotation.from_rotvec(axes).as_matrix()


def final_spacing_deg(search: PoseSearch, method: SearchMethod = "cells") -> float:
    """Angular step (degrees) of the finest grid a deep-prior search scores: the HEALPix spacing halved
    ``refine_levels`` times (``cells``), or the local lattice step (``balls``)."""
    if method == "balls":
        return float(search.local_step_deg or search.local_range_deg / 4.0)
    return healpix_grid(search.healpix_order).spacing_deg / 2 ** search.refine_levels


@dataclass(frozen=True)
class DeepPriorSearch:
    """Settings of deep-prior MMSE (:func:`deep_prior_assign`, module doc), checked when made (``ValueError``).

    ``method``: ``"cells"`` (seeded coarse-to-fine search on the engine's HEALPix grid) or ``"balls"`` (local
    lattices around the seeds). Seeds (:func:`seed_rotations`): ``seed_mass`` in (0, 1]: per particle the most
    probable network cells holding this fraction of the predicted probability, at most ``max_seed_cells``;
    ``seed_mass=None``: the prediction's fixed top-K rotations, the first ``top_k`` of them when given (use it
    with ``"balls"``: every seed adds a whole per-particle lattice). Quaternion predictions always use the top-K.
    ``local_range_deg``: radius (degrees, in (0, 90]) of the searched regions around the seeds (None:
    :func:`default_local_range_deg`). ``fallback_z``: particles whose fit z-score is below it and whose fit
    deficit is above ``fallback_deficit`` are re-assigned by the global search (defaults ``AUTO_FALLBACK_Z`` and
    ``AUTO_FALLBACK_DEFICIT``, measured; higher z / lower deficit = more fall back; deficit 0: the z-score alone);
    ``fallback_z`` None: no check (every particle keeps its deep-prior result). :func:`fallback_threshold` reads a
    user's ``auto | none | Z``.
    """

    method: SearchMethod = "cells"
    seed_mass: float | None = DEFAULT_SEED_MASS
    max_seed_cells: int = DEFAULT_MAX_SEED_CELLS
    top_k: int | None = None
    local_range_deg: float | None = None
    fallback_z: float | None = AUTO_FALLBACK_Z
    fallback_deficit: float = AUTO_FALLBACK_DEFICIT

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, got {self.method!r}")
        if self.seed_mass is not None and not (_is_number(self.seed_mass) and 0 < self.seed_mass <= 1):
            raise ValueError(f"seed_mass must be a fraction in (0, 1] of the predicted probability, or None for "
                             f"the top-K seeds, got {self.seed_mass!r}")
        if not (_is_number(self.max_seed_cells) and self.max_seed_cells >= 1):
            raise ValueError(f"max_seed_cells must be >= 1, got {self.max_seed_cells!r}")
        if self.top_k is not None and not (_is_number(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k!r}")
        if self.local_range_deg is not None and not (_is_number(self.local_range_deg)
                                                     and 0 < self.local_range_deg <= 90):
            raise ValueError(f"local range must be in (0, 90] degrees or None, got {self.local_range_deg!r}")
        if self.fallback_z is not None and not (_is_number(self.fallback_z) and math.isfinite(self.fallback_z)):
            raise ValueError(f"fallback_z must be a finite z threshold or None (no check), got {self.fallback_z!r}")
        if not (_is_number(self.fallback_deficit) and 0 <= self.fallback_deficit < 2):
            raise ValueError(f"fallback_deficit must be a fraction of the signal energy in [0, 2), "
                             f"got {self.fallback_deficit!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class DeepPriorAssignment(PoseAssignment):
    """A :class:`~bayespose.core.assign.PoseAssignment` of deep-prior MMSE with the network's and the
    verification's per-particle results (fields of :class:`~bayespose.core.results.ParticleResults`):
    ``deep_confidence`` and ``deep_top_probability`` (N,) of the prediction, ``deep_fit_z`` (N,) fit z-score of
    each particle's best searched pose (the MLE of the deep-prior search; None without the check),
    ``deep_fallback`` (N,) bool: re-assigned by the global search (its rows hold the global result), and
    ``seed_counts`` (N,) seed rotations per particle. ``timings`` adds ``deep_s``, ``fit_s``, ``fallback_s``,
    ``fallback_particles``, ``deep_scored_rotations_per_particle`` (the deep-prior search alone),
    ``fallback_scored_rotations`` (total of the global re-assignment) and ``scoring_gflop`` (GFLOP of all
    scoring); ``scored_rotations_per_particle``, ``setup_s``, ``scoring_s`` and ``total_s`` count both searches
    (rotations per input particle)."""

    deep_confidence: np.ndarray | None = None
    deep_top_probability: np.ndarray | None = None
    deep_fit_z: np.ndarray | None = None
    deep_fallback: np.ndarray | None = None
    seed_counts: np.ndarray | None = None

    def to_particle_set(self, particles: ParticleSet, estimator: str = "mmse") -> ParticleSet:
        """:meth:`PoseAssignment.to_particle_set` plus the deep columns of the schema
        (:data:`~bayespose.core.results.COLUMNS`): ``bpDeepConfidence``, ``bpDeepTopProbability``, ``bpDeepFitZ``
        and ``bpDeepFallback`` (1: the particle's pose comes from the global search), those that hold values."""
        out = super().to_particle_set(particles, estimator)
        deep = ParticleResults(**{name: getattr(self, name) for name in _DEEP_FIELDS})
        out.extra.update(deep.statistic_columns())
        return out


_DEEP_FIELDS = ("deep_confidence", "deep_top_probability", "deep_fit_z", "deep_fallback")
_PER_PARTICLE = ("mmse_rotations", "mmse_origins_A", "map_rotations", "map_origins_A", "mle_rotations",
                 "mle_origins_A", "pmax", "n_significant", "expected_error_deg", "concentration", "log_evidence")


def deep_prior_assign(particles: ParticleSet, prediction: PosePrediction, volume: np.ndarray,
                      search: PoseSearch | None = None, config: DeepPriorSearch | None = None, *,
                      images: np.ndarray | None = None, noise: NoiseModel | None = None,
                      progress: Callable[[int, int], None] | None = None) -> DeepPriorAssignment:
    """MMSE pose assignment of ``particles`` against ``volume`` (D, D, D) restricted to the network's predicted
    regions, with a global-search fallback for the particles whose deep-prior pose does not fit (module doc).

    ``prediction``: :func:`~bayespose.core.deep.predict_poses` of the same particles. ``search``: grid,
    refinement, shift and device settings (``healpix_order``/``refine_levels`` for ``cells`` and for the
    fallback; ``local_step_deg`` (default range / 3) for ``balls``; ``symmetry`` default the prediction's).
    ``config``: seeds, regions and fallback (:class:`DeepPriorSearch`; default: adaptive seeds on cells, check at
    ``AUTO_FALLBACK_Z``). ``images`` (N, D, D): the particle images if in memory. ``noise``: a given noise model
    and reference scale (default: estimated from up to 1000 of the particles, as :func:`assign_poses`; the fit
    z-score shifts by about ``-ε·sqrt(2E)`` for a scale off by a fraction ε, so sets of a few dozen particles,
    whose scale estimate is a few % off, are better given one from more). ``progress(done, total)``: after each
    batch of either search. Returns a :class:`DeepPriorAssignment`; ``timings["scored_rotations_per_particle"]``
    and ``timings["total_s"]`` measure the whole work (compare with a global :func:`assign_poses`).
    """
    t_start = time.perf_counter()
    config = config or DeepPriorSearch()
    n = len(particles)
    if len(prediction) != n:
        raise ValueError(f"prediction has {len(prediction)} particles, the set {n}")
    if images is not None and len(images) != n:
        raise ValueError(f"{len(images)} images for {n} particles")
    search = search or PoseSearch()
    symmetry = search.symmetry if search.symmetry.upper() != "C1" else prediction.symmetry
    with torch_threads(search.threads or os.cpu_count()):  # prepared once for the search, the check and fallback
        volume = prepared_for(volume, particles.box, choose_device(search.device))
    # the engine centres the shift lattice on the input origins (zeros when the particles have none)
    target = particles if particles.origins_A is not None else replace(particles, origins_A=np.zeros((n, 2)))
    deep, deep_search, counts = _search_predicted_regions(target, prediction, volume, search, config, symmetry,
                                                          images, noise, progress)
    t_deep = time.perf_counter() - t_start
    values = {f.name: getattr(deep, f.name) for f in fields(PoseAssignment)}
    values.update(deep_confidence=np.asarray(prediction.confidence, dtype=np.float64),
                  deep_top_probability=np.asarray(prediction.top_probabilities[:, 0], dtype=np.float64),
                  deep_fallback=np.zeros(n, dtype=bool), seed_counts=counts)
    result = DeepPriorAssignment(**values)
    timings = dict(deep.timings)
    timings.update(scoring_gflop=_gflop(deep.timings), deep_s=t_deep, fit_s=0.0,
                   fallback_s=0.0, fallback_particles=0, fallback_scored_rotations=0.0,
                   deep_scored_rotations_per_particle=deep.timings["scored_rotations_per_particle"])
    result.timings = timings
    if config.fallback_z is not None:
        _verify_and_fall_back(result, target, volume, search, config, deep_search, symmetry, images, progress)
    timings["scored_rotations_per_particle"] = (timings["deep_scored_rotations_per_particle"]
                                                + timings["fallback_scored_rotations"] / n)
    timings["total_s"] = time.perf_counter() - t_start
    return result


def _search_predicted_regions(
        target: ParticleSet, prediction: PosePrediction, volume: PreparedVolume, search: PoseSearch,
        config: DeepPriorSearch, symmetry: str, images: np.ndarray | None, noise: NoiseModel | None,
        progress: Callable[[int, int], None] | None) -> tuple[PoseAssignment, PoseSearch, np.ndarray]:
    """Stages 1-2 (module doc): the deep-prior assignment, the engine settings it ran with and the seed counts."""
    range_deg = (float(config.local_range_deg) if config.local_range_deg is not None
                 else default_local_range_deg(prediction, config.method))
    if prediction.log_probabilities is not None:
        prior = GridPrior(int(prediction.grid_order), prediction.log_probabilities)
    else:
        prior = IGSO3Prior(np.asarray(prediction.rotations, dtype=np.float64), math.radians(range_deg) / 3.0)
    if config.method == "cells":
        deep_search = replace(search, local_range_deg=None, symmetry=symmetry, **_start_order(search, prediction))
        seeds, counts = seed_cells(prediction, deep_search.healpix_order, range_deg, config.seed_mass,
                                   config.max_seed_cells, config.top_k)
        deep = assign_poses(target, volume, deep_search, prior, images=images, noise=noise, progress=progress,
                            seed_cells=seeds)
    else:
        centres, counts = seed_rotations(prediction, config.seed_mass, config.max_seed_cells, config.top_k)
        deep_search = replace(search, local_range_deg=range_deg,
                              local_step_deg=search.local_step_deg or range_deg / 3.0, symmetry=symmetry)
        deep = assign_poses(target, volume, deep_search, prior, images=images, noise=noise, progress=progress,
                            centers=centres)
    return deep, deep_search, counts


def _start_order(search: PoseSearch, prediction: PosePrediction) -> dict:
    """Where the seeded coarse-to-fine search starts: on the network's own grid when it is finer than the
    search's coarse grid (its cells are already resolved by the prediction; the coarse levels are skipped), with
    the levels that end on the same finest grid as the global search; else the search's own grid."""
    order = prediction.grid_order
    finest = search.healpix_order + search.refine_levels
    if order is None or not search.healpix_order < int(order) <= finest:
        return {}
    return {"healpix_order": int(order), "refine_levels": finest - int(order)}


def _verify_and_fall_back(result: DeepPriorAssignment, target: ParticleSet, volume: PreparedVolume,
                          search: PoseSearch, config: DeepPriorSearch, deep_search: PoseSearch, symmetry: str,
                          images: np.ndarray | None, progress: Callable[[int, int], None] | None) -> None:
    """Stage 3 (module doc): the fit z-scores of the deep-prior poses, and the global search (results written
    into ``result``'s rows, timings added) for the particles below ``config.fallback_z`` whose fit deficit is
    above ``config.fallback_deficit``."""
    timings, n = result.timings, len(target)
    t0 = time.perf_counter()
    # the best-fitting searched pose (the MLE of the searched set, prior left out): does the region hold the data?
    fit = fit_zscores(target, volume, result.mle_rotations, result.mle_origins_A, result.noise,
                      timings["radii_px"][-1], images, search.device,
                      tolerance_deg=final_spacing_deg(deep_search, config.method) / 2.0)
    result.deep_fit_z = fit.z
    timings["fit_s"] = time.perf_counter() - t0
    rows = np.flatnonzero((fit.z < config.fallback_z) & (fit.deficit > config.fallback_deficit))
    if not len(rows):
        return
    t0 = time.perf_counter()
    glob = _global_assign(target, rows, volume, replace(search, local_range_deg=None, symmetry=symmetry),
                          images, result.noise, progress, n)
    for name in _PER_PARTICLE:
        getattr(result, name)[rows] = getattr(glob, name)
    result.deep_fallback[rows] = True
    deep_gflop = timings["scoring_gflop"]
    timings.update(fallback_s=time.perf_counter() - t0, fallback_particles=int(len(rows)),
                   fallback_scored_rotations=glob.timings["scored_rotations_per_particle"] * len(rows),
                   setup_s=timings["setup_s"] + glob.timings["setup_s"],
                   scoring_s=timings["scoring_s"] + glob.timings["scoring_s"])
    timings["scoring_gflop"] = deep_gflop + _gflop(glob.timings)
    timings["scoring_gflops"] = timings["scoring_gflop"] / max(timings["scoring_s"], 1e-9)


def _gflop(timings: dict) -> float:
    """Floating-point work (GFLOP) of one :func:`assign_poses` run from its timings (rate x seconds)."""
    return float(timings.get("scoring_gflops", 0.0)) * float(timings.get("scoring_s", 0.0))


def _global_assign(particles: ParticleSet, rows: np.ndarray, volume: PreparedVolume, search: PoseSearch,
                   images: np.ndarray | None, noise: NoiseModel,
                   progress: Callable[[int, int], None] | None, n_total: int) -> PoseAssignment:
    """The global coarse-to-fine search (uniform prior, given noise model) of the particles ``rows``, with the
    shift lattice around their input origins (all coarse cells as seeds when the origins are not all zero, which
    is the global search centred there; the plain global search otherwise). ``progress`` continues after the
    ``n_total`` particles of the first pass."""
    sub = particles.subset(rows)
    imgs = images[rows] if images is not None else None
    report = (lambda done, total: progress(n_total + done, n_total + total)) if progress else None
    if sub.origins_A is None or not np.any(sub.origins_A):
        return assign_poses(sub, volume, search, images=imgs, noise=noise, progress=report)
    every = np.tile(np.arange(len(healpix_grid(search.healpix_order))), (len(rows), 1))
    return assign_poses(sub, volume, search, images=imgs, noise=noise, progress=report, seed_cells=every)
