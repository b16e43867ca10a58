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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .ctf import ctf_2d
from .forward import PreparedVolume, prepare_volume, project_fourier, slice_coefficients
from .grids import cell_rotations, healpix_grid, local_offsets, split_cells
from .io.mrc import read_images
from .noise import (ScoringFrequencies, noise_power_from_background, radial_average, reference_scale,
                    resolution_to_radius, scoring_frequencies)
from .particles import ParticleSet
from .priors import RotationPrior, UniformPrior
from .rotations import project_to_so3, random_rotations
from .symmetry import nearest_symmetry_mate, symmetry_group

ESTIMATORS = ("mmse", "map", "mle")


@dataclass
class PoseSearch:
    """How to search. Angles in degrees, shifts in px, resolution in Å.

    ``local_range_deg`` None: global HEALPix grid of ``healpix_order`` (72·8^r rotations, spacing ~60/2^r deg).
    Otherwise a local grid of ±``local_range_deg`` around each particle's centre pose (its input pose) with
    lattice step ``local_step_deg`` (default: range / 4), and shifts centred on the input origins.
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

        from .rotations import matrix_to_euler

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
def choose_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("a GPU was requested but torch sees no CUDA device")
    return torch.device(device)


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
    """The rotations scored first for a batch: one shared HEALPix grid, or per-particle local grids."""

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
            step = search.local_step_deg or search.local_range_deg / 4.0
            offsets, weights, _ = local_offsets(search.local_range_deg, step)
            self.shared = False
            self.offsets = offsets
            self.centers = centers
            self.log_q = np.log(weights)
            self.spacing_deg = step
            self.description = (f"local ±{search.local_range_deg:g}° step {step:g}° "
                                f"({len(offsets)} rotations per particle)")
        self.size = len(self.log_q)

    def rotations_for(self, index: np.ndarray) -> np.ndarray:
        """(K, 3, 3) shared or (B, K, 3, 3) per particle."""
        if self.shared:
            return self.grid.rotations
        return np.einsum("bij,kjl->bkil", self.centers[index], self.offsets)


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
        log_q = torch.as_tensor(log_q, dtype=torch.float32, device=dev).reshape(-1 if shared else b, k_total)
        log_pi = torch.as_tensor(log_pi, dtype=torch.float32, device=dev).reshape(-1, k_total)
        chunk = max(1, self.max_scores // (b * j))
        log_rot = torch.empty((b, k_total), device=dev)
        log_shift = torch.full((b, j), -math.inf, device=dev)
        best = {name: (torch.full((b,), -math.inf, device=dev), torch.zeros(b, dtype=torch.long, device=dev))
                for name in ("map", "mle", "post")}
        for k0 in range(0, k_total, chunk):
            k1 = min(k0 + chunk, k_total)
            kc = k1 - k0
            if shared:
                proj = self._shared_projections(rotations, k0, k1, radius, cache_key)  # (Kc, M)
                cross = (x_real @ torch.view_as_real(proj).reshape(kc, 2 * m).T).view(b, j, kc)
                norm = a2 @ (proj.abs() ** 2).T  # (B, Kc)
            else:
                if lattice_ids is not None:
                    proj = self._lattice_projections(rotations[:, k0:k1], lattice_ids[:, k0:k1], radius)
                else:
                    rot = rotations[:, k0:k1].reshape(-1, 3, 3)
                    proj = slice_coefficients(self.prepared, rot, freqs.kx, freqs.ky).view(b, kc, m)
                cross = torch.bmm(x_real.view(b, j, 2 * m), torch.view_as_real(proj).reshape(b, kc, 2 * m)
                                  .transpose(1, 2))  # (B, J, Kc)
                norm = torch.einsum("bm,bkm->bk", a2, proj.abs() ** 2)
            self.flops += 2.0 * b * j * kc * 2 * m + 2.0 * b * kc * m
            loglik = cross - norm[:, None, :]
            log_map = loglik + log_pi[:, None, k0:k1]
            log_post = log_map + log_q[:, None, k0:k1]
            log_rot[:, k0:k1] = torch.logsumexp(log_post, dim=1)
            log_shift = torch.logaddexp(log_shift, torch.logsumexp(log_post, dim=2))
            for name, scores in (("map", log_map), ("mle", loglik), ("post", log_post)):
                if name == "mle":  # cells outside the searched set carry log q = -inf: keep them out of the MLE
                    scores = torch.where(torch.isfinite(log_q[:, None, k0:k1]), scores, -math.inf)
                value, flat = scores.reshape(b, -1).max(dim=1)
                better = value > best[name][0]
                index = (flat // kc) * k_total + flat % kc + k0
                best[name] = (torch.where(better, value, best[name][0]), torch.where(better, index, best[name][1]))
        self.seconds += time.perf_counter() - t0
        return _StageScores(log_rot, log_shift, best, const)

    def _lattice_projections(self, rotations: np.ndarray, ids: np.ndarray, radius: float) -> torch.Tensor:
        """(B, Kc, M) projections of lattice rotations, computing each distinct id once (cache up to ~1.5 GB)."""
        key = round(radius, 6)
        known_ids, rows = self._lattice_cache.get(key, (np.zeros(0, dtype=np.int64), None))
        wanted, first = np.unique(ids, return_index=True)
        missing = ~np.isin(wanted, known_ids)
        if missing.any():
            freqs = self.frequencies(radius)
            flat_rot = rotations.reshape(-1, 3, 3)
            new = slice_coefficients(self.prepared, flat_rot[first[missing]], freqs.kx, freqs.ky)
            if rows is not None and (rows.numel() + new.numel()) * 8 > 1.5e9:
                known_ids, rows = np.zeros(0, dtype=np.int64), None  # full: start afresh
                missing = np.ones(len(wanted), dtype=bool)
                new = slice_coefficients(self.prepared, flat_rot[first], freqs.kx, freqs.ky)
            known_ids = np.concatenate([known_ids, wanted[missing]])
            rows = new if rows is None else torch.cat([rows, new])
            order = np.argsort(known_ids, kind="stable")
            known_ids, rows = known_ids[order], rows[torch.as_tensor(order, device=rows.device)]
            self._lattice_cache[key] = (known_ids, rows)
        where = np.searchsorted(known_ids, ids.ravel())
        return rows[torch.as_tensor(where, device=rows.device)].view(*ids.shape, -1)

    def _shared_projections(self, rotations, k0, k1, radius, cache_key):
        key = (cache_key, round(radius, 6), k0, k1)
        if key in self._projection_cache:
            return self._projection_cache[key]
        freqs = self.frequencies(radius)
        proj = slice_coefficients(self.prepared, rotations[k0:k1], freqs.kx, freqs.ky)
        cached = sum(v.numel() for v in self._projection_cache.values())
        if cache_key is not None and (cached + proj.numel()) * 8 < 1.5e9:  # keep the cache within ~1.5 GB
            self._projection_cache[key] = proj
        return proj


def _significant_cells(p_rot: np.ndarray, mass: float) -> list[np.ndarray]:
    """Per particle, the smallest set of cells holding ``mass`` of the posterior (most probable first)."""
    order = np.argsort(-p_rot, axis=1)
    cumulative = np.cumsum(np.take_along_axis(p_rot, order, axis=1), axis=1)
    counts = (cumulative < mass).sum(axis=1) + 1
    return [order[i, :c] for i, c in enumerate(counts)]


def assign_poses(particles: ParticleSet, volume: np.ndarray, search: PoseSearch | None = None,
                 prior: RotationPrior | None = None, images: np.ndarray | None = None,
                 noise: NoiseModel | None = None, keep_marginals: Sequence[int] = (),
                 progress: Callable[[int, int], None] | None = None, seed: int = 0) -> PoseAssignment:
    """Posterior pose assignment of ``particles`` against ``volume`` (D, D, D) at the particles' pixel size.

    Global search: the HEALPix grid of ``search.healpix_order`` scored with the frequency cut-off matched to its
    spacing; then, ``refine_levels`` times, the cells that hold ``refine_mass`` of each particle's posterior are
    split into 8 children each (:func:`grids.split_cells`, RELION's oversampling) and scored at the cut-off matched
    to the halved spacing. A particle whose significant cells exceed ``refine_max_cells`` (a broad posterior, which
    the current grid already resolves) keeps its current result. Local search: the local grid
    around each input pose. ``images``: the particle images (N, D, D) if already in memory (else read from the
    files, batch by batch). ``noise``: a given noise model (else estimated). ``keep_marginals``: particle indices
    whose rotation posterior (final stage) is returned in ``result.marginals``.
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
    space = _SearchSpace(search, particles.rotations if local else None)
    box, px = particles.box, particles.pixel_size
    cap = resolution_to_radius(box, px, search.max_resolution_A)
    levels = 0 if local else search.refine_levels
    prepared = prepare_volume(volume, device=device)
    if noise is None:
        noise = estimate_noise_model(particles, prepared, cap, images, search.mask_radius_px, seed=seed)
    if noise.ctf2 is None:
        noise.ctf2 = np.ones_like(noise.noise_power)
    radii = [information_radius(prepared, noise, space.spacing_deg / 2 ** (level + 1), cap, search.smoothness_nats)
             for level in range(levels + 1)]
    group = symmetry_group(search.symmetry)
    deltas = shift_lattice(search.shift_range_px, search.shift_step_px)
    centers_px = particles.origins_px if (local and particles.origins_A is not None) else np.zeros((n, 2))
    scorer = _Scorer(prepared, noise, deltas, box, search.max_scores_per_chunk, device)
    shared_log_pi = prior.log_density(space.grid.rotations) if space.shared and not prior.per_particle else None
    timings = {"setup_s": time.perf_counter() - t0}

    out = {name: np.zeros((n, 3, 3)) for name in ("mmse_rot", "map_rot", "mle_rot")}
    out.update({name: np.zeros((n, 2)) for name in ("mmse_org", "map_org", "mle_org")})
    out.update({name: np.zeros(n) for name in ("pmax", "nsig", "experr", "conc", "logz")})
    marginals = {}
    keep = set(int(i) for i in keep_marginals)
    n_refined = [0] * levels
    for start in range(0, n, search.batch_size):
        index = np.arange(start, min(start + search.batch_size, n))
        imgs = torch.from_numpy(_load_images(particles, index, images)).to(device)
        ctf = None
        if particles.ctf is not None:
            ctf = ctf_2d(particles.ctf.subset(index), px, box, rfft=True, device=device)
        batch = _Batch(index, torch.fft.rfft2(imgs), ctf,
                       torch.as_tensor(centers_px[index], dtype=torch.float32, device=device))
        rotations = space.rotations_for(index)
        log_pi = shared_log_pi if shared_log_pi is not None else prior.log_density(rotations, index)
        scores = scorer.score(batch, radii[0], rotations, space.log_q, log_pi, cache_key="grid")
        rows = np.arange(len(index))
        _store(out, scores, rows, index, rotations, deltas, centers_px, group, keep, marginals)
        if levels:
            grid = space.grid
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
                scores = scorer.score(sub, radii[level], children, np.where(valid, 0.0, -np.inf),
                                      prior.log_density(children, index[active]),
                                      lattice_ids=cell_dir * n_psi + psi_i)
                _store(out, scores, np.arange(len(active)), index[active], children, deltas, centers_px, group,
                       keep, marginals)
                n_refined[level - 1] += len(active)
        if progress:
            progress(int(index[-1]) + 1, n)

    timings.update(scoring_s=scorer.seconds, total_s=time.perf_counter() - t0,
                   scoring_gflops=scorer.flops / max(scorer.seconds, 1e-9) / 1e9, refined_particles=n_refined,
                   radii_px=radii)
    return PoseAssignment(
        mmse_rotations=out["mmse_rot"], mmse_origins_A=out["mmse_org"] * px,
        map_rotations=out["map_rot"], map_origins_A=out["map_org"] * px,
        mle_rotations=out["mle_rot"], mle_origins_A=out["mle_org"] * px,
        pmax=out["pmax"], n_significant=out["nsig"].astype(int), expected_error_deg=out["experr"],
        concentration=out["conc"], log_evidence=out["logz"], noise=noise, n_rotations=space.size,
        n_shifts=len(deltas), n_frequencies=len(scorer.frequencies(radii[-1])), timings=timings,
        marginals=marginals)


def _store(out: dict, scores: _StageScores, rows: np.ndarray, index: np.ndarray, rotations: np.ndarray,
           deltas: np.ndarray, centers_px: np.ndarray, group: np.ndarray, keep: set, marginals: dict) -> None:
    """Estimators and statistics of one stage for particles ``index`` (rows ``rows`` of the stage's batch)."""
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
    stats = _rotation_statistics(p_rot, rotations, out["map_rot"][index], group, shared)
    for key, value in stats.items():
        out[key][index] = value
    for row, i in zip(rows, index):
        if int(i) in keep:
            marginals[int(i)] = (rotations if shared else rotations[row], p_rot[row])


def _rotation_statistics(p_rot: np.ndarray, rotations: np.ndarray, map_rot: np.ndarray, group: np.ndarray,
                         shared: bool, min_prob: float = 1e-9) -> dict:
    """MMSE rotation (folded to the MAP's symmetry mates), expected angular error, significant count, concentration.

    ``p_rot`` (B, K) rotation posteriors; ``rotations`` (K, 3, 3) shared or (B, K, 3, 3); ``map_rot`` (B, 3, 3).
    Cells with probability below ``min_prob`` (in total < K · min_prob of the mass) are left out of the sums.
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
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    experr = np.bincount(rows, weights=weights * angle, minlength=b)
    ordered = -np.sort(-p_rot, axis=1)
    nsig = (np.cumsum(ordered, axis=1) < 0.99).sum(axis=1) + 1
    conc = np.linalg.svd(m, compute_uv=False).sum(axis=1) / 3.0
    return {"mmse_rot": mmse, "experr": experr, "nsig": np.minimum(nsig, p_rot.shape[1]), "conc": conc}
