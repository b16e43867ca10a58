"""Contrast transfer function on the Fourier grid of an image, in RELION's convention (computed by torch-ctf).

Units of the inputs (:class:`~bayespose.core.imaging.particles.CTFParams`): defocus U/V in Å (positive = underfocus),
astigmatism angle in degrees (``rlnDefocusAngle``), voltage in kV, spherical aberration in mm, amplitude contrast
as a fraction, phase shift in degrees. torch-ctf wants the mean defocus and the astigmatism half-difference in µm.

The value is RELION's ``CTF::getCTF`` (``-sin(chi)``, positive at zero frequency)::

    CTF(k) = sin(pi λ Δf(θ) |k|² - pi/2 Cs λ³ |k|⁴ + phase_shift + arctan(Q / sqrt(1 - Q²)))
    Δf(θ)  = (U + V)/2 + (U - V)/2 · cos(2 (θ - defocus_angle))

with ``|k|`` in 1/Å, ``θ`` the angle of the frequency vector measured from the +x axis (image column index) towards
+y (image row index), and λ the relativistic electron wavelength. So ``defocus_angle`` is the angle of the
defocus-U axis from the x axis, as RELION defines ``rlnDefocusAngle``. torch-ctf's docstring says its angle 0
puts U along y; its code (``apply_astigmatism_to_defocus``: unit vector ``yx = (sin a, cos a)``) puts it along x,
which is RELION's convention — measured in tests/core/imaging/test_forward.py (analytic formula) and
tests/relion/test_relion_convention.py (``relion_project --ctf``).

Layout: ``rfft=True`` returns the non-fftshifted half transform, shape (N, box, box // 2 + 1), the same layout as
``torch.fft.rfft2`` of a (box, box) image (row = ky, column = kx >= 0); ``rfft=False`` the full (N, box, box) grid
in ``torch.fft.fft2`` layout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_ctf import calculate_ctf_2d

from bayespose.core.imaging.particles import CTFParams

__all__ = ["ctf_2d", "electron_wavelength_A"]


def electron_wavelength_A(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (0.0197 Å at 300 kV)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def _as_torch(values: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)


def ctf_2d(ctf: CTFParams, pixel_size: float, box: int, rfft: bool = True,
           device: torch.device | str | None = None) -> torch.Tensor:
    """CTF of each particle on the Fourier grid of a (box, box) image; float32, shape (N, box, box // 2 + 1).

    Parameters
    ----------
    ctf: per-particle CTF parameters (Å, degrees, kV, mm, fraction, degrees), N entries.
    pixel_size: Å/px of the images.
    box: image side in px (even or odd).
    rfft: half transform (``torch.fft.rfft2`` layout) if True, else the full grid (``torch.fft.fft2`` layout),
        never fftshifted.
    device: torch device of the result (default CPU).
    """
    if not isinstance(ctf, CTFParams):
        raise ValueError(f"ctf must be a CTFParams, got {type(ctf).__name__}")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be positive (Å/px), got {pixel_size}")
    if int(box) != box or box < 2:
        raise ValueError(f"box must be an integer >= 2, got {box}")
    if len(ctf) == 0:
        raise ValueError("ctf has no particles")
    amp = np.asarray(ctf.amplitude_contrast)
    if np.any((amp < 0) | (amp >= 1)):
        raise ValueError("amplitude contrast must be a fraction in [0, 1)")
    if np.any(np.asarray(ctf.voltage) <= 0):
        raise ValueError("voltage must be positive (kV)")

    u = np.asarray(ctf.defocus_u, dtype=np.float64)
    v = np.asarray(ctf.defocus_v, dtype=np.float64)
    angle = np.asarray(ctf.defocus_angle, dtype=np.float64)
    # torch-ctf takes sqrt(astigmatism): it must be >= 0. With V > U the same CTF is U and V swapped and the
    # axis turned by 90 degrees.
    swap = v > u
    half_diff_um = np.abs(u - v) / 2.0 * 1e-4
    angle = np.where(swap, angle + 90.0, angle)
    mean_um = (u + v) / 2.0 * 1e-4

    device = torch.device("cpu") if device is None else torch.device(device)
    values = calculate_ctf_2d(
        defocus=_as_torch(mean_um, device),
        astigmatism=_as_torch(half_diff_um, device),
        astigmatism_angle=_as_torch(angle, device),
        voltage=_as_torch(ctf.voltage, device),
        spherical_aberration=_as_torch(ctf.cs, device),
        amplitude_contrast=_as_torch(ctf.amplitude_contrast, device),
        phase_shift=_as_torch(ctf.phase_shift, device),
        pixel_size=float(pixel_size),
        image_shape=(int(box), int(box)),
        rfft=rfft,
        fftshift=False,
    )
    return values.to(torch.float32).reshape(len(ctf), int(box), -1)
