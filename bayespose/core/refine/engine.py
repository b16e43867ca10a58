"""EM 3D refinement with rotational-prior estimation (paper 000 sec. 4, App. F2; DESIGN.md "EM ...").

Each iteration, for each gold-standard half set h independently, against its own reference V_h:

* **E-step (coarse to fine)** — :func:`.posterior.assign_poses` (the tested MMSE engine) scores every particle on
  the HEALPix grid of ``healpix_order`` and splits the cells holding 0.999 of its posterior ``refine_levels`` times
  (RELION's oversampling), or, once the global search has converged, on a local grid around the particle's current
  pose (``PoseSearch.local_range_deg``); the frequency cut-off follows the current resolution. It returns each
  particle's final-stage rotation posterior ``p_ik`` (marginalised over shifts) and the MMSE / MAP / MLE poses.
* **Joint weights** — per particle, the candidate rotations holding ``candidate_mass`` of ``p_ik`` (at most
  ``max_candidates``, renormalised) are re-scored against every shift of the lattice (batched:
  per-particle rotations (B, Kc) x shifts (J)) with the same Gaussian likelihood (CTF, noise per shell, reference
  scale). Since the norm term does not depend on the shift, ``p(j | i, k) = softmax_j(2 alpha Re<C_i/sigma²
  shift(Y_i, +o_j), P_k>)`` and the joint weight is ``w_ikj = p_ik p(j | i, k)``, exact on that support.
  Hard mode (the MLE/MAP baseline) puts all weight on the best (k, j).
  A particle whose posterior on the coarse grid is too broad for that cap (pure noise, very low SNR) keeps its
  whole coarse posterior: its data are summed per grid rotation in 2D and each grid rotation is inserted once
  (the shared-grid path), so soft assignment is never truncated where it matters most.
* **M-step map** — per particle and candidate ``N_ik = Σ_j w_ikj (C_i/σ²) shift(Y_i, +o_j)`` and
  ``W_ik = Σ_j w_ikj C_i²/σ²`` are inserted with :meth:`.reconstruct.FourierAccumulator.insert` (symmetry mates
  included); the half map is the Wiener solution ``Σ N / (Σ W + 1/τ²)``.
* **M-step prior** (``prior_mode="estimate"``) — the viewing-direction density from the posterior mass of both
  halves, ``π(d) ∝ Σ_i Σ_k p_ik [dir(R_ik) in d] + a`` smoothed over HEALPix neighbours (in-plane uniform), the
  :class:`.priors.DirectionDensityPrior` of the next E-step; ``"uniform"`` keeps the Haar prior. (One prior for both
  halves: a 192-pixel histogram carries no high-resolution information, so the halves stay independent where it
  matters.)
* **M-step noise** — σ²(shell) from the residuals at each particle's most probable (k, j); reference scale 1 from
  the second iteration on (the reconstructions are in the particles' units, ``Σ C Y / Σ C²``).

Then: FSC between the half maps (optionally masked) gives the resolution (0.143) and τ² (RELION's rule,
:func:`.reconstruct.tau2_from_fsc`); the references are the half maps regularised with that τ², solvent-flattened
(a soft sphere of the particle diameter, or the user's mask) and averaged below ``join_halves_below_A`` (RELION's
``--low_resol_join_halves``, which keeps the two halves in the same frame). The next iteration scores up to the
resolution + ``extra_shells`` Fourier shells, with the angular sampling that resolution needs at the particle's
radius (``resolution / radius`` rad). Convergence: stop when the resolution has not improved for 2 iterations and
the mean pose change is below the current angular step.

**Final full-resolution pass** (``final_full_resolution``, default on; RELION's final iteration): every iteration
inserts data only up to its scored band (resolution + ``extra_shells``), so the last iteration's map has no signal
beyond it. After the last iteration (converged or not) each particle's data are inserted once more at ALL
frequencies up to Nyquist (``D // 2`` Fourier px; the noise power per shell is known for all shells) at the last
E-step's joint weights (rotation posteriors kept per particle; the shift weights re-scored on that E-step's band
against the same references), for both halves; the FSC of these unregularised full-resolution half maps gives the
final FSC / resolution and τ² (:func:`.reconstruct.tau2_from_fsc`), then the Wiener half maps and the combined map
(whole-map τ²). It is not an iteration (no history entry, no pose update). Units: Å, degrees, RELION ``A`` rotations,
origins ``rlnOriginX/Y`` (px inside, Å in the outputs).

Files (``out_dir``), written atomically per iteration: ``it###_half{1,2}.mrc`` (the Wiener-filtered half maps,
unmasked), ``it###_map.mrc`` (both halves, the final map of a run stopped there), ``it###_state.npz`` (everything
needed to continue: iteration, resolution, τ², noise power, prior density, sampling, per-particle poses and
statistics, FSC) and ``history.json``; after the final pass ``final_half{1,2}.mrc``, ``final_map.mrc`` and
``final_state.npz`` (iteration, resolution, FSC, τ²; written last). ``refine(..., resume=True)`` continues from the
last complete iteration; a resumed finished run returns the saved final maps, or, if the final pass is missing,
recomputes the joint-weight supports with one E-step against the saved references and redoes the final pass.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import healpy
import numpy as np
import torch

from bayespose.core.assign.engine import (
    CELL_SPREAD,
    NoiseModel,
    PoseAssignment,
    PoseSearch,
    _phase,
    assign_poses,
    estimate_noise_model,
    shift_lattice,
)
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import DirectionDensityPrior, RotationPrior
from bayespose.core.geometry.rotations import matrix_to_euler
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import prepare_volume, slice_coefficients
from bayespose.core.imaging.noise import ScoringFrequencies, resolution_to_radius, scoring_frequencies
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.imaging.reconstruct import FourierAccumulator, fsc, lowpass, resolution_at, tau2_from_fsc
from bayespose.core.io.atomic import atomic_file
from bayespose.core.io.mrc import read_images, read_map, write_map
from bayespose.core.runtime import choose_device

MODES = ("soft", "hard")
PRIOR_MODES = ("uniform", "estimate")
STATE_VERSION = 1
FINAL_STATE = "final_state.npz"  # written last by the final full-resolution pass


@dataclass
class RefineConfig:
    """EM settings. Angles in degrees, shifts in px, resolutions in Å.

    Angular sampling: every iteration scores the global HEALPix grid of ``healpix_order`` (72 · 8^order rotations,
    step 60 / 2^order degrees) and refines the significant cells coarse-to-fine up to the order the current
    resolution needs (``resolution / (diameter / 2)`` radians at the particle's edge), at least one level and at
    most ``max_healpix_order``. With ``local_search`` the search turns local (±``local_range_deg``, default 3 steps,
    around each particle's current pose, step of the current order) once the global search has converged: the
    finest order is reached and the mean pose change is below its step. Off by default, measured: at box 64 a
    local ±11.25° grid (123 rotations per particle) cost 1.6x the CPU time of the global order 2 + 2 levels search
    (5.2 s vs 3.2 s for 150 particles, SNR 0.3), because per-particle rotations share no projections while the
    global grid and its refinement lattice are projected once for all particles; and a global search can still
    correct a wrong pose. Local searches pay off for large boxes and fine samplings (order >= 5).
    """

    iterations: int = 10  # maximum number of iterations
    healpix_order: int = 2  # coarse global grid scored exhaustively (15°)
    max_healpix_order: int = 4  # finest sampling reached by the refinement (3.75°)
    shift_range_px: float = 3.0
    shift_step_px: float = 1.0
    symmetry: str = "C1"
    mode: str = "soft"
    prior_mode: str = "uniform"
    prior_pseudocount: float = 0.5  # per viewing direction, in particles
    prior_order: int = 2  # HEALPix order of the estimated viewing-direction density (192 pixels)
    initial_lowpass_A: float = 30.0
    extra_shells: float = 5.0  # score and insert this many Fourier shells beyond the current resolution
    particle_diameter_A: float | None = None  # angular sampling and solvent mask (default: 0.9 · box)
    candidate_mass: float = 0.999  # posterior mass of the candidate rotations re-scored with the shifts
    max_candidates: int = 32  # per particle; broader coarse posteriors take the shared-grid path
    local_search: bool = False  # switch to local searches once the global search has converged (see below)
    # after the last iteration, reconstruct both halves from ALL frequencies up to Nyquist at the converged joint
    # weights (RELION's final iteration); the result's maps, FSC and resolution are then those of this pass
    final_full_resolution: bool = True
    local_range_deg: float | None = None  # local search half-width (default: 3 angular steps)
    solvent_flatten: bool = True  # soft spherical mask of the particle diameter on the references (no user mask)
    join_halves_below_A: float | None = 40.0  # average the half maps below this resolution (None: never)
    initial_scale: float | None = None  # reference scale of the first iteration (None: method of moments)
    batch_size: int = 32
    device: str | None = None
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prior_mode not in PRIOR_MODES:
            raise ValueError(f"prior mode must be one of {PRIOR_MODES}, got {self.prior_mode!r}")
        if self.iterations < 1:
            raise ValueError("need at least one iteration")
        if not 0 <= self.healpix_order <= self.max_healpix_order <= 6:
            raise ValueError("need 0 <= healpix order <= max healpix order <= 6")
        if not 0 <= self.prior_order <= 4:
            raise ValueError(f"prior order must be in 0..4, got {self.prior_order}")
        if not 0 < self.candidate_mass <= 1:
            raise ValueError(f"candidate mass must be in (0, 1], got {self.candidate_mass}")
        if self.max_candidates < 1:
            raise ValueError("max candidates must be >= 1")
        if self.shift_range_px < 0 or not self.shift_step_px > 0:
            raise ValueError("shift range must be >= 0 px and shift step > 0 px")
        if not self.initial_lowpass_A > 0:
            raise ValueError(f"initial low-pass must be > 0 Å, got {self.initial_lowpass_A}")
        if self.local_range_deg is not None and not 0 < self.local_range_deg <= 90:
            raise ValueError(f"local range must be in (0, 90] degrees, got {self.local_range_deg}")
        if self.initial_scale is not None and not self.initial_scale > 0:
            raise ValueError(f"initial scale must be > 0, got {self.initial_scale}")
        symmetry_group(self.symmetry)


@dataclass
class IterationLog:
    iteration: int
    healpix_order: int  # finest HEALPix order of the search (coarse order + refinement levels)
    scored_resolution_A: float
    resolution_A: float  # FSC 0.143 between the half maps
    log_likelihood: float  # mean per particle of log p(Y_i) over the scored band (up to a constant)
    pose_change_deg: float  # mean angle between this and the previous iteration's MMSE (hard: MAP) poses
    seconds: float
    search: str = "global"  # "global" or "local"
    angular_step_deg: float = float("nan")  # finest angular step of the search
    mean_candidates: float = float("nan")  # rotations per particle given to the M-step
    broad_particles: int = 0  # particles that took the shared-grid path
    converged: bool = False


@dataclass
class RefineResult:
    map: np.ndarray
    half_maps: tuple
    fsc_frequencies: np.ndarray  # 1/Å
    fsc: np.ndarray
    resolution_A: float
    particles: ParticleSet  # MMSE poses (hard mode: MAP) + per-particle results in extra
    direction_prior: np.ndarray  # density (relative to uniform) on HEALPix NEST pixels of order prior_order
    prior_order: int
    history: list = field(default_factory=list)
    converged: bool = False
    noise_power: np.ndarray | None = None  # final σ² per shell (unnormalised DFT units)


# ------------------------------------------------------------------------------------------------ small helpers
def _direction_density(mass: np.ndarray, order: int, pseudocount: float) -> np.ndarray:
    """Smoothed viewing-direction density (mean 1) from posterior mass per NEST pixel of ``order``."""
    nside = 2 ** order
    counts = mass + pseudocount
    neighbours = healpy.get_all_neighbours(nside, np.arange(len(counts)), nest=True).T  # (P, 8), -1 if none
    valid = neighbours >= 0
    neighbour_mean = np.where(valid, counts[np.clip(neighbours, 0, None)], 0.0).sum(1) / valid.sum(1)
    smooth = 0.5 * counts + 0.5 * neighbour_mean
    return smooth / smooth.mean()


def _direction_mass(marginals: dict, order: int) -> np.ndarray:
    """Posterior mass per viewing-direction NEST pixel of ``order`` summed over particles' rotation posteriors
    ``{i: (rotations (K, 3, 3), probabilities (K,))}``; the direction of a RELION ``A`` is its third row."""
    n_pix = 12 * 4 ** order
    mass = np.zeros(n_pix)
    for rotations, probs in marginals.values():
        d = rotations[:, 2, :]
        pix = healpy.vec2pix(2 ** order, d[:, 0], d[:, 1], d[:, 2], nest=True)
        mass += np.bincount(pix, weights=probs, minlength=n_pix)
    return mass


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


def soft_sphere_mask(box: int, radius_px: float, edge_px: float = 3.0) -> np.ndarray:
    """(D, D, D) float32 mask: 1 within ``radius_px`` of the centre voxel D // 2, raised-cosine edge of
    ``edge_px`` outside it, 0 beyond (RELION's ``--flatten_solvent`` sphere, edge width in px)."""
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    t = np.clip((r - radius_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def _flatten_solvent(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``volume · mask + b · (1 - mask)``, b the mask-weighted mean of the volume outside (RELION's
    softMaskOutsideMap): solvent set to its average level, not to zero, so no step appears at the mask edge."""
    outside = 1.0 - mask
    b = float((volume * outside).sum() / max(outside.sum(), 1e-6))
    return (volume * mask + b * outside).astype(np.float32)


def _join_halves(maps: list, resolution_A: float | None, pixel_size: float) -> list:
    """Replace the Fourier components below ``resolution_A`` of both half maps by their average."""
    if resolution_A is None:
        return maps
    low = [lowpass(m, resolution_A, pixel_size, edge_width=0.0).numpy() for m in maps]
    mean_low = 0.5 * (low[0] + low[1])
    return [(m - lo + mean_low).astype(np.float32) for m, lo in zip(maps, low)]


def _pose_change(a: np.ndarray, b: np.ndarray | None, group: np.ndarray) -> float:
    if b is None:
        return float("nan")
    if len(group) > 1:
        return float(np.mean(symmetric_geodesic_distance_deg(a, b, group)))
    trace = np.einsum("nij,nij->n", a, b)
    return float(np.mean(np.degrees(np.arccos(np.clip((trace - 1) / 2, -1, 1)))))


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


# ------------------------------------------------------------------------------------------------ M-step
class _HalfMStep:
    """Joint (rotation, shift) weights on each particle's candidate support and the M-step sums for one half set.

    ``particles`` is the half set (its own indexing), ``images`` its images in memory or None, ``prepared`` the
    half reference, ``noise`` the noise model of this iteration, ``radius`` the insertion / re-scoring cut-off
    (Fourier px), ``centers_px`` (n, 2) the shift-lattice centres used by the E-step.
    """

    def __init__(self, particles: ParticleSet, images: np.ndarray | None, prepared, noise: NoiseModel, radius: float,
                 centers_px: np.ndarray, config: RefineConfig, device: torch.device,
                 insert_radius: float | None = None):
        self.p, self.images, self.prepared, self.noise = particles, images, prepared, noise
        self.config, self.device = config, device
        self.box = particles.box
        # data are inserted up to ``insert_radius`` (default ``radius``); the joint weights are always scored up to
        # ``radius`` (the final full-resolution pass inserts to Nyquist at the weights of the last E-step's band)
        self.freqs: ScoringFrequencies = scoring_frequencies(self.box, radius if insert_radius is None
                                                             else max(insert_radius, radius))
        self.radius = self.freqs.radius
        r = torch.sqrt(self.freqs.kx ** 2 + self.freqs.ky ** 2)
        self.scored = None if insert_radius is None else (r <= radius).to(device)
        self.score_kx = (self.freqs.kx if self.scored is None else self.freqs.kx[self.scored.cpu()]).to(device)
        self.score_ky = (self.freqs.ky if self.scored is None else self.freqs.ky[self.scored.cpu()]).to(device)
        self.centers = np.asarray(centers_px, dtype=np.float64)
        self.deltas = shift_lattice(config.shift_range_px, config.shift_step_px)
        shell = self.freqs.shell
        sigma2 = torch.as_tensor(noise.noise_power, dtype=torch.float32)[shell]
        self.sigma2 = torch.clamp(sigma2, min=float(sigma2.max()) * 1e-6).to(device)
        self.accumulator = FourierAccumulator.zeros(self.box, device=device)
        n_shells = len(noise.noise_power)
        self.noise_sum = np.zeros(n_shells)
        self.noise_count = np.zeros(n_shells)
        self.best_rot = np.zeros((len(particles), 3, 3))
        self.best_org = np.zeros((len(particles), 2))

    # -- per-batch data
    def _batch(self, rows: np.ndarray):
        """(y (B, M), ctf (B, M), z (B, J, M) = (C/σ²) shift(Y, +o_j), origins (B, J, 2) px) for half rows."""
        dev, freqs = self.device, self.freqs
        imgs = self.images[rows] if self.images is not None else read_images(self.p, rows)
        y = freqs.select(torch.fft.rfft2(torch.as_tensor(np.asarray(imgs, dtype=np.float32), device=dev)))
        if self.p.ctf is not None:
            ctf = freqs.select(ctf_2d(self.p.ctf.subset(rows), self.p.pixel_size, self.box, rfft=True, device=dev))
        else:
            ctf = torch.ones_like(y.real)
        origins = self.centers[rows][:, None, :] + self.deltas[None]  # (B, J, 2) px
        phase = _phase(freqs, torch.as_tensor(origins, dtype=torch.float32, device=dev))  # (B, J, M)
        z = ((ctf / self.sigma2) * y)[:, None, :] * phase
        return y, ctf, z, origins

    def _scored(self, values: torch.Tensor) -> torch.Tensor:
        """(..., M) on the inserted frequencies -> (..., M_s) on the scored ones."""
        return values if self.scored is None else values[..., self.scored]

    def _noise_from(self, y, ctf, proj_best, origins_best) -> None:
        """Residual power per shell at the best (rotation, shift) of each particle of a batch (not in the
        full-resolution pass: its projections cover the scored band only)."""
        if self.scored is not None:
            return
        phase = _phase(self.freqs, torch.as_tensor(origins_best, dtype=torch.float32, device=self.device))
        resid = y - self.noise.scale * ctf * proj_best * torch.conj(phase)
        shell = self.freqs.shell.numpy()
        power = (resid.abs() ** 2).sum(0).cpu().numpy().astype(np.float64)
        self.noise_sum += np.bincount(shell, weights=power, minlength=len(self.noise_sum))
        self.noise_count += np.bincount(shell, minlength=len(self.noise_sum)) * len(y)

    def _insert(self, numerator: torch.Tensor, weight: torch.Tensor, rotations: np.ndarray) -> None:
        """Insert slices given on the scored half plane (K, M) at RELION rotations (K, 3, 3)."""
        box, flat = self.box, self.freqs.flat_index.to(self.device)
        width = box * (box // 2 + 1)
        for s in range(0, len(rotations), 1024):
            e = min(s + 1024, len(rotations))
            slices = torch.zeros((e - s, width), dtype=torch.complex64, device=self.device)
            weights = torch.zeros((e - s, width), device=self.device)
            slices[:, flat] = numerator[s:e]
            weights[:, flat] = weight[s:e]
            self.accumulator.insert(slices.view(-1, box, box // 2 + 1), weights.view(-1, box, box // 2 + 1),
                                    rotations[s:e], symmetry=self.config.symmetry, max_radius=self.radius)

    # -- per-particle candidate path
    def candidates(self, rows: np.ndarray, cand_rot: list, cand_p: list) -> None:
        """Joint weights and M-step sums for half rows ``rows`` with candidate rotations ``cand_rot[b]`` (n_b, 3, 3)
        and rotation posteriors ``cand_p[b]`` (n_b,) (summing to 1)."""
        dev, m = self.device, len(self.freqs)
        alpha = self.noise.scale
        for s in range(0, len(rows), self.config.batch_size):
            sl = slice(s, s + self.config.batch_size)
            r_b, rot_b, p_b = rows[sl], cand_rot[sl], cand_p[sl]
            b = len(r_b)
            width = max(len(p) for p in p_b)
            rots = np.tile(np.eye(3), (b, width, 1, 1))
            probs = np.zeros((b, width))
            for i, (rot, p) in enumerate(zip(rot_b, p_b)):
                rots[i, :len(p)] = rot
                probs[i, :len(p)] = p
            y, ctf, z, origins = self._batch(r_b)
            j = z.shape[1]
            proj = slice_coefficients(self.prepared, rots.reshape(-1, 3, 3), self.score_kx, self.score_ky)
            m_s = proj.shape[-1]
            proj = proj.view(b, width, m_s)
            z_real = torch.view_as_real(z).reshape(b, j, 2 * m)
            z_scored = torch.view_as_real(self._scored(z)).reshape(b, j, 2 * m_s)
            cross = (2.0 * alpha) * torch.bmm(z_scored, torch.view_as_real(proj).reshape(b, width, 2 * m_s)
                                              .transpose(1, 2))  # (B, J, W)
            log_pj = torch.log_softmax(cross, dim=1)  # p(j | i, k)
            p_t = torch.as_tensor(probs, dtype=torch.float32, device=dev)
            log_joint = torch.log(p_t)[:, None, :] + log_pj  # (B, J, W); -inf on the padding
            flat_best = log_joint.reshape(b, -1).argmax(dim=1)
            jj, kk = (flat_best // width).cpu().numpy(), (flat_best % width).cpu().numpy()
            if self.config.mode == "hard":
                w = torch.zeros_like(log_joint).reshape(b, -1)
                w[torch.arange(b), flat_best] = 1.0
                w = w.view(b, j, width)
            else:
                w = torch.exp(log_joint)
            numer = torch.bmm(w.transpose(1, 2), z_real)  # (B, W, 2M)
            p_rot = w.sum(1)  # (B, W)
            weight = p_rot[:, :, None] * (ctf ** 2 / self.sigma2)[:, None, :]  # (B, W, M)
            keep = (p_rot > 0).reshape(-1)
            numer = torch.view_as_complex(numer.view(b * width, m, 2).contiguous())[keep]
            keep_np = keep.cpu().numpy()
            self._insert(numer, weight.reshape(b * width, m)[keep], rots.reshape(-1, 3, 3)[keep_np])
            idx = np.arange(b)
            self.best_rot[r_b] = rots[idx, kk]
            self.best_org[r_b] = origins[idx, jj]
            self._noise_from(y, ctf, proj[torch.arange(b), torch.as_tensor(kk)], origins[idx, jj])

    # -- shared-grid path (broad coarse posteriors)
    def shared(self, rows: np.ndarray, grid_rotations: np.ndarray, p_rows: np.ndarray) -> None:
        """Soft M-step sums for half rows ``rows`` whose rotation posteriors ``p_rows`` (R, K) live on the shared
        grid ``grid_rotations`` (K, 3, 3): data summed per grid rotation in 2D, each rotation inserted once."""
        dev, m = self.device, len(self.freqs)
        k_total = len(grid_rotations)
        alpha = self.noise.scale
        proj = slice_coefficients(self.prepared, grid_rotations, self.score_kx, self.score_ky)
        m_s = proj.shape[-1]
        proj_real = torch.view_as_real(proj).reshape(k_total, 2 * m_s)
        numerator = torch.zeros((k_total, 2 * m), device=dev)
        weight = torch.zeros((k_total, m), device=dev)
        for s in range(0, len(rows), self.config.batch_size):
            r_b = rows[s:s + self.config.batch_size]
            b = len(r_b)
            y, ctf, z, origins = self._batch(r_b)
            j = z.shape[1]
            z_real = torch.view_as_real(z).reshape(b * j, 2 * m)
            z_scored = torch.view_as_real(self._scored(z)).reshape(b * j, 2 * m_s)
            cross = (2.0 * alpha) * (z_scored @ proj_real.T).view(b, j, k_total)
            p_t = torch.as_tensor(p_rows[s:s + b], dtype=torch.float32, device=dev)
            log_joint = torch.log(p_t)[:, None, :] + torch.log_softmax(cross, dim=1)
            w = torch.exp(log_joint)  # (B, J, K)
            numerator += w.reshape(b * j, k_total).T @ z_real
            weight += w.sum(1).T @ (ctf ** 2 / self.sigma2)
            flat_best = log_joint.reshape(b, -1).argmax(dim=1)
            jj, kk = (flat_best // k_total).cpu().numpy(), (flat_best % k_total).cpu().numpy()
            idx = np.arange(b)
            self.best_rot[r_b] = grid_rotations[kk]
            self.best_org[r_b] = origins[idx, jj]
            self._noise_from(y, ctf, proj[torch.as_tensor(kk)], origins[idx, jj])
        keep = torch.nonzero(weight.sum(1) > 0).squeeze(1)
        numer_c = torch.view_as_complex(numerator.view(k_total, m, 2).contiguous())
        self._insert(numer_c[keep], weight[keep], grid_rotations[keep.cpu().numpy()])


# ------------------------------------------------------------------------------------------------ one iteration
@dataclass
class _Sampling:
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


def _sampling(config: RefineConfig, resolution: float, diameter: float, local: bool) -> _Sampling:
    """Angular sampling for the current resolution (see :class:`RefineConfig`)."""
    top = config.max_healpix_order
    finest = min(max(_needed_order(resolution, diameter), config.healpix_order + 1), top)
    finest = max(finest, config.healpix_order)
    step = _angular_step(finest)
    if local:
        return _Sampling(finest, 0, config.local_range_deg or 3.0 * step, step)
    return _Sampling(config.healpix_order, finest - config.healpix_order, None, step)


_PER_PARTICLE = ("mmse_rot", "mmse_org", "map_rot", "map_org", "mle_rot", "mle_org", "pmax", "nsig", "experr",
                 "conc", "logz", "ncand")


def _empty_results(n: int) -> dict:
    out = {name: np.zeros((n, 3, 3)) for name in ("mmse_rot", "map_rot", "mle_rot")}
    out.update({name: np.zeros((n, 2)) for name in ("mmse_org", "map_org", "mle_org")})
    out.update({name: np.zeros(n) for name in ("pmax", "nsig", "experr", "conc", "logz", "ncand")})
    return out


@dataclass
class _Support:
    """One half set's joint-weight support from an E-step: what its M-step needs, kept after the last iteration
    for the final full-resolution pass. ``radius``: the scored band (Fourier px); ``rows`` / ``cand_rot`` /
    ``cand_p``: candidate-path particles (half indexing) with their candidate rotations and rotation posteriors;
    ``broad_rows`` / ``broad_p`` (R, K): shared-grid particles and their posteriors on ``grid`` (K, 3, 3)."""

    particles: ParticleSet
    images: np.ndarray | None
    reference: np.ndarray
    noise: NoiseModel
    radius: float
    centers: np.ndarray
    rows: list
    cand_rot: list
    cand_p: list
    broad_rows: list
    broad_p: list
    grid: np.ndarray | None


def _e_step(particles: ParticleSet, images: np.ndarray | None, reference: np.ndarray, noise: NoiseModel,
            sampling: _Sampling, radius: float, prior: RotationPrior | None, config: RefineConfig,
            device: torch.device, progress) -> tuple[PoseAssignment, _Support, dict]:
    """E-step (assign_poses) of one half set and its candidate support; returns the assignment (with the
    marginals), the support and path statistics."""
    box, px = particles.box, particles.pixel_size
    search = PoseSearch(healpix_order=sampling.order, refine_levels=sampling.levels,
                        max_resolution_A=box * px / radius, shift_range_px=config.shift_range_px,
                        shift_step_px=config.shift_step_px, symmetry=config.symmetry,
                        local_range_deg=sampling.local_range_deg,
                        local_step_deg=sampling.step_deg if sampling.local_range_deg is not None else None,
                        device=str(device), threads=config.threads)
    n = len(particles)
    e_progress = progress("E-step") if progress else None
    result = assign_poses(particles, reference, search, prior, images, noise, keep_marginals=range(n),
                          progress=e_progress, seed=config.seed)
    local = sampling.local_range_deg is not None
    centers = particles.origins_px if (local and particles.origins_A is not None) else np.zeros((n, 2))
    grid = None if local else healpix_grid(sampling.order).rotations
    support = _Support(particles, images, reference, noise, radius, centers, [], [], [], [], [], grid)
    ncand = np.zeros(n)
    for i in range(n):
        rotations, probs = result.marginals[i]
        rot, p, needed = _candidates(rotations, probs, config.candidate_mass, config.max_candidates)
        if (needed > config.max_candidates and config.mode == "soft" and grid is not None
                and len(rotations) == len(grid) and np.array_equal(rotations, grid)):
            support.broad_rows.append(i)
            support.broad_p.append(probs / probs.sum())
            ncand[i] = len(grid)
        else:
            support.rows.append(i)
            support.cand_rot.append(rot)
            support.cand_p.append(p)
            ncand[i] = len(p)
    return result, support, {"ncand": ncand, "broad": len(support.broad_rows)}


def _m_step(support: _Support, config: RefineConfig, device: torch.device, progress,
            insert_radius: float | None = None) -> _HalfMStep:
    """Joint weights and M-step sums of one half set on its support; data inserted up to ``insert_radius``
    (Fourier px; default: the scored band)."""
    prepared = prepare_volume(support.reference, device=device)
    mstep = _HalfMStep(support.particles, support.images, prepared, support.noise, support.radius, support.centers,
                       config, device, insert_radius=insert_radius)
    n = len(support.particles)
    m_progress = progress("M-step") if progress else None
    if support.rows:
        mstep.candidates(np.asarray(support.rows), support.cand_rot, support.cand_p)
        if m_progress:
            m_progress(len(support.rows), n)
    if support.broad_rows:
        mstep.shared(np.asarray(support.broad_rows), support.grid, np.stack(support.broad_p))
        if m_progress:
            m_progress(n, n)
    return mstep


def _run_half(particles: ParticleSet, images: np.ndarray | None, reference: np.ndarray, noise: NoiseModel,
              sampling: _Sampling, radius: float, prior: RotationPrior | None, config: RefineConfig,
              device: torch.device, progress) -> tuple[PoseAssignment, _HalfMStep, dict, dict, _Support]:
    """E-step (assign_poses) + joint weights + M-step sums for one half set; returns the assignment, the M-step
    (accumulator, noise sums, best poses), the marginals, path statistics and the support."""
    result, support, stats = _e_step(particles, images, reference, noise, sampling, radius, prior, config, device,
                                     progress)
    mstep = _m_step(support, config, device, progress)
    return result, mstep, result.marginals, stats, support


@dataclass
class _Maps:
    """Half maps, combined map, FSC and τ² from the two half accumulators of an M-step."""

    half_maps: list
    combined: np.ndarray
    freq: np.ndarray
    fsc: np.ndarray
    resolution: float
    tau2: torch.Tensor


def _maps_from(accumulators: list, pixel_size: float, mask: np.ndarray | None) -> _Maps:
    """FSC of the unregularised half maps (a small ridge only: τ² of a previous cut-off would be zero beyond it,
    and the FSC of two zeroed shells would measure crop leakage) -> resolution (FSC 0.143, at least Nyquist) and
    τ² (RELION's rule); the Wiener half maps with that τ² and the combined map with the whole-map τ²."""
    provisional = [acc.reconstruct(tau2=None).cpu().numpy() for acc in accumulators]
    freq_t, fsc_t = fsc(provisional[0], provisional[1], pixel_size, mask=mask)
    freq, fsc_values = freq_t.cpu().numpy(), fsc_t.cpu().numpy()
    resolution = max(resolution_at(freq, fsc_values), 2 * pixel_size)
    mean_weight = 0.5 * (accumulators[0].mean_weight_per_shell() + accumulators[1].mean_weight_per_shell())
    tau2 = tau2_from_fsc(fsc_values, mean_weight[:len(fsc_values)])
    half_maps = [acc.reconstruct(tau2=tau2).cpu().numpy() for acc in accumulators]
    both = accumulators[0] + accumulators[1]
    combined = both.reconstruct(tau2=tau2_from_fsc(fsc_values, both.mean_weight_per_shell()[:len(fsc_values)],
                                                   whole_map=True)).cpu().numpy()
    return _Maps(half_maps, combined, freq, fsc_values, float(resolution), tau2)


# ------------------------------------------------------------------------------------------------ state files
def _atomic_write_bytes(path: Path, writer: Callable[[Path], None]) -> None:
    with atomic_file(path) as tmp:
        writer(tmp)


def _save_state(out_dir: Path, it: int, state: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **state)

    _atomic_write_bytes(out_dir / f"it{it:03d}_state.npz", write)


def _last_complete_iteration(out_dir: Path) -> int:
    """Highest iteration with its state and both half maps and the combined map on disk (0 if none)."""
    best = 0
    for path in out_dir.glob("it*_state.npz"):
        match = re.fullmatch(r"it(\d{3,})_state\.npz", path.name)
        if not match:
            continue
        it = int(match.group(1))
        names = [f"it{it:03d}_half1.mrc", f"it{it:03d}_half2.mrc", f"it{it:03d}_map.mrc"]
        if all((out_dir / name).is_file() for name in names):
            best = max(best, it)
    return best


# ------------------------------------------------------------------------------------------------ refine
def refine(particles: ParticleSet, initial_map: np.ndarray, config: RefineConfig | None = None,
           out_dir: str | Path | None = None, images: np.ndarray | None = None,
           log: Callable[[str], None] | None = print,
           progress: Callable[[str], Callable[[int, int], None]] | None = None,
           mask: np.ndarray | None = None, resume: bool = False) -> RefineResult:
    """EM refinement of ``initial_map`` (D, D, D) from ``particles`` (with CTF). See the module docstring.

    ``out_dir``: per-iteration half maps (``it###_half{1,2}.mrc``), combined map (``it###_map.mrc``), state
    (``it###_state.npz``) and ``history.json``. ``images``: particle images (N, D, D) if in memory. ``log``: one
    line per iteration (None: silent). ``progress(label)`` returns a ``callback(done, total)`` for each half set's
    E-step and M-step (labels ``"iteration I half H E-step"`` / ``"... M-step"``). ``mask``: (D, D, D) in [0, 1],
    applied to the half maps before they become references and used for the FSC. ``resume``: continue from the
    last complete iteration in ``out_dir`` (same particles and config). Returns the final map, half maps, FSC and
    resolution (those of the final full-resolution pass unless ``config.final_full_resolution`` is False; the
    per-iteration maps stay in ``out_dir``), particles with MMSE poses (hard mode: MAP poses), and the
    viewing-direction prior.
    """
    config = config or RefineConfig()
    config.validate()
    n = len(particles)
    if n < 10:
        raise ValueError(f"EM refinement needs at least 10 particles, got {n}")
    initial_map = np.asarray(initial_map, dtype=np.float32)
    box, px = particles.box, particles.pixel_size
    if initial_map.shape != (box,) * 3:
        raise ValueError(f"initial map box {initial_map.shape} does not match the particle box {box} px")
    if images is not None and np.shape(images) != (n, box, box):
        raise ValueError(f"images must have shape ({n}, {box}, {box}), got {np.shape(images)}")
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape != (box,) * 3:
            raise ValueError(f"mask shape {mask.shape} does not match the map box {box} px")
        if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1 or mask.max() == 0:
            raise ValueError("mask values must be in [0, 1] and not all zero")
    if resume and out_dir is None:
        raise ValueError("resume needs the output folder of the run to continue")
    device = choose_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    group = symmetry_group(config.symmetry)
    diameter = config.particle_diameter_A or 0.9 * box * px
    reference_mask = mask if mask is not None else (
        soft_sphere_mask(box, diameter / 2 / px) if config.solvent_flatten else None)
    nyquist = resolution_to_radius(box, px, None)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    def references_from(half_maps: list) -> list:
        refs = [_flatten_solvent(m, reference_mask) if reference_mask is not None else m for m in half_maps]
        return _join_halves(refs, config.join_halves_below_A, px)

    # ---- state: fresh start or resume
    start_it, state = 0, None
    if resume:
        start_it = _last_complete_iteration(out_dir)
        if start_it:
            state = dict(np.load(out_dir / f"it{start_it:03d}_state.npz", allow_pickle=False))
            if len(state["halves"]) != n:
                raise ValueError(f"cannot resume: {out_dir} holds a run of {len(state['halves'])} particles, "
                                 f"not {n}")
    if state is None:
        rng = np.random.default_rng(config.seed)
        given = particles.half_set is not None and set(np.unique(particles.half_set)) == {1, 2}
        halves = np.asarray(particles.half_set, dtype=int) if given else np.where(rng.permutation(n) % 2 == 0, 1, 2)
        start_map = lowpass(initial_map, config.initial_lowpass_A, px).cpu().numpy()
        half_maps = [start_map, start_map]
        references = [_flatten_solvent(start_map, reference_mask) if reference_mask is not None else start_map] * 2
        initial_radius = min(box * px / config.initial_lowpass_A, nyquist)
        if config.initial_scale is None:
            try:
                noise = estimate_noise_model(particles, prepare_volume(references[0], device=device),
                                             initial_radius, images, seed=config.seed)
            except ValueError as exc:
                raise ValueError(f"{exc} (or give the reference scale: RefineConfig.initial_scale)") from None
        else:
            noise = _noise_without_scale(particles, images, config)
        resolution, best_resolution, no_gain = config.initial_lowpass_A, math.inf, 0
        tau2 = None
        prior_density = np.ones(12 * 4 ** config.prior_order)
        per = _empty_results(n)
        previous_rot, local, converged = None, False, False
        history: list[IterationLog] = []
        freq = fsc_values = None
        combined = start_map
    else:
        halves = state["halves"].astype(int)
        half_maps = [read_map(out_dir / f"it{start_it:03d}_half{h}.mrc")[0] for h in (1, 2)]
        references = references_from(half_maps)
        noise = NoiseModel(state["noise_power"], float(state["noise_scale"]), state["noise_ctf2"])
        resolution, best_resolution = float(state["resolution"]), float(state["best_resolution"])
        no_gain = int(state["no_gain"])
        tau2 = torch.as_tensor(state["tau2"])
        prior_density = state["prior_density"]
        per = {name: state[name] for name in _PER_PARTICLE}
        previous_rot = per["map_rot" if config.mode == "hard" else "mmse_rot"]
        local, converged = bool(state["local"]), bool(state["converged"])
        history = [IterationLog(**entry) for entry in json.loads(str(state["history"]))]
        freq, fsc_values = state["fsc_frequencies"], state["fsc"]
        combined = read_map(out_dir / f"it{start_it:03d}_map.mrc")[0]
        if log:
            log(f"resuming after iteration {start_it} (resolution {resolution:.1f} Å)")
    index = [np.nonzero(halves == h)[0] for h in (1, 2)]

    it = start_it
    while it < config.iterations and not converged:
        it += 1
        t0 = time.perf_counter()
        radius = min(box * px / resolution + config.extra_shells, nyquist)
        sampling = _sampling(config, resolution, diameter, local)
        prior = DirectionDensityPrior(config.prior_order, prior_density) if config.prior_mode == "estimate" else None
        accumulators, mass, broad, supports = [], np.zeros(12 * 4 ** config.prior_order), 0, []
        noise_sum = noise_count = 0.0
        for h in range(2):
            rows = index[h]
            half = particles.subset(rows)
            if local:
                half = replace(half, rotations=per["mmse_rot"][rows], origins_A=per["mmse_org"][rows] * px)
            label = f"iteration {it} half {h + 1}"
            sub_progress = (lambda tag, _label=label: progress(f"{_label} {tag}")) if progress else None
            result, mstep, marginals, stats, support = _run_half(half, images[rows] if images is not None else None,
                                                                 references[h], noise, sampling, radius, prior,
                                                                 config, device, sub_progress)
            accumulators.append(mstep.accumulator)
            supports.append(support)
            if config.prior_mode == "estimate":
                mass += _direction_mass(marginals, config.prior_order)
            noise_sum, noise_count = noise_sum + mstep.noise_sum, noise_count + mstep.noise_count
            broad += stats["broad"]
            for name in ("mmse", "map", "mle"):
                rot, org = result.poses(name)
                per[f"{name}_rot"][rows], per[f"{name}_org"][rows] = rot, org / px
            per["pmax"][rows], per["nsig"][rows] = result.pmax, result.n_significant
            per["experr"][rows], per["conc"][rows] = result.expected_error_deg, result.concentration
            per["logz"][rows], per["ncand"][rows] = result.log_evidence, stats["ncand"]
            del marginals, result
        # M-step map: FSC of the unregularised half maps, then the new tau² for the references
        maps = _maps_from(accumulators, px, mask)
        half_maps, combined, tau2 = maps.half_maps, maps.combined, maps.tau2
        freq, fsc_values, resolution = maps.freq, maps.fsc, maps.resolution
        references = references_from(half_maps)
        del accumulators, maps
        # M-step noise and prior
        updated = noise_count > 0
        noise = NoiseModel(np.where(updated, noise_sum / np.maximum(noise_count, 1), noise.noise_power), 1.0,
                           noise.ctf2)
        if config.prior_mode == "estimate":
            prior_density = _direction_density(mass, config.prior_order, config.prior_pseudocount)
        # convergence bookkeeping
        current_rot = per["map_rot" if config.mode == "hard" else "mmse_rot"].copy()
        change = _pose_change(current_rot, previous_rot, group)
        previous_rot = current_rot
        if resolution < best_resolution * 0.99:
            best_resolution, no_gain = resolution, 0
        else:
            no_gain += 1
        converged = no_gain >= 2 and change < sampling.step_deg
        go_local = (config.local_search and not local and it >= 2
                    and sampling.finest_order >= config.max_healpix_order and change < sampling.step_deg)
        entry = IterationLog(it, sampling.finest_order, float(box * px / radius), float(resolution),
                             float(np.mean(per["logz"])), change, time.perf_counter() - t0,
                             "local" if local else "global", sampling.step_deg, float(np.mean(per["ncand"])),
                             int(broad), bool(converged))
        history.append(entry)
        if log:
            log(f"iteration {it}: {sampling.describe()}, scored to {entry.scored_resolution_A:.1f} Å, "
                f"resolution {resolution:.1f} Å (FSC 0.143), log-likelihood {entry.log_likelihood:.1f}, "
                f"pose change {change:.2f}°, {entry.mean_candidates:.1f} rotations/particle"
                f"{f' ({broad} broad)' if broad else ''}, {entry.seconds:.1f} s"
                + (" — converged (no resolution gain for 2 iterations, pose change below the step)"
                   if converged else "")
                + (" — switching to local searches" if go_local and not converged else ""))
        local = local or go_local
        if out_dir is not None:
            for h in range(2):
                write_map(out_dir / f"it{it:03d}_half{h + 1}.mrc", half_maps[h], px)
            write_map(out_dir / f"it{it:03d}_map.mrc", combined, px)
            _save_state(out_dir, it, dict(
                version=STATE_VERSION, iteration=it, halves=halves, resolution=resolution,
                best_resolution=best_resolution, no_gain=no_gain, tau2=tau2.numpy(), noise_power=noise.noise_power,
                noise_scale=noise.scale, noise_ctf2=noise.ctf2 if noise.ctf2 is not None else np.ones(0),
                prior_density=prior_density, local=local, converged=converged, fsc_frequencies=freq, fsc=fsc_values,
                history=json.dumps([asdict(e) for e in history]), config=json.dumps(asdict(config)),
                **{name: per[name] for name in _PER_PARTICLE}))
            _atomic_write_bytes(out_dir / "history.json", lambda tmp: tmp.write_text(
                json.dumps([asdict(e) for e in history], indent=2)))

    if freq is None:  # no iteration ran (iterations already done): nothing to report beyond the start
        raise ValueError("no EM iteration ran: increase iterations")
    if config.final_full_resolution:
        final_maps = _load_final(out_dir, it) if (resume and it == start_it) else None
        if final_maps is None:
            if it == start_it:  # resumed a finished run whose final pass is missing: recompute the supports once
                supports = _recompute_supports(particles, images, index, references, noise, per, config, resolution,
                                               diameter, local, prior_density, device, progress, it, px)
            final_maps = _final_pass(supports, config, device, box, px, mask, progress, it, out_dir, log)
        half_maps, combined = final_maps.half_maps, final_maps.combined
        freq, fsc_values, resolution = final_maps.freq, final_maps.fsc, final_maps.resolution
    final = _final_particles(particles, halves, per, px, config.mode)
    return RefineResult(combined, (half_maps[0], half_maps[1]), np.asarray(freq), np.asarray(fsc_values),
                        float(resolution), final, np.asarray(prior_density), config.prior_order, history,
                        bool(converged), np.asarray(noise.noise_power))


def _recompute_supports(particles: ParticleSet, images: np.ndarray | None, index: list, references: list,
                        noise: NoiseModel, per: dict, config: RefineConfig, resolution: float, diameter: float,
                        local: bool, prior_density: np.ndarray, device: torch.device, progress, it: int,
                        px: float) -> list:
    """The joint-weight supports of both halves from one more E-step against the saved references (a resumed,
    finished run: the last E-step's weights live in memory only)."""
    box = particles.box
    radius = min(box * px / resolution + config.extra_shells, resolution_to_radius(box, px, None))
    sampling = _sampling(config, resolution, diameter, local)
    prior = DirectionDensityPrior(config.prior_order, prior_density) if config.prior_mode == "estimate" else None
    supports = []
    for h in range(2):
        rows = index[h]
        half = particles.subset(rows)
        if local:
            half = replace(half, rotations=per["mmse_rot"][rows], origins_A=per["mmse_org"][rows] * px)
        label = f"final after iteration {it} half {h + 1}"
        sub_progress = (lambda tag, _label=label: progress(f"{_label} {tag}")) if progress else None
        supports.append(_e_step(half, images[rows] if images is not None else None, references[h], noise, sampling,
                                radius, prior, config, device, sub_progress)[1])
    return supports


def _final_pass(supports: list, config: RefineConfig, device: torch.device, box: int, px: float,
                mask: np.ndarray | None, progress, it: int, out_dir: Path | None,
                log: Callable[[str], None] | None) -> _Maps:
    """RELION's final reconstruction: each half's data inserted at ALL frequencies up to Nyquist (``D // 2``
    Fourier px) at the last E-step's joint weights (scored on that E-step's band), the FSC and resolution of
    these unregularised full-resolution half maps, the half maps with τ² from that FSC and the combined map
    (whole-map τ²). Written to ``final_half{1,2}.mrc``, ``final_map.mrc`` and ``final_state.npz``."""
    t0 = time.perf_counter()
    accumulators = []
    for h, support in enumerate(supports):
        label = f"final half {h + 1}"
        sub_progress = (lambda tag, _label=label: progress(f"{_label} {tag}")) if progress else None
        accumulators.append(_m_step(support, config, device, sub_progress, insert_radius=float(box // 2))
                            .accumulator)
    maps = _maps_from(accumulators, px, mask)
    if log:
        log(f"final reconstruction to Nyquist ({2 * px:.1f} Å) at the weights of iteration {it}: resolution "
            f"{maps.resolution:.1f} Å (FSC 0.143), {time.perf_counter() - t0:.1f} s")
    if out_dir is not None:
        for h in range(2):
            write_map(out_dir / f"final_half{h + 1}.mrc", maps.half_maps[h], px)
        write_map(out_dir / "final_map.mrc", maps.combined, px)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, version=STATE_VERSION, iteration=it, resolution=maps.resolution,
                         fsc_frequencies=maps.freq, fsc=maps.fsc, tau2=maps.tau2.numpy())

        _atomic_write_bytes(out_dir / FINAL_STATE, write)  # last: marks the final files complete
    return maps


def _load_final(out_dir: Path | None, it: int) -> _Maps | None:
    """The final full-resolution maps of a run finished after iteration ``it``, or None if absent or stale."""
    if out_dir is None or not (out_dir / FINAL_STATE).is_file():
        return None
    names = ["final_half1.mrc", "final_half2.mrc", "final_map.mrc"]
    if not all((out_dir / name).is_file() for name in names):
        return None
    state = dict(np.load(out_dir / FINAL_STATE, allow_pickle=False))
    if int(state["iteration"]) != it:
        return None
    half_maps = [read_map(out_dir / name)[0] for name in names[:2]]
    return _Maps(half_maps, read_map(out_dir / names[2])[0], state["fsc_frequencies"], state["fsc"],
                 float(state["resolution"]), torch.as_tensor(state["tau2"]))


def _noise_without_scale(particles: ParticleSet, images: np.ndarray | None, config: RefineConfig) -> NoiseModel:
    """First-iteration noise model with a given reference scale (``config.initial_scale``): noise power from the
    particles' background, mean CTF² per shell."""
    from bayespose.core.imaging.noise import noise_power_from_background, radial_average

    rng = np.random.default_rng(config.seed)
    n = len(particles)
    index = np.sort(rng.choice(n, size=min(n, 1000), replace=False))
    imgs = images[index] if images is not None else read_images(particles, index)
    noise_power = noise_power_from_background(imgs)
    ctf2 = np.ones_like(noise_power)
    if particles.ctf is not None:
        ctf2 = radial_average((ctf_2d(particles.ctf.subset(index), particles.pixel_size, particles.box) ** 2)
                              .mean(0).numpy(), particles.box)
    return NoiseModel(noise_power, float(config.initial_scale), ctf2)


def _final_particles(particles: ParticleSet, halves: np.ndarray, per: dict, px: float, mode: str) -> ParticleSet:
    """The input particles with the final poses (soft: MMSE, hard: MAP), origins in Å, half sets, and the
    per-particle results as extra columns."""
    chosen = "map" if mode == "hard" else "mmse"
    extra = dict(particles.extra)
    extra.update(rlnMaxValueProbDistribution=per["pmax"], rlnNrOfSignificantSamples=per["nsig"].astype(int),
                 bpExpectedErrorDeg=per["experr"], bpConcentration=per["conc"], bpLogEvidence=per["logz"],
                 bpCandidates=per["ncand"].astype(int))
    for name in ("mmse", "map", "mle"):
        if name == chosen:
            continue
        angles = matrix_to_euler(per[f"{name}_rot"])
        for col, label in enumerate(("Rot", "Tilt", "Psi")):
            extra[f"bp{name.upper()}Angle{label}"] = angles[:, col]
    return replace(particles, rotations=per[f"{chosen}_rot"].copy(), origins_A=per[f"{chosen}_org"] * px,
                   half_set=halves.astype(int), extra=extra)


__all__ = ["RefineConfig", "RefineResult", "IterationLog", "refine", "soft_sphere_mask", "CELL_SPREAD"]
