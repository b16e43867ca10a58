"""Tests of bayespose.core.geometry.so3_distributions: uniform, isotropic Gaussian on SO(3) and preferred orientation.

Ground truth independent of the code under test:
* the IG(eta) angle CDF written out here in closed form from the l-series (term-wise integration of
  (2l+1) e^{-l(l+1) eta^2/2} (cos l w - cos (l+1) w) / pi), used for KS tests of the sampler;
* E[chi_l(w)] = (2l+1) e^{-l(l+1) eta^2 / 2} (heat-kernel Fourier coefficients), i.e. E[R] = e^{-eta^2} mean;
* the paper's calibration (000 App. F1): eta = 0.1 gives Std(w) ~ 0.067 rad (Maxwell with scale eta);
* the semigroup (convolution) property IG(a) * IG(b) = IG(sqrt(a^2 + b^2));
* the von Mises-Fisher cap probability (1 - exp(-kappa (1 - cos a))) / (1 - exp(-2 kappa));
* Haar averages from uniform Monte Carlo and from the HEALPix grid quadrature.
"""

from __future__ import annotations

import healpy
import numpy as np
import pytest
from scipy import stats
from scipy.integrate import quad
from scipy.spatial.transform import Rotation

from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import geodesic_distance_deg, project_to_so3, random_rotations
from bayespose.core.geometry.so3_distributions import (
    IGSO3_SWITCH_ETA,
    PreferredOrientation,
    _log_haar_images,
    _log_haar_series,
    igso3_angle_cdf,
    igso3_angle_density,
    igso3_density,
    igso3_haar_density,
    igso3_log_density,
    rotation_angle,
    sample_igso3,
    sample_uniform,
)


def _series_cdf(w: np.ndarray, eta: float) -> np.ndarray:
    """Exact IG(eta) angle CDF: (1/pi) [w - sin w + sum_{l>=1} c_l (sin(l w)/l - sin((l+1) w)/(l+1))]."""
    ls = np.arange(1, int(12.0 / eta) + 30)
    c = (2 * ls + 1) * np.exp(-ls * (ls + 1) * eta**2 / 2.0)
    w = np.asarray(w, dtype=float)
    lw = w[..., None]
    terms = c * (np.sin(ls * lw) / ls - np.sin((ls + 1) * lw) / (ls + 1))
    return (w - np.sin(w) + terms.sum(-1)) / np.pi


def _healpix_directions(nside: int) -> np.ndarray:
    """Centres of the equal-area HEALPix pixels (healpy), (12 nside^2, 3)."""
    return np.stack(healpy.pix2vec(nside, np.arange(12 * nside**2)), axis=1)


def _haar_angle_cdf(w: np.ndarray) -> np.ndarray:
    return (w - np.sin(w)) / np.pi


# ---------------------------------------------------------------------------------------------------------------
# uniform
# ---------------------------------------------------------------------------------------------------------------


def test_sample_uniform_is_haar() -> None:
    r = sample_uniform(20000, rng=0)
    np.testing.assert_allclose(np.swapaxes(r, 1, 2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    assert stats.kstest(rotation_angle(r), _haar_angle_cdf).pvalue > 1e-3
    # E R = 0 and E R_ij R_kl = delta_ik delta_jl / 3 (standard error ~ 1 / sqrt(3 n))
    assert np.abs(r.mean(0)).max() < 5 / np.sqrt(3 * len(r))
    # viewing directions uniform: z component uniform on [-1, 1] (Archimedes)
    assert stats.kstest(r[:, 2, 2], stats.uniform(-1, 2).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# IGSO3 density
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.02, 0.05, 0.3, 1.0, 2.5])
def test_igso3_angle_density_integrates_to_one(eta: float) -> None:
    total, _ = quad(lambda w: float(igso3_angle_density(np.array(w), eta)), 0.0, np.pi, points=[eta], limit=400)
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("eta", [0.05, 0.3, 1.0, 2.5])
def test_igso3_angle_density_is_derivative_of_exact_cdf(eta: float) -> None:
    w = np.linspace(0.01, np.pi - 0.01, 300)
    h = 1e-5
    numeric = (_series_cdf(w + h, eta) - _series_cdf(w - h, eta)) / (2 * h)
    np.testing.assert_allclose(igso3_angle_density(w, eta), numeric, rtol=1e-5, atol=1e-8 / eta)


@pytest.mark.parametrize("eta", [0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0])
def test_igso3_series_and_closed_form_agree(eta: float) -> None:
    """Both forms are valid for 0.2 <= eta <= 2 (series: <= 50 terms; image sum: omitted images < 1e-12)."""
    w = np.linspace(0.0, np.pi, 1001)
    a = np.exp(_log_haar_images(w, eta))
    b = np.exp(_log_haar_series(w, eta))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * a.max())
    ok = a > 1e-6 * a.max()  # log forms agree wherever the density is not negligible
    np.testing.assert_allclose(_log_haar_images(w[ok], eta), _log_haar_series(w[ok], eta), atol=1e-9)


def test_igso3_switch_and_limits() -> None:
    assert IGSO3_SWITCH_ETA == 1.0
    w = np.linspace(0.0, np.pi, 50)
    # eta -> infinity: uniform (Haar density 1)
    np.testing.assert_allclose(igso3_haar_density(w, 6.0), 1.0, atol=1e-6)
    # tiny eta: Haar density at the identity is sqrt(pi) / eps^3 with eps^2 = eta^2 / 2 (Gaussian N(0, eta^2 I) in
    # the tangent space divided by the Haar density 1 / (8 pi^2) in exponential coordinates), and the log density
    # stays finite far in the tail where the density itself underflows
    eta = 1e-3
    assert float(igso3_haar_density(np.array(0.0), eta)) == pytest.approx(
        8 * np.pi**2 / (2 * np.pi * eta**2) ** 1.5, rel=1e-5
    )
    assert np.isfinite(igso3_log_density(Rotation.from_rotvec([[0, 0, 3.0]]).as_matrix(), None, eta))
    # continuity at omega = 0 (limit branch) and at the switch eta = 1
    assert float(igso3_haar_density(np.array(0.0), 0.4)) == pytest.approx(
        float(igso3_haar_density(np.array(1e-7), 0.4)), rel=1e-9
    )
    below = igso3_haar_density(w, np.nextafter(1.0, 0.0))
    above = igso3_haar_density(w, 1.0)
    np.testing.assert_allclose(below, above, rtol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_igso3_density_integrates_to_one_on_so3(eta: float) -> None:
    """Haar quadrature with the order-3 HEALPix grid (7.5 deg) of the density around a random mean."""
    g = healpix_grid(3)
    mean = random_rotations(1, np.random.default_rng(4))[0]
    total = g.weights @ igso3_density(g.rotations, mean, eta)
    assert total == pytest.approx(1.0, abs=2e-3)
    # and by uniform Monte Carlo (independent of the grid)
    u = random_rotations(200_000, np.random.default_rng(5))
    vals = igso3_density(u, mean, eta)
    assert abs(vals.mean() - 1.0) < 5 * vals.std() / np.sqrt(len(u))


# ---------------------------------------------------------------------------------------------------------------
# IGSO3 sampler
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.05, 0.3, 1.0, 2.0])
def test_sample_igso3_angle_ks_against_exact_cdf(eta: float) -> None:
    mean = random_rotations(1, np.random.default_rng(6))[0]
    r = sample_igso3(20000, eta, mean, rng=7)
    np.testing.assert_allclose(np.swapaxes(r, 1, 2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    w = rotation_angle(r, mean)
    assert stats.kstest(w, lambda x: _series_cdf(x, eta)).pvalue > 1e-3
    # the tabulated CDF used by the sampler is accurate well below the KS resolution
    grid = np.linspace(0.0, np.pi, 400)
    np.testing.assert_allclose(igso3_angle_cdf(grid, eta), _series_cdf(grid, eta), atol=1e-5)


def test_sample_igso3_is_concentrated_for_small_eta_and_calibrated() -> None:
    """Paper 000 App. F1: eta = 0.1 gives Std(omega) ~ 0.067 rad (Maxwell with scale eta): small eta = concentrated."""
    r = sample_igso3(50000, 0.1, rng=8)
    w = rotation_angle(r)
    assert w.std() == pytest.approx(0.1 * np.sqrt(3 - 8 / np.pi), rel=0.02)
    assert w.std() == pytest.approx(0.067, abs=0.002)
    # the rotation vector is ~ N(0, eta^2 I_3) to first order
    v = Rotation.from_matrix(r).as_rotvec()
    np.testing.assert_allclose(np.cov(v.T), 0.01 * np.eye(3), atol=0.0006)
    stds = [rotation_angle(sample_igso3(5000, eta, rng=9)).std() for eta in (0.05, 0.3, 1.0)]
    assert stds[0] < stds[1] < stds[2]


@pytest.mark.parametrize("eta", [0.2, 0.6, 1.2])
def test_sample_igso3_mean_matrix(eta: float) -> None:
    """E[R] = exp(-eta^2) * mean (l = 1 heat-kernel coefficient); its SO(3) projection is the mean."""
    rng = np.random.default_rng(10)
    mean = random_rotations(1, rng)[0]
    n = 40000
    r = sample_igso3(n, eta, mean, rng=rng)
    m = r.mean(0)
    assert np.abs(m - np.exp(-eta**2) * mean).max() < 5 / np.sqrt(n)
    assert geodesic_distance_deg(project_to_so3(m), mean) < 1.0
    # perturbation side: R = mean @ E, so mean^T R has the IG law; the same law holds for R mean^T (isotropy)
    w_left = np.arccos(np.clip((np.einsum("ij,nij->n", mean, r) - 1) / 2, -1, 1))
    w_right = rotation_angle(r @ mean.T)
    np.testing.assert_allclose(w_left, w_right, atol=1e-7)
    # higher characters: E[chi_2] = 5 exp(-3 eta^2)
    w = rotation_angle(r, mean)
    chi2 = np.sin(2.5 * w) / np.sin(w / 2)
    assert abs(chi2.mean() - 5 * np.exp(-3 * eta**2)) < 5 * chi2.std() / np.sqrt(n)


def test_sample_igso3_semigroup() -> None:
    """Products of independent IG(a) and IG(b) rotations follow IG(sqrt(a^2 + b^2)) (heat kernel semigroup)."""
    a, b = 0.3, 0.4
    e1 = sample_igso3(20000, a, rng=11)
    e2 = sample_igso3(20000, b, rng=12)
    w = rotation_angle(e1 @ e2)
    assert stats.kstest(w, lambda x: _series_cdf(x, 0.5)).pvalue > 1e-3
    # and not IG(a + b) (a wrong parametrisation would pass the single-eta checks but fail here)
    assert stats.kstest(w, lambda x: _series_cdf(x, 0.7)).pvalue < 1e-6


def test_igso3_density_matches_sample_histogram() -> None:
    """Histogram of the angle of samples vs the density integrated over the bins."""
    eta = 0.4
    w = rotation_angle(sample_igso3(100000, eta, rng=13))
    edges = np.linspace(0.0, np.pi, 31)
    counts, _ = np.histogram(w, edges)
    probs = np.diff(_series_cdf(edges, eta))
    expected = probs * len(w)
    ok = expected > 20
    chi2 = ((counts[ok] - expected[ok]) ** 2 / expected[ok]).sum()
    assert stats.chi2.sf(chi2, ok.sum() - 1) > 1e-3


def test_igso3_bad_inputs() -> None:
    with pytest.raises(ValueError):
        igso3_angle_density(np.array([0.1]), 0.0)
    with pytest.raises(ValueError):
        igso3_angle_density(np.array([4.0]), 0.5)
    with pytest.raises(ValueError):
        sample_igso3(10, -1.0)
    with pytest.raises(ValueError):
        sample_igso3(10, 0.5, mean=np.eye(4))


# ---------------------------------------------------------------------------------------------------------------
# preferred orientation
# ---------------------------------------------------------------------------------------------------------------


def _vmf_cap(kappa: float, angle_rad: float) -> float:
    return float(-np.expm1(-kappa * (1 - np.cos(angle_rad))) / -np.expm1(-2 * kappa))


@pytest.mark.parametrize("kappa", [2.0, 20.0, 200.0])
def test_vmf_sampler_cap_probabilities(kappa: float) -> None:
    rng = np.random.default_rng(14)
    mu = np.array([0.3, -0.5, 0.8])
    mu /= np.linalg.norm(mu)
    po = PreferredOrientation(means=mu[None], kappas=np.array([kappa]), weights=np.array([1.0]))
    r = po.sample(40000, rng)
    np.testing.assert_allclose(np.swapaxes(r, 1, 2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    d = r[:, 2, :]  # viewing direction = third row of A
    ang = np.arccos(np.clip(d @ mu, -1, 1))
    for a_deg in (5.0, 10.0, 20.0, 45.0, 90.0):
        p = _vmf_cap(kappa, np.radians(a_deg))
        frac = (ang <= np.radians(a_deg)).mean()
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / len(ang)) + 1e-3
    # azimuth around mu uniform: mean of the component perpendicular to mu vanishes
    perp = d - (d @ mu)[:, None] * mu
    assert np.abs(perp.mean(0)).max() < 5 / np.sqrt(len(d))


def test_preferred_orientation_in_plane_uniform_and_invariant() -> None:
    po = PreferredOrientation.default_top_view()
    r = po.sample(20000, np.random.default_rng(15))
    # in-plane angle: RELION psi recovered with scipy (A^T is the scipy ZYZ matrix) must be uniform
    psi = Rotation.from_matrix(np.swapaxes(r, 1, 2)).as_euler("ZYZ", degrees=True)[:, 2]
    assert stats.kstest(psi, stats.uniform(-180, 360).cdf).pvalue > 1e-3
    # density does not depend on the in-plane angle: A -> Rz(phi) A keeps the third row
    rz = Rotation.from_euler("z", np.random.default_rng(16).uniform(0, 360, len(r)), degrees=True).as_matrix()
    np.testing.assert_allclose(po.log_density(rz @ r), po.log_density(r), atol=1e-12)


def test_preferred_orientation_normalised_wrt_haar() -> None:
    po = PreferredOrientation(
        means=np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1, 1]]),
        kappas=np.array([40.0, 5.0, 0.0]),
        weights=np.array([0.5, 0.3, 0.2]),
    )
    u = random_rotations(200_000, np.random.default_rng(17))
    vals = np.exp(po.log_density(u))
    assert abs(vals.mean() - 1.0) < 5 * vals.std() / np.sqrt(len(u))
    # the density depends on the viewing direction only: equal-area HEALPix quadrature at Nside 64 (0.9 deg)
    dirs = _healpix_directions(64)
    assert np.exp(po.log_density_directions(dirs)).mean() == pytest.approx(1.0, abs=1e-3)  # measured 2.7e-4
    np.testing.assert_allclose(po.log_density(u[:100]), po.log_density_directions(u[:100, 2, :]))
    # single component: density at the mean direction is kappa / tanh... = 2 kappa / (1 - exp(-2 kappa))
    one = PreferredOrientation(means=np.array([[0, 0, 1.0]]), kappas=np.array([40.0]), weights=np.array([1.0]))
    assert float(np.exp(one.log_density(np.eye(3)))) == pytest.approx(80.0 / -np.expm1(-80.0))
    # huge kappa stays finite in log space
    sharp = PreferredOrientation(means=np.array([[0, 0, 1.0]]), kappas=np.array([1e5]), weights=np.array([1.0]))
    assert np.isfinite(sharp.log_density(u[:10])).all()


def test_preferred_orientation_samples_match_density() -> None:
    """E_sample[h(d)] equals the Haar quadrature of h * density for a few test functions h."""
    po = PreferredOrientation(
        means=np.array([[0, 0, 1.0], [1.0, 0, 0]]), kappas=np.array([15.0, 3.0]), weights=np.array([0.6, 0.4])
    )
    r = po.sample(60000, np.random.default_rng(18))
    dirs = _healpix_directions(128)  # equal-area quadrature of the sphere, 0.46 deg pixels
    dens = np.exp(po.log_density_directions(dirs))
    for h in (lambda d: d[..., 2], lambda d: d[..., 0] ** 2, lambda d: (d[..., 2] > np.cos(np.radians(25))) * 1.0):
        sample_mean = h(r[:, 2, :]).mean()
        grid_mean = (dens * h(dirs)).mean()
        se = h(r[:, 2, :]).std() / np.sqrt(len(r))
        assert abs(sample_mean - grid_mean) < 5 * se + 1e-3


def test_default_top_view_fraction() -> None:
    po = PreferredOrientation.default_top_view()
    d = po.sample(40000, np.random.default_rng(19))[:, 2, :]
    frac = (d[:, 2] > np.cos(np.radians(20))).mean()
    expected = 0.75 * _vmf_cap(40.0, np.radians(20)) + 0.25 * (1 - np.cos(np.radians(20))) / 2
    assert frac == pytest.approx(expected, abs=0.01)
    assert 0.65 < frac < 0.75


def test_preferred_orientation_bad_inputs() -> None:
    with pytest.raises(ValueError):
        PreferredOrientation(means=np.zeros((1, 3)), kappas=np.array([1.0]), weights=np.array([1.0]))
    with pytest.raises(ValueError):
        PreferredOrientation(means=np.eye(3)[:1], kappas=np.array([-1.0]), weights=np.array([1.0]))
    with pytest.raises(ValueError):
        PreferredOrientation(means=np.eye(3)[:2], kappas=np.array([1.0, 2.0]), weights=np.array([0.0, 0.0]))
    with pytest.raises(ValueError):
        PreferredOrientation(means=np.eye(3)[:2], kappas=np.array([1.0]), weights=np.array([1.0, 1.0]))
