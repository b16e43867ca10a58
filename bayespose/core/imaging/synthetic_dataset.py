"""Simulated particle data sets with known poses: pose and CTF sampling, images, and the files on disk.

This is the one function the CLI (``bayespose simulate``) and the Scipion protocol (``simulate particles``) both
call. It draws ground-truth poses from a chosen distribution, origins (shifts) and CTF parameters from ranges,
renders the images with :func:`bayespose.core.imaging.simulate.simulate_images` and writes ``particles.mrcs`` and a
RELION 3.1 ``particles.star`` with the ground truth.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from bayespose.core.geometry import so3_distributions as so3d
from bayespose.core.geometry.rotations import euler_to_matrix
from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.imaging.simulate import simulate_images
from bayespose.core.io.atomic import atomic_folder
from bayespose.core.io.mrc import read_map, write_stack
from bayespose.core.io.relion_star import write_star

POSE_DISTRIBUTIONS = ("uniform", "igso3:ETA", "preferred")


@dataclass
class SimulationSpec:
    """What to simulate. Units: defocus in µm (positive = underfocus), astigmatism in Å, shifts in px, angles in
    degrees. The ``preferred_*`` fields shape the ``"preferred"`` pose distribution (see :func:`sample_poses`)."""

    n_particles: int
    snr: float | None = 0.1  # signal variance / noise variance over the box; None = noiseless
    pose_distribution: str = "uniform"  # "uniform", "igso3:ETA" (around the identity, ETA in rad) or "preferred"
    ctf: bool = True
    defocus_min_um: float = 1.0
    defocus_max_um: float = 2.5
    astigmatism_max_A: float = 200.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    max_shift_px: float = 0.0  # origins drawn uniformly in [-max, max] px on each axis
    seed: int = 0
    preferred_rot_deg: float = 0.0  # RELION rot of the preferred viewing direction
    preferred_tilt_deg: float = 0.0  # RELION tilt of the preferred viewing direction (0 = top view, +z)
    preferred_kappa: float = 40.0  # von Mises-Fisher concentration of the peak (angular width ~ 1/sqrt(kappa) rad)
    preferred_fraction: float = 0.75  # fraction of the views in the peak, the rest uniform

    def validate(self) -> None:
        if self.n_particles < 1:
            raise ValueError(f"number of particles must be >= 1, got {self.n_particles}")
        if self.snr is not None and not self.snr > 0:
            raise ValueError(f"SNR must be > 0 (or None for noiseless images), got {self.snr}")
        if self.ctf and not 0 < self.defocus_min_um <= self.defocus_max_um:
            raise ValueError(f"need 0 < defocus min <= defocus max (µm), got {self.defocus_min_um}, "
                             f"{self.defocus_max_um}")
        if self.max_shift_px < 0:
            raise ValueError(f"maximum shift must be >= 0 px, got {self.max_shift_px}")
        sample_poses(1, self.pose_distribution, np.random.default_rng(0), **self.preferred())  # raises on bad input

    def preferred(self) -> dict:
        """The keyword arguments of :func:`sample_poses` for the ``"preferred"`` distribution."""
        return {"preferred_direction_deg": (self.preferred_rot_deg, self.preferred_tilt_deg),
                "preferred_kappa": self.preferred_kappa, "preferred_fraction": self.preferred_fraction}


def sample_poses(n: int, distribution: str, rng: np.random.Generator,
                 preferred_direction_deg: tuple[float, float] = (0.0, 0.0), preferred_kappa: float = 40.0,
                 preferred_fraction: float = 0.75) -> np.ndarray:
    """Draw ``n`` ground-truth RELION A matrices (n, 3, 3) from ``distribution`` (see :data:`POSE_DISTRIBUTIONS`).

    * ``uniform``: Haar measure on SO(3).
    * ``igso3:ETA``: isotropic Gaussian on SO(3) around the identity with scale ETA in radians (appendix F1 of
      Xu, Balanov, Singer & Bendory 2026, "Bayesian perspective for orientation determination in cryo-EM with
      application to structural heterogeneity analysis", Acta Cryst. D 82, arXiv:2412.03723; small ETA =
      concentrated; the rotation angle is ~Maxwell with scale ETA, std ~0.67 ETA).
    * ``preferred``: preferred orientation, uniform in-plane: a fraction ``preferred_fraction`` (in [0, 1]) of the
      viewing directions from a von Mises-Fisher peak of concentration ``preferred_kappa`` (>= 0) around the
      direction of RELION angles ``preferred_direction_deg = (rot, tilt)`` in degrees, the rest uniform
      (:meth:`so3_distributions.PreferredOrientation.default_top_view`; the defaults give its top view).

    Raises ``ValueError`` for an unknown distribution or bad parameters.
    """
    name, _, arg = distribution.partition(":")
    name = name.strip().lower()
    if name == "uniform" and not arg:
        return so3d.sample_uniform(n, rng)
    if name == "igso3":
        try:
            eta = float(arg)
        except ValueError:
            raise ValueError(f"pose distribution 'igso3:ETA' needs a number for ETA, got {distribution!r}") from None
        if not eta > 0:
            raise ValueError(f"igso3 scale ETA must be > 0, got {eta}")
        return so3d.sample_igso3(n, eta, rng=rng)
    if name == "preferred" and not arg:
        if not preferred_kappa >= 0:
            raise ValueError(f"preferred-orientation concentration kappa must be >= 0, got {preferred_kappa}")
        rot, tilt = preferred_direction_deg
        direction = euler_to_matrix(np.array([[rot, tilt, 0.0]]))[0, 2]  # third row of A: the viewing direction
        return so3d.PreferredOrientation.default_top_view(direction, preferred_fraction, preferred_kappa).sample(n, rng)
    raise ValueError(f"unknown pose distribution {distribution!r}; choose one of {', '.join(POSE_DISTRIBUTIONS)}")


def sample_ctf(spec: SimulationSpec, rng: np.random.Generator) -> CTFParams:
    """Per-particle CTF: defocus U uniform in [min, max] µm, V = U - astigmatism (uniform in [0, max] Å),
    astigmatism angle uniform in [0, 180) degrees; voltage, Cs and amplitude contrast fixed."""
    n = spec.n_particles
    defocus_u = rng.uniform(spec.defocus_min_um, spec.defocus_max_um, n) * 1e4
    defocus_v = defocus_u - rng.uniform(0.0, spec.astigmatism_max_A, n)
    return CTFParams(defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle=rng.uniform(0.0, 180.0, n),
                     voltage=np.full(n, spec.voltage_kV), cs=np.full(n, spec.cs_mm),
                     amplitude_contrast=np.full(n, spec.amplitude_contrast), phase_shift=np.zeros(n))


_BYTES_PER_PARTICLE = 400  # poses, origins, CTF, image names (float64 / object arrays) besides the image
_NOISE_STACKS = 4  # peak copies of the stack while noise is added (clean, float64 variance copy, noise, sum)


def check_resources(n_particles: int, box: int, noisy: bool, out_dir: str | Path) -> None:
    """Raise before any work when the simulation cannot fit: ``MemoryError`` when ``n_particles`` images of
    ``box`` × ``box`` float32 (with the copies made while adding noise) exceed the available memory, ``OSError``
    (``errno.ENOSPC``) when the stack does not fit on the file system of ``out_dir``."""
    stack = n_particles * box * box * 4
    needed = stack * (_NOISE_STACKS if noisy else 1) + n_particles * _BYTES_PER_PARTICLE
    available = psutil.virtual_memory().available
    if needed > available:
        fit = max(available // (box * box * 4 * (_NOISE_STACKS if noisy else 1) + _BYTES_PER_PARTICLE), 0)
        raise MemoryError(f"simulating {n_particles} particles of {box}x{box} px needs about {_size(needed)} of "
                          f"memory but {_size(available)} is available; simulate at most about {fit} particles "
                          "per run")
    existing = Path(os.path.abspath(out_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if stack > free:
        raise OSError(errno.ENOSPC, f"the stack of {n_particles} particles needs {_size(stack)} but only "
                                    f"{_size(free)} is free on the file system of {existing}")


def _size(n_bytes: float) -> str:
    """``1.6 MB``-style sizes (powers of 1000)."""
    units = ("bytes", "KB", "MB", "GB", "TB")
    k = 0
    while n_bytes >= 1000 and k < len(units) - 1:
        n_bytes /= 1000
        k += 1
    return f"{n_bytes:.0f} bytes" if k == 0 else f"{n_bytes:.1f} {units[k]}"


def simulate_dataset(map_path: str | Path, spec: SimulationSpec, out_dir: str | Path,
                     progress: Callable[[int, int], None] | None = None,
                     pixel_size: float | None = None) -> ParticleSet:
    """Simulate ``spec.n_particles`` particles of the map at ``map_path`` and write them to ``out_dir``.

    Writes ``particles.mrcs`` (float32 stack, pixel size from the map), ``particles.star`` (RELION 3.1 with the
    ground-truth angles, origins and CTF) and ``simulation.json`` (the spec and the noise sigma). Returns the
    ParticleSet that the star file describes. The three files replace earlier ones as a unit (written into a
    hidden sibling folder that then takes ``out_dir``'s place; other files of ``out_dir`` are kept), so a reader
    never sees a new stack beside an old star, and an interrupted run leaves ``out_dir`` as it was.
    ``pixel_size`` (Å/px) overrides the map header's (Scipion passes the Volume's sampling rate).

    Raises ``ValueError`` for a map without a pixel size or without signal (constant), ``MemoryError`` /
    ``OSError`` (ENOSPC) up front when the images do not fit in memory / on disk (:func:`check_resources`).
    """
    spec.validate()
    volume, header_pixel_size = read_map(map_path)
    pixel_size = float(pixel_size or header_pixel_size)
    if not pixel_size > 0:
        raise ValueError(f"{map_path}: pixel size unknown (header says {header_pixel_size}); give one")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"{map_path}: need a cubic 3D map, got shape {volume.shape}")
    if float(volume.max()) == float(volume.min()):
        raise ValueError(f"{map_path}: the map is constant ({float(volume.min()):g} everywhere): its projections "
                         "have no signal to simulate")
    n, box = spec.n_particles, volume.shape[0]
    check_resources(n, box, spec.snr is not None, out_dir)
    rng = np.random.default_rng(spec.seed)
    rotations = sample_poses(n, spec.pose_distribution, rng, **spec.preferred())
    origins_px = rng.uniform(-spec.max_shift_px, spec.max_shift_px, (n, 2)) if spec.max_shift_px else np.zeros((n, 2))
    ctf = sample_ctf(spec, rng) if spec.ctf else None

    images, noise_sigma = simulate_images(volume, pixel_size, rotations, origins_px * pixel_size, ctf,
                                          spec.snr, seed=spec.seed, progress=progress)

    out_dir = Path(os.path.abspath(out_dir))
    final = out_dir.resolve()
    stack_path = final / "particles.mrcs"  # the final path: the star file refers to it, not to the temporary
    particles = ParticleSet(pixel_size=pixel_size, box=box, image_files=[str(stack_path)] * n,
                            image_indices=np.arange(n), rotations=rotations, origins_A=origins_px * pixel_size,
                            ctf=ctf, optics_group=np.ones(n, dtype=int),
                            half_set=np.where(np.arange(n) % 2 == 0, 1, 2))
    info = {"map": str(Path(map_path).resolve()), "pixel_size_A": pixel_size, "box": box,
            "noise_sigma": float(noise_sigma), **asdict(spec)}
    with atomic_folder(out_dir, keep_other_entries=True) as tmp:
        write_stack(tmp / stack_path.name, images, pixel_size)
        write_star(tmp / "particles.star", particles, relative_to=final)
        (tmp / "simulation.json").write_text(json.dumps(info, indent=2))
    return particles
