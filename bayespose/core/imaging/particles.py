"""The in-memory description of a particle set shared by the I/O readers, the converters and the engines.

Units and conventions (the same as RELION 3.1 star files):

* ``pixel_size``: Å/px; ``box``: image side in px (square images).
* ``rotations``: RELION matrices ``A`` (volume -> image coordinates), shape (N, 3, 3); see :mod:`.rotations`.
* ``origins_A``: ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å, shape (N, 2). Centring a particle image means
  shifting it by ``+origin / pixel_size`` px; a projection of the centred map therefore equals the image after
  that shift (RELION's convention, tested against ``relion_project``).
* CTF: defocus U/V in Å (positive = underfocus), astigmatism angle in degrees (``rlnDefocusAngle``), voltage in
  kV, spherical aberration in mm, amplitude contrast as a fraction, phase shift in degrees; one value per particle.
* Images are referenced, not loaded: ``image_files[i]`` (absolute path of an MRC stack) and
  ``image_indices[i]`` (0-based slice in that stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each an array of shape (N,)."""

    defocus_u: np.ndarray  # Å, positive = underfocus
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees, rlnDefocusAngle
    voltage: np.ndarray  # kV
    cs: np.ndarray  # mm
    amplitude_contrast: np.ndarray  # fraction (0.07 = 7 %)
    phase_shift: np.ndarray  # degrees

    FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift")

    def __post_init__(self):
        n = None
        for name in self.FIELDS:
            value = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
            setattr(self, name, value)
            n = len(value) if n is None else n
            if len(value) != n:
                raise ValueError(f"CTF field {name} has {len(value)} values, expected {n}")

    def __len__(self) -> int:
        return len(self.defocus_u)

    def subset(self, index) -> CTFParams:
        return CTFParams(*(getattr(self, name)[index] for name in self.FIELDS))

    @classmethod
    def constant(cls, n: int, defocus_u: float, defocus_v: float | None = None, defocus_angle: float = 0.0,
                 voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
                 phase_shift: float = 0.0) -> CTFParams:
        """The same CTF for ``n`` particles (defocus in Å)."""
        defocus_v = defocus_u if defocus_v is None else defocus_v
        return cls(*(np.full(n, float(v)) for v in
                     (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift)))


@dataclass
class ParticleSet:
    """Metadata of N particles: where the images are, their poses (optional) and CTF (optional)."""

    pixel_size: float  # Å/px
    box: int  # px
    image_files: np.ndarray  # (N,) str, absolute paths of MRC stacks
    image_indices: np.ndarray  # (N,) int, 0-based slice in the stack
    rotations: np.ndarray | None = None  # (N, 3, 3) RELION A matrices
    origins_A: np.ndarray | None = None  # (N, 2) rlnOriginX/YAngst in Å
    ctf: CTFParams | None = None
    optics_group: np.ndarray | None = None  # (N,) int, RELION optics group (1-based)
    half_set: np.ndarray | None = None  # (N,) int in {1, 2}, rlnRandomSubset
    extra: dict = field(default_factory=dict)  # name -> (N,) array of per-particle values (e.g. scores)

    def __post_init__(self):
        self.image_files = np.asarray(self.image_files, dtype=object)
        self.image_indices = np.asarray(self.image_indices, dtype=np.int64)
        n = len(self.image_files)
        if len(self.image_indices) != n:
            raise ValueError("image_files and image_indices differ in length")
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float64).reshape(n, 3, 3)
            if self.origins_A is None:
                self.origins_A = np.zeros((n, 2))
        if self.origins_A is not None:
            self.origins_A = np.asarray(self.origins_A, dtype=np.float64).reshape(n, 2)
        if self.ctf is not None and len(self.ctf) != n:
            raise ValueError(f"CTF has {len(self.ctf)} entries for {n} particles")
        for name, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"extra column {name} has {len(values)} values for {n} particles")

    def __len__(self) -> int:
        return len(self.image_files)

    @property
    def has_alignment(self) -> bool:
        return self.rotations is not None

    @property
    def has_ctf(self) -> bool:
        return self.ctf is not None

    @property
    def origins_px(self) -> np.ndarray | None:
        """Origins in pixels, (N, 2) as (x, y)."""
        return None if self.origins_A is None else self.origins_A / self.pixel_size

    def subset(self, index) -> ParticleSet:
        """The particles selected by a boolean mask or an index array (a new object; self is unchanged)."""
        index = np.asarray(index)

        def pick(a):
            return None if a is None else a[index]

        return replace(
            self,
            image_files=self.image_files[index],
            image_indices=self.image_indices[index],
            rotations=pick(self.rotations),
            origins_A=pick(self.origins_A),
            ctf=None if self.ctf is None else self.ctf.subset(index),
            optics_group=pick(self.optics_group),
            half_set=pick(self.half_set),
            extra={k: np.asarray(v)[index] for k, v in self.extra.items()},
        )
