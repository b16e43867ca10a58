"""Rotations in RELION's convention: Euler angles <-> matrices <-> unit quaternions, distances, SO(3) projection.

Convention used everywhere in bayespose (measured against RELION, see tests/core/geometry/test_rotations.py):

* Euler angles are RELION's ``(rot, tilt, psi)`` in **degrees**, ZYZ.
* The rotation matrix of a pose is RELION's ``A`` (``Euler_angles2matrix``): it maps **volume** coordinates to
  **image** coordinates, ``x_image = A @ x_volume``.  In scipy terms
  ``A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T``.
* The projection of volume ``V`` for pose ``A`` is the central slice ``{A^T k : k in the image plane}``
  (torch-fourier-slice is given ``A^T`` with ``zyx_matrices=False``).
* Quaternions are scalar-first ``(w, x, y, z)`` of the same matrix ``A`` and are made canonical with ``w >= 0``.

All functions are batched over leading dimensions and work on numpy arrays (float64 unless given float32).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles (rot, tilt, psi) in degrees, shape (..., 3) -> RELION matrices ``A``, (..., 3, 3)."""
    angles = np.asarray(angles_deg, dtype=np.float64)
    flat = angles.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).as_matrix().transpose(0, 2, 1)
    return mats.reshape(angles.shape[:-1] + (3, 3))


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """RELION matrices ``A`` (..., 3, 3) -> RELION Euler angles (rot, tilt, psi) in degrees, (..., 3).

    tilt is in [0, 180]; rot and psi in (-180, 180]. At tilt 0 or 180 (gimbal lock) only rot+psi (or rot-psi)
    is defined; the split returned is scipy's (psi = 0), which gives the same matrix.
    """
    mats = np.asarray(matrices, dtype=np.float64)
    flat = mats.reshape(-1, 3, 3).transpose(0, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal-lock warning: the matrix is still reproduced
        angles = Rotation.from_matrix(flat).as_euler("ZYZ", degrees=True)
    return angles.reshape(mats.shape[:-2] + (3,))


def matrix_to_quaternion(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> unit quaternions (w, x, y, z) with w >= 0, (..., 4)."""
    mats = np.asarray(matrices, dtype=np.float64)
    xyzw = Rotation.from_matrix(mats.reshape(-1, 3, 3)).as_quat()
    q = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q.reshape(mats.shape[:-2] + (4,))


def quaternion_to_matrix(quaternions: np.ndarray) -> np.ndarray:
    """Quaternions (w, x, y, z), (..., 4), normalised here -> rotation matrices (..., 3, 3)."""
    q = np.asarray(quaternions, dtype=np.float64)
    flat = q.reshape(-1, 4)
    mats = Rotation.from_quat(np.concatenate([flat[:, 1:], flat[:, :1]], axis=1)).as_matrix()
    return mats.reshape(q.shape[:-1] + (3, 3))


def geodesic_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle of the relative rotation ``a^T b`` in degrees, in [0, 180]; broadcasts over leading dims."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    trace = np.einsum("...ji,...ji->...", a, b)  # tr(a^T b)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def chordal_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Frobenius norm ``||a - b||_F`` (= 2 sqrt(2) sin(theta / 2) for rotations at geodesic angle theta)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.sqrt(np.einsum("...ij,...ij->...", diff, diff))


def project_to_so3(matrices: np.ndarray) -> np.ndarray:
    """Nearest rotation (Frobenius norm) to any 3x3 matrix: ``U diag(1, 1, det(U V^T)) V^T`` from its SVD.

    This is the MMSE rotation (eq. 15-19 of Xu, Balanov, Singer & Bendory (2026), "Bayesian perspective for
    orientation determination in cryo-EM with application to structural heterogeneity analysis", Acta Cryst. D 82,
    arXiv:2412.03723) when applied to a posterior-mean matrix.
    """
    m = np.asarray(matrices, dtype=np.float64)
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    return u @ vt


def random_rotations(n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``n`` rotations drawn from the Haar (uniform) measure on SO(3), shape (n, 3, 3)."""
    rng = np.random.default_rng(rng)
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return quaternion_to_matrix(q)


def viewing_directions(matrices: np.ndarray) -> np.ndarray:
    """Projection direction in volume coordinates of poses ``A`` (..., 3, 3): ``A^T e_z`` (the third row of A).

    For RELION angles this is ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``.
    """
    return np.asarray(matrices)[..., 2, :]
