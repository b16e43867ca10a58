"""Fourier coefficients used for scoring, noise power per resolution shell, and the reference scale.

Units: Fourier coefficients are unnormalised DFTs (``torch.fft.rfft2`` of the image in its pixel units). White
real-space noise of variance ``s²`` has ``E|N(k)|² = D² s²`` at every frequency; the noise powers here are in those
units. Frequencies are in Fourier pixels of the D-box (cycles per box); resolution ``res_A`` corresponds to radius
``D · pixel_size / res_A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ScoringFrequencies:
    """The half-plane of rfft2 coefficients scored: ``0 < |k| <= radius``, ``kx > 0`` or (``kx == 0``, ``ky > 0``).

    Each selected coefficient stands for itself and its Hermitian mate, so real inner products over the full
    transform are ``2 · Σ_selected Re(conj(a) b)``. ``flat_index`` indexes the flattened (D, D // 2 + 1) rfft2
    layout; ``shell`` is ``round(|k|)``.
    """

    box: int
    radius: float
    kx: torch.Tensor  # (M,) float32
    ky: torch.Tensor  # (M,) float32
    flat_index: torch.Tensor  # (M,) int64
    shell: torch.Tensor  # (M,) int64

    def __len__(self) -> int:
        return len(self.kx)

    def select(self, images_rfft: torch.Tensor) -> torch.Tensor:
        """(..., D, D // 2 + 1) -> (..., M) selected coefficients."""
        return images_rfft.reshape(*images_rfft.shape[:-2], -1)[..., self.flat_index.to(images_rfft.device)]


def resolution_to_radius(box: int, pixel_size: float, max_resolution_A: float | None) -> float:
    """Fourier radius (px of the D-box) of a resolution in Å, capped below Nyquist (``D/2 - 0.5``)."""
    nyquist = box / 2 - 0.5
    if max_resolution_A is None or max_resolution_A <= 0:
        return nyquist
    if max_resolution_A < 2 * pixel_size:
        raise ValueError(f"maximum resolution {max_resolution_A} Å is beyond Nyquist ({2 * pixel_size:.2f} Å)")
    return min(box * pixel_size / max_resolution_A, nyquist)


def scoring_frequencies(box: int, radius: float) -> ScoringFrequencies:
    """The coefficients within ``radius`` (Fourier px) on the non-redundant half plane, DC excluded."""
    ky = torch.fft.fftfreq(box, d=1.0 / box).round()[:, None].expand(box, box // 2 + 1)
    kx = torch.arange(box // 2 + 1, dtype=torch.float32)[None, :].expand(box, box // 2 + 1)
    r = torch.sqrt(kx ** 2 + ky ** 2)
    keep = (r > 0) & (r <= radius) & ((kx > 0) | (ky > 0))
    flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
    return ScoringFrequencies(box, float(radius), kx.reshape(-1)[flat].float(), ky.reshape(-1)[flat].float(),
                              flat, r.reshape(-1)[flat].round().long())


def background_mask(box: int, radius_px: float | None = None) -> np.ndarray:
    """Boolean (D, D) mask of pixels farther than ``radius_px`` (default D/2) from the centre pixel D // 2."""
    radius_px = box / 2 if radius_px is None else radius_px
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > radius_px ** 2


def noise_power_from_background(images: np.ndarray, radius_px: float | None = None) -> np.ndarray:
    """Noise power per shell ``E|N(k)|²`` (index = round(|k|), length D // 2 + 1) from the particles' background.

    The pixels outside a circle of ``radius_px`` (default: the inscribed circle, radius D/2) hold noise only. The
    power spectrum of each masked background (its mean removed) divided by the masked fraction is an unbiased
    estimate of the noise power for white noise and a mask-smoothed one for coloured noise; it is averaged over
    images and over each shell.
    """
    images = np.asarray(images)
    box = images.shape[-1]
    return radial_average(background_power_sum(images, radius_px) / len(images), box)


def background_power_sum(images: np.ndarray, radius_px: float | None = None, batch_size: int = 128) -> np.ndarray:
    """Sum over ``images`` (N, D, D) of the power spectra (rfft2 layout (D, D // 2 + 1), float64) of their masked,
    mean-removed backgrounds divided by the masked fraction (see :func:`noise_power_from_background`), in batches
    of ``batch_size`` images (memory O(batch · D²), whatever N)."""
    box = images.shape[-1]
    mask = background_mask(box, radius_px)
    fraction = mask.mean()
    if fraction < 0.05:
        raise ValueError(f"the background outside radius {radius_px} px is only {fraction:.1%} of the box: give a "
                         "smaller particle diameter")
    m = torch.from_numpy(mask)
    total = np.zeros((box, box // 2 + 1))
    for s in range(0, len(images), batch_size):
        t = torch.from_numpy(np.asarray(images[s:s + batch_size], dtype=np.float32))
        background = torch.where(m, t - (t * m).sum((-2, -1), keepdim=True) / m.sum(), torch.zeros(()))
        total += (torch.fft.rfft2(background).abs() ** 2).sum(0).double().numpy() / fraction
    return total


def radial_average(values_rfft: np.ndarray, box: int) -> np.ndarray:
    """Average of an rfft2-layout array (D, D // 2 + 1) over shells round(|k|) = 0 .. D // 2."""
    ky = np.fft.fftfreq(box, d=1.0 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    shell = np.rint(np.sqrt(kx ** 2 + ky ** 2)).astype(int)
    n_shells = box // 2 + 1
    keep = shell < n_shells
    sums = np.bincount(shell[keep], weights=np.asarray(values_rfft)[keep], minlength=n_shells)
    counts = np.bincount(shell[keep], minlength=n_shells)
    return sums / np.maximum(counts, 1)


def reference_scale(data_power: np.ndarray, noise_power: np.ndarray, model_power: np.ndarray,
                    shells: np.ndarray) -> float:
    """Scale ``alpha`` of the reference such that ``E|Y|² = alpha² C² <|P|²> + sigma²`` (method of moments).

    ``data_power``: mean |Y(k)|² of the particles per shell; ``noise_power``: sigma² per shell; ``model_power``:
    mean over particles and uniform rotations of ``C² |P_R V|²`` per shell; ``shells``: the shell indices to use.
    ``alpha² = Σ (data - noise) / Σ model`` over those shells (count-weighted by the caller's averaging). Needs no
    pose, so it works before any search; a reference multiplied by c gives alpha / c and the same posterior.
    """
    signal = float(np.sum(data_power[shells] - noise_power[shells]))
    model = float(np.sum(model_power[shells]))
    if not model > 0:
        raise ValueError("the reference has no power in the scored frequency band")
    if not signal > 0:
        raise ValueError("no signal above the noise in the particles' power spectrum: check the particle images "
                         "(normalisation, box) or lower the maximum resolution")
    return math.sqrt(signal / model)
