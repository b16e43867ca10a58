"""EM 3D refinement with rotational-prior estimation (paper 000 sec. 4, App. F2; DESIGN.md "EM ...").

Each iteration, for each gold-standard half set h independently:

* **E-step** — the posterior ``w_ikj`` of every particle over the HEALPix grid x shift lattice against the half
  map V_h (the same Gaussian likelihood as :mod:`.posterior`, scored up to the current resolution); hard mode
  (the MLE baseline) puts all weight on the best (k, j).
* **M-step map** — per rotation, the data summed in 2D first: ``N_k = Σ_ij w_ikj (C_i/σ²) shift(Y_i, +o_j)`` and
  ``W_k = Σ_ij w_ikj C_i²/σ²`` (two matrix products), then each rotation is inserted once into a Fourier accumulator
  (:class:`.reconstruct.FourierAccumulator`, symmetry mates included) and the map is the Wiener solution
  ``Σ N / (Σ W + 1/τ²)`` with τ² from the previous half-map FSC (:func:`.reconstruct.tau2_from_fsc`).
* **M-step prior** (``prior_mode="estimate"``) — the viewing-direction distribution from the posterior mass,
  ``π(d) ∝ Σ_i Σ_psi w_i(d, psi) + a`` smoothed over HEALPix neighbours (in-plane uniform, the usual preferred
  orientation), used as the rotation prior of the next E-step; ``"uniform"`` keeps the Haar prior.
* **M-step noise** — σ²(shell) from the residuals at each particle's most probable pose.

Then the FSC between the half maps gives the resolution (0.143) and τ²; the next iteration scores up to that
resolution (+ a few shells) and refines the angular sampling when the resolution asks for it. Units: Å, degrees,
RELION ``A`` rotations, origins ``rlnOriginX/Y`` (px inside, Å in outputs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import healpy
import numpy as np
import torch

from .ctf import ctf_2d
from .forward import prepare_volume, slice_coefficients
from .grids import healpix_grid
from .io.mrc import read_images, write_map
from .particles import ParticleSet
from .posterior import (CELL_SPREAD, NoiseModel, _phase, _rotation_statistics, choose_device, estimate_noise_model,
                        shift_lattice)
from .noise import resolution_to_radius, scoring_frequencies
from .reconstruct import FourierAccumulator, fsc, lowpass, resolution_at, tau2_from_fsc
from .symmetry import symmetry_group

MODES = ("soft", "hard")
PRIOR_MODES = ("uniform", "estimate")


@dataclass
class RefineConfig:
    """EM settings. Angles in degrees, shifts in px, resolutions in Å."""

    iterations: int = 8
    healpix_order: int = 1  # first iteration's grid (30°)
    max_healpix_order: int = 3  # finest grid (7.5°)
    shift_range_px: float = 2.0
    shift_step_px: float = 1.0
    symmetry: str = "C1"
    mode: str = "soft"
    prior_mode: str = "uniform"
    prior_pseudocount: float = 0.5  # per viewing direction, in particles
    initial_lowpass_A: float = 30.0
    extra_shells: float = 3.0  # score and insert this many Fourier shells beyond the current resolution
    particle_diameter_A: float | None = None  # sets when the angular sampling is refined (default: 0.8 · box)
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
        if not 0 <= self.healpix_order <= self.max_healpix_order <= 4:
            raise ValueError("need 0 <= healpix order <= max healpix order <= 4")
        symmetry_group(self.symmetry)


@dataclass
class IterationLog:
    iteration: int
    healpix_order: int
    scored_resolution_A: float
    resolution_A: float
    log_likelihood: float  # mean per particle of log p(Y_i) over the scored band
    pose_change_deg: float  # mean angle between this and the previous iteration's MAP poses
    seconds: float


@dataclass
class RefineResult:
    map: np.ndarray
    half_maps: tuple
    fsc_frequencies: np.ndarray  # 1/Å
    fsc: np.ndarray
    resolution_A: float
    particles: ParticleSet  # MMSE poses + per-particle results in extra
    direction_prior: np.ndarray  # density (relative to uniform) on HEALPix NEST pixels of order prior_order
    prior_order: int
    history: list = field(default_factory=list)


def _direction_density(mass: np.ndarray, order: int, pseudocount: float) -> np.ndarray:
    """Smoothed viewing-direction density (mean 1) from posterior mass per NEST pixel of ``order``."""
    nside = 2 ** order
    counts = mass + pseudocount
    neighbours = healpy.get_all_neighbours(nside, np.arange(len(counts)), nest=True).T  # (P, 8), -1 if none
    valid = neighbours >= 0
    neighbour_mean = np.where(valid, counts[np.clip(neighbours, 0, None)], 0.0).sum(1) / valid.sum(1)
    smooth = 0.5 * counts + 0.5 * neighbour_mean
    return smooth / smooth.mean()


def _regrid_density(density: np.ndarray, order_from: int, order_to: int) -> np.ndarray:
    """Carry a NEST-pixel density to another order (children inherit, parents average)."""
    if order_to == order_from:
        return density
    if order_to > order_from:
        return np.repeat(density, 4 ** (order_to - order_from))
    return density.reshape(-1, 4 ** (order_from - order_to)).mean(1)


class _EStep:
    """E-step + M-step sums for one half set at one iteration (see the module docstring)."""

    def __init__(self, particles, index, volume, noise, order, radius, log_prior_dir, config, device, images):
        self.p, self.index, self.noise, self.config, self.device, self.images = (particles, index, noise, config,
                                                                                   device, images)
        self.grid = healpix_grid(order)
        self.freqs = scoring_frequencies(particles.box, radius)
        self.prepared = prepare_volume(volume, device=device)
        self.deltas = shift_lattice(config.shift_range_px, config.shift_step_px)
        self.log_pi = torch.as_tensor(np.log(log_prior_dir[self.grid.direction_index]), dtype=torch.float32,
                                      device=device) if log_prior_dir is not None else None
        k, m = len(self.grid), len(self.freqs)
        self.numerator = torch.zeros((k, m), dtype=torch.complex64, device=device)
        self.weight = torch.zeros((k, m), device=device)
        self.noise_sum = np.zeros(len(noise.noise_power))
        self.noise_count = np.zeros(len(noise.noise_power))
        self.rot_mass = np.zeros(k)

    def run(self, progress=None) -> dict:
        p, cfg, dev, freqs = self.p, self.config, self.device, self.freqs
        n, k_total, m = len(self.index), len(self.grid), len(self.freqs)
        sigma2 = torch.as_tensor(self.noise.noise_power, dtype=torch.float32, device=dev)[freqs.shell.to(dev)]
        sigma2 = torch.clamp(sigma2, min=float(sigma2.max()) * 1e-6)
        alpha = self.noise.scale
        deltas_t = torch.as_tensor(self.deltas, dtype=torch.float32, device=dev)
        phase_d = _phase(freqs, deltas_t)  # (J, M)
        j = len(self.deltas)
        proj = slice_coefficients(self.prepared, self.grid.rotations, freqs.kx, freqs.ky)  # (K, M)
        proj_real = torch.view_as_real(proj).reshape(k_total, 2 * m)
        proj_pow = proj.abs() ** 2
        out = {"map_rot": np.zeros((n, 3, 3)), "map_org": np.zeros((n, 2)), "mmse_rot": np.zeros((n, 3, 3)),
               "mmse_org": np.zeros((n, 2)), "experr": np.zeros(n), "pmax": np.zeros(n), "logz": np.zeros(n)}
        group = symmetry_group(cfg.symmetry)
        for start in range(0, n, cfg.batch_size):
            rows = np.arange(start, min(start + cfg.batch_size, n))
            idx = self.index[rows]
            b = len(idx)
            imgs = torch.from_numpy(self.images[idx] if self.images is not None else read_images(p, idx)).to(dev)
            y = freqs.select(torch.fft.rfft2(imgs))
            ctf = freqs.select(ctf_2d(p.ctf.subset(idx), p.pixel_size, p.box, device=dev)) if p.ctf is not None \
                else torch.ones_like(y.real)
            z = ((ctf / sigma2) * y)[:, None, :] * phase_d[None]  # (B, J, M) = (C/σ²) shift(Y, +o_j)
            z_real = torch.view_as_real(z).reshape(b * j, 2 * m)
            cross = (2.0 * alpha) * (z_real @ proj_real.T).view(b, j, k_total)
            norm = (alpha ** 2) * ((ctf ** 2 / sigma2) @ proj_pow.T)  # (B, K)
            loglik = cross - norm[:, None, :]
            log_post = loglik + (self.log_pi[None, None, :] if self.log_pi is not None else 0.0)
            log_z = torch.logsumexp(log_post.reshape(b, -1), dim=1)
            if cfg.mode == "hard":
                best = loglik.reshape(b, -1).argmax(dim=1)
                w = torch.zeros_like(loglik).reshape(b, -1)
                w[torch.arange(b), best] = 1.0
                w = w.view(b, j, k_total)
            else:
                w = torch.exp(log_post - log_z[:, None, None])
            # M-step sums per rotation: N_k = Σ_ij w_ikj z_ij (complex), W_k = Σ_i (Σ_j w_ikj) C_i²/σ²
            wk = w.reshape(b * j, k_total).T.contiguous()  # (K, B·J)
            self.numerator += torch.view_as_complex((wk @ z_real).view(k_total, m, 2).contiguous())
            p_rot = w.sum(1)  # (B, K)
            self.weight += p_rot.T @ (ctf ** 2 / sigma2)
            p_rot_np = p_rot.cpu().numpy().astype(np.float64)
            self.rot_mass += p_rot_np.sum(0)
            flat = log_post.reshape(b, -1).argmax(dim=1).cpu().numpy()
            jj, kk = flat // k_total, flat % k_total
            out["map_rot"][rows] = self.grid.rotations[kk]
            out["map_org"][rows] = self.deltas[jj]
            out["pmax"][rows] = torch.exp(log_post.reshape(b, -1).max(1).values - log_z).cpu().numpy()
            out["logz"][rows] = (log_z - ((y.abs() ** 2) / sigma2).sum(1)).cpu().numpy()
            out["mmse_org"][rows] = w.sum(2).cpu().numpy() @ self.deltas
            stats = _rotation_statistics(p_rot_np / np.maximum(p_rot_np.sum(1, keepdims=True), 1e-300),
                                         self.grid.rotations, out["map_rot"][rows], group, True,
                                         self.grid.spacing_deg)
            out["mmse_rot"][rows] = stats["mmse_rot"]
            out["experr"][rows] = stats["experr"]
            # noise from the residual at the most probable pose, per shell
            resid = y - alpha * ctf * proj[kk] * torch.conj(phase_d[jj])
            shell = freqs.shell.numpy()
            power = (resid.abs() ** 2).cpu().numpy()
            self.noise_sum += np.bincount(shell, weights=power.sum(0), minlength=len(self.noise_sum))
            self.noise_count += np.bincount(shell, minlength=len(self.noise_sum)) * b
            if progress:
                progress(int(rows[-1]) + 1, n)
        return out

    def accumulate(self, accumulator: FourierAccumulator) -> None:
        """Insert every rotation's summed slice (and weight) once, with the symmetry mates."""
        box = self.p.box
        keep = torch.nonzero(self.weight.abs().sum(1) > 0).squeeze(1)
        flat = self.freqs.flat_index
        for s in range(0, len(keep), 2048):
            sel = keep[s:s + 2048]
            slices = torch.zeros((len(sel), box * (box // 2 + 1)), dtype=torch.complex64, device=self.device)
            weights = torch.zeros((len(sel), box * (box // 2 + 1)), device=self.device)
            slices[:, flat] = self.numerator[sel]
            weights[:, flat] = self.weight[sel]
            accumulator.insert(slices.view(-1, box, box // 2 + 1), weights.view(-1, box, box // 2 + 1),
                               self.grid.rotations[sel.cpu().numpy()], symmetry=self.config.symmetry)


def refine(particles: ParticleSet, initial_map: np.ndarray, config: RefineConfig | None = None,
           out_dir: str | Path | None = None, images: np.ndarray | None = None,
           log: Callable[[str], None] | None = print,
           progress: Callable[[str], Callable[[int, int], None]] | None = None) -> RefineResult:
    """EM refinement of ``initial_map`` (D, D, D) from ``particles`` (with CTF). See the module docstring.

    ``out_dir``: per-iteration half maps (``it###_half{1,2}.mrc``), ``history.json``. ``images``: particle images
    (N, D, D) if in memory. Returns the final map, half maps, FSC, particles with MMSE poses, and the prior.
    """
    config = config or RefineConfig()
    config.validate()
    n = len(particles)
    if n < 10:
        raise ValueError(f"EM refinement needs at least 10 particles, got {n}")
    initial_map = np.asarray(initial_map, dtype=np.float32)
    if initial_map.shape != (particles.box,) * 3:
        raise ValueError(f"initial map box {initial_map.shape} does not match the particle box {particles.box} px")
    device = choose_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    box, px = particles.box, particles.pixel_size
    rng = np.random.default_rng(config.seed)
    halves = particles.half_set if particles.half_set is not None and set(np.unique(particles.half_set)) == {1, 2} \
        else np.where(rng.permutation(n) % 2 == 0, 1, 2)
    index = [np.nonzero(halves == h)[0] for h in (1, 2)]
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    start_map = lowpass(initial_map, config.initial_lowpass_A, px).cpu().numpy()
    maps = [start_map, start_map]
    prepared = prepare_volume(start_map, device=device)
    nyquist = resolution_to_radius(box, px, None)
    noise = estimate_noise_model(particles, prepared, nyquist, images, seed=config.seed)
    resolution = config.initial_lowpass_A
    order = config.healpix_order
    prior_density = None if config.prior_mode == "uniform" else np.ones(12 * 4 ** order)
    diameter = config.particle_diameter_A or 0.8 * box * px
    tau2 = None
    history: list[IterationLog] = []
    previous_map_rot = None
    results = None
    for it in range(1, config.iterations + 1):
        t0 = time.perf_counter()
        radius = min(box * px / resolution + config.extra_shells, nyquist)
        if prior_density is not None:
            prior_density = _regrid_density(prior_density, int(round(math.log(len(prior_density) / 12, 4))), order)
        accumulators, results, mass, ll = [], [], np.zeros(12 * 4 ** order), []
        noise_sum, noise_count = 0.0, 0.0
        for h in range(2):
            estep = _EStep(particles, index[h], maps[h], noise, order, radius, prior_density, config, device,
                           images)
            res = estep.run(progress(f"iteration {it} half {h + 1}") if progress else None)
            acc = FourierAccumulator.zeros(box, device=device)
            estep.accumulate(acc)
            accumulators.append(acc)
            results.append(res)
            mass += estep.rot_mass.reshape(-1, estep.grid.n_psi).sum(1)
            ll.append(res["logz"])
            noise_sum, noise_count = noise_sum + estep.noise_sum, noise_count + estep.noise_count
        # M-step: maps with tau² from the previous FSC (first iteration: light regularisation)
        maps = [acc.reconstruct(tau2=tau2).cpu().numpy() for acc in accumulators]
        freq, fsc_values = fsc(maps[0], maps[1], px)
        resolution = max(resolution_at(freq, fsc_values), 2 * px)
        tau2 = tau2_from_fsc(fsc_values, 0.5 * (accumulators[0].mean_weight_per_shell()
                                                + accumulators[1].mean_weight_per_shell())[:len(fsc_values)])
        updated = noise_count > 0
        # the reconstructed maps are in the particles' units (Σ C Y / Σ C²), so the reference scale is now 1
        noise = NoiseModel(np.where(updated, noise_sum / np.maximum(noise_count, 1), noise.noise_power),
                           1.0, noise.ctf2)
        if config.prior_mode == "estimate":
            prior_density = _direction_density(mass, order, config.prior_pseudocount)
        map_rot = np.zeros((n, 3, 3))
        for h in range(2):
            map_rot[index[h]] = results[h]["map_rot"]
        change = float("nan") if previous_map_rot is None else float(np.mean(np.degrees(np.arccos(np.clip(
            (np.einsum("nij,nij->n", map_rot, previous_map_rot) - 1) / 2, -1, 1)))))
        previous_map_rot = map_rot
        entry = IterationLog(it, order, float(box * px / radius), float(resolution),
                             float(np.mean(np.concatenate(ll))), change, time.perf_counter() - t0)
        history.append(entry)
        if log:
            log(f"iteration {it}: HEALPix order {order}, scored to {entry.scored_resolution_A:.1f} Å, "
                f"resolution {resolution:.1f} Å (FSC 0.143), log-likelihood {entry.log_likelihood:.1f}, "
                f"pose change {change:.1f}°, {entry.seconds:.1f} s")
        if out_dir is not None:
            for h in range(2):
                write_map(out_dir / f"it{it:03d}_half{h + 1}.mrc", maps[h], px)
            (out_dir / "history.json").write_text(json.dumps([asdict(e) for e in history], indent=2))
        # angular sampling: refine when the spacing is coarser than the resolution needs at the particle's edge
        needed_deg = math.degrees(resolution / (diameter / 2))
        if order < config.max_healpix_order and healpix_grid(order).spacing_deg > needed_deg:
            order += 1

    combined = (accumulators[0] + accumulators[1]).reconstruct(
        tau2=tau2_from_fsc(fsc_values, (accumulators[0] + accumulators[1]).mean_weight_per_shell()[:len(fsc_values)],
                           whole_map=True)).cpu().numpy()
    final = _final_particles(particles, index, results, px)
    prior_out = prior_density if prior_density is not None else np.ones(12 * 4 ** order)
    prior_order = int(round(math.log(len(prior_out) / 12, 4)))
    return RefineResult(combined, (maps[0], maps[1]), freq.cpu().numpy(), fsc_values.cpu().numpy(),
                        float(resolution), final, prior_out, prior_order, history)


def _final_particles(particles: ParticleSet, index, results, px) -> ParticleSet:
    from dataclasses import replace

    n = len(particles)
    rot, org, experr, pmax = np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n), np.zeros(n)
    half = np.zeros(n, dtype=int)
    for h in range(2):
        rot[index[h]] = results[h]["mmse_rot"]
        org[index[h]] = results[h]["mmse_org"]
        experr[index[h]] = results[h]["experr"]
        pmax[index[h]] = results[h]["pmax"]
        half[index[h]] = h + 1
    extra = dict(particles.extra)
    extra.update(rlnMaxValueProbDistribution=pmax, bpExpectedErrorDeg=experr)
    return replace(particles, rotations=rot, origins_A=org * px, half_set=half, extra=extra)


__all__ = ["RefineConfig", "RefineResult", "IterationLog", "refine", "CELL_SPREAD"]
