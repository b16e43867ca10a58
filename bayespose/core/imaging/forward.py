"""Forward model of a particle image: projection (Fourier-slice theorem), shift, CTF.

Image i in Fourier space (the image formation model of RELION: Scheres (2012), "RELION: implementation of a
Bayesian approach to cryo-EM structure determination", J. Struct. Biol. 180, 519-530,
https://doi.org/10.1016/j.jsb.2012.09.006)::

    Y_i(k) = C_i(k) · S_{t_i}(k) · (P_{A_i} V)(k) + noise

Conventions (measured against ``relion_project`` in tests/relion/test_relion_convention.py):

* Volumes are indexed ``volume[z, y, x]`` (mrcfile order); images ``image[y, x]`` (row = y). The centre of a box of
  side ``D`` (even or odd) is pixel ``D // 2`` along every axis, RELION's origin.
* Poses are RELION matrices ``A`` (volume -> image coordinates, :mod:`.rotations`). The projection for pose ``A``
  samples the volume's 3D Fourier transform at ``A^T (kx, ky, 0)``. For ``A = I`` the image is the sum over z:
  ``image[y, x] = sum_z volume[z, y, x]``.
* Scale: a real-space projection is the line integral in pixel units (a sum of voxel values along the beam),
  like ``relion_project``. Fourier coefficients are unnormalised DFTs, i.e. exactly ``torch.fft.rfft2(image)``.
* Fourier layout of every ``*_rfft`` tensor here: ``(..., D, D // 2 + 1)`` complex64, not fftshifted, the layout
  of ``torch.fft.rfft2`` of a real-space image whose centre is pixel ``D // 2``.
* Shifts in px as ``(x, y)``. ``shift_fourier(F, s)`` moves the image content by ``+s`` (towards larger x / y
  index). RELION: a particle with origin ``o`` (``rlnOriginX/YAngst``, Å) is centred by shifting it by
  ``+o / pixel_size``; so the image of a pose with origin ``o`` is the centred projection shifted by
  ``-o / pixel_size`` (verified against ``relion_project`` and ASPIRE's RELION-made shifted stacks).
* CTF: :func:`bayespose.core.imaging.ctf.ctf_2d`, multiplied onto the shifted projection (RELION's order; they commute).
* Frequencies beyond the Nyquist circle (``kx² + ky² > (D // 2)²`` in Fourier pixels) are zero, as in RELION's
  projector; ``max_radius`` lowers that cut-off.

Implementation: the volume is zero-padded to an even size ``P >= pad_factor · D`` (centre kept at ``P // 2``),
divided by RELION's radial sinc² gridding correction for trilinear interpolation, and Fourier transformed once
(:func:`prepare_volume`). Slices are sampled with trilinear interpolation (:func:`sample_trilinear`: the values of
``torch_image_interpolation``'s sampler, which torch-fourier-slice uses, 1.75x faster) directly at the ``D``-grid
frequencies of the image, so no padded 2D slice is made. On a CPU the same arithmetic runs as one compiled loop
(:mod:`._slice_kernel`, numba: 13 instead of 75 ns per coefficient at box 64 on 2 cores,
benchmarks/projection_speed.py); the torch operations serve GPUs and autograd. torch-fourier-slice's own
``extract_central_slices_rfft_3d`` samples at the padded grid (4x more points for ``pad_factor = 2``) and maps
frequencies to array coordinates half a voxel off for odd padded sizes (its ``project_3d_to_2d`` of a 33 px blob
volume correlates 0.993 with the exact projection, this module 0.9999); tests/core/imaging/test_forward.py checks
this module against its ``project_3d_to_2d`` for an even box.

Odd boxes: bayespose keeps RELION's documented centre ``D // 2``. ``relion_project`` (RELION assumes even boxes)
writes odd-box projections centred at ``D // 2 + 1``, i.e. ours rolled by +1 px in x and y
(tests/relion/test_relion_convention.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch_fourier_shift import fourier_shift_dft_2d

from bayespose.core.imaging import _slice_kernel
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.particles import CTFParams

__all__ = [
    "PreparedVolume",
    "prepare_volume",
    "prepared_for",
    "project_fourier",
    "slice_coefficients",
    "sample_trilinear",
    "shift_fourier",
    "apply_ctf",
    "to_real",
    "project",
    "GRID_CORRECTIONS",
]

GRID_CORRECTIONS = ("radial", "separable", "none")


@dataclass
class PreparedVolume:
    """The padded, grid-corrected 3D DFT of a volume, ready for central-slice extraction.

    ``data``: complex64 (P + 1, P + 1, P // 2 + 1), the rfft of the padded volume with its centre moved to the
    array origin, fftshifted along z and y (frequency ``j`` at index ``j + P // 2``, ``j`` in ``[-P/2, P/2]``; the
    Nyquist plane appears at both ends so that interpolation up to ``+P/2`` stays inside the array). Frequency
    indices are in units of ``1 / P`` cycles per voxel. ``box`` (D) is the side of the original volume.
    ``derived``: quantities computed from this map once for every search that shares it (the searches' expected
    loss per shell, :mod:`bayespose.core.assign.noise_model`), by key; the map's data are not to change.
    """

    data: torch.Tensor
    box: int
    padded_size: int
    grid_correction: str
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def pad_factor(self) -> float:
        return self.padded_size / self.box

    def to(self, device: torch.device | str) -> PreparedVolume:
        """A copy on another device."""
        return PreparedVolume(self.data.to(device), self.box, self.padded_size, self.grid_correction)


def _as_volume_tensor(volume, device) -> torch.Tensor:
    if isinstance(volume, torch.Tensor):
        vol = volume.detach().to(device=device, dtype=torch.float32)
    else:
        vol = torch.from_numpy(np.array(volume, dtype=np.float32)).to(device)  # a copy: inputs may be read-only
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cubic 3D array (D, D, D), got shape {tuple(vol.shape)}")
    if vol.shape[0] < 4:
        raise ValueError(f"volume is too small ({vol.shape[0]} px)")
    if not torch.isfinite(vol).all():
        raise ValueError("volume contains NaN or infinite values")
    return vol


def _centred_coordinate(n: int, device) -> torch.Tensor:
    """Voxel coordinates ``i - n // 2`` of an axis of length n (centre at n // 2)."""
    return torch.arange(n, device=device, dtype=torch.float32) - (n // 2)


def gridding_correction(size: int, padded: int, kind: str, device) -> torch.Tensor:
    """Fourier transform of the trilinear interpolation kernel on a (size³) box, to divide a volume by.

    Coordinates ``(i - size // 2) / padded`` (``padded``: the side of the grid that is interpolated; ``size`` =
    ``padded`` before projection, the cropped map side after reconstruction). ``radial``: RELION's
    ``Projector::griddingCorrect``: ``sinc²(r)`` with ``r`` the distance to the centre. ``separable``:
    torch-fourier-slice's ``sinc²(x) sinc²(y) sinc²(z)`` (exact for trilinear). ``none``: 1.
    """
    c = _centred_coordinate(size, device) / padded
    if kind == "radial":
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        return torch.sinc(r) ** 2
    if kind == "separable":
        s = torch.sinc(c) ** 2
        return s[:, None, None] * s[None, :, None] * s[None, None, :]
    return torch.ones((), device=device)


def prepare_volume(volume, pad_factor: float = 2.0, grid_correction: str = "radial",
                   device: torch.device | str | None = None) -> PreparedVolume:
    """Pad, grid-correct and Fourier transform a cubic volume (D, D, D), indexed ``[z, y, x]``, centre ``D // 2``.

    ``pad_factor`` >= 1: the padded side is the smallest even ``P >= pad_factor · D``. ``grid_correction``:
    ``"radial"`` (RELION's, the default: best match to ``relion_project``), ``"separable"`` (torch-fourier-slice's)
    or ``"none"``. Memory: (P + 1)² (P / 2 + 1) complex64 values (0.54 GB for D = 256, pad 2); the peak while
    preparing is about twice that (the padded volume and its transform; 2.6 GB before it was built in place).

    Measured against ``relion_project`` (3J9G map, 64 px, 8 random poses, no CTF; min per-image Pearson r,
    least-squares scale RELION/ours): radial 0.99994, 0.9999; separable 0.99994, 1.0002; none 0.99906, 1.092.
    Against exact line integrals of a smooth 32 px volume the corrections halve the error (rms 1.8 % vs 3.6 %),
    but over-correct samples that fall on the grid (the DC term, and everything at A = I): totals a few % high,
    exactly as relion_project.
    """
    if grid_correction not in GRID_CORRECTIONS:
        raise ValueError(f"grid_correction must be one of {GRID_CORRECTIONS}, got {grid_correction!r}")
    if not pad_factor >= 1.0:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    device = torch.device("cpu") if device is None else torch.device(device)
    vol = _as_volume_tensor(volume, device)
    d = vol.shape[0]
    p = 2 * math.ceil(pad_factor * d / 2)
    if grid_correction != "none":  # the correction at the volume's voxels only (zero padding stays zero)
        vol = vol / gridding_correction(d, p, grid_correction, device)
    # zero-padded to P with the centre voxel d // 2 at the array origin (= ifftshift of the volume padded around
    # P // 2), built in place: one P³ array, not the padded copy, its shifted copy and the correction's
    padded = torch.zeros((p, p, p), dtype=torch.float32, device=device)
    parts = [(slice(d // 2, d), slice(0, d - d // 2)), (slice(0, d // 2), slice(p - d // 2, p))]  # (source, dest)
    for sz, dz in parts:
        for sy, dy in parts:
            for sx, dx in parts:
                padded[dz, dy, dx] = vol[sz, sy, sx]
    dft = torch.fft.rfftn(padded, dim=(-3, -2, -1)).to(torch.complex64)
    del padded
    # z, y fftshifted (frequency j at index j + P // 2, j in [-P/2, P/2 - 1]) and the +P/2 planes (= -P/2, periodic
    # DFT) at index P, copied into the final array block by block
    h = p // 2
    data = torch.empty((p + 1, p + 1, p // 2 + 1), dtype=torch.complex64, device=device)
    for src_z, dst_z in ((slice(h, p), slice(0, h)), (slice(0, h), slice(h, p))):
        for src_y, dst_y in ((slice(h, p), slice(0, h)), (slice(0, h), slice(h, p))):
            data[dst_z, dst_y] = dft[src_z, src_y]
    del dft
    data[p, :p] = data[0, :p]
    data[:, p] = data[:, 0]
    return PreparedVolume(data, d, p, grid_correction)


def prepared_for(volume, box: int, device: torch.device | str) -> PreparedVolume:
    """``volume`` ready to slice on ``device``: a (box, box, box) map is prepared (:func:`prepare_volume`, its
    defaults); a :class:`PreparedVolume` of that box is used as it is (moved when on another kind of device), so
    that several searches of one map prepare it once (at box 256 about 1 s and 1 GB each). ``ValueError`` when
    the box differs."""
    if isinstance(volume, PreparedVolume):
        if volume.box != box:
            raise ValueError(f"map box {volume.box} does not match the particle box {box} px")
        return volume if volume.device.type == torch.device(device).type else volume.to(device)
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != (box,) * 3:
        raise ValueError(f"map box {volume.shape} does not match the particle box {box} px")
    return prepare_volume(volume, device=device)


def _rfft_grid(box: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed frequency indices (Fourier pixels) of the rfft2 layout: ky (box, 1) and kx (1, box // 2 + 1)."""
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=device).round()[:, None]
    kx = torch.arange(box // 2 + 1, device=device, dtype=torch.float32)[None, :]
    return ky.to(torch.float32), kx


def _as_rotations(rotations, device) -> torch.Tensor:
    rot = torch.as_tensor(rotations, dtype=torch.float32, device=device) if not isinstance(rotations, torch.Tensor) \
        else rotations.to(device=device, dtype=torch.float32)
    if rot.ndim == 2:
        rot = rot[None]
    if rot.ndim != 3 or rot.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (N, 3, 3), got {tuple(rot.shape)}")
    return rot


def sample_trilinear(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of ``grid`` (Z, Y, X), real or complex, at array coordinates ``coords`` (..., 3)
    = (z, y, x); 0 outside ``[0, Z - 1] x [0, Y - 1] x [0, X - 1]``.

    The same values as ``torch_image_interpolation.sample_image_3d(grid, coords, "trilinear")`` (grid_sample with
    ``align_corners=True`` and zero padding; tests/core/imaging/test_forward.py) by eight flat-index gathers: 1.75x
    faster on CPU (measured on 2 cores: 57 vs 99 ns per sample for 2000 slices of 1562 coefficients, P = 128), and
    the central slices are most of the refinement levels' cost.
    """
    sz, sy, sx = grid.shape
    flat = grid.reshape(-1)
    upper = torch.tensor([sz - 2, sy - 2, sx - 2], device=coords.device)
    inside = ((coords >= 0) & (coords <= upper + 1)).all(dim=-1)
    i0 = torch.minimum(torch.floor(coords).to(torch.int64).clamp_(min=0), upper)  # a coordinate on the last
    frac = coords - i0  # plane is taken as "plane - 1" with weight 1 on the last one
    rest = 1.0 - frac
    base = (i0[..., 0] * sy + i0[..., 1]) * sx + i0[..., 2]
    out = None
    for dz in (0, 1):
        wz = frac[..., 0] if dz else rest[..., 0]
        for dy in (0, 1):
            wzy = wz * (frac[..., 1] if dy else rest[..., 1])
            index = base + (dz * sy + dy) * sx
            term = (flat[index] * rest[..., 2] + flat[index + 1] * frac[..., 2]) * wzy
            out = term if out is None else out + term
    return out if bool(inside.all()) else out * inside


def slice_coefficients(prepared: PreparedVolume, rotations, kx: torch.Tensor, ky: torch.Tensor,
                       compiled: bool | None = None) -> torch.Tensor:
    """Central-slice coefficients at chosen frequencies: complex64 (N, M) for RELION poses ``A`` (N, 3, 3).

    ``kx``, ``ky``: (M,) frequency indices in Fourier pixels of the D-box (any sign). Entry ``[n, m]`` equals
    ``torch.fft.rfft2(projection_n)`` at frequency (ky[m], kx[m]), including the phase that puts the projection's
    centre at pixel D // 2. The scoring engine uses this to sample only the coefficients it scores.

    ``compiled``: sample with the compiled CPU loop (:mod:`._slice_kernel`, numba; the same values to float32
    rounding, 10-20x faster on a CPU) or with torch operations (any device, differentiable). None (default): the
    compiled loop for a CPU volume when nothing needs gradients.
    """
    d, p = prepared.box, prepared.padded_size
    device = prepared.device
    rot = _as_rotations(rotations, device)
    kx = kx.to(device=device, dtype=torch.float32)
    ky = ky.to(device=device, dtype=torch.float32)
    c = d // 2  # exp(-2 pi i k · c / D): content from the array origin to pixel D // 2
    angle = (-2.0 * math.pi * c / d) * (kx + ky)
    if compiled is None:
        compiled = device.type == "cpu" and _slice_kernel.available() and not (
            torch.is_grad_enabled() and (prepared.data.requires_grad or rot.requires_grad))
    if compiled:
        if device.type != "cpu" or not _slice_kernel.available():
            raise ValueError("the compiled slice sampler needs a CPU volume and numba")
        phase = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        threads = torch.get_num_threads()
        out = _slice_kernel.sample_slices(torch.view_as_real(prepared.data.detach()).numpy(),
                                          rot.detach().contiguous().numpy(), kx.contiguous().numpy(),
                                          ky.contiguous().numpy(), p / d, p // 2, phase.numpy(), threads)
        if torch.get_num_threads() != threads:
            # numba's OpenMP pool shares torch's runtime: launching it sets the thread count to numba's (all cores),
            # which would override a caller's --threads 1 for the rest of the run
            torch.set_num_threads(threads)
        return torch.view_as_complex(torch.from_numpy(out).view(len(out), -1, 2))
    # A^T (kx, ky, 0) = kx * A[0, :] + ky * A[1, :], in Fourier pixels of the padded grid
    scale = p / d
    xyz = (kx[None, :, None] * rot[:, None, 0, :] + ky[None, :, None] * rot[:, None, 1, :]) * scale
    conj = xyz[..., 0] < 0  # the rfft stores x >= 0 only: use F(-k) = conj(F(k))
    xyz = torch.where(conj[..., None], -xyz, xyz)
    coords = torch.stack([xyz[..., 2] + p // 2, xyz[..., 1] + p // 2, xyz[..., 0]], dim=-1)  # zyx array coords
    samples = sample_trilinear(prepared.data, coords)  # (N, M) complex
    samples = torch.where(conj, samples.conj(), samples).to(torch.complex64)
    return samples * torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def project_fourier(prepared: PreparedVolume, rotations, max_radius: float | None = None) -> torch.Tensor:
    """Central slices of ``prepared`` for RELION poses ``A``: complex64 (N, D, D // 2 + 1), ``rfft2`` layout.

    ``rotations``: (N, 3, 3) RELION matrices (numpy or torch; computed in float32 on ``prepared.device``).
    ``max_radius``: cut-off in Fourier pixels (frequency index of the D-box); default ``D // 2`` (Nyquist circle,
    as RELION). Coefficients outside are zero. The result equals ``torch.fft.rfft2`` of the real-space
    projection (line integral in pixel units, centre at pixel D // 2). Memory ~ 40 bytes · N · D² / 2: batch N.
    """
    d = prepared.box
    device = prepared.device
    rot = _as_rotations(rotations, device)
    r_max = float(d // 2) if max_radius is None else float(max_radius)
    if r_max < 0:
        raise ValueError(f"max_radius must be >= 0, got {max_radius}")
    ky, kx = _rfft_grid(d, device)
    ky, kx = torch.broadcast_tensors(ky, kx)
    mask = kx ** 2 + ky ** 2 <= r_max ** 2
    out = torch.zeros((rot.shape[0], d, d // 2 + 1), dtype=torch.complex64, device=device)
    out[:, mask] = slice_coefficients(prepared, rot, kx[mask], ky[mask])
    return out


def shift_fourier(images_rfft: torch.Tensor, shifts_px) -> torch.Tensor:
    """Shift images given as rfft2 (..., D, D // 2 + 1) by ``shifts_px`` (..., 2) = (x, y) px (content moves +s).

    Sub-pixel shifts are exact Fourier phase ramps (periodic boundary); an integer shift equals ``np.roll``.
    """
    if images_rfft.ndim < 2 or images_rfft.shape[-1] != images_rfft.shape[-2] // 2 + 1:
        raise ValueError(f"images_rfft must have shape (..., D, D // 2 + 1), got {tuple(images_rfft.shape)}")
    box = images_rfft.shape[-2]
    shifts = torch.as_tensor(shifts_px, dtype=torch.float32, device=images_rfft.device)
    if shifts.shape[-1] != 2:
        raise ValueError(f"shifts must have shape (..., 2) as (x, y), got {tuple(shifts.shape)}")
    return fourier_shift_dft_2d(images_rfft, image_shape=(box, box), shifts=torch.flip(shifts, dims=(-1,)),
                                rfft=True, fftshifted=False)


def apply_ctf(images_rfft: torch.Tensor, ctf: CTFParams | torch.Tensor, pixel_size: float | None = None
              ) -> torch.Tensor:
    """Multiply rfft2 images (N, D, D // 2 + 1) by their CTFs.

    ``ctf``: a CTFParams with N entries (then ``pixel_size`` in Å/px is required) or precomputed CTF values
    broadcastable to the images (e.g. from :func:`bayespose.core.imaging.ctf.ctf_2d`).
    """
    if isinstance(ctf, CTFParams):
        if pixel_size is None:
            raise ValueError("apply_ctf needs pixel_size (Å/px) when given CTFParams")
        if len(ctf) != images_rfft.shape[0]:
            raise ValueError(f"{len(ctf)} CTFs for {images_rfft.shape[0]} images")
        values = ctf_2d(ctf, pixel_size, images_rfft.shape[-2], rfft=True, device=images_rfft.device)
    else:
        values = torch.as_tensor(ctf, device=images_rfft.device)
    return images_rfft * values


def to_real(images_rfft: torch.Tensor) -> torch.Tensor:
    """Inverse of ``torch.fft.rfft2`` for square images: (..., D, D // 2 + 1) -> real (..., D, D) float32."""
    box = images_rfft.shape[-2]
    return torch.fft.irfft2(images_rfft, s=(box, box)).to(torch.float32)


def project(volume, rotations, origins_A=None, pixel_size: float | None = None, ctf: CTFParams | None = None,
            pad_factor: float = 2.0, max_radius: float | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Real-space particle images (N, D, D) float32 of a volume (numpy/torch (D, D, D) or a PreparedVolume).

    What ``relion_project --ang poses.star [--ctf]`` writes for the same poses: ``rotations`` (N, 3, 3) RELION
    ``A``; ``origins_A`` (N, 2) ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å or None (the image is the centred
    projection shifted by ``-origin / pixel_size`` px); ``ctf`` (N entries) or None. ``pixel_size`` (Å/px) is
    required with origins or a CTF. Batch large N at the caller (memory ~ 40 bytes · N · D²).
    """
    if isinstance(volume, PreparedVolume):
        prepared = volume if device is None else volume.to(device)
    else:
        prepared = prepare_volume(volume, pad_factor=pad_factor, device=device)
    images = project_fourier(prepared, rotations, max_radius=max_radius)
    n = images.shape[0]
    if (origins_A is not None or ctf is not None) and not (pixel_size is not None and pixel_size > 0):
        raise ValueError("project needs a positive pixel_size (Å/px) with origins or a CTF")
    if origins_A is not None:
        origins = torch.as_tensor(np.asarray(origins_A, dtype=np.float64) / pixel_size, dtype=torch.float32,
                                  device=prepared.device).reshape(-1, 2)
        if origins.shape[0] != n:
            raise ValueError(f"{origins.shape[0]} origins for {n} rotations")
        images = shift_fourier(images, -origins)
    if ctf is not None:
        images = apply_ctf(images, ctf, pixel_size)
    return to_real(images)
