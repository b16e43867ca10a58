"""Shared test data paths and independent oracles (nothing here calls the code under test).

* ``DATA``: the real files of ``tests/data`` (provenance and licences in ``tests/data/README.md``).
* RELION's rotation convention written out independently of :mod:`bayespose.core.geometry.rotations`:
  ``A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T`` (checked against RELION's own
  ``Euler_angles2matrix`` formula in ``tests/core/geometry/test_rotations.py``).
* ``requires_relion(...)``: skip a test (only) when a RELION 3.1 binary is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

DATA = Path(__file__).resolve().parent / "data"
CRYODRGN = DATA / "cryodrgn"
ASPIRE = DATA / "aspire"
ANGLE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


def relion_matrices(angles) -> np.ndarray:
    """RELION ``A`` matrices (N, 3, 3) from Euler angles (N, 3) in degrees (rot, tilt, psi; ZYZ), or from a star
    table (pandas DataFrame with ``rlnAngleRot/Tilt/Psi``)."""
    if hasattr(angles, "columns"):
        angles = angles[ANGLE_COLUMNS].to_numpy(dtype=float)
    angles = np.atleast_2d(np.asarray(angles, dtype=float))
    return Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)


def relion_euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (src/euler.cpp) written out term by term (degrees in, ``A`` out)."""
    a, b, g = np.radians(rot), np.radians(tilt), np.radians(psi)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def has_relion(*binaries: str) -> bool:
    return all(shutil.which(b) is not None for b in (binaries or ("relion_refine",)))


def requires_relion(*binaries: str):
    """``pytest.mark.skipif`` for tests that run RELION 3.1 binaries (Debian package ``relion``)."""
    names = binaries or ("relion_refine",)
    return pytest.mark.skipif(not has_relion(*names), reason=f"RELION binary not installed: {', '.join(names)}")


def star_rotations(table) -> Rotation:
    """The poses of a star table (``rlnAngleRot/Tilt/Psi``, degrees) as scipy rotations ``R = Aᵀ`` (ZYZ), for
    angle comparisons (``(a.inv() * b).magnitude()``)."""
    return Rotation.from_euler("ZYZ", table[ANGLE_COLUMNS].to_numpy(dtype=float), degrees=True)


def need_relion(*binaries: str) -> None:
    """Skip the calling test or fixture when a RELION 3.1 binary is not installed (the only reason a test skips
    besides a missing GPU)."""
    names = binaries or ("relion_refine",)
    if not has_relion(*names):
        pytest.skip(f"RELION binary not installed: {', '.join(names)} (Debian package 'relion')")


def fourier_crop(volume: np.ndarray, box: int) -> np.ndarray:
    """Fourier-crop a (D, D, D) map to (box, box, box) (pixel size x D / box), keeping the mean density (numpy
    FFTs only): small, fast test maps from the demo map."""
    d = volume.shape[0]
    f = np.fft.fftshift(np.fft.fftn(volume))
    lo = d // 2 - box // 2
    f = f[lo:lo + box, lo:lo + box, lo:lo + box]
    return (np.fft.ifftn(np.fft.ifftshift(f)).real * (box / d) ** 3).astype(np.float32)
