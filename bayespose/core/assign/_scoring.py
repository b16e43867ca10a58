"""Scoring: the log-likelihood of every (particle, rotation, shift), streamed into log-sum-exp accumulations.

The model (Xu et al. 2026, eq. 3 and App. B). For particle i with Fourier coefficients Y_i, CTF C_i, noise
power sigma²(k) (per shell), reference scale alpha, candidate rotation R_k and origin o_j (px):

    log p(Y_i | R_k, o_j) = Σ_k' [ 2 Re(conj(Y_i) · alpha C_i S_j P_k) - alpha² C_i² |P_k|² - |Y_i|² ] / sigma²

summed over the non-redundant half plane of rfft2 coefficients with 0 < |k'| <= cut-off (each standing for its
Hermitian mate, hence the factor 2 of the cross term against the 1/2 of a Gaussian), where ``P_k`` is the central
slice (:func:`~bayespose.core.imaging.forward.slice_coefficients`) and ``S_j`` the phase that moves the projection
by ``-o_j``. The first term is one real matrix product ``X (B·J, 2M) @ P (2M, K)`` with
``X_ij = 2 alpha C_i/sigma² · shift(Y_i, +o_j)``; the norm term ``(alpha² C²/sigma²) (B, M) @ |P|² (M, K)`` is kept
(with a CTF it depends on the pose).

Posterior weights ``w_ikj ∝ q_k · pi(R_k) · rho(o_j) · exp(loglik)`` (q: quadrature weight, pi: rotation prior
density w.r.t. Haar, rho: uniform over the shift disk) are accumulated chunk by chunk of rotations with
log-sum-exp (:func:`_fold_chunk`), so memory is O(batch · (K + J)) plus one chunk of scores, never N · K · J.
Each call of :meth:`_Scorer.score` is logged as a :class:`ScoringCall` (its size, work and time).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from bayespose.core.assign.noise_model import NoiseModel, _load_images
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, slice_coefficients
from bayespose.core.imaging.noise import ScoringFrequencies, scoring_frequencies
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.parallel import local_world_size
from bayespose.core.runtime import memory_bytes, work_bytes

_CHUNK_SCORES = 3_000_000  # float32 scores per chunk (12 MB): the post-GEMM passes run from the L3 cache
_PROJECT_SAMPLES = 400_000  # central-slice samples per call of the sampler
_CACHE_ENV = "BAYESPOSE_CACHE_GB"  # refinement-lattice cache budget in GB (default: see _lattice_budget)


@dataclass(frozen=True)
class ScoringCall:
    """One scoring call: ``particles`` (B) x ``rotations`` (K per particle, ``shared``: one set for all) x
    ``shifts`` (J) at ``frequencies`` (M) coefficients of the half plane, in chunks of ``chunk`` rotations;
    ``stage``: 0 for the first grid, l for refinement level l; ``flops`` of the matrix products and ``seconds``
    of wall time (projections included)."""

    stage: int
    particles: int
    rotations: int
    shifts: int
    frequencies: int
    shared: bool
    chunk: int
    flops: float
    seconds: float


def _phase(freqs: ScoringFrequencies, shifts_px: torch.Tensor) -> torch.Tensor:
    """exp(-2 pi i k · s / D) for shifts (..., 2) = (x, y) px: multiplying moves image content by +s."""
    kx = freqs.kx.to(shifts_px.device)
    ky = freqs.ky.to(shifts_px.device)
    angle = (-2.0 * math.pi / freqs.box) * (shifts_px[..., :1] * kx + shifts_px[..., 1:] * ky)
    return torch.polar(torch.ones_like(angle), angle)


@dataclass
class _Batch:
    """One batch of particles in Fourier space (full rfft2 layout) with CTFs and shift centres (px)."""

    index: np.ndarray
    y: torch.Tensor  # (B, D, D // 2 + 1) complex64
    ctf: torch.Tensor | None  # (B, D, D // 2 + 1) float32
    centers_px: torch.Tensor  # (B, 2)

    @classmethod
    def load(cls, particles: ParticleSet, index: np.ndarray, images: np.ndarray | None, centers_px: np.ndarray,
             device: torch.device) -> _Batch:
        """Particles ``index``: their images (rows of ``images``, else read from the files), CTFs and shift
        centres (rows of ``centers_px`` (N, 2) px) on ``device``."""
        imgs = torch.from_numpy(_load_images(particles, index, images)).to(device)
        ctf = None
        if particles.ctf is not None:
            ctf = ctf_2d(particles.ctf.subset(index), particles.pixel_size, particles.box, rfft=True, device=device)
        return cls(index, torch.fft.rfft2(imgs), ctf,
                   torch.as_tensor(centers_px[index], dtype=torch.float32, device=device))

    def rows(self, rows: np.ndarray) -> _Batch:
        """The sub-batch of rows ``rows``."""
        return _Batch(self.index[rows], self.y[rows], None if self.ctf is None else self.ctf[rows],
                      self.centers_px[rows])


@dataclass
class _StageScores:
    """Log-sum-exp accumulations of one stage for a batch (natural logs; unnormalised)."""

    log_rot: torch.Tensor  # (B, K) rotation marginal
    log_shift: torch.Tensor  # (B, J) shift marginal
    best: dict  # name -> (value (B,), flat index j * K + k (B,)) for "map", "mle", "post"
    const: torch.Tensor  # (B,) -Σ|Y|²/σ² over the stage's band


class _Scorer:
    """Scores batches of particles against one map over rotation sets and a shift lattice (see module doc).

    ``flops`` and ``seconds``: totals over all calls; ``calls``: one :class:`ScoringCall` per call.
    """

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
        self.calls: list[ScoringCall] = []

    def frequencies(self, radius: float) -> ScoringFrequencies:
        """The scored coefficients up to ``radius`` (Fourier px), computed once per radius."""
        key = round(radius, 6)
        if key not in self._freqs:
            self._freqs[key] = scoring_frequencies(self.box, radius)
        return self._freqs[key]

    def score(self, batch: _Batch, radius: float, rotations: np.ndarray, log_q: np.ndarray, log_pi: np.ndarray,
              cache_key=None, lattice_ids: np.ndarray | None = None, stage: int = 0) -> _StageScores:
        """Scores of ``rotations`` ((K,3,3) shared or (B,K,3,3) per particle) with log quadrature ``log_q`` ((K,) or
        (B,K)) and log prior ``log_pi`` ((1,K) or (B,K)) for frequencies up to ``radius``; ``stage`` labels the
        call in :attr:`calls`.

        ``lattice_ids`` (B, K): for per-particle rotations that belong to a fixed refinement lattice, their ids in
        it; their projections are then computed once per id and cached across particles and batches.
        """
        t0, flops0 = time.perf_counter(), self.flops
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
        a2_pairs = None if shared else a2.repeat_interleave(2, dim=1)[:, :, None]  # (B, 2M, 1), as proj's layout
        chunk = self._chunk_size(b, j, k_total, 0 if shared else m)
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
                norm = torch.bmm(proj.square(), a2_pairs).squeeze(2)  # Σ a2 (re² + im²), no pass over the pairs
            self.flops += 2.0 * b * j * kc * 2 * m + 2.0 * b * kc * m
            log_shift = _fold_chunk(cross, norm, log_pi[:, k0:k1], log_w[:, k0:k1], searched[:, k0:k1], k0, k_total,
                                    log_rot, log_shift, best)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.calls.append(ScoringCall(stage, b, k_total, j, m, shared, chunk, self.flops - flops0, seconds))
        return _StageScores(log_rot, log_shift, best, const)

    def _chunk_size(self, b: int, j: int, k_total: int, m: int = 0) -> int:
        """Rotations per chunk: the (B, J, Kc) float32 scores stay within ``max_scores`` and, where the GEMM
        stays efficient (Kc >= 256), within about 12 MB so that the passes after the GEMM run from cache; with
        per-particle rotations (``m`` > 0 frequencies) the (B, Kc, 2M) float32 projections of a chunk also stay
        within :func:`~bayespose.core.runtime.work_bytes` (they grow as box²: 13 GB for 64 particles x 1024
        rotations at box 256 otherwise); the chunks are then balanced (no small last chunk)."""
        cache_fit = max(256, _CHUNK_SCORES // (b * j))
        chunk = max(1, min(self.max_scores // (b * j), cache_fit))
        if m:
            chunk = max(1, min(chunk, int(work_bytes(self.device) // (8 * b * m))))
        n_chunks = -(-k_total // chunk)
        return -(-k_total // n_chunks)

    def _project(self, rotations: np.ndarray, freqs: ScoringFrequencies, with_power: bool = False,
                 out: torch.Tensor | None = None):
        """Central-slice coefficients (N, 2M) float32, real and imaginary parts interleaved, of RELION rotations
        (N, 3, 3), and with ``with_power`` also their powers |P|² (N, M) (then a tuple); written into ``out``
        (N, 2M) when given (e.g. rows of the lattice cache); computed in sub-chunks of about ``_PROJECT_SAMPLES``
        samples, whose temporaries stay in cache."""
        m = len(freqs)
        if out is None:
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
        distinct id once: rows are projected into a buffer (within the cache budget; emptied when full) and looked
        up by id."""
        key = round(radius, 6)
        freqs = self.frequencies(radius)
        known, slots, buffer, used = self._lattice_cache.get(key, (np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                                    None, 0))
        wanted, first = np.unique(ids, return_index=True)
        pos = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))
        missing = ~(known[pos] == wanted) if len(known) else np.ones(len(wanted), dtype=bool)
        if missing.any():
            row_bytes = 8 * len(freqs)
            if (used + missing.sum()) * row_bytes > _lattice_budget(self.device):  # full: start afresh
                known, slots, buffer, used = np.zeros(0, np.int64), np.zeros(0, np.int64), None, 0
                missing = np.ones(len(wanted), dtype=bool)
            n_new = int(missing.sum())
            if buffer is None or used + n_new > len(buffer):
                budget_rows = max(int(_lattice_budget(self.device) // row_bytes), used + n_new)
                # on a CPU the whole budget at once: untouched pages cost no memory, and rows are never copied
                # again (doubling copied up to the 2 GB of a full cache); on a GPU, where memory is taken when
                # allocated, grown by doubling
                rows = budget_rows if self.device.type == "cpu" else max(min(2 * (used + n_new), budget_rows), 1024)
                grown = torch.empty((rows, 2 * len(freqs)), device=self.device)
                if buffer is not None:
                    grown[:used] = buffer[:used]
                buffer = grown
            self._project(rotations.reshape(-1, 3, 3)[first[missing]], freqs, out=buffer[used:used + n_new])
            # merged into the sorted ids (both sorted: an O(n) insert, not a re-sort of the whole cache per call)
            at = np.searchsorted(known, wanted[missing])
            known = np.insert(known, at, wanted[missing])
            slots = np.insert(slots, at, np.arange(used, used + n_new))
            used += n_new
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


def _cache_budget(device: torch.device) -> float:
    """Bytes the projection table of a shared grid may take (built once, whatever N): a quarter of the memory (the
    GPU's, or the host RAM shared by the data-parallel processes of this node), at least 1.5 GB."""
    total = memory_bytes(device)
    if device.type != "cuda":
        total /= local_world_size()
    return max(1.5e9, total / 4)


def _lattice_budget(device: torch.device) -> float:
    """Bytes the refinement-lattice cache may hold. It fills as particles visit new refined cells and starts afresh
    when full, so this bounds its growth with N: on the CPU 2 GB per process (or :func:`_cache_budget` if less;
    measured with a quarter of 24 GB instead: 1.4 GB -> 1.8 GB over the first 3000 particles at box 64, still
    growing), on a GPU a quarter of its memory; ``BAYESPOSE_CACHE_GB`` sets it. A larger cache saves re-projecting
    refined cells that particles share (at box 256 and Nyquist a row is 0.2 MB: few rows are shared in any
    budget)."""
    import os

    if os.environ.get(_CACHE_ENV):
        return float(os.environ[_CACHE_ENV]) * 1e9
    return _cache_budget(device) if device.type == "cuda" else min(2e9, _cache_budget(device))


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

