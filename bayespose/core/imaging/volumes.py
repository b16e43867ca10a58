"""Map operations on (D, D, D) arrays indexed [z, y, x]: the asymmetric fragment of the demo map used for
pose-accuracy experiments, a soft spherical mask, a map's own envelope mask, solvent flattening (RELION's
``--flatten_solvent``) and the central sections of a map."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["asymmetric_fragment", "soft_sphere_mask", "envelope_mask", "flatten_solvent"]


def asymmetric_fragment(volume: np.ndarray, half_angle_deg: float = 60.0, edge_deg: float = 15.0) -> np.ndarray:
    """A wedge of a map around +x, recentred: breaks the (pseudo-)symmetry of ring-shaped complexes.

    The 3J9G demo map is an exact C2 ring with a strong pseudo-6-fold about z (a 60° turn correlates 0.94), so at
    low resolution its poses are ambiguous six ways and accuracy experiments would measure the ambiguity rather than
    the estimator. Keeping the density within ``±half_angle_deg`` of the +x azimuth (cosine edge of ``edge_deg``)
    leaves two adjacent subunits of the real complex, which have no rotational symmetry; the fragment is then
    moved (integer voxels) so that its centre of mass is at the box centre D // 2. Volume indexed [z, y, x].
    """
    volume = np.asarray(volume, dtype=np.float32)
    d = volume.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    azimuth = np.degrees(np.arctan2(y, x))
    t = np.clip((half_angle_deg + edge_deg - np.abs(azimuth)) / edge_deg, 0.0, 1.0)
    fragment = volume * (0.5 - 0.5 * np.cos(np.pi * t))
    mass = np.clip(fragment, 0.0, None)
    com = [float((mass * axis).sum() / mass.sum()) for axis in (z, y, x)]
    return np.roll(fragment, [-int(round(v)) for v in com], axis=(0, 1, 2)).astype(np.float32)


def soft_sphere_mask(box: int, radius_px: float, edge_px: float = 3.0) -> np.ndarray:
    """(D, D, D) float32 mask: 1 within ``radius_px`` of the centre voxel D // 2, raised-cosine edge of
    ``edge_px`` outside it, 0 beyond (RELION's ``--flatten_solvent`` sphere, edge width in px)."""
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    t = np.clip((r - radius_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def envelope_mask(volume: np.ndarray, pixel_size: float, lowpass_A: float = 15.0, threshold: float = 0.2,
                  near_A: float = 6.0, far_A: float = 14.0, inside: np.ndarray | None = None) -> np.ndarray:
    """(D, D, D) float32 soft mask of a map's own envelope (a dynamic solvent mask, as cryoSPARC's refinements
    make each iteration; the recipe of ``relion_mask_create --lowpass --ini_threshold --extend_inimask
    --width_soft_edge``): the map low-passed to ``lowpass_A`` Å, the voxels above ``threshold`` times its maximum
    (within the hard core of ``inside``), 1 up to ``near_A`` Å from them, a raised-cosine edge to 0 at ``far_A`` Å,
    then multiplied by ``inside`` (e.g. the solvent sphere; None: the whole box). A map with no positive density
    gives ``inside`` (or ones). ``pixel_size`` in Å/px; volume indexed [z, y, x]."""
    from bayespose.core.imaging.reconstruct import lowpass  # torch: only when masking

    if not 0 <= near_A < far_A:
        raise ValueError(f"need 0 <= near_A < far_A, got {near_A} and {far_A}")
    outer = np.ones(volume.shape, np.float32) if inside is None else np.asarray(inside, np.float32)
    smooth = lowpass(volume, lowpass_A, pixel_size).numpy() * (outer > 0.999)
    if not smooth.max() > 0:
        return outer
    distance_A = ndimage.distance_transform_edt(smooth <= threshold * smooth.max()) * pixel_size
    edge = np.clip((distance_A - near_A) / (far_A - near_A), 0.0, 1.0)
    return ((0.5 + 0.5 * np.cos(np.pi * edge)) * outer).astype(np.float32)


def flatten_solvent(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``volume · mask + b · (1 - mask)`` for a (D, D, D) map and a soft mask in [0, 1], ``b`` the mask-weighted
    mean of the volume outside (RELION's softMaskOutsideMap): the solvent is set to its average level, not to
    zero, so no step appears at the mask edge. Returns float32."""
    outside = 1.0 - mask
    b = float((volume * outside).sum() / max(outside.sum(), 1e-6))
    return (volume * mask + b * outside).astype(np.float32)


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three central sections of a map (Z, Y, X): ``(xy at z = Z // 2 (Y, X), xz at y = Y // 2 (Z, X),
    yz at x = X // 2 (Z, Y))``, views of ``volume``. Raises ``ValueError`` unless it is 3D."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"need a 3D map, got shape {v.shape}")
    cz, cy, cx = (s // 2 for s in v.shape)
    return v[cz], v[:, cy, :], v[:, :, cx]
