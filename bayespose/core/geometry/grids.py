"""Grids on SO(3) with quadrature weights for the Haar measure (section 3.1 of Xu, Balanov, Singer & Bendory (2026),
"Bayesian perspective for orientation determination in cryo-EM with application to structural heterogeneity
analysis", Acta Cryst. D 82, https://journals.iucr.org/d/issues/2026/04/00/bar5003/, arXiv:2412.03723).

Every grid is a set of RELION pose matrices ``A`` (volume -> image coordinates, see ``rotations.py``) plus weights
``q_k`` that sum to 1 and approximate the *normalised* Haar measure of the region the grid covers:

    integral over region of f(R) dHaar(R)  ~=  haar_volume * sum_k q_k f(R_k)

``haar_volume`` is 1 for a grid of the whole group and the Haar measure of the covered region for a local grid.
The posterior weights of a particle are then ``w_k ~ q_k * prior(R_k) * likelihood(R_k)`` (Xu et al. 2026,
eq. 21-22).

Two kinds of grids:

* :func:`healpix_grid`: RELION's global sampling for ``healpix_order`` r. Viewing directions are the centres of the
  12 * Nside^2 HEALPix pixels (Nside = 2^r, NEST ordering as in RELION's ``HealpixSampling``), in-plane angles psi
  are ``6 * Nside`` equispaced values starting at 0, and rotation k = direction * n_psi + psi_index. 72 * 8^r poses,
  angular step 360 / (6 * 2^r) degrees (RELION's ``getAngularSampling``: 7.5 deg at order 3).
* :func:`local_grid` / :func:`local_grids`: rotations ``center @ exp(hat(v))`` for rotation vectors ``v`` on a cubic
  lattice inside a ball; weights from the Haar density in exponential coordinates.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import healpy
import numpy as np
from scipy.spatial.transform import Rotation

from bayespose.core.geometry.rotations import euler_to_matrix, matrix_to_euler

__all__ = ["SO3Grid", "healpix_grid", "psi_count", "containing_cell", "neighbour_table", "local_grid", "local_grids",
           "local_offsets", "haar_ball_volume"]


@dataclass
class SO3Grid:
    """Poses on SO(3) with Haar quadrature weights.

    Attributes:
        rotations: (K, 3, 3) RELION matrices ``A`` (volume -> image coordinates), float64.
        weights: (K,) quadrature weights, non-negative, summing to 1.
        euler_deg: (K, 3) RELION Euler angles (rot, tilt, psi) in degrees of ``rotations``.
        direction_index: (K,) index of the viewing direction (HEALPix NEST pixel) of each pose; -1 for grids that
            are not a direction x in-plane product (local grids).
        psi_index: (K,) index of the in-plane angle; -1 for local grids.
        n_directions: number of distinct viewing directions (0 for local grids).
        n_psi: number of in-plane angles per direction (0 for local grids).
        spacing_deg: approximate angular step between neighbouring poses, degrees.
        haar_volume: normalised Haar measure of the region the grid covers (1 for the whole group), so that
            ``haar_volume * weights[k]`` is the Haar measure attached to node k.
    """

    rotations: np.ndarray
    weights: np.ndarray
    euler_deg: np.ndarray
    direction_index: np.ndarray
    psi_index: np.ndarray
    n_directions: int
    n_psi: int
    spacing_deg: float
    haar_volume: float = 1.0

    def __post_init__(self) -> None:
        k = self.rotations.shape[0]
        if self.rotations.shape != (k, 3, 3):
            raise ValueError(f"rotations must have shape (K, 3, 3), got {self.rotations.shape}")
        for name in ("weights", "direction_index", "psi_index"):
            if getattr(self, name).shape != (k,):
                raise ValueError(f"{name} must have shape ({k},), got {getattr(self, name).shape}")
        if self.euler_deg.shape != (k, 3):
            raise ValueError(f"euler_deg must have shape ({k}, 3), got {self.euler_deg.shape}")

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    def subset(self, mask: np.ndarray) -> SO3Grid:
        """Grid restricted to the nodes selected by ``mask`` (boolean (K,) or integer indices).

        The kept weights are renormalised to sum to 1 and ``haar_volume`` shrinks by the removed weight, so that
        ``haar_volume * weights`` is still the Haar measure attached to each kept node.
        """
        idx = np.arange(len(self))[np.asarray(mask)]
        if idx.size == 0:
            raise ValueError("subset: the mask selects no rotation")
        kept = float(self.weights[idx].sum())
        if kept <= 0.0:
            raise ValueError("subset: the selected rotations have zero total weight")
        return SO3Grid(
            rotations=self.rotations[idx],
            weights=self.weights[idx] / kept,
            euler_deg=self.euler_deg[idx],
            direction_index=self.direction_index[idx],
            psi_index=self.psi_index[idx],
            n_directions=self.n_directions,
            n_psi=self.n_psi,
            spacing_deg=self.spacing_deg,
            haar_volume=self.haar_volume * kept,
        )


def psi_count(order: int) -> int:
    """Number of in-plane angles per viewing direction of ``healpix_grid(order)``: ``6 · 2^order`` (step
    ``360 / psi_count`` degrees)."""
    return 6 * 2 ** int(order)


def healpix_grid(order: int) -> SO3Grid:
    """RELION's global orientation grid of ``healpix_order`` ``order``: HEALPix directions x equispaced psi.

    Directions: centres of the 12 * Nside^2 HEALPix pixels, Nside = 2^order, NEST numbering (RELION's
    ``HealpixSampling::setOrientations``). For pixel centre (theta, phi), ``rot = phi`` wrapped to (-180, 180] and
    ``tilt = theta`` in degrees, so that the viewing direction ``A^T e_z = (cos rot sin tilt, sin rot sin tilt,
    cos tilt)`` is healpy's ``pix2vec``. In-plane: ``psi = j * 360 / n_psi``, j = 0..n_psi-1, n_psi = 6 * Nside.
    Ordering: index ``k = direction_index * n_psi + psi_index``. Size 72 * 8^order.

    Weights are all equal (1 / K). Justification: in RELION's ZYZ angles the normalised Haar measure factorises as
    ``dHaar = (dOmega(direction) / 4 pi) * (dpsi / 2 pi)``. HEALPix pixels have exactly equal areas, so equal weights
    at the pixel centres are the midpoint rule on the sphere, and equispaced psi is the trapezoidal rule on the
    circle, exact for trigonometric polynomials in psi of degree < n_psi. Hence the grid integrates any function of
    in-plane degree < n_psi with the error of the HEALPix midpoint rule only, O(pixel area) = O(1 / Nside^2):
    odd moments vanish exactly (z -> -z symmetry), E tr(R)^2 = 1 is reproduced to 1.2e-2 / 2.9e-3 / 7.3e-4 at
    orders 1 / 2 / 3 (about 0.047 / Nside^2), E R_ij R_kl = delta_ik delta_jl / 3 to 2/3 of that
    (tested in tests/core/geometry/test_grids.py).

    Args:
        order: HEALPix order r >= 0 (RELION's ``--healpix_order``); angular step 360 / (6 * 2^r) degrees.
    """
    if int(order) != order or order < 0 or order > 8:
        raise ValueError(f"healpix order must be an integer in [0, 8], got {order!r}")
    order = int(order)
    nside = 2**order
    n_dir = 12 * nside * nside
    n_psi = psi_count(order)
    theta, phi = healpy.pix2ang(nside, np.arange(n_dir), nest=True)
    rot = np.degrees(phi)
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    tilt = np.degrees(theta)
    psi = np.arange(n_psi) * (360.0 / n_psi)
    dir_idx = np.repeat(np.arange(n_dir), n_psi)
    psi_idx = np.tile(np.arange(n_psi), n_dir)
    euler = np.stack([rot[dir_idx], tilt[dir_idx], psi[psi_idx]], axis=1)
    k = n_dir * n_psi
    return SO3Grid(
        rotations=euler_to_matrix(euler),
        weights=np.full(k, 1.0 / k),
        euler_deg=euler,
        direction_index=dir_idx,
        psi_index=psi_idx,
        n_directions=n_dir,
        n_psi=n_psi,
        spacing_deg=360.0 / n_psi,
        haar_volume=1.0,
    )


def containing_cell(order: int, rotations: np.ndarray) -> np.ndarray:
    """Index in ``healpix_grid(order)`` of the cell containing each rotation (..., 3, 3): its viewing-direction
    pixel and in-plane bin (the in-plane angle relative to the pixel centre's frame, rounded to the grid's psi)."""
    rotations = np.asarray(rotations, dtype=np.float64)
    flat = rotations.reshape(-1, 3, 3)
    d = flat[:, 2, :]
    nside = 2 ** int(order)
    pix = healpy.vec2pix(nside, d[:, 0], d[:, 1], d[:, 2], nest=True)
    # A @ A_cell(psi=0)^T is (nearly) RELION's psi rotation [[cos, sin], [-sin, cos]] about z; exact for rotations
    # with the cell's own viewing direction
    theta, phi = healpy.pix2ang(nside, pix, nest=True)
    frame = euler_to_matrix(np.stack([np.degrees(phi), np.degrees(theta), np.zeros(len(pix))], axis=1))
    rel = np.einsum("nij,nkj->nik", flat, frame)
    psi = np.degrees(np.arctan2(rel[:, 0, 1], rel[:, 0, 0]))
    n_psi = psi_count(order)
    psi_bin = np.mod(np.rint(psi * n_psi / 360.0).astype(np.int64), n_psi)
    return (pix * n_psi + psi_bin).reshape(rotations.shape[:-2])


@functools.lru_cache(maxsize=8)
def neighbour_table(order: int, range_deg: float) -> np.ndarray:
    """For each cell of ``healpix_grid(order)`` the cells whose centre lies within ``range_deg`` degrees of its
    centre, itself first, then the others in index order: (K, W) int64 padded with -1. Cached: treat the result as
    read-only.

    The angle between two cells depends on their in-plane angles only through the difference: for RELION's
    ``A = Rz(psi) Ry(tilt) Rz(rot)``, ``tr(A1 A2^T) = tr(Ry(tilt1) Rz(rot1 - rot2) Ry(-tilt2) Rz(psi1 - psi2))``.
    So the neighbours of the cells of psi index 0 (unit quaternions ``q`` and ``-q`` in a k-d tree; the angle ``t``
    between two rotations is ``2 arccos |<q1, q2>|``) give every row by turning their psi indices: n_psi times
    fewer queries (order 3, 18.75°: 1.9 s -> 0.1 s; the tree query of every cell was most of the first
    ``bayespose predict`` call of a process). Cells on the range's border are the psi-0 row's decision for every
    row of the direction.
    """
    from scipy.spatial import cKDTree

    grid = healpix_grid(order)
    k, n_psi = len(grid), psi_count(order)
    n_dir = k // n_psi
    q = Rotation.from_matrix(grid.rotations).as_quat()
    radius = math.sqrt(max(0.0, 2.0 - 2.0 * math.cos(math.radians(range_deg) / 2.0))) + 1e-9
    lists = cKDTree(np.concatenate([q, -q])).query_ball_point(q[::n_psi], radius)  # the rows of psi index 0
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=n_dir)
    cols = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum())) % k
    pairs = np.unique(np.repeat(np.arange(n_dir, dtype=np.int64), lengths) * k + cols)  # without q / -q repeats
    row_dir, col = np.divmod(pairs, k)
    counts = np.bincount(row_dir, minlength=n_dir)
    width = int(counts.max())
    slot = np.arange(len(row_dir)) - np.repeat(np.cumsum(counts) - counts, counts)
    col_dir = np.full((n_dir, width), -1, dtype=np.int64)
    col_psi = np.zeros((n_dir, width), dtype=np.int64)
    col_dir[row_dir, slot], col_psi[row_dir, slot] = np.divmod(col, n_psi)
    turns = np.arange(n_psi, dtype=np.int64)[None, :, None]
    table = col_dir[:, None, :] * n_psi + (col_psi[:, None, :] + turns) % n_psi  # (n_dir, n_psi, W)
    table = np.where(col_dir[:, None, :] >= 0, table, k).reshape(k, width)
    # itself first (key -1), then ascending, the padding (key k) last
    key = np.where(table == np.arange(k)[:, None], -1, table)
    table = np.take_along_axis(table, np.argsort(key, axis=1, kind="stable"), axis=1)
    table[table == k] = -1
    return table


def cell_rotations(order: int, direction_index: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """RELION A matrices of HEALPix cells: pixel ``direction_index`` (NEST, Nside 2**order) centre x ``psi_deg``."""
    direction_index = np.asarray(direction_index, dtype=np.int64)
    theta, phi = healpy.pix2ang(2 ** order, direction_index.ravel(), nest=True)
    euler = np.stack([np.degrees(phi), np.degrees(theta), np.asarray(psi_deg, dtype=np.float64).ravel()], axis=-1)
    return euler_to_matrix(euler).reshape(direction_index.shape + (3, 3))


def split_cells(order: int, direction_index: np.ndarray, psi_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split cells of a level-``order`` HEALPix x psi grid into 8 equal-mass children (RELION's oversampling).

    A cell is (direction pixel p at Nside 2**order, in-plane interval of width Δ = 360 / (6 · 2**order) centred on
    ``psi_deg``); :func:`healpix_grid` cells are (``direction_index``, ``euler_deg[:, 2]``). Its children are the 4
    NEST sub-pixels ``4p .. 4p+3`` at order + 1 times the two half intervals centred at ``psi ± Δ/4``: together
    they partition the parent, so children of any set of cells carry equal quadrature weights. Apply repeatedly to
    refine further (the children are cells of level ``order + 1``).

    Args:
        order: level of the parent cells; ``direction_index`` (n,) NEST pixels; ``psi_deg`` (n,) cell centres.

    Returns:
        ``(child_direction_index (n, 8), child_psi_deg (n, 8))``.
    """
    direction_index = np.asarray(direction_index, dtype=np.int64).ravel()
    psi_deg = np.asarray(psi_deg, dtype=np.float64).ravel()
    quarter = 360.0 / (6 * 2 ** order) / 4.0
    child_dir = np.repeat(direction_index[:, None] * 4 + np.arange(4)[None, :], 2, axis=1)  # (n, 8)
    child_psi = psi_deg[:, None] + np.tile([-quarter, quarter], 4)[None, :]
    return child_dir, child_psi


def haar_ball_volume(radius_rad: float | np.ndarray) -> float | np.ndarray:
    """Normalised Haar measure of a geodesic ball of radius ``radius_rad`` (radians, <= pi): (t - sin t) / pi.

    From the density (1 - cos w) / pi of the rotation angle w of a uniform rotation.
    """
    t = np.asarray(radius_rad, dtype=np.float64)
    return (t - np.sin(t)) / np.pi


def local_offsets(range_deg: float, step_deg: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotation-vector lattice of a local grid: offsets ``E = exp(hat(v))`` and their Haar quadrature weights.

    ``v`` runs over the cubic lattice ``step * Z^3`` (step in radians) restricted to the ball ``|v| <= range``.
    The geodesic distance between ``R`` and ``R @ exp(hat(v))`` is exactly ``|v|`` (for |v| <= pi).
    The normalised Haar measure in exponential coordinates is ``(1 - cos|v|) / (4 pi^2 |v|^2) d^3v``
    (= 1 / (8 pi^2) at v = 0), so each lattice cell carries the Haar mass
    ``h(v) = step^3 (2 - 2 cos|v|) / (8 pi^2 |v|^2)`` (midpoint rule). The weights are ``h / sum(h)`` and the
    returned volume ``sum(h)`` estimates the Haar measure (t - sin t) / pi of the ball; its error is the lattice
    boundary error of counting cubes in a ball (a few % at range/step = 4, < 1 % at range/step >= 10).

    Args:
        range_deg: radius of the ball in degrees (geodesic), in (0, 180].
        step_deg: lattice step in degrees, > 0.

    Returns:
        offsets (K, 3, 3) rotation matrices, weights (K,) summing to 1, haar_volume (float). The first offset is
        the identity (v = 0).
    """
    if not np.isfinite(range_deg) or not 0.0 < range_deg <= 180.0:
        raise ValueError(f"range_deg must be in (0, 180], got {range_deg!r}")
    if not np.isfinite(step_deg) or step_deg <= 0.0:
        raise ValueError(f"step_deg must be > 0, got {step_deg!r}")
    step = np.radians(step_deg)
    radius = np.radians(range_deg)
    n = int(np.floor(range_deg / step_deg + 1e-9))
    if (2 * n + 1) ** 3 > 50_000_000:
        raise ValueError(f"local grid too large: range/step = {range_deg / step_deg:.1f}")
    ax = np.arange(-n, n + 1) * step
    v = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    keep = norm <= radius * (1.0 + 1e-12)
    v, norm = v[keep], norm[keep]
    order = np.argsort(norm, kind="stable")  # identity first, then by distance
    v, norm = v[order], norm[order]
    safe = np.where(norm > 0.0, norm, 1.0)
    ratio = np.where(norm > 1e-8, (2.0 - 2.0 * np.cos(norm)) / safe**2, 1.0 - norm**2 / 12.0)
    mass = step**3 * ratio / (8.0 * np.pi**2)
    offsets = Rotation.from_rotvec(v).as_matrix()
    return offsets, mass / mass.sum(), float(mass.sum())


def local_grid(center: np.ndarray, range_deg: float, step_deg: float) -> SO3Grid:
    """Local grid ``center @ exp(hat(v))`` around one RELION pose ``center`` (3, 3), |v| <= range (geodesic).

    Right multiplication perturbs the pose in volume coordinates (``A' = A E``); the geodesic distance to the
    centre is |v| either way. Weights and ``haar_volume`` as in :func:`local_offsets`; ``direction_index`` and
    ``psi_index`` are -1 (not a product grid). ``rotations[0]`` is ``center`` itself.

    Args:
        center: (3, 3) rotation matrix (RELION ``A``).
        range_deg: geodesic radius of the ball in degrees.
        step_deg: lattice step of the rotation vectors in degrees (approximate angular spacing).
    """
    center = _check_rotations(center, "center", batch=False)
    offsets, weights, volume = local_offsets(range_deg, step_deg)
    rots = center @ offsets
    k = rots.shape[0]
    return SO3Grid(
        rotations=rots,
        weights=weights,
        euler_deg=matrix_to_euler(rots),
        direction_index=np.full(k, -1),
        psi_index=np.full(k, -1),
        n_directions=0,
        n_psi=0,
        spacing_deg=float(step_deg),
        haar_volume=volume,
    )


def local_grids(centers: np.ndarray, range_deg: float, step_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Local grids for a batch of centres with the same offsets: ``rotations[i, k] = centers[i] @ E_k``.

    Args:
        centers: (N, 3, 3) RELION matrices ``A``.
        range_deg, step_deg: as in :func:`local_grid` (degrees).

    Returns:
        rotations (N, K, 3, 3) and weights (K,) (sum 1, shared by all particles; see :func:`local_offsets`).
        ``rotations[:, 0]`` are the centres.
    """
    centers = _check_rotations(centers, "centers", batch=True)
    offsets, weights, _ = local_offsets(range_deg, step_deg)
    return np.einsum("nij,kjl->nkil", centers, offsets), weights


def _check_rotations(mats: np.ndarray, name: str, batch: bool) -> np.ndarray:
    """Validate (3, 3) (``batch=False``) or (N, 3, 3) rotation matrices (orthonormal, det +1, to 1e-6)."""
    m = np.asarray(mats, dtype=np.float64)
    ok_shape = m.shape[-2:] == (3, 3) and m.ndim == (3 if batch else 2)
    if not ok_shape:
        raise ValueError(f"{name} must have shape {'(N, 3, 3)' if batch else '(3, 3)'}, got {m.shape}")
    if m.size == 0:
        return m
    err = np.abs(np.swapaxes(m, -1, -2) @ m - np.eye(3)).max()
    if not np.isfinite(m).all() or err > 1e-6 or (np.linalg.det(m) <= 0).any():
        raise ValueError(f"{name} must be rotation matrices (orthonormal, det +1)")
    return m
