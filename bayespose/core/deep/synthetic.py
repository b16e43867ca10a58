"""Training images from the map: unlimited synthetic projections that look like the particles at the network's
input ("train from the map").

Whoever trains a pose network has the consensus map of the particles. :class:`SyntheticProjections` renders, for
uniformly random rotations, the network input (:func:`bayespose.core.deep.data.preprocess_images`) of a particle
that the map would give under the particles' own imaging conditions:

* **CTF**: the CTF of a randomly drawn particle of the set (a pool of at most ``max_pool`` particles);
* **noise**: Gaussian with the particles' noise power per shell, estimated from their background exactly as the
  MMSE engine does (:func:`bayespose.core.assign.estimate_noise_model`: ``E|N(k)|²`` in unnormalised DFT units of
  the particle box), and the signal multiplied by the engine's reference scale ``alpha`` (method of moments), so the
  signal-to-noise ratio per frequency is the particles';
* **shifts**: the projection is moved by ``-o`` px for an origin ``o`` drawn from the particles' origins (their
  picking offsets; RELION: centring shifts by ``+o``), or, for particles without origins, uniformly within
  ``±fallback_shift_px`` px of the particle box in x and y;
* **normalisation**: the preprocessing of real particles (phase flip with the CTF's sign when
  ``ctf_correction == "phase_flip"``, Fourier crop to ``net_box``, background mean 0 / std 1, soft circular mask).

Only the coefficients the Fourier crop keeps are computed: the projection is sampled at the ``net_box`` rfft2
frequencies (:func:`~bayespose.core.imaging.forward.slice_coefficients`, which works in Fourier px of the particle
box D), the CTF is evaluated on the same frequencies (pixel size ``pixel_size · D / net_box``) and the noise is drawn
on them, so an image costs what a ``net_box`` image costs, whatever D. Frequencies beyond the particle box's Nyquist
circle carry no signal (the forward model's convention). :meth:`SyntheticProjections.render` without noise equals
Fourier-cropping the full simulated particle (tests/core/deep/test_deep_synthetic.py checks it against
:func:`~bayespose.core.imaging.simulate.simulate_images`).

Rotations are RELION ``A`` matrices (volume -> image); shifts (x, y) in px of the particle box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bayespose.core.deep.data import circular_mask, normalise_background
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, CtfCorrection
from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, prepare_volume, slice_coefficients
from bayespose.core.imaging.particles import ParticleSet

__all__ = ["SyntheticProjections"]

DEFAULT_POOL = 20_000  # particles whose CTFs and origins are drawn from


@dataclass
class SyntheticProjections:
    """A source of synthetic network inputs (module doc). Build it with :meth:`from_particles`.

    ``prepared``: the map (particle box D); ``net_box`` n; ``scale``: reference scale alpha; ``noise_amplitude``
    (n, n // 2 + 1): ``sqrt(E|N(k)|²) / n`` on the net-box rfft2 grid; ``ctfs`` (P, n, n // 2 + 1) or None: the
    pool's CTFs on that grid; ``shifts_px`` (S, 2) or None: the pool of shifts (px of the particle box) the
    projections are moved by (None: uniform within ``fallback_shift_px``).
    """

    prepared: PreparedVolume
    net_box: int
    scale: float
    noise_amplitude: torch.Tensor
    ctfs: torch.Tensor | None
    shifts_px: np.ndarray | None
    ctf_correction: CtfCorrection = "phase_flip"
    fallback_shift_px: float = 1.0

    def __post_init__(self):
        n, d = self.net_box, self.prepared.box
        dev = self.prepared.device
        ky = torch.fft.fftfreq(n, d=1.0 / n).round()[:, None].expand(n, n // 2 + 1)
        kx = torch.arange(n // 2 + 1, dtype=torch.float32)[None, :].expand(n, n // 2 + 1)
        self._inside = ((kx ** 2 + ky ** 2) <= (d // 2) ** 2).reshape(-1).to(dev)  # signal within D's Nyquist
        self._kx = kx.reshape(-1)[self._inside.cpu()].to(dev)
        self._ky = ky.reshape(-1)[self._inside.cpu()].to(dev)
        # slice_coefficients puts the centre at pixel D // 2 (phase over D); the n-box image has it at n // 2
        angle = 2.0 * math.pi * (self._kx + self._ky) * ((d // 2) / d - (n // 2) / n)
        self._recentre = torch.polar(torch.ones_like(angle), angle)
        self._mask = circular_mask(n, device=dev)

    @property
    def box(self) -> int:
        return self.prepared.box

    @property
    def device(self) -> torch.device:
        return self.prepared.device

    @classmethod
    def from_particles(cls, volume: np.ndarray | PreparedVolume, particles: ParticleSet, net_box: int,
                       ctf_correction: CtfCorrection = "phase_flip", images: np.ndarray | None = None,
                       noise=None, device=None, max_pool: int = DEFAULT_POOL, fallback_shift_px: float = 1.0,
                       seed: int = 0) -> SyntheticProjections:
        """The source for ``particles`` (their box, pixel size, CTFs, origins and background noise) and
        ``volume`` (D, D, D) at their pixel size.

        ``noise``: a :class:`~bayespose.core.assign.NoiseModel` (default: estimated from up to 1000 particles'
        images, ``images`` (N, D, D) when in memory, else read from the files). ``max_pool``: CTFs and origins of
        at most this many particles (seeded draw) are kept on ``device``. Poses are not needed (map-only training).
        """
        from bayespose.core.assign.noise_model import estimate_noise_model

        if ctf_correction not in CTF_CORRECTIONS:
            raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {ctf_correction!r}")
        d, n = particles.box, int(net_box)
        if not 8 <= n <= d:
            raise ValueError(f"net_box must be in [8, {d}] px (the particle box), got {n}")
        prepared = volume if isinstance(volume, PreparedVolume) else prepare_volume(
            np.asarray(volume, dtype=np.float32), device=device)
        if prepared.box != d:
            raise ValueError(f"map box {prepared.box} does not match the particle box {d} px")
        if noise is None:
            noise = estimate_noise_model(particles, prepared, d / 2 - 0.5, images, seed=seed)
        rng = np.random.default_rng(seed)
        pool = np.sort(rng.choice(len(particles), size=min(len(particles), max_pool), replace=False))
        dev = prepared.device
        ctfs = None
        if particles.ctf is not None:
            ctfs = ctf_2d(particles.ctf.subset(pool), particles.pixel_size * d / n, n, rfft=True, device=dev)
        shifts = None
        if particles.origins_px is not None and np.any(particles.origins_px != 0):
            shifts = -np.asarray(particles.origins_px[pool], dtype=np.float64)
        return cls(prepared=prepared, net_box=n, scale=float(noise.scale),
                   noise_amplitude=_noise_amplitude(noise.noise_power, n, dev), ctfs=ctfs, shifts_px=shifts,
                   ctf_correction=ctf_correction, fallback_shift_px=fallback_shift_px)

    def draw(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random imaging conditions of ``count`` images: uniform rotations (count, 3, 3), CTF pool indices
        (count,) and shifts (count, 2) px of the particle box."""
        rotations = random_rotations(count, rng)
        ctf_index = rng.integers(0, len(self.ctfs), count) if self.ctfs is not None else np.zeros(count, np.int64)
        if self.shifts_px is not None:
            shifts = self.shifts_px[rng.integers(0, len(self.shifts_px), count)]
        else:
            shifts = rng.uniform(-self.fallback_shift_px, self.fallback_shift_px, (count, 2))
        return rotations, ctf_index, shifts

    def render(self, rotations: np.ndarray, ctf_index: np.ndarray, shifts_px: np.ndarray,
               generator: torch.Generator | None = None, noise: bool = True, noise_scale: float = 1.0
               ) -> torch.Tensor:
        """Unnormalised net-box images (B, n, n) float32 on the device: the particle of pose ``rotations`` (B, 3, 3),
        CTF ``ctfs[ctf_index]`` and content moved by ``shifts_px`` (B, 2) px, plus noise (drawn with
        ``generator`` on the device; its amplitude times ``noise_scale``, 1 = the particles'), phase-flipped
        when configured, Fourier-cropped to ``net_box`` (values in the particle's pixel units, as
        :func:`~bayespose.core.deep.data.fourier_resize` keeps them)."""
        n, d, dev = self.net_box, self.box, self.device
        b = len(rotations)
        coeff = slice_coefficients(self.prepared, rotations, self._kx, self._ky) * self._recentre  # (B, M)
        shifts = torch.as_tensor(np.asarray(shifts_px, dtype=np.float32), device=dev).reshape(b, 2)
        angle = (-2.0 * math.pi / d) * (shifts[:, :1] * self._kx + shifts[:, 1:] * self._ky)
        coeff = coeff * torch.polar(torch.ones_like(angle), angle) * self.scale
        full = torch.zeros((b, n * (n // 2 + 1)), dtype=torch.complex64, device=dev)
        full[:, self._inside] = coeff
        full = full.view(b, n, n // 2 + 1)
        ctf = None
        if self.ctfs is not None:
            ctf = self.ctfs[torch.as_tensor(np.asarray(ctf_index), device=dev)]
            full = full * ctf
        if noise:
            white = torch.randn((b, n, n), generator=generator, device=dev)
            full = full + torch.fft.rfft2(white) * (self.noise_amplitude * noise_scale)
        if ctf is not None and self.ctf_correction == "phase_flip":
            full = full * torch.sign(ctf)
        return torch.fft.irfft2(full, s=(n, n)) * (n / d) ** 2

    def sample(self, count: int, rng: np.random.Generator,
               generator: torch.Generator | None = None, noise_scale: float = 1.0
               ) -> tuple[torch.Tensor, np.ndarray]:
        """``count`` network inputs (count, n, n) float32 on the device (background-normalised and masked like
        :func:`~bayespose.core.deep.data.preprocess_images`) and their RELION rotations (count, 3, 3);
        ``noise_scale`` multiplies the noise amplitude (:meth:`render`)."""
        rotations, ctf_index, shifts = self.draw(count, rng)
        images = self.render(rotations, ctf_index, shifts, generator, noise_scale=noise_scale)
        return normalise_background(images) * self._mask, rotations


def _noise_amplitude(noise_power: np.ndarray, n: int, device) -> torch.Tensor:
    """``sqrt(E|N(k)|²) / n`` (n, n // 2 + 1) on the net-box rfft2 grid, the power taken at shell round(|k|) of
    the particle box (clipped to the last shell): ``rfft2`` of unit white noise times it has that power."""
    power = np.asarray(noise_power, dtype=np.float64)
    ky = np.fft.fftfreq(n, d=1.0 / n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    shell = np.minimum(np.rint(np.sqrt(kx ** 2 + ky ** 2)).astype(int), len(power) - 1)
    return torch.as_tensor(np.sqrt(np.maximum(power[shell], 0.0)) / n, dtype=torch.float32, device=device)
