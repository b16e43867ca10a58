"""Network inputs and training targets for deep pose prediction: preprocessing, augmentation, symmetry targets.

Conventions (the rest of bayespose's, :mod:`bayespose.core.geometry.rotations` /
:mod:`bayespose.core.imaging.particles`):

* Images are ``image[y, x]`` (row = y, column = x) with the centre at pixel ``D // 2``; poses are RELION ``A``
  matrices (volume -> image coordinates); origins ``rlnOriginX/YAngst`` in Å.
* **The network predicts the rotation only.** Images are centred by their known origins (shifted by
  ``+origin / pixel_size`` px, RELION's centring) before anything else, at training and at prediction time; a
  particle set without origins is used as it is. Small random shifts in training make the network tolerate the
  residual centring error of real data.

Preprocessing (:func:`preprocess_images`), per image, in this order: centre by the origin (Fourier phase ramp);
optional phase flip (multiply the transform by the sign of the particle's CTF,
:func:`bayespose.core.imaging.ctf.ctf_2d`);
Fourier crop (or pad) from the particle box D to ``net_box`` (pixel size becomes ``pixel_size * D / net_box``);
normalise with the background outside the inscribed circle (mean 0, std 1 there); multiply by a soft circular
mask (radius ``net_box / 2``, cosine edge) so that in-plane rotations do not move the box corners into the
particle.

In-plane augmentation (:func:`rotate_shift_images`): ``image'(p) = image(Rz(a)^T (p - t))`` for pixel position
``p = (x, y)`` from the centre, i.e. the content is turned by ``a`` degrees from +x towards +y and then moved by
``t`` px. Then the pose of the new image is ``Rz(a) @ A`` with ``Rz(a) = [[cos a, -sin a, 0], [sin a, cos a, 0],
[0, 0, 1]]`` (:func:`inplane_rotation_matrix`): ``image(R^T p) = ∫ V(A^T Rz^T (p, z)) dz``. Checked against real
projections of the fragment map in tests/core/deep/test_deep_data.py.

Symmetry (:func:`grid_targets`, :func:`symmetry_quaternions`): all mates ``A @ L_g`` (``core.symmetry``, mates on
the right) are correct labels and share the target mass equally.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, CtfCorrection
from bayespose.core.geometry.rotations import matrix_to_quaternion
from bayespose.core.geometry.symmetry import symmetry_group
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import shift_fourier
from bayespose.core.imaging.particles import ParticleSet

__all__ = ["preprocess_images", "network_input_batches", "read_network_inputs", "fourier_resize",
           "normalise_background", "circular_mask", "augment_inputs", "rotate_shift_images",
           "inplane_rotation_matrix", "grid_targets", "symmetry_quaternions"]

def fourier_resize(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """Fourier crop (or zero-pad) real images (N, D, D) to (N, new_box, new_box), keeping the centre D // 2.

    The kept coefficients are the low frequencies ``|kx|, |ky| < min(D, new_box) / 2`` of ``rfft2``; values are
    rescaled by ``(new_box / D)²`` so that pixel values keep their meaning (a constant image stays constant).
    """
    n, d, _ = images.shape
    if new_box == d:
        return images
    if new_box < 2:
        raise ValueError(f"network box must be >= 2 px, got {new_box}")
    f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))  # centre D//2 -> origin
    m = min(d, new_box)
    half = m // 2
    out = torch.zeros((n, new_box, new_box // 2 + 1), dtype=f.dtype, device=f.device)
    rows = torch.cat([torch.arange(0, m - half), torch.arange(-half, 0)])
    out[:, rows, : half + 1] = f[:, rows, : half + 1]
    real = torch.fft.irfft2(out, s=(new_box, new_box)) * (new_box / d) ** 2
    return torch.fft.fftshift(real, dim=(-2, -1)).to(torch.float32)


def circular_mask(box: int, radius: float | None = None, edge: float = 2.0, device=None) -> torch.Tensor:
    """Soft circular mask (box, box) centred on pixel box // 2: 1 inside ``radius - edge`` px, cosine to 0 at
    ``radius`` (default box / 2)."""
    radius = box / 2.0 if radius is None else float(radius)
    c = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    t = ((r - (radius - edge)) / max(edge, 1e-6)).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def normalise_background(images: torch.Tensor, radius: float | None = None) -> torch.Tensor:
    """Per image: subtract the mean and divide by the std of the pixels outside the circle of ``radius`` px
    (default box / 2, the inscribed circle) -> background mean 0, std 1."""
    box = images.shape[-1]
    radius = box / 2.0 if radius is None else radius
    c = torch.arange(box, device=images.device) - box // 2
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > radius ** 2
    if outside.sum() < 8:
        raise ValueError(f"too few background pixels outside radius {radius} px in a {box} px box")
    bg = images[:, outside]
    mean = bg.mean(1)
    std = bg.std(1).clamp_min(1e-8)
    return (images - mean[:, None, None]) / std[:, None, None]


def preprocess_images(images: np.ndarray | torch.Tensor, particles: ParticleSet, index: np.ndarray | None,
                      net_box: int, ctf_correction: CtfCorrection = "phase_flip",
                      batch_size: int = 512, work_box: int | None = None) -> torch.Tensor:
    """Network inputs (N, net_box, net_box) float32 (CPU) from particle images (N, D, D) (see module doc).

    ``particles``: the set the images belong to; ``index`` (N,): which of its particles the images are (None:
    all). Centring uses ``particles.origins_A`` (Å) when present; phase flipping uses ``particles.ctf`` when
    ``ctf_correction == "phase_flip"`` (particles without CTF are left as they are).

    ``work_box`` (training, :func:`augment_inputs`): return instead the images Fourier-cropped to ``work_box``
    (``net_box <= work_box <= D``), normalised with the background mean and std of their ``net_box`` crop and not
    masked; then ``fourier_resize(x, net_box) * circular_mask(net_box)`` is the network input (the Fourier crop
    is linear and keeps constants), and in-plane turns interpolated at the finer ``work_box`` leave the frequencies
    the network sees nearly untouched.
    """
    if ctf_correction not in CTF_CORRECTIONS:
        raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {ctf_correction!r}")
    index = np.arange(len(particles)) if index is None else np.asarray(index)
    imgs = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must have shape (N, D, D), got {tuple(imgs.shape)}")
    if len(imgs) != len(index):
        raise ValueError(f"{len(imgs)} images for {len(index)} particles")
    if imgs.shape[-1] != particles.box:
        raise ValueError(f"images are {imgs.shape[-1]} px, the particle set says box = {particles.box}")
    size = net_box if work_box is None else work_box
    out = torch.empty((len(imgs), size, size), dtype=torch.float32)
    mask = circular_mask(net_box)
    for s in range(0, len(imgs), batch_size):
        sel = slice(s, s + batch_size)
        rows = index[sel]
        f = torch.fft.rfft2(imgs[sel])
        if particles.origins_A is not None:
            f = shift_fourier(f, torch.as_tensor(particles.origins_A[rows] / particles.pixel_size))
        if ctf_correction == "phase_flip" and particles.ctf is not None:
            f = f * torch.sign(ctf_2d(particles.ctf.subset(rows), particles.pixel_size, particles.box, rfft=True))
        real = torch.fft.irfft2(f, s=imgs.shape[-2:])
        if work_box is None:
            out[sel] = normalise_background(fourier_resize(real, net_box)) * mask
        else:
            out[sel] = _normalise_like(fourier_resize(real, work_box), net_box)
    return out


def network_input_batches(particles: ParticleSet, images: np.ndarray | None, net_box: int,
                          ctf_correction: CtfCorrection = "phase_flip", batch_size: int = 1024,
                          work_box: int | None = None) -> Iterator[torch.Tensor]:
    """The network inputs of ``particles`` batch by batch (B, n, n) float32, in order: their images (rows of
    ``images`` when in memory, else read from the stacks ``batch_size`` at a time) through
    :func:`preprocess_images` (``work_box``: at that box instead of ``net_box``). One batch of images is in memory
    at a time, never all of them (26 GB for 100,000 particles of 256 px)."""
    from bayespose.core.io.mrc import read_images

    for s in range(0, len(particles), batch_size):
        index = np.arange(s, min(s + batch_size, len(particles)))
        imgs = images[index] if images is not None else read_images(particles, index)
        yield preprocess_images(imgs, particles, index, net_box, ctf_correction, work_box=work_box)


def read_network_inputs(particles: ParticleSet, images: np.ndarray | None, net_box: int,
                        ctf_correction: CtfCorrection = "phase_flip", batch_size: int = 1024) -> torch.Tensor:
    """Network inputs (N, net_box, net_box) float32 of all ``particles`` (:func:`network_input_batches`). Memory:
    the inputs (4 · net_box² bytes per particle, 4 KB at net box 32) plus one batch of images."""
    parts = list(network_input_batches(particles, images, net_box, ctf_correction, batch_size))
    return torch.cat(parts) if parts else torch.zeros((0, net_box, net_box))


def _normalise_like(images: torch.Tensor, net_box: int) -> torch.Tensor:
    """Images (B, W, W) minus the background mean and divided by the background std of their ``net_box`` crop."""
    small = fourier_resize(images, net_box)
    c = torch.arange(net_box, device=images.device) - net_box // 2
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > (net_box / 2.0) ** 2
    bg = small[:, outside]
    return (images - bg.mean(1)[:, None, None]) / bg.std(1).clamp_min(1e-8)[:, None, None]


def augment_inputs(work_images: torch.Tensor, net_box: int, angle_deg=None, shift_px=None) -> torch.Tensor:
    """Network inputs (B, net_box, net_box) from ``work_box`` images of :func:`preprocess_images`: turned in-plane
    by ``angle_deg`` (B,) degrees and moved by ``shift_px`` (B, 2) px of the work box (:func:`rotate_shift_images`;
    None: not turned / not moved), Fourier-cropped to ``net_box`` and masked. Without a turn or shift this is
    exactly :func:`preprocess_images`'s input. The pose of a turned image is ``inplane_rotation_matrix(a) @ A``."""
    x = work_images
    if angle_deg is not None or shift_px is not None:
        x = rotate_shift_images(x, np.zeros(len(x)) if angle_deg is None else angle_deg, shift_px)
    return fourier_resize(x, net_box) * circular_mask(net_box, device=x.device)


def inplane_rotation_matrix(angle_deg: np.ndarray | float) -> np.ndarray:
    """``Rz(a)`` (..., 3, 3): rotation by ``a`` degrees about the image z axis, from +x towards +y.

    An image whose content is turned by ``a`` (:func:`rotate_shift_images`) has the pose ``Rz(a) @ A``.
    """
    a = np.radians(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1], out[..., 2, 2] = c, -s, s, c, 1.0
    return out


def rotate_shift_images(images: torch.Tensor, angle_deg, shift_px=None) -> torch.Tensor:
    """``image'(p) = image(Rz(a)^T (p - t))``: content turned by ``angle_deg`` (N,) degrees (+x towards +y) about
    pixel ``D // 2`` and moved by ``shift_px`` (N, 2) = (x, y) px; bilinear interpolation, zeros outside.

    The pose of the result is ``inplane_rotation_matrix(a) @ A`` (module doc).
    """
    n, d, _ = images.shape
    dev = images.device
    a = torch.as_tensor(np.radians(np.asarray(angle_deg, dtype=np.float64)), dtype=torch.float32,
                        device=dev).reshape(-1).expand(n)
    t = torch.zeros((n, 2), device=dev) if shift_px is None else torch.as_tensor(
        np.asarray(shift_px, dtype=np.float32), device=dev).reshape(n, 2)
    c = torch.arange(d, dtype=torch.float32, device=dev) - d // 2
    py, px = torch.meshgrid(c, c, indexing="ij")  # output pixel positions from the centre
    qx0 = px[None] - t[:, 0, None, None]
    qy0 = py[None] - t[:, 1, None, None]
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    qx = cos * qx0 + sin * qy0  # Rz(a)^T (p - t)
    qy = -sin * qx0 + cos * qy0
    # grid_sample (align_corners=False): pixel index i sits at normalised (2 i + 1) / d - 1
    gx = (2.0 * (qx + d // 2) + 1.0) / d - 1.0
    gy = (2.0 * (qy + d // 2) + 1.0) / d - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return torch.nn.functional.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[:, 0]


def grid_targets(rotations: np.ndarray, cell_index, n_cells: int, symmetry: str = "C1") -> torch.Tensor:
    """Soft cross-entropy targets (N, n_cells): the cells of all symmetry mates ``A @ L_g`` share mass 1.

    ``cell_index``: function (..., 3, 3) rotations -> (...) cell indices (e.g. ``GridPrior.cell_index``).
    Mates that fall in the same cell add up.
    """
    group = symmetry_group(symmetry)
    mates = np.einsum("nij,gjk->ngik", np.asarray(rotations, dtype=np.float64), group)
    cells = torch.as_tensor(cell_index(mates), dtype=torch.long)  # (N, G)
    target = torch.zeros((len(cells), n_cells))
    target.scatter_add_(1, cells, torch.full(cells.shape, 1.0 / len(group)))
    return target


def symmetry_quaternions(rotations: np.ndarray, symmetry: str = "C1") -> torch.Tensor:
    """Unit quaternions (w, x, y, z) of all mates ``A @ L_g``: (N, G, 4) float32 (the quaternion loss takes the
    best mate, 001 eq. 12)."""
    group = symmetry_group(symmetry)
    mates = np.einsum("nij,gjk->ngik", np.asarray(rotations, dtype=np.float64), group)
    return torch.as_tensor(matrix_to_quaternion(mates), dtype=torch.float32)
