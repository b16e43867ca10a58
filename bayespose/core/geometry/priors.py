"""Rotation priors for pose assignment: log densities with respect to the normalised Haar measure on SO(3).

A prior is evaluated on the rotations being scored: either one grid shared by all particles (shape (K, 3, 3) ->
log density (1, K)) or per-particle rotations ((B, K, 3, 3) -> (B, K)); ``particle_index`` (B,) says which
particles of the set the rows are (per-particle priors, e.g. centred on each particle's input pose, need it).

Spec strings (CLI ``--prior`` and the protocol form map onto them, see :func:`prior_from_spec`):

* ``uniform`` — Haar measure.
* ``igso3:ETA`` — isotropic Gaussian on SO(3) around the identity pose, scale ETA in radians (appendix F1 of Xu,
  Balanov, Singer & Bendory (2026), "Bayesian perspective for orientation determination in cryo-EM with application
  to structural heterogeneity analysis", Acta Cryst. D 82, arXiv:2412.03723; see :mod:`.so3_distributions`).
* ``local:DEG`` — isotropic Gaussian around each particle's input pose with ETA = DEG/3 (in radians; ~97 % of its
  mass within DEG), searched on a local grid of ±DEG (see :mod:`.posterior`).
* ``preferred`` / ``preferred:ROT,TILT,KAPPA,FRACTION`` — viewing-direction prior (von Mises-Fisher peak of
  concentration KAPPA at the direction of RELION angles ROT, TILT in degrees, holding FRACTION of the views, the
  rest uniform), uniform in-plane; ``preferred`` alone is the default top view of the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bayespose.core.geometry import so3_distributions as so3d


class RotationPrior:
    """Base class: a prior over rotations. Subclasses implement :meth:`log_density`."""

    name = "prior"
    per_particle = False  # True when the density depends on the particle

    def log_density(self, rotations: np.ndarray, particle_index: np.ndarray | None = None) -> np.ndarray:
        """Natural log of the density w.r.t. Haar: (K,3,3) -> (1, K); (B,K,3,3) -> (B, K)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class UniformPrior(RotationPrior):
    """The Haar measure (log density 0)."""

    name = "uniform"

    def log_density(self, rotations, particle_index=None):
        rotations = np.asarray(rotations)
        lead = (1,) + rotations.shape[-3:-2] if rotations.ndim == 3 else rotations.shape[:2]
        return np.zeros(lead)


class IGSO3Prior(RotationPrior):
    """Isotropic Gaussian on SO(3) (:mod:`.so3_distributions`) around ``mean``: one rotation (3, 3) for all particles or
    one per particle (N, 3, 3), with scale ``eta`` in radians (small = concentrated).

    The density depends only on the angle between ``mean`` and the rotation; it is tabulated once on a fine angle
    grid (linear interpolation of the log density, error < 1e-3 nats for eta >= 0.01).
    """

    def __init__(self, mean: np.ndarray, eta: float, table_size: int = 8192):
        self.mean = np.asarray(mean, dtype=np.float64)
        if self.mean.shape[-2:] != (3, 3) or self.mean.ndim not in (2, 3):
            raise ValueError(f"IGSO3 prior mean must be (3, 3) or (N, 3, 3), got {self.mean.shape}")
        if not eta > 0:
            raise ValueError(f"IGSO3 prior scale eta must be > 0, got {eta}")
        self.eta = float(eta)
        self.per_particle = self.mean.ndim == 3
        self.name = f"igso3(eta={self.eta:.4g} rad{', per particle' if self.per_particle else ''})"
        self._omega = np.linspace(0.0, math.pi, table_size)
        self._table = so3d.igso3_log_haar_density(self._omega, self.eta)

    def log_density(self, rotations, particle_index=None):
        rotations = np.asarray(rotations, dtype=np.float64)
        if self.per_particle:
            if particle_index is None:
                raise ValueError("a per-particle IGSO3 prior needs the particle indices")
            mean = self.mean[np.asarray(particle_index)]  # (B, 3, 3)
            if rotations.ndim == 3:
                trace = np.einsum("bij,kij->bk", mean, rotations)
            else:
                trace = np.einsum("bij,bkij->bk", mean, rotations)
        else:
            if rotations.ndim == 3:
                trace = np.einsum("ij,kij->k", self.mean, rotations)[None]
            else:
                trace = np.einsum("ij,bkij->bk", self.mean, rotations)
        omega = np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0))
        return np.interp(omega, self._omega, self._table)


class ViewingDirectionPrior(RotationPrior):
    """Preferred orientation: a density on viewing directions (von Mises-Fisher mixture), uniform in-plane."""

    def __init__(self, distribution: so3d.PreferredOrientation):
        self.distribution = distribution
        self.name = f"preferred orientation ({len(distribution.kappas)} component(s))"

    def log_density(self, rotations, particle_index=None):
        rotations = np.asarray(rotations, dtype=np.float64)
        flat = self.distribution.log_density(rotations.reshape(-1, 3, 3))
        return flat.reshape((1, -1) if rotations.ndim == 3 else rotations.shape[:2])


class DirectionDensityPrior(RotationPrior):
    """Preferred orientation as a tabulated density of viewing directions, uniform in-plane (the EM M-step prior).

    ``density`` (12 · 4**order,): values on the HEALPix NEST pixels of ``order`` (Nside = 2**order), relative to
    the uniform distribution on the sphere (normalised here to mean 1, so a constant table is the Haar prior); the
    pixels have equal areas, so the table is a density w.r.t. the normalised area measure and, with in-plane psi
    uniform, w.r.t. normalised Haar on SO(3). The viewing direction of a RELION pose ``A`` is its third row
    ``A^T e_z`` (:func:`rotations.viewing_directions`). ``interpolate``: bilinear interpolation between pixel
    centres (``healpy.get_interp_val``, exact at the centres), so that the log prior is continuous across pixel
    edges; else the value of the pixel containing the direction. ``floor``: densities are clipped below at
    ``floor`` (relative to uniform) so that no direction gets log prior -inf.
    """

    def __init__(self, order: int, density: np.ndarray, interpolate: bool = True, floor: float = 1e-3):
        if int(order) != order or not 0 <= order <= 8:
            raise ValueError(f"direction density order must be an integer in 0..8, got {order!r}")
        self.order = int(order)
        density = np.asarray(density, dtype=np.float64)
        n_pix = 12 * 4 ** self.order
        if density.shape != (n_pix,):
            raise ValueError(f"direction density for HEALPix order {order} needs {n_pix} values (NEST pixels), got "
                             f"shape {density.shape}")
        if not np.isfinite(density).all() or (density < 0).any() or not density.sum() > 0:
            raise ValueError("direction density values must be finite, >= 0 and not all zero")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        self.density = density / density.mean()
        self.interpolate = bool(interpolate)
        self.floor = float(floor)
        self.name = f"viewing-direction density (HEALPix order {self.order}, {n_pix} pixels)"

    def density_of_directions(self, directions: np.ndarray) -> np.ndarray:
        """Density (relative to uniform) at unit vectors ``directions`` (..., 3) in volume coordinates."""
        import healpy

        d = np.asarray(directions, dtype=np.float64)
        flat = d.reshape(-1, 3)
        theta, phi = healpy.vec2ang(flat)
        nside = 2 ** self.order
        if self.interpolate:
            values = healpy.get_interp_val(self.density, theta, phi, nest=True)
        else:
            values = self.density[healpy.ang2pix(nside, theta, phi, nest=True)]
        return np.maximum(np.asarray(values, dtype=np.float64), self.floor).reshape(d.shape[:-1])

    def log_density(self, rotations, particle_index=None):
        rotations = np.asarray(rotations, dtype=np.float64)
        if rotations.shape[-2:] != (3, 3) or rotations.ndim not in (3, 4):
            raise ValueError(f"rotations must be (K, 3, 3) or (B, K, 3, 3), got {rotations.shape}")
        values = np.log(self.density_of_directions(rotations[..., 2, :]))
        return values[None] if rotations.ndim == 3 else values


class GridPrior(RotationPrior):
    """A per-particle prior given as weights on a HEALPix grid (e.g. a pose network's predicted distribution).

    ``log_weights`` (N, K): log probabilities of each particle over the cells of ``healpix_grid(order)`` (any
    normalisation; they are turned into a density w.r.t. Haar: ``log(K · p_k)``, so a uniform row is log 1 = 0).
    A rotation gets the weight of the cell containing it (its viewing-direction pixel and in-plane bin), so the
    prior also applies to the finer children of the refinement and to local grids.
    """

    per_particle = True

    def __init__(self, order: int, log_weights: np.ndarray):
        import torch  # here: the CLI reads this module's prior specs without loading torch

        from bayespose.core.geometry.grids import healpix_grid

        self.order = int(order)
        self.grid = healpix_grid(self.order)
        log_weights = np.asarray(log_weights)
        if log_weights.ndim != 2 or log_weights.shape[1] != len(self.grid):
            raise ValueError(f"grid prior needs (N, {len(self.grid)}) log weights for HEALPix order {order}, got "
                             f"{log_weights.shape}")
        # kept as given, normalised row by row when looked up: an (N, K) copy costs seconds for 1000 particles on
        # the order-3 grid (page faults of 300 MB; numpy's exp of far-negative values takes its slow path too)
        self.log_weights = log_weights
        log_sum = torch.logsumexp(torch.as_tensor(log_weights), dim=1, keepdim=True).double().numpy()
        self.log_norm = log_sum - np.log(len(self.grid))  # (N, 1): log density = log weight - log_norm
        self.name = f"grid prior (HEALPix order {order}, per particle)"

    def cell_index(self, rotations: np.ndarray) -> np.ndarray:
        """Index in ``healpix_grid(order)`` of the cell containing each rotation (..., 3, 3)."""
        from bayespose.core.geometry.grids import containing_cell

        return containing_cell(self.order, rotations)

    def log_density(self, rotations, particle_index=None):
        if particle_index is None:
            raise ValueError("a grid prior needs the particle indices")
        index = np.asarray(particle_index)
        rows = self.log_weights[index] - self.log_norm[index]  # (B, K) float64
        cells = self.cell_index(rotations)
        if cells.ndim == 1:
            return rows[:, cells]
        return np.take_along_axis(rows, cells, axis=1)


@dataclass
class PriorSpec:
    """A parsed ``--prior`` string: the prior, and the local search range (degrees) when it is a local prior."""

    prior: RotationPrior
    local_range_deg: float | None = None


PRIOR_SPECS = ("uniform", "igso3:ETA", "local:DEG", "preferred[:ROT,TILT,KAPPA,FRACTION]")


def _direction_from_angles(rot_deg: float, tilt_deg: float) -> np.ndarray:
    r, t = math.radians(rot_deg), math.radians(tilt_deg)
    return np.array([math.cos(r) * math.sin(t), math.sin(r) * math.sin(t), math.cos(t)])


def prior_from_spec(spec: str, input_rotations: np.ndarray | None = None) -> PriorSpec:
    """Parse a prior spec string (see the module docstring). ``input_rotations`` (N, 3, 3) are needed by ``local``."""
    name, _, arg = spec.strip().partition(":")
    name = name.lower()
    try:
        if name == "uniform" and not arg:
            return PriorSpec(UniformPrior())
        if name == "igso3":
            return PriorSpec(IGSO3Prior(np.eye(3), float(arg)))
        if name == "local":
            range_deg = float(arg)
            if not 0 < range_deg <= 90:
                raise ValueError(f"local search range must be in (0, 90] degrees, got {range_deg}")
            if input_rotations is None:
                raise ValueError("prior 'local' needs particles with input poses (an aligned set / star angles)")
            return PriorSpec(IGSO3Prior(input_rotations, math.radians(range_deg) / 3.0), local_range_deg=range_deg)
        if name == "preferred":
            if not arg:
                return PriorSpec(ViewingDirectionPrior(so3d.PreferredOrientation.default_top_view()))
            rot, tilt, kappa, fraction = (float(v) for v in arg.split(","))
            if not 0 < fraction <= 1 or not kappa > 0:
                raise ValueError("preferred:ROT,TILT,KAPPA,FRACTION needs KAPPA > 0 and 0 < FRACTION <= 1")
            dist = so3d.PreferredOrientation.default_top_view(direction=_direction_from_angles(rot, tilt),
                                                              fraction=fraction, kappa=kappa)
            return PriorSpec(ViewingDirectionPrior(dist))
    except ValueError as exc:
        if "could not convert" in str(exc) or "not enough values" in str(exc) or "too many values" in str(exc):
            raise ValueError(f"bad prior {spec!r}: expected one of {', '.join(PRIOR_SPECS)}") from None
        raise
    raise ValueError(f"unknown prior {spec!r}: expected one of {', '.join(PRIOR_SPECS)}")
