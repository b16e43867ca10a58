"""Posterior over (rotation, shift) for every particle, streamed; MMSE / MAP / MLE poses and uncertainty.

The model (DESIGN.md "The model", paper 000 eq. 3 and App. B). For particle i with Fourier coefficients Y_i,
CTF C_i, noise power sigma²(k) (per shell), reference scale alpha, candidate rotation R_k and origin o_j (px):

    log p(Y_i | R_k, o_j) = Σ_k' [ 2 Re(conj(Y_i) · alpha C_i S_j P_k) - alpha² C_i² |P_k|² - |Y_i|² ] / sigma²

summed over the non-redundant half plane of rfft2 coefficients with 0 < |k'| <= cut-off (each standing for its
Hermitian mate, hence the factor 2 of the cross term against the 1/2 of a Gaussian), where ``P_k`` is the central
slice (:func:`forward.slice_coefficients`) and ``S_j`` the phase that moves the projection by ``-o_j``. The first
term is one real matrix product ``X (B·J, 2M) @ P (2M, K)`` with ``X_ij = 2 alpha C_i/sigma² · shift(Y_i, +o_j)``;
the norm term ``(alpha² C²/sigma²) (B, M) @ |P|² (M, K)`` is kept (with a CTF it depends on the pose).

Posterior weights ``w_ikj ∝ q_k · pi(R_k) · rho(o_j) · exp(loglik)`` (q: quadrature weight, pi: rotation prior
density w.r.t. Haar, rho: uniform over the shift disk) are accumulated chunk by chunk of rotations with
log-sum-exp, so memory is O(batch · (K + J)) plus one chunk of scores, never N · K · J.

Estimators (paper 000 sec. 2.3, App. B2):

* MLE: argmax over (k, j) of the log-likelihood; MAP: argmax of log-likelihood + log pi (not the quadrature);
* MMSE rotation: the SVD projection onto SO(3) of ``M = Σ_k p_k R_k`` (000 eq. 15-19), after folding every
  rotation to its symmetry mate nearest the MAP rotation when the map has a point-group symmetry;
* MMSE origin: the posterior mean of o_j.

Per particle also: ``pmax`` (largest posterior probability of one (rotation, shift) cell, RELION's
rlnMaxValueProbDistribution), ``n_significant`` (number of grid rotations that hold 99 % of the rotation
posterior), ``expected_error_deg`` (posterior mean of the geodesic angle between the (folded) rotation and the
MMSE rotation: the posterior expected angular error), ``concentration`` (sum of the singular values of M / 3:
1 for a point mass, ~0 for a uniform posterior) and ``log_evidence`` (log p(Y_i) up to the Gaussian
normalisation constant).

Rotations are RELION ``A`` matrices; origins are ``rlnOriginX/Y`` (Å in results, px inside).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bayespose.core.geometry.grids import cell_rotations, healpix_grid, local_offsets, split_cells
from bayespose.core.geometry.priors import RotationPrior, UniformPrior
from bayespose.core.geometry.rotations import project_to_so3, random_rotations
from bayespose.core.geometry.symmetry import nearest_symmetry_mate, symmetry_group
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, prepare_volume, project_fourier, slice_coefficients
from bayespose.core.imaging.noise import (
    ScoringFrequencies,
    noise_power_from_background,
    radial_average,
    reference_scale,
    resolution_to_radius,
    scoring_frequencies,
)
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.mrc import read_images
from bayespose.core.runtime import choose_device

ESTIMATORS = ("mmse", "map", "mle")


@dataclass
class PoseSearch:
    """How to search. Angles in degrees, shifts in px, resolution in Å.

    ``local_range_deg`` None: global HEALPix grid of ``healpix_order`` (72·8^r rotations, spacing ~60/2^r deg).
    Otherwise a local grid of ±``local_range_deg`` around each particle's centre pose (its input pose) with
    lattice step ``local_step_deg`` (default: range / 4), and shifts centred on the input origins. Several centres
    per particle (``assign_poses(..., centers=(N, C, 3, 3))``, e.g. a pose network's top-K rotations): the union
    of the C balls, each region scored once (see :class:`_SearchSpace`).
    Shifts: candidate origins on a square lattice of ``shift_step_px`` inside a disk of ``shift_range_px``.
    """

    healpix_order: int = 2
    refine_levels: int = 2  # coarse-to-fine: halvings of the grid in the significant cells (0: coarse grid only)
    refine_mass: float = 0.999  # posterior mass whose cells are refined
    refine_max_cells: int = 128  # particles with more significant cells keep the coarse result
    max_resolution_A: float | None = None  # cap on the scored resolution (None: Nyquist)
    smoothness_nats: float = 30.0  # each stage's cut-off: a pose half a grid step off loses at most this much
    shift_range_px: float = 3.0
    shift_step_px: float = 1.0
    symmetry: str = "C1"
    local_range_deg: float | None = None
    local_step_deg: float | None = None
    batch_size: int = 64
    max_scores_per_chunk: int = 8_000_000  # B·J·K_chunk float32 scores held at once (32 MB)
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # CPU threads (None: all cores)
    mask_radius_px: float | None = None  # background outside this radius gives the noise (default box/2)

    def validate(self) -> None:
        if not 0 <= self.healpix_order <= 5:
            raise ValueError(f"healpix order must be in 0..5, got {self.healpix_order}")
        if self.shift_range_px < 0 or not self.shift_step_px > 0:
            raise ValueError("shift range must be >= 0 px and shift step > 0 px")
        if self.local_range_deg is not None and not 0 < self.local_range_deg <= 90:
            raise ValueError(f"local range must be in (0, 90] degrees, got {self.local_range_deg}")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        symmetry_group(self.symmetry)


@dataclass
class NoiseModel:
    """Noise power per shell (``E|N(k)|²``, unnormalised DFT units, index = round(|k|)), the reference scale, and
    the particles' mean CTF² per shell (ones without CTF)."""

    noise_power: np.ndarray
    scale: float
    ctf2: np.ndarray | None = None


@dataclass
class PoseAssignment:
    """Per-particle results (N rows). Rotations: RELION A (N, 3, 3); origins: (N, 2) Å (rlnOriginX/YAngst)."""

    mmse_rotations: np.ndarray
    mmse_origins_A: np.ndarray
    map_rotations: np.ndarray
    map_origins_A: np.ndarray
    mle_rotations: np.ndarray
    mle_origins_A: np.ndarray
    pmax: np.ndarray
    n_significant: np.ndarray
    expected_error_deg: np.ndarray
    concentration: np.ndarray
    log_evidence: np.ndarray
    noise: NoiseModel
    n_rotations: int
    n_shifts: int
    n_frequencies: int
    timings: dict = field(default_factory=dict)
    marginals: dict = field(default_factory=dict)  # particle index -> (rotations (K,3,3), probabilities (K,))

    def poses(self, estimator: str = "mmse") -> tuple[np.ndarray, np.ndarray]:
        """(rotations, origins_A) of one estimator: ``mmse``, ``map`` or ``mle``."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        return getattr(self, f"{estimator}_rotations"), getattr(self, f"{estimator}_origins_A")

    def to_particle_set(self, particles: ParticleSet, estimator: str = "mmse") -> ParticleSet:
        """A copy of ``particles`` with the chosen poses and the per-particle results in ``extra``."""
        from dataclasses import replace

        from bayespose.core.geometry.rotations import matrix_to_euler

        rotations, origins = self.poses(estimator)
        extra = dict(particles.extra)
        extra.update(rlnMaxValueProbDistribution=self.pmax, rlnNrOfSignificantSamples=self.n_significant,
                     bpExpectedErrorDeg=self.expected_error_deg, bpConcentration=self.concentration,
                     bpLogEvidence=self.log_evidence)
        for name in ESTIMATORS:
            if name != estimator:
                angles = matrix_to_euler(getattr(self, f"{name}_rotations"))
                for col, label in enumerate(("Rot", "Tilt", "Psi")):
                    extra[f"bp{name.upper()}Angle{label}"] = angles[:, col]
        return replace(particles, rotations=rotations, origins_A=origins, extra=extra)


# ------------------------------------------------------------------------------------------------ helpers
def shift_lattice(range_px: float, step_px: float) -> np.ndarray:
    """Origins offsets (J, 2) px on a square lattice of ``step_px`` inside the disk of radius ``range_px``
    (the zero offset first)."""
    n = int(math.floor(range_px / step_px + 1e-9))
    ax = np.arange(-n, n + 1) * step_px
    grid = np.stack(np.meshgrid(ax, ax, indexing="xy"), axis=-1).reshape(-1, 2)
    grid = grid[np.einsum("ij,ij->i", grid, grid) <= range_px ** 2 + 1e-9]
    return grid[np.argsort(np.einsum("ij,ij->i", grid, grid), kind="stable")]


def _phase(freqs: ScoringFrequencies, shifts_px: torch.Tensor) -> torch.Tensor:
    """exp(-2 pi i k · s / D) for shifts (..., 2) = (x, y) px: multiplying moves image content by +s."""
    kx = freqs.kx.to(shifts_px.device)
    ky = freqs.ky.to(shifts_px.device)
    angle = (-2.0 * math.pi / freqs.box) * (shifts_px[..., :1] * kx + shifts_px[..., 1:] * ky)
    return torch.polar(torch.ones_like(angle), angle)


def _load_images(particles: ParticleSet, index: np.ndarray, images: np.ndarray | None) -> np.ndarray:
    return np.asarray(images[index], dtype=np.float32) if images is not None else read_images(particles, index)


def _ctf_values(particles: ParticleSet, index: np.ndarray, freqs: ScoringFrequencies, device) -> torch.Tensor:
    if particles.ctf is None:
        return torch.ones((len(index), len(freqs)), device=device)
    values = ctf_2d(particles.ctf.subset(index), particles.pixel_size, particles.box, rfft=True, device=device)
    return freqs.select(values)


def estimate_noise_model(particles: ParticleSet, prepared: PreparedVolume, radius: float,
                         images: np.ndarray | None = None, mask_radius_px: float | None = None,
                         n_sample: int = 1000, n_rotations: int = 256, seed: int = 0) -> NoiseModel:
    """Noise power per shell from the particles' background, and the reference scale by the method of moments
    (:func:`noise.reference_scale`) over shells 1..radius, from up to ``n_sample`` particles."""
    rng = np.random.default_rng(seed)
    n = len(particles)
    index = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    imgs = _load_images(particles, index, images)
    box = particles.box
    noise_power = noise_power_from_background(imgs, mask_radius_px)
    data_power = radial_average((torch.fft.rfft2(torch.from_numpy(imgs)).abs() ** 2).mean(0).numpy(), box)
    proj = project_fourier(prepared, random_rotations(n_rotations, rng)).cpu()
    mean_proj_power = radial_average((proj.abs() ** 2).mean(0).numpy(), box)
    ctf2 = np.ones_like(mean_proj_power)
    if particles.ctf is not None:
        ctf2 = radial_average((ctf_2d(particles.ctf.subset(index), particles.pixel_size, box) ** 2).mean(0).numpy(),
                              box)
    shells = np.arange(1, int(math.floor(radius)) + 1)
    scale = reference_scale(data_power, noise_power, ctf2 * mean_proj_power, shells)
    return NoiseModel(noise_power=noise_power, scale=scale, ctf2=ctf2)


def geometric_radius(spacing_deg: float) -> float:
    """Fourier radius (px) at which half a grid step of ``spacing_deg`` moves a coefficient by one Fourier pixel."""
    return 2.0 / math.radians(spacing_deg)


def information_radius(prepared: PreparedVolume, noise: NoiseModel, offset_deg: float, max_radius: float,
                       tolerance_nats: float = 2.0, n_samples: int = 64, seed: int = 0) -> float:
    """Largest Fourier radius (px) at which a pose ``offset_deg`` away from the truth loses at most
    ``tolerance_nats`` of expected log-likelihood.

    The expected loss of a wrong pose R' against data from R is ``Σ alpha² C² |P_R - P_R'|² / sigma²`` over the
    scored half plane; it grows with radius (the slices separate) and with SNR. Scoring a grid of spacing s with
    the radius for offset s/2 keeps the likelihood smooth at the grid's scale, so the cells near the truth keep
    posterior mass and the refinement can find it; at low SNR this is Nyquist, at high SNR it is lower (RELION
    limits coarse samplings to low resolution for the same reason, but by a fixed rule).
    """
    rng = np.random.default_rng(seed)
    box = prepared.box
    freqs = scoring_frequencies(box, max_radius)
    base = random_rotations(n_samples, rng)
    axes = rng.standard_normal((n_samples, 3))
    axes *= math.radians(offset_deg) / np.linalg.norm(axes, axis=1, keepdims=True)
    from scipy.spatial.transform import Rotation

    moved = base @ Rotation.from_rotvec(axes).as_matrix()
    diff = (slice_coefficients(prepared, base, freqs.kx, freqs.ky)
            - slice_coefficients(prepared, moved, freqs.kx, freqs.ky)).abs().cpu().numpy() ** 2  # (S, M)
    shell = freqs.shell.numpy()
    weight = noise.scale ** 2 * noise.ctf2[shell] / np.maximum(noise.noise_power[shell], 1e-30)
    per_shell = np.bincount(shell, weights=(diff * weight).mean(0), minlength=len(noise.noise_power))
    cumulative = np.cumsum(per_shell)
    within = np.nonzero(cumulative <= tolerance_nats)[0]
    radius = float(within[-1]) if len(within) else 1.0
    return min(max(radius, 2.0), max_radius)


# ------------------------------------------------------------------------------------------------ engine
class _SearchSpace:
    """The rotations scored first for a batch: one shared HEALPix grid, or per-particle local grids.

    Local grids: ``centers`` (N, 3, 3) (one ball per particle, all offsets kept) or (N, C, 3, 3) (several centres
    per particle). With several centres the searched region is the union of the C balls of radius ``range``; the
    lattice point ``c_j E_k`` of ball j is kept only when no earlier centre ``c_j'`` (j' < j) lies within
    ``range`` of it, so every part of the union is covered by exactly one ball's lattice (overlaps are neither
    scored twice nor weighted twice) and each kept point carries its ball's Haar quadrature weight. Rows are
    compacted (kept points first) and padded with log q = -inf; the weights are normalised per particle.
    """

    def __init__(self, search: PoseSearch, centers: np.ndarray | None):
        if search.local_range_deg is None:
            self.grid = healpix_grid(search.healpix_order)
            self.shared = True
            self.log_q = np.log(self.grid.weights)
            self.spacing_deg = self.grid.spacing_deg
            self.description = f"HEALPix order {search.healpix_order} ({len(self.grid)} rotations)"
        else:
            if centers is None:
                raise ValueError("a local search needs input poses (particles with alignment)")
            centers = np.asarray(centers, dtype=np.float64)
            if centers.ndim not in (3, 4) or centers.shape[-2:] != (3, 3):
                raise ValueError(f"local search centres must be (N, 3, 3) or (N, C, 3, 3), got {centers.shape}")
            step = search.local_step_deg or search.local_range_deg / 4.0
            offsets, weights, _ = local_offsets(search.local_range_deg, step)
            self.shared = False
            self.offsets = offsets
            self.centers = centers
            self.range_deg = float(search.local_range_deg)
            self.log_q = np.log(weights)
            self.spacing_deg = step
            n_centres = 1 if centers.ndim == 3 else centers.shape[1]
            self.description = (f"local ±{search.local_range_deg:g}° step {step:g}° "
                                f"({len(offsets)} rotations per centre, {n_centres} centre(s) per particle)")
        self.size = len(self.log_q)

    def rotations_for(self, index: np.ndarray) -> np.ndarray:
        """(K, 3, 3) shared or (B, K, 3, 3) per particle."""
        return self.grid_for(index)[0]

    def grid_for(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rotations ((K, 3, 3) shared or (B, K', 3, 3)) and log quadrature weights ((K,) or (B, K'))."""
        if self.shared:
            return self.grid.rotations, self.log_q
        if self.centers.ndim == 3:
            return np.einsum("bij,kjl->bkil", self.centers[index], self.offsets), self.log_q
        c = self.centers[index]  # (B, C, 3, 3)
        b, n_c = c.shape[:2]
        rots = np.einsum("bcij,kjl->bckil", c, self.offsets)  # (B, C, K, 3, 3)
        trace = np.einsum("bdij,bckij->bckd", c, rots)  # tr(c_d^T R): cos of the angle to every centre
        inside = trace >= 1.0 + 2.0 * math.cos(math.radians(self.range_deg)) - 1e-9
        earlier = np.tril(np.ones((n_c, n_c), dtype=bool), -1)  # earlier[j, j'] = j' < j
        keep = ~(inside & earlier[None, :, None, :]).any(-1)  # (B, C, K)
        keep = keep.reshape(b, -1)
        order = np.argsort(~keep, axis=1, kind="stable")  # kept points first
        width = int(keep.sum(1).max())
        order = order[:, :width]
        rots = np.take_along_axis(rots.reshape(b, -1, 3, 3), order[:, :, None, None], axis=1)
        log_q = np.where(np.take_along_axis(keep, order, axis=1),
                         np.tile(self.log_q, n_c)[order], -np.inf)
        log_q = log_q - np.logaddexp.reduce(log_q, axis=1, keepdims=True)
        return rots, log_q


@dataclass
class _Batch:
    """One batch of particles in Fourier space (full rfft2 layout) with CTFs and shift centres (px)."""

    index: np.ndarray
    y: torch.Tensor  # (B, D, D // 2 + 1) complex64
    ctf: torch.Tensor | None  # (B, D, D // 2 + 1) float32
    centers_px: torch.Tensor  # (B, 2)


@dataclass
class _StageScores:
    """Log-sum-exp accumulations of one stage for a batch (natural logs; unnormalised)."""

    log_rot: torch.Tensor  # (B, K) rotation marginal
    log_shift: torch.Tensor  # (B, J) shift marginal
    best: dict  # name -> (value (B,), flat index j * K + k (B,)) for "map", "mle", "post"
    const: torch.Tensor  # (B,) -Σ|Y|²/σ² over the stage's band


class _Scorer:
    """Scores batches of particles against one map over rotation sets and a shift lattice (see module doc)."""

    def __init__(self, prepared: PreparedVolume, noise: NoiseModel, deltas: np.ndarray, box: int,
                 max_scores: int, device: torch.device):
        self.prepared = prepared
        self.noise = noise
        self.device = device
        self.box = box
        self.max_scores = max_scores
        self.deltas = torch.as_tensor(deltas, dtype=torch.float32, device=device)
        self._freqs: dict = {}
        self._projection_cache: dict = {}
        self._lattice_cache: dict = {}
        self.flops = 0.0
        self.seconds = 0.0

    def frequencies(self, radius: float) -> ScoringFrequencies:
        key = round(radius, 6)
        if key not in self._freqs:
            self._freqs[key] = scoring_frequencies(self.box, radius)
        return self._freqs[key]

    def score(self, batch: _Batch, radius: float, rotations: np.ndarray, log_q: np.ndarray, log_pi: np.ndarray,
              cache_key=None, lattice_ids: np.ndarray | None = None) -> _StageScores:
        """Scores of ``rotations`` ((K,3,3) shared or (B,K,3,3) per particle) with log quadrature ``log_q`` ((K,) or
        (B,K)) and log prior ``log_pi`` ((1,K) or (B,K)) for frequencies up to ``radius``.

        ``lattice_ids`` (B, K): for per-particle rotations that belong to a fixed refinement lattice, their ids in
        it; their projections are then computed once per id and cached across particles and batches.
        """
        t0 = time.perf_counter()
        dev = self.device
        freqs = self.frequencies(radius)
        m = len(freqs)
        sigma2 = torch.as_tensor(self.noise.noise_power, dtype=torch.float32, device=dev)[freqs.shell.to(dev)]
        sigma2 = torch.clamp(sigma2, min=float(sigma2.max()) * 1e-6)
        y = freqs.select(batch.y)
        ctf = freqs.select(batch.ctf) if batch.ctf is not None else torch.ones_like(y.real)
        b = y.shape[0]
        a1 = (2.0 * self.noise.scale) * ctf / sigma2
        a2 = (self.noise.scale ** 2) * ctf ** 2 / sigma2  # (B, M)
        const = -((y.abs() ** 2) / sigma2).sum(1)
        yc = (a1 * y) * _phase(freqs, batch.centers_px)
        x = (yc[:, None, :] * _phase(freqs, self.deltas)[None]).contiguous()  # (B, J, M): Y shifted by +(c + d)
        j = x.shape[1]
        x_real = torch.view_as_real(x).reshape(b * j, 2 * m)
        shared = rotations.ndim == 3
        k_total = rotations.shape[-3]
        log_q = torch.as_tensor(log_q, dtype=torch.float32, device=dev).reshape(-1, k_total)  # (1 or B, K)
        log_pi = torch.as_tensor(log_pi, dtype=torch.float32, device=dev).reshape(-1, k_total)
        log_w = log_pi + log_q  # (1 or B, K): log prior + log quadrature, constant over shifts
        searched = torch.isfinite(log_q)  # cells outside the searched set carry log q = -inf
        chunk = self._chunk_size(b, j, k_total)
        table = self._shared_projections(rotations, radius, cache_key) if shared else None  # (P, |P|²) or None
        log_rot = torch.empty((b, k_total), device=dev)
        log_shift = torch.full((b, j), -math.inf, device=dev)
        best = {name: (torch.full((b,), -math.inf, device=dev), torch.zeros(b, dtype=torch.long, device=dev))
                for name in ("map", "mle", "post")}
        for k0 in range(0, k_total, chunk):
            k1 = min(k0 + chunk, k_total)
            kc = k1 - k0
            if shared:  # proj (Kc, 2M): real and imaginary parts interleaved, as view_as_real(x)
                if table is not None:
                    proj, power = table[0][k0:k1], table[1][k0:k1]
                else:
                    proj = self._project(rotations[k0:k1], freqs)
                    power = proj.square().view(kc, m, 2).sum(2)  # (Kc, M) |P|²
                cross = (x_real @ proj.T).view(b, j, kc)
                norm = a2 @ power.T  # (B, Kc): Σ a2 |P|²
            else:  # proj (B, Kc, 2M)
                if lattice_ids is not None:
                    proj = self._lattice_projections(rotations[:, k0:k1], lattice_ids[:, k0:k1], radius)
                else:
                    proj = self._project(rotations[:, k0:k1].reshape(-1, 3, 3), freqs).view(b, kc, 2 * m)
                cross = torch.bmm(x_real.view(b, j, 2 * m), proj.transpose(1, 2))  # (B, J, Kc)
                norm = torch.bmm(proj.square().view(b, kc, m, 2).sum(3), a2[:, :, None]).squeeze(2)
            self.flops += 2.0 * b * j * kc * 2 * m + 2.0 * b * kc * m
            log_shift = _fold_chunk(cross, norm, log_pi[:, k0:k1], log_w[:, k0:k1], searched[:, k0:k1], k0, k_total,
                                    log_rot, log_shift, best)
        self.seconds += time.perf_counter() - t0
        return _StageScores(log_rot, log_shift, best, const)

    def _chunk_size(self, b: int, j: int, k_total: int) -> int:
        """Rotations per chunk: the (B, J, Kc) float32 scores stay within ``max_scores`` and, where the GEMM
        stays efficient (Kc >= 256), within about 12 MB so that the passes after the GEMM run from cache; the
        chunks are then balanced (no small last chunk)."""
        cache_fit = max(256, _CHUNK_SCORES // (b * j))
        chunk = max(1, min(self.max_scores // (b * j), cache_fit))
        n_chunks = -(-k_total // chunk)
        return -(-k_total // n_chunks)

    def _project(self, rotations: np.ndarray, freqs: ScoringFrequencies, with_power: bool = False):
        """Central-slice coefficients (N, 2M) float32, real and imaginary parts interleaved, of RELION rotations
        (N, 3, 3), and with ``with_power`` also their powers |P|² (N, M) (then a tuple); computed in sub-chunks of
        about ``_PROJECT_SAMPLES`` samples, whose temporaries stay in cache (measured: 60 ns per sample, against
        166 ns in one call for 4096 rotations of a 64 px box)."""
        m = len(freqs)
        out = torch.empty((len(rotations), 2 * m), device=self.device)
        power = torch.empty((len(rotations), m), device=self.device) if with_power else None
        step = max(1, _PROJECT_SAMPLES // m)
        for s0 in range(0, len(rotations), step):
            proj = torch.view_as_real(slice_coefficients(self.prepared, rotations[s0:s0 + step], freqs.kx, freqs.ky))
            out[s0:s0 + step] = proj.reshape(-1, 2 * m)
            if power is not None:
                power[s0:s0 + step] = proj.square().sum(-1)
        return (out, power) if with_power else out

    def _lattice_projections(self, rotations: np.ndarray, ids: np.ndarray, radius: float) -> torch.Tensor:
        """(B, Kc, 2M) projections of lattice rotations (B, Kc, 3, 3) with lattice ids (B, Kc), computing each
        distinct id once: rows are appended to a growing buffer (within the cache budget) and looked up by id."""
        key = round(radius, 6)
        freqs = self.frequencies(radius)
        known, slots, buffer, used = self._lattice_cache.get(key, (np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                                    None, 0))
        wanted, first = np.unique(ids, return_index=True)
        pos = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))
        missing = ~(known[pos] == wanted) if len(known) else np.ones(len(wanted), dtype=bool)
        if missing.any():
            row_bytes = 8 * len(freqs)
            if (used + missing.sum()) * row_bytes > _cache_budget(self.device):  # full: start afresh
                known, slots, buffer, used = np.zeros(0, np.int64), np.zeros(0, np.int64), None, 0
                missing = np.ones(len(wanted), dtype=bool)
            new = self._project(rotations.reshape(-1, 3, 3)[first[missing]], freqs)
            if buffer is None or used + len(new) > len(buffer):  # grow by doubling, within the budget
                budget_rows = int(_cache_budget(self.device) // row_bytes)
                rows = max(used + len(new), min(2 * (used + len(new)), budget_rows), 1024)
                grown = torch.empty((rows, 2 * len(freqs)), device=self.device)
                if buffer is not None:
                    grown[:used] = buffer[:used]
                buffer = grown
            buffer[used:used + len(new)] = new
            known = np.concatenate([known, wanted[missing]])
            slots = np.concatenate([slots, np.arange(used, used + len(new))])
            order = np.argsort(known, kind="stable")
            known, slots, used = known[order], slots[order], used + len(new)
            self._lattice_cache[key] = (known, slots, buffer, used)
        where = slots[np.searchsorted(known, ids.ravel())]
        return buffer[torch.as_tensor(where, device=buffer.device)].view(*ids.shape, -1)

    def _shared_projections(self, rotations: np.ndarray, radius: float,
                            cache_key) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All projections (K, 2M) of a shared rotation set and their powers |P|² (K, M), cached under
        ``cache_key`` (None: not cached, and None is returned, so that each chunk is projected when scored; also
        when the tables would exceed the cache budget)."""
        if cache_key is None:
            return None
        key = (cache_key, round(radius, 6))
        if key not in self._projection_cache:
            freqs = self.frequencies(radius)
            cached = sum(t.numel() * 4 for pair in self._projection_cache.values() for t in pair)
            if cached + 12 * len(rotations) * len(freqs) > _cache_budget(self.device):
                return None
            self._projection_cache[key] = self._project(rotations, freqs, with_power=True)
        return self._projection_cache[key]


_CHUNK_SCORES = 3_000_000  # float32 scores per chunk (12 MB): the post-GEMM passes run from the L3 cache
_PROJECT_SAMPLES = 400_000  # central-slice samples per call of the sampler


def _cache_budget(device: torch.device) -> float:
    """Bytes that projection caches may hold: a quarter of the memory (host RAM, or the GPU's), at least 1.5 GB."""
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        total = 6e9
    return max(1.5e9, total / 4)


def _fold_chunk(cross: torch.Tensor, norm: torch.Tensor, log_pi: torch.Tensor, log_w: torch.Tensor,
                searched: torch.Tensor, k0: int, k_total: int, log_rot: torch.Tensor, log_shift: torch.Tensor,
                best: dict) -> torch.Tensor:
    """Folds one chunk of rotations into the running results; returns the updated shift marginal (B, J).

    ``cross`` (B, J, Kc): the cross terms of the log-likelihood (overwritten); ``norm`` (B, Kc): the norm terms, so
    that loglik = cross - norm; ``log_pi`` (1|B, Kc) log prior; ``log_w`` (1|B, Kc) log prior + log quadrature;
    ``searched`` (1|B, Kc): cells inside the searched set (for the MLE). Writes ``log_rot[:, k0:k0+Kc]`` and
    updates ``best`` (name -> (value, flat index j * k_total + k)) in place.

    Few passes over the (B, J, Kc) scores: since the norm, prior and quadrature do not depend on the shift, the
    maximum over shifts of the cross term per (b, k) gives all three argmaxes (on (B, Kc) tensors), the rotation
    marginal is ``max + log Σ_j exp(cross - max)`` (exact, each term <= 1 with one equal to 1) and the shift
    marginal is one matrix-vector product of those exponentials with ``exp(max + log_w - its maximum)``: terms
    under e^-87 of the chunk's largest posterior cell underflow to 0, far below float32 resolution of the
    normalised posterior.
    """
    b, _, kc = cross.shape
    top = cross.amax(dim=1)  # (B, Kc): best shift's cross term per rotation
    top_ll = top - norm  # (B, Kc): max over shifts of the log-likelihood
    post = top_ll + log_w
    rows = torch.arange(b, device=cross.device)
    for name, per_k in (("map", top_ll + log_pi), ("mle", torch.where(searched, top_ll, -math.inf)),
                        ("post", post)):
        value, k = per_k.max(dim=1)
        better = value > best[name][0]
        jj = cross[rows, :, k].argmax(dim=1)  # the best shift at that rotation (first one on ties)
        index = jj * k_total + k + k0
        best[name] = (torch.where(better, value, best[name][0]), torch.where(better, index, best[name][1]))
    weights = cross.sub_(top[:, None, :]).exp_()  # (B, J, Kc) in [0, 1], 1 at each (b, k)'s best shift
    log_rot[:, k0:k0 + kc] = post + weights.sum(dim=1).log_()
    post_max = post.amax(dim=1, keepdim=True)
    post_max = torch.where(torch.isfinite(post_max), post_max, torch.zeros_like(post_max))
    per_shift = torch.bmm(weights, torch.exp(post - post_max)[:, :, None]).squeeze(2)  # (B, J)
    return torch.logaddexp(log_shift, per_shift.log_() + post_max)


def _significant_cells(p_rot: np.ndarray, mass: float) -> list[np.ndarray]:
    """Per particle, the smallest set of cells holding ``mass`` of the posterior (most probable first)."""
    order = np.argsort(-p_rot, axis=1)
    cumulative = np.cumsum(np.take_along_axis(p_rot, order, axis=1), axis=1)
    counts = (cumulative < mass).sum(axis=1) + 1
    return [order[i, :c] for i, c in enumerate(counts)]


def assign_poses(particles: ParticleSet, volume: np.ndarray, search: PoseSearch | None = None,
                 prior: RotationPrior | None = None, images: np.ndarray | None = None,
                 noise: NoiseModel | None = None, keep_marginals: Sequence[int] = (),
                 progress: Callable[[int, int], None] | None = None, seed: int = 0,
                 centers: np.ndarray | None = None, seed_cells: np.ndarray | None = None) -> PoseAssignment:
    """Posterior pose assignment of ``particles`` against ``volume`` (D, D, D) at the particles' pixel size.

    Global search: the HEALPix grid of ``search.healpix_order`` scored with the frequency cut-off matched to its
    spacing; then, ``refine_levels`` times, the cells that hold ``refine_mass`` of each particle's posterior are
    split into 8 children each (:func:`grids.split_cells`, RELION's oversampling) and scored at the cut-off matched
    to the halved spacing. A particle whose significant cells exceed ``refine_max_cells`` (a broad posterior, which
    the current grid already resolves) keeps its current result. Local search: the local grid
    around each input pose. ``images``: the particle images (N, D, D) if already in memory (else read from the
    files, batch by batch). ``noise``: a given noise model (else estimated). ``keep_marginals``: particle indices
    whose rotation posterior (final stage) is returned in ``result.marginals``. ``centers`` (N, C, 3, 3) or
    (N, 3, 3): the centres of the local search (default: the particles' input poses); several per particle search
    the union of their balls (:class:`_SearchSpace`); needs ``search.local_range_deg``. ``seed_cells`` (N, C)
    int: a seeded global search: instead of the whole HEALPix grid of ``search.healpix_order``, only these cells
    (indices into ``healpix_grid(search.healpix_order)``, -1 = none; e.g. the cells near a pose network's
    predictions) are scored first, then refined coarse-to-fine as in the global search; their projections come
    from a cache shared by all particles (each cell is projected once); shifts are searched around the input
    origins, as in a local search.
    ``timings["scored_rotations_per_particle"]``: rotations scored per particle over all stages (each with the
    shift lattice), the measure of the search's work.
    """
    search = search or PoseSearch()
    search.validate()
    prior = prior or UniformPrior()
    n = len(particles)
    if n == 0:
        raise ValueError("no particles to assign")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != (particles.box,) * 3:
        raise ValueError(f"map box {volume.shape} does not match the particle box {particles.box} px")
    device = choose_device(search.device)
    torch.set_num_threads(int(search.threads) if search.threads else (os.cpu_count() or 1))
    t0 = time.perf_counter()

    local = search.local_range_deg is not None
    if centers is not None:
        if not local:
            raise ValueError("search centres need a local search: set PoseSearch.local_range_deg")
        centers = np.asarray(centers, dtype=np.float64)
        if len(centers) != n:
            raise ValueError(f"{len(centers)} sets of search centres for {n} particles")
    space = _SearchSpace(search, (particles.rotations if centers is None else centers) if local else None)
    if seed_cells is not None:
        if local:
            raise ValueError("seed cells belong to the (coarse-to-fine) global search: leave local_range_deg unset")
        seed_cells = np.asarray(seed_cells, dtype=np.int64)
        if seed_cells.ndim != 2 or len(seed_cells) != n:
            raise ValueError(f"seed cells must be (N, C) = ({n}, C) grid indices, got shape {seed_cells.shape}")
        if (seed_cells >= space.size).any() or (seed_cells < -1).any() or not (seed_cells >= 0).any(1).all():
            raise ValueError(f"seed cells must be indices in [0, {space.size}) (or -1), at least one per particle")
    box, px = particles.box, particles.pixel_size
    cap = resolution_to_radius(box, px, search.max_resolution_A)
    levels = 0 if local else search.refine_levels
    prepared = prepare_volume(volume, device=device)
    if noise is None:
        noise = estimate_noise_model(particles, prepared, cap, images, search.mask_radius_px, seed=seed)
    if noise.ctf2 is None:
        noise.ctf2 = np.ones_like(noise.noise_power)
    # each level's cut-off: information-matched, but never below the geometric one (2 / spacing in radians, where
    # half a step moves a coefficient by one Fourier pixel): at high SNR the information criterion alone would keep
    # only a few coefficients, too few to tell the views apart
    radii = [min(max(information_radius(prepared, noise, space.spacing_deg / 2 ** (level + 1), cap,
                                        search.smoothness_nats), geometric_radius(space.spacing_deg / 2 ** level)),
                 cap) for level in range(levels + 1)]
    group = symmetry_group(search.symmetry)
    deltas = shift_lattice(search.shift_range_px, search.shift_step_px)
    centred = (local or seed_cells is not None) and particles.origins_A is not None  # shifts around input origins
    centers_px = particles.origins_px if centred else np.zeros((n, 2))
    scorer = _Scorer(prepared, noise, deltas, box, search.max_scores_per_chunk, device)
    shared_log_pi = prior.log_density(space.grid.rotations) if space.shared and not prior.per_particle else None
    timings = {"setup_s": time.perf_counter() - t0}

    out = {name: np.zeros((n, 3, 3)) for name in ("mmse_rot", "map_rot", "mle_rot")}
    out.update({name: np.zeros((n, 2)) for name in ("mmse_org", "map_org", "mle_org")})
    out.update({name: np.zeros(n) for name in ("pmax", "nsig", "experr", "conc", "logz")})
    marginals = {}
    keep = {int(i) for i in keep_marginals}
    n_refined = [0] * levels
    scored = 0  # (particle, rotation) pairs scored, over all stages
    for start in range(0, n, search.batch_size):
        index = np.arange(start, min(start + search.batch_size, n))
        imgs = torch.from_numpy(_load_images(particles, index, images)).to(device)
        ctf = None
        if particles.ctf is not None:
            ctf = ctf_2d(particles.ctf.subset(index), px, box, rfft=True, device=device)
        batch = _Batch(index, torch.fft.rfft2(imgs), ctf,
                       torch.as_tensor(centers_px[index], dtype=torch.float32, device=device))
        if seed_cells is not None:  # the seeded cells of the coarse grid, projected once each (lattice cache)
            cells0 = seed_cells[index]
            valid0 = cells0 >= 0
            cells0 = np.where(valid0, cells0, cells0.max(1, keepdims=True))
            rotations = space.grid.rotations[cells0]  # (B, C, 3, 3)
            log_q = np.where(valid0, space.log_q[cells0], -np.inf)
            scores = scorer.score(batch, radii[0], rotations, log_q, prior.log_density(rotations, index),
                                  lattice_ids=cells0)
            scored += int(valid0.sum())
        else:
            rotations, log_q = space.grid_for(index)
            log_pi = shared_log_pi if shared_log_pi is not None else prior.log_density(rotations, index)
            scores = scorer.score(batch, radii[0], rotations, log_q, log_pi, cache_key="grid")
            scored += int(np.isfinite(log_q).sum()) * (len(index) if log_q.ndim == 1 else 1)
        rows = np.arange(len(index))
        _store(out, scores, rows, index, rotations, deltas, centers_px, group, keep, marginals, space.spacing_deg)
        if levels:
            grid = space.grid
            if seed_cells is not None:
                cell_dir, cell_psi = grid.direction_index[cells0], grid.euler_deg[cells0, 2]
            else:
                cell_dir = np.broadcast_to(grid.direction_index, (len(index), space.size))
                cell_psi = np.broadcast_to(grid.euler_deg[:, 2], (len(index), space.size))
            active = np.arange(len(index))  # batch rows still being refined
            for level in range(1, levels + 1):
                p_rot = torch.exp(scores.log_rot - torch.logsumexp(scores.log_rot, 1, keepdim=True)).cpu().numpy()
                cells = _significant_cells(p_rot, search.refine_mass)
                ok = np.array([len(c) <= search.refine_max_cells for c in cells])
                if not ok.any():
                    break
                active, cells = active[ok], [c for c, keep_row in zip(cells, ok) if keep_row]
                width = max(len(c) for c in cells)
                chosen = np.stack([np.pad(c, (0, width - len(c)), mode="edge") for c in cells])  # (R, width)
                valid = np.repeat(np.stack([np.arange(width) < len(c) for c in cells]), 8, axis=1)
                rows_ok = np.nonzero(ok)[0]
                parent_dir = np.take_along_axis(cell_dir[rows_ok], chosen, axis=1)
                parent_psi = np.take_along_axis(cell_psi[rows_ok], chosen, axis=1)
                child_dir, child_psi = split_cells(search.healpix_order + level - 1, parent_dir, parent_psi)
                cell_dir = child_dir.reshape(len(active), -1)
                cell_psi = child_psi.reshape(len(active), -1)
                children = cell_rotations(search.healpix_order + level, cell_dir, cell_psi)  # (R, 8·width, 3, 3)
                sub = _Batch(index[active], batch.y[active], None if ctf is None else ctf[active],
                             batch.centers_px[active])
                n_psi = 6 * 2 ** (search.healpix_order + level)  # level >= 1: psi = (i + 1/2) · 360 / n_psi
                psi_i = np.mod(np.rint(cell_psi * n_psi / 360.0 - 0.5).astype(np.int64), n_psi)
                # lattice ids carry the level: the projection cache is keyed by radius only, and levels whose
                # radii coincide (e.g. all capped at Nyquist) must not share ids (cell i of level 1 is not cell i
                # of level 2)
                scores = scorer.score(sub, radii[level], children, np.where(valid, 0.0, -np.inf),
                                      prior.log_density(children, index[active]),
                                      lattice_ids=cell_dir * n_psi + psi_i + (level << 40))
                _store(out, scores, np.arange(len(active)), index[active], children, deltas, centers_px, group,
                       keep, marginals, space.spacing_deg / 2 ** level)
                n_refined[level - 1] += len(active)
                scored += int(valid.sum())
        if progress:
            progress(int(index[-1]) + 1, n)

    timings.update(scoring_s=scorer.seconds, total_s=time.perf_counter() - t0,
                   scoring_gflops=scorer.flops / max(scorer.seconds, 1e-9) / 1e9, refined_particles=n_refined,
                   radii_px=radii, scored_rotations_per_particle=scored / n)
    return PoseAssignment(
        mmse_rotations=out["mmse_rot"], mmse_origins_A=out["mmse_org"] * px,
        map_rotations=out["map_rot"], map_origins_A=out["map_org"] * px,
        mle_rotations=out["mle_rot"], mle_origins_A=out["mle_org"] * px,
        pmax=out["pmax"], n_significant=out["nsig"].astype(int), expected_error_deg=out["experr"],
        concentration=out["conc"], log_evidence=out["logz"], noise=noise, n_rotations=space.size,
        n_shifts=len(deltas), n_frequencies=len(scorer.frequencies(radii[-1])), timings=timings,
        marginals=marginals)


def _store(out: dict, scores: _StageScores, rows: np.ndarray, index: np.ndarray, rotations: np.ndarray,
           deltas: np.ndarray, centers_px: np.ndarray, group: np.ndarray, keep: set, marginals: dict,
           spacing_deg: float) -> None:
    """Estimators and statistics of one stage (grid spacing ``spacing_deg``) for particles ``index`` (rows
    ``rows`` of the stage's batch)."""
    log_z = torch.logsumexp(scores.log_rot, dim=1)
    p_rot = torch.exp(scores.log_rot - log_z[:, None]).cpu().numpy().astype(np.float64)
    p_shift = torch.exp(scores.log_shift - log_z[:, None]).cpu().numpy().astype(np.float64)
    k_total = rotations.shape[-3]
    shared = rotations.ndim == 3
    for name in ("map", "mle"):
        flat = scores.best[name][1].cpu().numpy()
        jj, kk = flat // k_total, flat % k_total
        out[f"{name}_rot"][index] = rotations[kk] if shared else rotations[rows, kk]
        out[f"{name}_org"][index] = centers_px[index] + deltas[jj]
    out["pmax"][index] = torch.exp(scores.best["post"][0] - log_z).cpu().numpy()
    out["logz"][index] = (log_z + scores.const).cpu().numpy()
    out["mmse_org"][index] = centers_px[index] + p_shift @ deltas
    stats = _rotation_statistics(p_rot, rotations, out["map_rot"][index], group, shared, spacing_deg)
    for key, value in stats.items():
        out[key][index] = value
    for row, i in zip(rows, index):
        if int(i) in keep:
            marginals[int(i)] = (rotations if shared else rotations[row], p_rot[row])


CELL_SPREAD = 0.46  # mean angle between a uniform rotation and its nearest grid point, in grid spacings


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
