"""Simulated particle images with known poses: projection, shift, CTF (:mod:`.forward`) and white Gaussian noise.

SNR definition used throughout bayespose: ``SNR = signal variance / noise variance``, where the signal variance is
the **mean over the set of the per-image variances** of the clean images (each image's variance over its whole
box, in real space), and the noise is i.i.d. Gaussian per pixel with variance ``sigma²``. Hence
``sigma = sqrt(mean_i var(clean_i) / SNR)``, one sigma for the whole set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bayespose.core.imaging.forward import prepare_volume, project
from bayespose.core.imaging.particles import CTFParams

__all__ = ["add_white_noise", "signal_variance", "simulate_images"]


def signal_variance(images: np.ndarray) -> float:
    """Mean over the images (N, D, D) of each image's variance over its whole box."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, D, D), got {images.shape}")
    return float(np.mean(np.var(images.reshape(len(images), -1).astype(np.float64), axis=1)))


def add_white_noise(images: np.ndarray, snr: float, rng: np.random.Generator | int | None = None
                    ) -> tuple[np.ndarray, float]:
    """Add i.i.d. Gaussian noise at ``snr`` (signal variance / noise variance, see module doc) to images (N, D, D).

    Returns ``(noisy float32, sigma)`` with ``sigma`` the noise standard deviation (image units).
    """
    if not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a positive number, got {snr}")
    rng = np.random.default_rng(rng)
    images = np.asarray(images, dtype=np.float32)
    sigma = float(np.sqrt(signal_variance(images) / snr))
    noisy = images + rng.standard_normal(images.shape, dtype=np.float32) * np.float32(sigma)
    return noisy, sigma


def simulate_images(volume: np.ndarray, pixel_size: float, rotations: np.ndarray,
                    origins_A: np.ndarray | None = None, ctf: CTFParams | None = None, snr: float | None = None,
                    seed: int | None = None, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None,
                    device: torch.device | str | None = None) -> tuple[np.ndarray, float]:
    """Particle images of ``volume`` (D, D, D) for known poses; float32 (N, D, D) and the noise sigma (0 if none).

    ``pixel_size`` Å/px; ``rotations`` (N, 3, 3) RELION ``A``; ``origins_A`` (N, 2) rlnOriginX/YAngst in Å (the
    image is the centred projection shifted by ``-origin / pixel_size``); ``ctf`` with N entries or None;
    ``snr`` as defined in the module doc (None: clean images). Images are rendered ``batch_size`` at a time;
    ``progress(done, total)`` is called after each batch. Same result as ``relion_project --ctf`` plus noise.
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (N, 3, 3), got {rotations.shape}")
    n = len(rotations)
    if origins_A is not None:
        origins_A = np.asarray(origins_A, dtype=np.float64).reshape(-1, 2)
        if len(origins_A) != n:
            raise ValueError(f"{len(origins_A)} origins for {n} rotations")
    if ctf is not None and len(ctf) != n:
        raise ValueError(f"{len(ctf)} CTFs for {n} rotations")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be positive (Å/px), got {pixel_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a positive number or None, got {snr}")

    prepared = prepare_volume(volume, device=device)
    box = prepared.box
    images = np.empty((n, box, box), dtype=np.float32)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch = project(prepared, rotations[sl], None if origins_A is None else origins_A[sl], pixel_size,
                        None if ctf is None else ctf.subset(sl))
        images[sl] = batch.cpu().numpy()
        if progress is not None:
            progress(sl.stop, n)
    if snr is None:
        return images, 0.0
    return add_white_noise(images, snr, np.random.default_rng(seed))
