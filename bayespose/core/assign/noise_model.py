"""The noise model of the likelihood: noise power per shell, reference scale and mean CTF², and the frequency
cut-offs matched to a grid's spacing.

* :class:`NoiseModel` / :func:`estimate_noise_model`: noise power per shell from the particles' background
  (:func:`~bayespose.core.imaging.noise.noise_power_from_background`) and the reference scale by the method of
  moments, so that a map of any intensity scale gives the same poses;
* :func:`information_radius` / :func:`geometric_radius` / :func:`signal_radius`: the Fourier radius each
  coarse-to-fine stage scores to.

Noise power is ``E|N(k)|²`` in unnormalised DFT units per shell ``round(|k|)``; radii in Fourier pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, project_fourier, slice_coefficients
from bayespose.core.imaging.noise import (
    background_power_sum,
    radial_average,
    reference_scale,
    scoring_frequencies,
)
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.mrc import read_images

__all__ = ["NoiseModel", "estimate_noise_model", "information_radius", "signal_radius", "geometric_radius"]

_NOISE_BATCH = 128  # images (and projections) per batch of the noise estimate


@dataclass
class NoiseModel:
    """Noise power per shell (``E|N(k)|²``, unnormalised DFT units, index = round(|k|)), the reference scale, and
    the particles' mean CTF² per shell (ones without CTF)."""

    noise_power: np.ndarray
    scale: float
    ctf2: np.ndarray | None = None


def _load_images(particles: ParticleSet, index: np.ndarray, images: np.ndarray | None) -> np.ndarray:
    """Images ``index`` (B, D, D) float32: rows of ``images`` when given (in memory), else read from the files."""
    return np.asarray(images[index], dtype=np.float32) if images is not None else read_images(particles, index)


def estimate_noise_model(particles: ParticleSet, prepared: PreparedVolume, radius: float,
                         images: np.ndarray | None = None, mask_radius_px: float | None = None,
                         n_sample: int = 1000, n_rotations: int = 256, seed: int = 0) -> NoiseModel:
    """Noise power per shell from the particles' background (outside ``mask_radius_px``, default box/2), and the
    reference scale of ``prepared`` by the method of moments (:func:`~bayespose.core.imaging.noise.reference_scale`)
    over shells 1..``radius`` (Fourier px), from up to ``n_sample`` particles (``images`` (N, D, D) when in memory,
    else read from the files) and ``n_rotations`` random projections."""
    rng = np.random.default_rng(seed)
    n = len(particles)
    index = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    box = particles.box
    sums = np.zeros((3, box, box // 2 + 1))  # background power, data power, CTF², summed over the sample
    for s in range(0, len(index), _NOISE_BATCH):  # batches: memory O(batch · D²), not O(n_sample · D²)
        rows = index[s:s + _NOISE_BATCH]
        imgs = _load_images(particles, rows, images)
        sums[0] += background_power_sum(imgs, mask_radius_px)
        sums[1] += (torch.fft.rfft2(torch.from_numpy(imgs)).abs() ** 2).sum(0).double().numpy()
        if particles.ctf is not None:
            sums[2] += (ctf_2d(particles.ctf.subset(rows), particles.pixel_size, box) ** 2).sum(0).double().numpy()
    noise_power, data_power = (radial_average(x / len(index), box) for x in sums[:2])
    proj_power = np.zeros((box, box // 2 + 1))
    rotations = random_rotations(n_rotations, rng)
    for s in range(0, n_rotations, _NOISE_BATCH):
        proj = project_fourier(prepared, rotations[s:s + _NOISE_BATCH])
        proj_power += (proj.abs() ** 2).sum(0).double().cpu().numpy()
    mean_proj_power = radial_average(proj_power / n_rotations, box)
    ctf2 = np.ones_like(mean_proj_power)
    if particles.ctf is not None:
        ctf2 = radial_average(sums[2] / len(index), box)
    shells = np.arange(1, int(math.floor(radius)) + 1)
    scale = reference_scale(data_power, noise_power, ctf2 * mean_proj_power, shells)
    return NoiseModel(noise_power=noise_power, scale=scale, ctf2=ctf2)


def geometric_radius(spacing_deg: float) -> float:
    """Fourier radius (px) at which half a grid step of ``spacing_deg`` (degrees) moves a coefficient by one Fourier
    pixel: ``2 / spacing`` in radians."""
    return 2.0 / math.radians(spacing_deg)


LOSS_SAMPLES = 64  # random poses averaged by the expected loss per shell
SIGNAL_FRACTION = 0.99  # of the expected loss inside the signal band (signal_radius)


def _loss_per_shell(prepared: PreparedVolume, noise: NoiseModel, offset_deg: float, max_radius: float,
                    n_samples: int, seed: int) -> np.ndarray:
    """Expected log-likelihood loss (nats) per Fourier shell (index = round(|k|)) of a pose ``offset_deg`` away from
    the truth: ``Σ alpha² C² |P_R - P_R'|² / sigma²`` over the shell, averaged over ``n_samples`` random poses and
    turn axes. Computed once per map, noise model and settings (kept in ``prepared.derived``: a deep-prior search,
    its global fallback and every block of ``bayespose predict`` share them; at box 256 a level costs 0.25 s)."""
    key = ("loss_per_shell", float(offset_deg), float(max_radius), int(n_samples), int(seed), float(noise.scale),
           noise.noise_power.tobytes(), None if noise.ctf2 is None else noise.ctf2.tobytes())
    if key not in prepared.derived:
        prepared.derived[key] = _expected_loss_per_shell(prepared, noise, offset_deg, max_radius, n_samples, seed)
    return prepared.derived[key]


def _expected_loss_per_shell(prepared: PreparedVolume, noise: NoiseModel, offset_deg: float, max_radius: float,
                             n_samples: int, seed: int) -> np.ndarray:
    """:func:`_loss_per_shell`, computed."""
    rng = np.random.default_rng(seed)
    freqs = scoring_frequencies(prepared.box, max_radius)
    base = random_rotations(n_samples, rng)
    axes = rng.standard_normal((n_samples, 3))
    axes *= math.radians(offset_deg) / np.linalg.norm(axes, axis=1, keepdims=True)
    moved = base @ Rotation.from_rotvec(axes).as_matrix()
    diff = (slice_coefficients(prepared, base, freqs.kx, freqs.ky)
            - slice_coefficients(prepared, moved, freqs.kx, freqs.ky)).abs().cpu().numpy() ** 2  # (S, M)
    shell = freqs.shell.numpy()
    weight = noise.scale ** 2 * noise.ctf2[shell] / np.maximum(noise.noise_power[shell], 1e-30)
    return np.bincount(shell, weights=(diff * weight).mean(0), minlength=len(noise.noise_power))


def information_radius(prepared: PreparedVolume, noise: NoiseModel, offset_deg: float, max_radius: float,
                       tolerance_nats: float = 2.0, n_samples: int = LOSS_SAMPLES, seed: int = 0) -> float:
    """Largest Fourier radius (px) at which a pose ``offset_deg`` away from the truth loses at most
    ``tolerance_nats`` of expected log-likelihood.

    The expected loss of a wrong pose R' against data from R is ``Σ alpha² C² |P_R - P_R'|² / sigma²`` over the
    scored half plane; it grows with radius (the slices separate) and with SNR. Scoring a grid of spacing s with
    the radius for offset s/2 keeps the likelihood smooth at the grid's scale, so the cells near the truth keep
    posterior mass and the refinement can find it; at low SNR this is Nyquist, at high SNR it is lower (RELION
    limits coarse samplings to low resolution for the same reason, but by a fixed rule).
    """
    return _tolerance_radius(np.cumsum(_loss_per_shell(prepared, noise, offset_deg, max_radius, n_samples, seed)),
                             tolerance_nats, max_radius)


def _tolerance_radius(cumulative: np.ndarray, tolerance_nats: float, max_radius: float) -> float:
    """:func:`information_radius` from the cumulative loss per shell."""
    within = np.nonzero(cumulative <= tolerance_nats)[0]
    radius = float(within[-1]) if len(within) else 1.0
    return min(max(radius, 2.0), max_radius)


def signal_radius(prepared: PreparedVolume, noise: NoiseModel, offset_deg: float, max_radius: float,
                  fraction: float = SIGNAL_FRACTION, n_samples: int = LOSS_SAMPLES,
                  seed: int = 0) -> float:
    """Fourier radius (px) within which the shells hold ``fraction`` of the information that tells a pose from
    one ``offset_deg`` away (:func:`_loss_per_shell`): beyond it the reference has (nearly) no signal left against
    the noise, and scoring it costs time without changing the posterior (the last 1 % of the expected loss: within
    the tolerance of :func:`information_radius` at low SNR, a posterior about 0.5 % wider at high SNR). 0.99 rather
    than 0.999: the trilinear projector leaks about 0.5 % of a band-limited map's power into higher shells (a map
    low-passed to 8 px of 16: 98.8 % of the loss within 8 px, 99.5 % within 9, the rest spread to Nyquist).

    Binding for a band-limited reference: a map filtered to its resolution, or one Fourier-padded to a finer pixel
    (no power beyond its original Nyquist); at low SNR, where :func:`information_radius` reaches Nyquist because
    the loss never reaches its tolerance, it keeps the search from scoring empty shells (box 256, a map with
    power to 8.8 Å at 1.1 Å/px: 48 instead of 128 px, 7x fewer coefficients per projection). One more pixel than
    the shell that reaches ``fraction``; ``max_radius`` when the reference carries no information at all."""
    return _band_radius(np.cumsum(_loss_per_shell(prepared, noise, offset_deg, max_radius, n_samples, seed)),
                        fraction, max_radius)


def _band_radius(cumulative: np.ndarray, fraction: float, max_radius: float) -> float:
    """:func:`signal_radius` from the cumulative loss per shell."""
    if not cumulative[-1] > 0:
        return max_radius
    edge = int(np.argmax(cumulative >= fraction * cumulative[-1]))
    return min(max(edge + 1.0, 2.0), max_radius)
