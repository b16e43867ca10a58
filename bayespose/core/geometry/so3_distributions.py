"""Distributions of poses on SO(3): uniform, isotropic Gaussian (IGSO3) and preferred viewing directions.

All densities are with respect to the **normalised Haar measure** (so the uniform distribution has density 1) and
act on RELION pose matrices ``A`` (volume -> image coordinates, see ``rotations.py``). Angles are in radians here.

Isotropic Gaussian on SO(3), ``IG(eta)`` (section 3.2 and appendix F1 of Xu, Balanov, Singer & Bendory (2026),
"Bayesian perspective for orientation determination in cryo-EM with application to structural heterogeneity
analysis", Acta Cryst. D 82, https://journals.iucr.org/d/issues/2026/04/00/bar5003/, arXiv:2412.03723; after
Savjolova 1985):
the rotation axis is uniform and the rotation angle ``w`` in [0, pi] has density

    f(w) = (1 - cos w) / pi * g(w),
    g(w) = sum_{l>=0} (2l + 1) exp(-l (l + 1) eta^2 / 2) sin((l + 1/2) w) / sin(w / 2)

where ``(1 - cos w) / pi`` is the angle density of a uniform rotation and ``g`` is the density w.r.t. Haar (the heat
kernel of SO(3) at time eta^2 / 2). The scale is fixed so that, as Xu et al. (2026, app. F1) state, for small eta the
rotation vector is ~ N(0, eta^2 I_3) and ``w`` is Maxwell distributed with scale eta (Std(w) = eta sqrt(3 - 8/pi):
0.067 rad for eta = 0.1). **Small eta = concentrated** around the mean; eta -> infinity gives the uniform
distribution. Useful identity: E[R] = exp(-eta^2) * mean.

Small-eta closed form (Matthies et al. 1988, as quoted in Xu et al. 2026, app. F1): Poisson summation over the
half-integers n = l + 1/2 turns the slowly converging series into a fast one over images k,

    g(w) = exp(eps^2 / 4) sqrt(pi) / (2 eps^3 sin(w/2)) * sum_k (-1)^k (w - 2 pi k) exp(-(w - 2 pi k)^2 / (4 eps^2)),

with eps^2 = eta^2 / 2. Matthies' formula is the k in {-1, 0, 1} truncation; we keep |k| <= 2, whose omitted
terms are below exp(-12 pi^2 / eta^2) relative (< 1e-50 for eta < 1). The l-series needs
l(l+1) eta^2 / 2 ~ 40, i.e. l_max ~ 9 / eta terms (900 at eta = 0.01). **Switch**: the image sum for eta < 1
(it is exact there and costs 5 terms), the l-series (l_max chosen for 1e-17 truncation, <= 12 terms) for
eta >= 1. Both agree to 1e-12 of the peak value over 0.2 <= eta <= 2 (tested).

Preferred orientation: :class:`PreferredOrientation`, a von Mises-Fisher mixture on the sphere of viewing directions
``d = A^T e_z`` (third row of A; volume coordinates) with uniform in-plane angle. Because the Haar measure is the
product of the uniform measure on directions and the uniform in-plane angle, its density w.r.t. Haar is the
mixture density w.r.t. the *normalised* area measure of S^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation
from scipy.special import logsumexp

from bayespose.core.geometry.rotations import euler_to_matrix, random_rotations

__all__ = [
    "IGSO3_SWITCH_ETA",
    "sample_uniform",
    "igso3_angle_density",
    "igso3_haar_density",
    "igso3_log_haar_density",
    "igso3_angle_cdf",
    "igso3_density",
    "igso3_log_density",
    "sample_igso3",
    "rotation_angle",
    "PreferredOrientation",
]

IGSO3_SWITCH_ETA = 1.0
"""eta below which the image-sum (Matthies) closed form is used instead of the l-series."""

_N_IMAGES = 2  # images k = -2..2 of the closed form


# ----------------------------------------------------------------------------------------------------------------
# Uniform
# ----------------------------------------------------------------------------------------------------------------


def sample_uniform(n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``n`` Haar-uniform rotations (RELION ``A`` matrices), shape (n, 3, 3), float64."""
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return random_rotations(int(n), rng)


# ----------------------------------------------------------------------------------------------------------------
# Isotropic Gaussian on SO(3)
# ----------------------------------------------------------------------------------------------------------------


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not np.isfinite(eta) or eta <= 0.0:
        raise ValueError(f"IGSO3 concentration eta must be a finite positive number (radians), got {eta!r}")
    return eta


def _check_omega(omega: np.ndarray) -> np.ndarray:
    w = np.asarray(omega, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < -1e-12) or np.any(w > np.pi + 1e-12):
        raise ValueError("rotation angles omega must lie in [0, pi] (radians)")
    return np.clip(w, 0.0, np.pi)


def _series_lmax(eta: float) -> int:
    """Smallest l_max with (2l+1)^2 exp(-l(l+1) eta^2/2) < 1e-17 for all l > l_max (truncation of the l-series)."""
    ls = np.arange(1, int(20.0 / eta) + 20)  # the bound below holds well before l = 20 / eta
    bad = 2.0 * np.log(2 * ls + 1) - ls * (ls + 1) * eta**2 / 2.0 > np.log(1e-17)
    return int(ls[bad].max()) if bad.any() else 1


def _log_haar_series(w: np.ndarray, eta: float) -> np.ndarray:
    """log g(w) from the l-series (good for eta >= ~0.2; used for eta >= IGSO3_SWITCH_ETA)."""
    ls = np.arange(_series_lmax(eta) + 1, dtype=np.float64)
    coef = (2 * ls + 1) * np.exp(-ls * (ls + 1) * eta**2 / 2.0)
    half = np.sin(w / 2.0)
    small = half < 1e-6
    safe = np.where(small, 1.0, half)
    # character chi_l(w) = sin((l + 1/2) w) / sin(w/2); Taylor (2l+1)(1 - l(l+1) w^2 / 6) near w = 0
    chi = np.where(
        small[..., None],
        (2 * ls + 1) * (1.0 - ls * (ls + 1) * w[..., None] ** 2 / 6.0),
        np.sin((ls + 0.5) * w[..., None]) / safe[..., None],
    )
    g = chi @ coef
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(g, 0.0))


def _log_haar_images(w: np.ndarray, eta: float) -> np.ndarray:
    """log g(w) from the Poisson (image) sum, evaluated in log space (exact for eta < ~1.5, any small eta)."""
    eps2 = eta**2 / 2.0
    ks = np.arange(-_N_IMAGES, _N_IMAGES + 1, dtype=np.float64)
    x = w[..., None] - 2.0 * np.pi * ks  # (…, K)
    # sum_k (-1)^k x_k exp(-x_k^2/(4 eps2)) = exp(-w^2/(4 eps2)) * sum_k (-1)^k x_k exp(pi k (w - pi k) / eps2)
    rel = np.exp(np.pi * ks * (w[..., None] - np.pi * ks) / eps2)  # <= 1 for w in [0, pi], |k| >= 1
    sign = np.where(ks % 2 == 0, 1.0, -1.0)
    half = np.sin(w / 2.0)
    small = w < 1e-12  # only w ~ 0 needs the limit: the k = 0 term w / sin(w/2) is accurate down to tiny w
    bracket = (sign * x * rel).sum(axis=-1)
    # bracket / sin(w/2) -> d/dw bracket * 2 at w = 0 (bracket(0) = 0 by symmetry): use the k = 0 limit + images
    deriv0 = (sign * (1.0 - x**2 / (2.0 * eps2)) * rel).sum(axis=-1) * 2.0
    ratio = np.where(small, deriv0, bracket / np.where(small, 1.0, half))
    log_pref = eps2 / 4.0 + 0.5 * np.log(np.pi) - np.log(2.0) - 1.5 * np.log(eps2)
    with np.errstate(divide="ignore"):
        return log_pref - w**2 / (4.0 * eps2) + np.log(np.maximum(ratio, 0.0))


def igso3_log_haar_density(omega: np.ndarray, eta: float) -> np.ndarray:
    """log of the IG(eta) density w.r.t. normalised Haar, as a function of the rotation angle ``omega`` (radians).

    Uses the image-sum closed form for ``eta < IGSO3_SWITCH_ETA`` and the l-series otherwise (module docstring).
    Finite for any eta > 0 and omega in [0, pi] (no underflow for tiny eta).
    """
    eta = _check_eta(eta)
    w = _check_omega(omega)
    if eta < IGSO3_SWITCH_ETA:
        return _log_haar_images(w, eta)
    return _log_haar_series(w, eta)


def igso3_haar_density(omega: np.ndarray, eta: float) -> np.ndarray:
    """IG(eta) density w.r.t. normalised Haar, g(omega), as a function of the rotation angle (radians)."""
    return np.exp(igso3_log_haar_density(omega, eta))


def igso3_angle_density(omega: np.ndarray, eta: float) -> np.ndarray:
    """Density of the rotation angle ``omega`` in [0, pi] (radians, w.r.t. d omega) of IG(eta): (1 - cos w)/pi g(w).

    Integrates to 1 over [0, pi]; eta -> infinity gives the uniform-rotation angle density (1 - cos w) / pi.
    """
    w = _check_omega(omega)
    with np.errstate(divide="ignore"):
        log_haar_angle = np.log(1.0 - np.cos(w)) - np.log(np.pi)
    return np.exp(log_haar_angle + igso3_log_haar_density(w, eta))


@lru_cache(maxsize=64)
def _angle_cdf_table(eta: float) -> tuple[np.ndarray, np.ndarray]:
    """Tabulated CDF of the IG(eta) angle on a fine grid: (omega nodes, CDF values), CDF strictly increasing.

    Nodes: 4097 equispaced on [0, pi] plus 8193 on [0, min(pi, 14 eta)] (the Maxwell bulk for small eta, whose
    mass beyond 14 eta is < 1e-40); cumulative trapezoid rule (relative error ~ (step / eta)^2 < 1e-5), then
    normalised by the total (which equals 1 to that accuracy).
    """
    fine = np.linspace(0.0, min(np.pi, 14.0 * eta), 8193)
    w = np.unique(np.concatenate([np.linspace(0.0, np.pi, 4097), fine]))
    f = igso3_angle_density(w, eta)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(w))])
    cdf /= cdf[-1]
    keep = np.concatenate([[True], np.diff(cdf) > 0.0])
    return w[keep], cdf[keep]


def igso3_angle_cdf(omega: np.ndarray, eta: float) -> np.ndarray:
    """CDF of the IG(eta) rotation angle at ``omega`` (radians), from the tabulated table (~1e-5 accuracy)."""
    eta = _check_eta(eta)
    w_tab, cdf_tab = _angle_cdf_table(eta)
    return np.interp(_check_omega(omega), w_tab, cdf_tab)


def rotation_angle(rotations: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Angle (radians, [0, pi]) of ``mean^T R`` for rotations (..., 3, 3); ``mean`` (3, 3) defaults to identity."""
    r = np.asarray(rotations, dtype=np.float64)
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (..., 3, 3), got {r.shape}")
    if mean is None:
        trace = np.trace(r, axis1=-2, axis2=-1)
    else:
        m = np.asarray(mean, dtype=np.float64)
        if m.shape != (3, 3):
            raise ValueError(f"mean must be a (3, 3) rotation matrix, got shape {m.shape}")
        trace = np.einsum("ji,...ji->...", m, r)  # tr(m^T r)
    return np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0))


def igso3_log_density(rotations: np.ndarray, mean: np.ndarray | None, eta: float) -> np.ndarray:
    """log density w.r.t. normalised Haar of IG(eta) centred at ``mean`` (3, 3) for rotations (..., 3, 3).

    Depends only on the angle of ``mean^T R`` (equivalently of ``R mean^T``: the distribution is bi-invariant).
    """
    return igso3_log_haar_density(rotation_angle(rotations, mean), eta)


def igso3_density(rotations: np.ndarray, mean: np.ndarray | None, eta: float) -> np.ndarray:
    """Density w.r.t. normalised Haar of IG(eta) centred at ``mean`` for rotations (..., 3, 3)."""
    return np.exp(igso3_log_density(rotations, mean, eta))


def sample_igso3(
    n: int,
    eta: float,
    mean: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """``n`` samples of IG(eta) around ``mean`` (3, 3, default identity): ``R = mean @ exp(hat(w u))``, (n, 3, 3).

    The axis u is uniform on S^2 and the angle w is drawn by inverting the tabulated angle CDF
    (:func:`igso3_angle_cdf`, Xu et al. 2026, app. F1). The perturbation multiplies on the right (in volume
    coordinates for RELION ``A``); since the law of ``exp(hat(w u))`` is invariant under conjugation,
    ``exp(hat(w u)) @ mean`` has the same distribution.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    eta = _check_eta(eta)
    rng = np.random.default_rng(rng)
    w_tab, cdf_tab = _angle_cdf_table(eta)
    omega = np.interp(rng.random(int(n)), cdf_tab, w_tab)
    axis = rng.standard_normal((int(n), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    e = Rotation.from_rotvec(axis * omega[:, None]).as_matrix().reshape(int(n), 3, 3)
    if mean is None:
        return e
    m = np.asarray(mean, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"mean must be a (3, 3) rotation matrix, got shape {m.shape}")
    return m @ e


# ----------------------------------------------------------------------------------------------------------------
# Preferred orientation: von Mises-Fisher mixture on viewing directions, uniform in-plane
# ----------------------------------------------------------------------------------------------------------------


def _vmf_log_norm(kappa: np.ndarray) -> np.ndarray:
    """Log normaliser c of the vMF density w.r.t. the normalised area of S^2, written as exp(c + kappa (mu.d - 1)).

    p(d) = kappa / sinh(kappa) * exp(kappa mu.d) = exp(c + kappa (mu.d - 1)) with
    c = log(2 kappa) - log(1 - exp(-2 kappa)), stable for large kappa; c -> kappa -> 0 for kappa -> 0.
    """
    k = np.asarray(kappa, dtype=np.float64)
    small = k < 1e-8
    ks = np.where(small, 1.0, k)
    c = np.log(2.0 * ks) - np.log(-np.expm1(-2.0 * ks))
    return np.where(small, k, c)  # c = kappa + O(kappa^2) for small kappa


@dataclass
class PreferredOrientation:
    """Mixture of von Mises-Fisher distributions of the viewing direction, uniform in-plane angle.

    The viewing direction of a RELION pose ``A`` is ``d = A^T e_z`` (third row of A, volume coordinates;
    ``rotations.viewing_directions``). Component m has density w.r.t. the normalised area measure of S^2
    ``kappa_m / sinh(kappa_m) * exp(kappa_m mu_m . d)`` (kappa = 0: uniform). The in-plane angle psi is uniform and
    independent, so the density of the pose w.r.t. normalised Haar is the mixture density of d.

    Attributes:
        means: (M, 3) mean viewing directions (normalised on construction), volume coordinates.
        kappas: (M,) concentrations >= 0 (dimensionless; angular spread ~ 1 / sqrt(kappa) radians).
        weights: (M,) mixture weights >= 0 (normalised on construction).
    """

    means: np.ndarray
    kappas: np.ndarray
    weights: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        means = np.atleast_2d(np.asarray(self.means, dtype=np.float64))
        kappas = np.atleast_1d(np.asarray(self.kappas, dtype=np.float64))
        m = means.shape[0]
        weights = np.full(m, 1.0 / m) if self.weights is None else np.atleast_1d(np.asarray(self.weights, float))
        if means.ndim != 2 or means.shape[1] != 3:
            raise ValueError(f"means must have shape (M, 3), got {means.shape}")
        if kappas.shape != (m,) or weights.shape != (m,):
            raise ValueError(f"kappas and weights must have shape ({m},), got {kappas.shape} and {weights.shape}")
        norms = np.linalg.norm(means, axis=1)
        if not np.isfinite(means).all() or (norms < 1e-12).any():
            raise ValueError("means must be finite non-zero 3-vectors (viewing directions)")
        if not np.isfinite(kappas).all() or (kappas < 0).any():
            raise ValueError("kappas must be finite and >= 0")
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be finite, >= 0 and not all zero")
        self.means = means / norms[:, None]
        self.kappas = kappas
        self.weights = weights / weights.sum()

    @classmethod
    def default_top_view(
        cls,
        direction: np.ndarray = (0.0, 0.0, 1.0),
        fraction: float = 0.75,
        kappa: float = 40.0,
    ) -> PreferredOrientation:
        """A typical strong preferred orientation for simulations: one vMF peak plus a uniform part.

        With the defaults 75 % of the particles come from a vMF with kappa = 40 around ``direction`` (91 % of that
        component lies within 20 deg: 1 - exp(-kappa (1 - cos 20 deg))), the rest is uniform; in total ~69 % of the
        viewing directions lie within 20 deg of ``direction``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        d = np.asarray(direction, dtype=np.float64)
        return cls(means=np.stack([d, d]), kappas=np.array([kappa, 0.0]), weights=np.array([fraction, 1 - fraction]))

    def log_density_directions(self, directions: np.ndarray) -> np.ndarray:
        """log mixture density of unit vectors (..., 3) w.r.t. the normalised area measure of S^2."""
        d = np.asarray(directions, dtype=np.float64)
        if d.shape[-1] != 3:
            raise ValueError(f"directions must have shape (..., 3), got {d.shape}")
        cos = d @ self.means.T  # (..., M)
        with np.errstate(divide="ignore"):
            logw = np.log(self.weights)
        terms = logw + _vmf_log_norm(self.kappas) + self.kappas * (cos - 1.0)
        return logsumexp(terms, axis=-1)

    def log_density(self, rotations: np.ndarray) -> np.ndarray:
        """log density w.r.t. normalised Haar of RELION poses (..., 3, 3); the Haar average of its exp is 1."""
        r = np.asarray(rotations, dtype=np.float64)
        if r.shape[-2:] != (3, 3):
            raise ValueError(f"rotations must have shape (..., 3, 3), got {r.shape}")
        return self.log_density_directions(r[..., 2, :])

    def sample_directions(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` viewing directions (n, 3) from the mixture (exact vMF sampler: inverse CDF of mu.d)."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        rng = np.random.default_rng(rng)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        kappa = self.kappas[comp]
        mu = self.means[comp]
        u = 1.0 - rng.random(n)  # (0, 1]
        # cos angle to mu: inverse CDF of density ~ exp(kappa t) on [-1, 1]
        big = kappa > 1e-8
        ks = np.where(big, kappa, 1.0)
        t = np.where(big, 1.0 + np.log1p((1.0 - u) * np.expm1(-2.0 * ks)) / ks, 2.0 * u - 1.0)
        t = np.clip(t, -1.0, 1.0)
        phi = rng.uniform(0.0, 2.0 * np.pi, n)
        e1, e2 = _orthonormal_complement(mu)
        s = np.sqrt(1.0 - t**2)
        d = t[:, None] * mu + s[:, None] * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` RELION poses (n, 3, 3) whose viewing direction (third row) follows the mixture, psi uniform."""
        rng = np.random.default_rng(rng)
        d = self.sample_directions(n, rng)
        rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
        tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
        psi = rng.uniform(-180.0, 180.0, d.shape[0])
        return euler_to_matrix(np.stack([rot, tilt, psi], axis=1))


def _orthonormal_complement(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (n, 3) completing unit vectors ``mu`` (n, 3) to orthonormal frames."""
    helper = np.where(np.abs(mu[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    e1 = np.cross(mu, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(mu, e1)
