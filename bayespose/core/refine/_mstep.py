"""M-step of the EM refinement for one gold-standard half set: joint (rotation, shift) weights on each particle's
candidate support, their insertion into the half set's Fourier accumulator, the noise residuals and the
viewing-direction density of the prior.

* **Joint weights** — per particle, the candidate rotations holding ``candidate_mass`` of the E-step's rotation
  posterior ``p_ik`` (at most ``max_candidates``, renormalised) are re-scored against every shift of the lattice
  (batched: per-particle rotations (B, Kc) x shifts (J)) with the same Gaussian likelihood (CTF, noise per shell,
  reference scale). Since the norm term does not depend on the shift, ``p(j | i, k) = softmax_j(2 alpha
  Re<C_i/sigma² shift(Y_i, +o_j), P_k>)`` and the joint weight is ``w_ikj = p_ik p(j | i, k)``, exact on that
  support. Hard mode (the MLE/MAP baseline) puts all weight on the best (k, j). A particle whose coarse posterior
  is too broad for that cap takes the shared-grid path: its data are summed per grid rotation in 2D and each grid
  rotation is inserted once, so soft assignment is never truncated where it matters most.
* **Map** — per particle and candidate ``N_ik = Σ_j w_ikj (C_i/σ²) shift(Y_i, +o_j)`` and ``W_ik = Σ_j w_ikj
  C_i²/σ²`` are inserted with :meth:`bayespose.core.imaging.reconstruct.FourierAccumulator.insert` (symmetry mates
  included); the half map is the Wiener solution ``Σ N / (Σ W + 1/τ²)`` (:mod:`._maps`).
* **Noise** — residual power per shell at each particle's most probable (k, j).
* **Prior** — the viewing-direction density from the posterior mass (:func:`direction_density`).

Units: shifts and origins in px, frequencies in Fourier px, rotations RELION ``A`` matrices (N, 3, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import healpy
import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.assign import NoiseModel, shift_lattice
from bayespose.core.assign._scoring import _phase
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import prepare_volume, slice_coefficients
from bayespose.core.imaging.noise import ScoringFrequencies, scoring_frequencies
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.imaging.reconstruct import FourierAccumulator
from bayespose.core.io.mrc import read_images
from bayespose.core.refine.config import RefineConfig
from bayespose.core.runtime import work_bytes


def direction_density(mass: np.ndarray, order: int, pseudocount: float) -> np.ndarray:
    """Smoothed viewing-direction density (mean 1) from posterior mass per NEST pixel of ``order``."""
    nside = 2 ** order
    counts = mass + pseudocount
    neighbours = healpy.get_all_neighbours(nside, np.arange(len(counts)), nest=True).T  # (P, 8), -1 if none
    valid = neighbours >= 0
    neighbour_mean = np.where(valid, counts[np.clip(neighbours, 0, None)], 0.0).sum(1) / valid.sum(1)
    smooth = 0.5 * counts + 0.5 * neighbour_mean
    return smooth / smooth.mean()


def direction_mass(marginals: dict, order: int) -> np.ndarray:
    """Posterior mass per viewing-direction NEST pixel of ``order`` summed over particles' rotation posteriors
    ``{i: (rotations (K, 3, 3), probabilities (K,))}``; the direction of a RELION ``A`` is its third row."""
    n_pix = 12 * 4 ** order
    mass = np.zeros(n_pix)
    for rotations, probs in marginals.values():
        d = rotations[:, 2, :]
        pix = healpy.vec2pix(2 ** order, d[:, 0], d[:, 1], d[:, 2], nest=True)
        mass += np.bincount(pix, weights=probs, minlength=n_pix)
    return mass


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

    def _rows_per_batch(self, width: int) -> int:
        """Particles per batch: ``config.batch_size``, fewer when the batch's buffers (shifted data (B, J, M)
        twice, numerators and weights (B, width, M)) would exceed :func:`work_bytes` (big boxes)."""
        per_particle = 16 * len(self.deltas) * len(self.freqs) + 12 * width * len(self.freqs)
        return max(1, min(self.config.batch_size, int(work_bytes(self.device) // per_particle)))

    def _insert(self, numerator: torch.Tensor, weight: torch.Tensor, rotations: np.ndarray) -> None:
        """Insert slices given on the scored half plane (K, M) at RELION rotations (K, 3, 3)."""
        box, flat = self.box, self.freqs.flat_index.to(self.device)
        width = box * (box // 2 + 1)
        step = max(1, min(1024, int(work_bytes(self.device) // (12 * width))))  # full slices being inserted
        for s in range(0, len(rotations), step):
            e = min(s + step, len(rotations))
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
        step = self._rows_per_batch(max(len(p) for p in cand_p))
        for s in range(0, len(rows), step):
            sl = slice(s, s + step)
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
        grid ``grid_rotations`` (K, 3, 3): data summed per grid rotation in 2D, each rotation inserted once.

        In chunks of grid rotations whose projections, numerators and weights ((Kc, 2M_s + 3M) float32) stay
        within :func:`work_bytes` (the whole grid at Nyquist would be (K, 2M): 0.9 GB for order 2 at box 256,
        three such arrays): p(j | i, k) is a softmax over the shifts of each rotation, so chunks over k are exact;
        each chunk reads the rows' images again (the page cache serves them)."""
        k_total = len(grid_rotations)
        m, m_s = len(self.freqs), len(self.score_kx)
        chunk = max(1, min(k_total, int(work_bytes(self.device) // (4 * (2 * m_s + 3 * m)))))
        best = (np.full(len(rows), -np.inf), np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows), np.int64))
        for k0 in range(0, k_total, chunk):
            self._shared_chunk(rows, grid_rotations[k0:k0 + chunk], p_rows[:, k0:k0 + chunk], k0, best)
        step = self._rows_per_batch(0)
        for s in range(0, len(rows), step):  # best pose and noise residual of each row, known only now
            r_b, kk, jj = rows[s:s + step], best[1][s:s + step], best[2][s:s + step]
            y, ctf, _, origins = self._batch(r_b)
            idx = np.arange(len(r_b))
            self.best_rot[r_b] = grid_rotations[kk]
            self.best_org[r_b] = origins[idx, jj]
            proj = slice_coefficients(self.prepared, grid_rotations[kk], self.score_kx, self.score_ky)
            self._noise_from(y, ctf, proj, origins[idx, jj])

    def _shared_chunk(self, rows: np.ndarray, rotations: np.ndarray, p_rows: np.ndarray, k0: int,
                      best: tuple) -> None:
        """One chunk of :meth:`shared`: grid rotations ``rotations`` (Kc, 3, 3) starting at grid index ``k0`` with
        the rows' posteriors on them ``p_rows`` (R, Kc); inserts the chunk and updates ``best`` (value, grid
        index, shift index per row: the argmax of the joint weight, first one on ties)."""
        dev, m = self.device, len(self.freqs)
        kc = len(rotations)
        proj = slice_coefficients(self.prepared, rotations, self.score_kx, self.score_ky)
        m_s = proj.shape[-1]
        proj_real = torch.view_as_real(proj).reshape(kc, 2 * m_s)
        numerator = torch.zeros((kc, 2 * m), device=dev)
        weight = torch.zeros((kc, m), device=dev)
        step = self._rows_per_batch(0)
        for s in range(0, len(rows), step):
            r_b = rows[s:s + step]
            b = len(r_b)
            _, ctf, z, _ = self._batch(r_b)
            j = z.shape[1]
            z_real = torch.view_as_real(z).reshape(b * j, 2 * m)
            z_scored = torch.view_as_real(self._scored(z)).reshape(b * j, 2 * m_s)
            cross = (2.0 * self.noise.scale) * (z_scored @ proj_real.T).view(b, j, kc)
            p_t = torch.as_tensor(p_rows[s:s + b], dtype=torch.float32, device=dev)
            log_joint = torch.log(p_t)[:, None, :] + torch.log_softmax(cross, dim=1)
            w = torch.exp(log_joint)  # (B, J, Kc)
            numerator += w.reshape(b * j, kc).T @ z_real
            weight += w.sum(1).T @ (ctf ** 2 / self.sigma2)
            value, flat = log_joint.reshape(b, -1).max(dim=1)
            value, flat = value.cpu().numpy(), flat.cpu().numpy()
            better = value > best[0][s:s + b]
            best[0][s:s + b] = np.where(better, value, best[0][s:s + b])
            best[1][s:s + b] = np.where(better, k0 + flat % kc, best[1][s:s + b])
            best[2][s:s + b] = np.where(better, flat // kc, best[2][s:s + b])
        keep = torch.nonzero(weight.sum(1) > 0).squeeze(1)
        numer_c = torch.view_as_complex(numerator.view(kc, m, 2).contiguous())
        self._insert(numer_c[keep], weight[keep], rotations[keep.cpu().numpy()])

    def all_reduce(self) -> None:
        """Data-parallel run: the sums of every process (accumulator, noise residuals), on every process."""
        parallel.all_reduce_sum(torch.view_as_real(self.accumulator.numerator))
        parallel.all_reduce_sum(self.accumulator.weight)
        self.noise_sum = parallel.all_reduce_sum(self.noise_sum)
        self.noise_count = parallel.all_reduce_sum(self.noise_count)


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


def m_step(support: _Support, config: RefineConfig, device: torch.device, progress,
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
    mstep.all_reduce()  # under torchrun each process inserted its own particles
    return mstep
