"""RELION 3.1 helpers for the accuracy benchmark: independent particle simulation and map symmetrisation.

* :func:`relion_dataset`: the particles of a RELION 3.1 star (true poses, origins and CTF) projected by
  ``relion_project --ctf`` and given white noise by ``relion_project --add_noise --white_noise S``, at a target
  SNR in bayespose's definition (mean over particles of the clean image's variance over the whole box / the
  per-pixel noise variance). relion_project adds the noise to the half-complex transform, so its real-space noise
  variance is ``S² (1 - 1/box)`` (measured, ../shared/data/README.md); S is chosen from that and the measured
  noise variance is reported back.
* :func:`relion_symmetrise`: ``relion_image_handler --sym G`` (RELION's own point groups).
* :func:`invariance_correlations`: correlation of a map with itself rotated by each group matrix (an independent
  check that RELION's symmetrised map is invariant under bayespose's group matrices).

Units: pixel sizes Å/px, noise sigma in image units, angles in degrees (RELION ZYZ).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import affine_transform

from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.imaging.simulate import signal_variance
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.io.relion_star import read_star


def have_relion(*names: str) -> bool:
    """True when all the given RELION binaries (default: relion_project, relion_image_handler) are on PATH."""
    names = names or ("relion_project", "relion_image_handler")
    return all(shutil.which(n) is not None for n in names)


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def relion_project(map_path: Path, poses_star: Path, out_root: Path, white_noise: float | None = None) -> Path:
    """``relion_project --i MAP --ang POSES --o OUT --ctf [--add_noise --white_noise S]``; returns OUT.star."""
    out_root.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["relion_project", "--i", str(map_path), "--o", str(out_root), "--ang", str(poses_star), "--ctf"]
    if white_noise is not None:
        cmd += ["--add_noise", "--white_noise", f"{white_noise:.9g}"]
    _run(cmd, out_root.parent)
    star = Path(f"{out_root}.star")
    if not star.exists():
        raise RuntimeError(f"relion_project wrote no {star}")
    return star


@dataclass
class RelionData:
    """Particles and images simulated by relion_project."""

    particles: ParticleSet  # read back from relion_project's own star (poses and CTF as RELION wrote them)
    images: np.ndarray  # (N, D, D) float32
    white_noise: float  # the --white_noise S passed
    noise_variance: float  # measured real-space variance of (noisy - clean)
    signal_variance: float  # bayespose definition (mean of per-image variances of the clean images)
    snr: float  # signal_variance / noise_variance (measured)


def relion_clean(map_path: Path, poses_star: Path, work: Path) -> tuple[ParticleSet, np.ndarray]:
    """relion_project without noise (cached in ``work``): the clean CTF-modulated projections."""
    star = Path(f"{work / 'clean'}.star")
    if not star.exists():
        star = relion_project(map_path, poses_star, work / "clean")
    particles = read_star(star)
    return particles, read_images(particles)


def relion_dataset(map_path: Path, poses_star: Path, truth: ParticleSet, snr: float, work: Path) -> RelionData:
    """relion_project particles of ``poses_star`` at ``snr`` (bayespose definition), checked against ``truth``.

    Raises ``RuntimeError`` when RELION's star does not carry the true poses (to 1e-3 degrees) or the measured
    noise variance is off the expected ``S² (1 - 1/box)`` by more than 5 %.
    """
    _, clean = relion_clean(map_path, poses_star, work)
    box = clean.shape[-1]
    s_var = signal_variance(clean)
    white = math.sqrt(s_var / snr / (1.0 - 1.0 / box))
    star = relion_project(map_path, poses_star, work / f"noisy_snr{snr:g}", white_noise=white)
    particles = read_star(star)
    images = read_images(particles)
    if particles.rotations is None or geodesic_distance_deg(particles.rotations, truth.rotations).max() > 1e-3:
        raise RuntimeError("relion_project's star does not carry the true poses")
    noise_var = float(np.var((images - clean).astype(np.float64)))
    expected = white ** 2 * (1.0 - 1.0 / box)
    if abs(noise_var / expected - 1.0) > 0.05:
        raise RuntimeError(f"relion_project noise variance {noise_var:.4g}, expected {expected:.4g}")
    return RelionData(particles, images, white, noise_var, s_var, s_var / noise_var)


def relion_symmetrise(map_path: Path, out_path: Path, sym: str) -> np.ndarray:
    """``relion_image_handler --i MAP --o OUT --sym SYM`` (cached); returns the symmetrised map (D, D, D)."""
    if not out_path.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _run(["relion_image_handler", "--i", str(map_path), "--o", str(out_path), "--sym", sym], out_path.parent)
    return read_map(out_path)[0]


def rotate_map(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``V'(x) = V(L x)`` for a volume ``vol[z, y, x]`` with coordinates ``x = (x, y, z)`` in px from ``box // 2``
    (trilinear interpolation; :mod:`bayespose.core.geometry.symmetry` convention)."""
    flip = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    m = flip @ np.asarray(matrix, dtype=np.float64) @ flip
    c = np.full(3, volume.shape[0] // 2, dtype=np.float64)
    return affine_transform(np.asarray(volume, dtype=np.float64), m, offset=c - m @ c, order=1, mode="constant")


def invariance_correlations(volume: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``volume`` with ``V(L_g x)`` for every group element (1 for an invariant map)."""
    v = np.asarray(volume, dtype=np.float64).ravel()
    out = []
    for g in group:
        w = rotate_map(volume, g).ravel()
        out.append(np.corrcoef(v, w)[0, 1])
    return np.array(out)
