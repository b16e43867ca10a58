"""Deep-prior MMSE with adaptive seeds, the fit z-score check and the global-search fallback
(bayespose.core.deep.prior_refine). Synthetic network predictions (peaked distributions on the HEALPix order-2
grid) around the true poses or around deliberately wrong ones, on simulated particles with known poses."""

from dataclasses import replace

import numpy as np
import pytest

from bayespose.core.assign import PoseSearch, assign_poses, estimate_noise_model
from bayespose.core.deep import PosePrediction
from bayespose.core.deep.prior_refine import (
    AUTO_FALLBACK_DEFICIT,
    AUTO_FALLBACK_Z,
    DeepPriorAssignment,
    DeepPriorSearch,
    deep_prior_assign,
    fallback_threshold,
    fit_zscores,
    seed_rotations,
)
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import geodesic_distance_deg, random_rotations
from bayespose.core.imaging.forward import prepare_volume
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.data import fragment_map_path

ORDER = 2
FLIP = np.diag([1.0, -1.0, -1.0])  # turns a view by 180° about the image x axis: the network's typical mistake


def _prediction(centres: np.ndarray, sigma_deg: float = 8.0, top_k: int = 8) -> PosePrediction:
    """A so3grid-like prediction: log p of each order-2 cell = -(angle to the particle's centre / sigma)² / 2."""
    grid = healpix_grid(ORDER)
    d = geodesic_distance_deg(grid.rotations[None], centres[:, None])  # (N, K)
    logp = -0.5 * (d / sigma_deg) ** 2
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    idx = np.argsort(-logp, axis=1)[:, :top_k]
    probs = np.exp(np.take_along_axis(logp, idx, axis=1))
    return PosePrediction(rotations=centres, confidence=probs.sum(1), top_rotations=grid.rotations[idx],
                          top_probabilities=probs, grid_order=ORDER, log_probabilities=logp.astype(np.float32))


@pytest.fixture(scope="module")
def particle_set(tmp_path_factory):
    """60 simulated particles (SNR 0.1, CTF, no shifts) with the noise model estimated from all of them (the
    reference scale of a few dozen particles is a few % off, which shifts every fit z-score)."""
    out = tmp_path_factory.mktemp("deep_prior_refine")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=60, snr=0.1, seed=21), out)
    volume, _ = read_map(fragment_map_path())
    images = read_images(particles)
    noise = estimate_noise_model(particles, prepare_volume(volume), particles.box / 2, images)
    return particles, images, volume, noise


def test_fit_llr_matches_the_engine_posterior_ratios(particle_set):
    """The fit's log-likelihood gain is the engine's log-likelihood up to a per-particle constant: with a uniform
    prior, equal quadrature weights and no shifts, log p(R_k | Y) - log p(R_j | Y) = LLR_k - LLR_j."""
    particles, images, volume, _ = particle_set
    sub = particles.subset(np.arange(3))
    search = PoseSearch(healpix_order=0, refine_levels=0, shift_range_px=0.0, threads=1)
    res = assign_poses(sub, volume, search, images=images[:3], keep_marginals=(0, 1, 2))
    radius = res.timings["radii_px"][0]
    for i in range(3):
        rots, probs = res.marginals[i]
        fit = fit_zscores(sub.subset([i] * len(rots)), volume, rots, None, res.noise, radius,
                          np.repeat(images[i:i + 1], len(rots), axis=0))
        keep = probs > 1e-12
        engine = np.log(probs[keep])
        ours = fit.llr[keep]
        assert keep.sum() >= 3
        np.testing.assert_allclose(engine - engine.max(), ours - ours.max(), atol=0.05 + 1e-3 * np.ptp(ours))


def test_fit_z_is_standard_normal_at_the_true_pose_and_very_low_at_a_flipped_one(particle_set):
    """Under the model (noise and scale estimated from the particles, as the engine does) z ~ N(0, 1) at the
    true pose; at the flipped view the squared projection difference in noise units pushes it far down."""
    particles, images, volume, noise = particle_set
    true = fit_zscores(particles, volume, particles.rotations, particles.origins_A, noise, 32.0, images)
    flipped = fit_zscores(particles, volume, FLIP @ particles.rotations, particles.origins_A, noise, 32.0, images)
    assert abs(np.mean(true.z)) < 0.8 and 0.4 < np.std(true.z) < 1.8, true.z
    assert (flipped.z < -5).all(), flipped.z
    # the flipped view projects to the mirror image: the same signal energy, only the fit tells them apart
    np.testing.assert_allclose(flipped.energy, true.energy, rtol=0.01)
    # the grid credit: the expected loss of a pose delta away grows as delta² for small delta, and raises z
    one = fit_zscores(particles, volume, particles.rotations, None, noise, 32.0, images, tolerance_deg=1.0)
    two = fit_zscores(particles, volume, particles.rotations, None, noise, 32.0, images, tolerance_deg=2.0)
    assert (one.grid_loss > 0).all() and 3.0 < np.median(two.grid_loss / one.grid_loss) < 5.0
    np.testing.assert_allclose(two.z - true.z, two.grid_loss / np.sqrt(2 * true.energy), rtol=1e-6)


def test_fit_deficit_tells_a_model_mismatch_from_a_wrong_pose(tmp_path):
    """At high SNR a right pose under a 4 % reference-scale error has a significant z-score (z ≈ -ε·sqrt(2E)) but
    leaves only ~2ε of the signal unexplained, a flipped view about half or more: the default rule (z and deficit)
    keeps the right poses and re-assigns the flipped ones; the z-score alone (deficit 0) re-assigns both."""
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=8, snr=3.0, seed=4), tmp_path)
    images = read_images(particles)
    volume, _ = read_map(fragment_map_path())
    true_noise = estimate_noise_model(particles, prepare_volume(volume), particles.box / 2, images)
    noise = replace(true_noise, scale=true_noise.scale * 1.04)
    radius = particles.box / 2
    right = fit_zscores(particles, volume, particles.rotations, None, noise, radius, images)
    flipped = fit_zscores(particles, volume, FLIP @ particles.rotations, None, noise, radius, images)
    assert (right.z < AUTO_FALLBACK_Z).all(), right.z  # the setup: the z-score alone would call them wrong
    np.testing.assert_allclose(right.deficit, -right.z * np.sqrt(2 * right.energy) / right.energy)
    assert (right.deficit < 0.15).all() and (flipped.deficit > 0.4).all(), (right.deficit, flipped.deficit)
    assert (right.deficit < AUTO_FALLBACK_DEFICIT).all() and (flipped.deficit > AUTO_FALLBACK_DEFICIT).all()

    wrong = np.arange(len(particles)) % 2 == 1
    pred = _prediction(np.where(wrong[:, None, None], FLIP @ particles.rotations, particles.rotations))
    search = PoseSearch(shift_range_px=0.0, threads=1)
    plain = deep_prior_assign(particles, pred, volume, search, DeepPriorSearch(fallback_z=None), images=images,
                              noise=noise)
    found = geodesic_distance_deg(plain.mle_rotations, particles.rotations) < 3.0  # the search found the pose
    assert (found & ~wrong).sum() >= 3  # the setup: most right predictions lead to their pose
    both = deep_prior_assign(particles, pred, volume, search, images=images, noise=noise)
    z_only = deep_prior_assign(particles, pred, volume, search, DeepPriorSearch(fallback_deficit=0.0),
                               images=images, noise=noise)
    assert both.deep_fallback[wrong].all() and not both.deep_fallback[found].any(), both.deep_fit_z
    assert z_only.deep_fallback.all(), z_only.deep_fit_z
    assert geodesic_distance_deg(both.mmse_rotations, particles.rotations).max() < 10.0


def test_wrong_prediction_falls_back_to_the_global_result_and_right_ones_do_not(particle_set):
    """Half of the particles get a prediction peaked at their true pose, half one peaked at the 180°-flipped
    view. Without the check the flipped ones stay wrong; with the default check they are re-assigned and carry
    exactly the global search's result; the right ones keep the (cheaper) deep-prior result."""
    particles, images, volume, noise = particle_set
    particles, images = particles.subset(np.arange(12)), images[:12]
    n = len(particles)
    wrong = np.arange(n) % 2 == 1
    centres = np.where(wrong[:, None, None], FLIP @ particles.rotations, particles.rotations)
    pred = _prediction(centres)
    search = PoseSearch(shift_range_px=0.0, threads=1)
    plain = deep_prior_assign(particles, pred, volume, search, DeepPriorSearch(fallback_z=None), images=images,
                              noise=noise)
    err_plain = geodesic_distance_deg(plain.mmse_rotations, particles.rotations)
    assert (err_plain[wrong] > 60).all(), err_plain  # the setup: the true pose is never searched
    assert plain.deep_fallback is not None and not plain.deep_fallback.any() and plain.deep_fit_z is None

    res = deep_prior_assign(particles, pred, volume, search, images=images, noise=noise)  # fallback_z AUTO
    assert isinstance(res, DeepPriorAssignment)
    assert res.deep_fallback[wrong].all(), res.deep_fit_z
    assert (res.deep_fit_z[wrong] < AUTO_FALLBACK_Z).all()
    assert res.deep_fallback[~wrong].sum() <= 1, res.deep_fit_z  # a right prediction stays (noise: at most 1)
    glob = assign_poses(particles.subset(np.flatnonzero(wrong)), volume, search, images=images[wrong],
                        noise=res.noise)
    np.testing.assert_allclose(res.mmse_rotations[wrong], glob.mmse_rotations, atol=1e-4)
    np.testing.assert_allclose(res.log_evidence[wrong], glob.log_evidence, rtol=1e-5)
    err = geodesic_distance_deg(res.mmse_rotations, particles.rotations)
    assert np.median(err) < 6.0 and err.max() < 15.0, err
    kept = ~res.deep_fallback
    np.testing.assert_allclose(res.mmse_rotations[kept], plain.mmse_rotations[kept], atol=1e-6)
    # the work: the deep-prior search plus the global search of the fallen-back particles
    per_global = glob.timings["scored_rotations_per_particle"]
    expected = plain.timings["scored_rotations_per_particle"] + res.deep_fallback.sum() * per_global / n
    assert res.timings["scored_rotations_per_particle"] == pytest.approx(expected, rel=0.02)
    assert res.timings["fallback_particles"] == res.deep_fallback.sum()
    out = res.to_particle_set(particles)
    np.testing.assert_array_equal(out.extra["bpDeepFallback"], res.deep_fallback.astype(int))
    np.testing.assert_allclose(out.extra["bpDeepFitZ"], res.deep_fit_z)
    np.testing.assert_allclose(out.extra["bpDeepConfidence"], pred.confidence)
    np.testing.assert_allclose(out.extra["bpDeepTopProbability"], pred.top_probabilities[:, 0])


def test_fallback_keeps_the_shift_search_around_the_input_origins(tmp_path):
    """Particles with origins: the fallen-back particles get the global search centred on their input origins
    (all coarse cells as seeds), which finds the true origin within the (small) shift range."""
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=4, snr=0.3, seed=5,
                                                                     max_shift_px=4.0), tmp_path)
    images = read_images(particles)
    volume, _ = read_map(fragment_map_path())
    pred = _prediction(FLIP @ particles.rotations)  # every prediction wrong
    search = PoseSearch(shift_range_px=1.0, threads=1)
    res = deep_prior_assign(particles, pred, volume, search, DeepPriorSearch(fallback_z=0.0), images=images)
    assert res.deep_fallback.all()
    assert np.median(geodesic_distance_deg(res.mmse_rotations, particles.rotations)) < 8.0
    np.testing.assert_allclose(res.mmse_origins_A, particles.origins_A, atol=1.0 * particles.pixel_size)


def test_adaptive_seeds_follow_the_predicted_mass():
    """A peaked prediction needs a few cells for 99 % of its mass, a flat one hits the cap; the seeds are the most
    probable cells; seed_mass=None gives the fixed top-K."""
    rng = np.random.default_rng(0)
    centres = random_rotations(2, rng=1)
    peaked = _prediction(centres, sigma_deg=4.0)
    rot, counts = seed_rotations(peaked, seed_mass=0.99, max_seed_cells=128)
    assert (counts >= 1).all() and (counts <= 12).all(), counts
    best = np.argmax(peaked.log_probabilities, axis=1)
    np.testing.assert_allclose(rot[:, 0], healpix_grid(ORDER).rotations[best])
    flat = _prediction(centres, sigma_deg=1e4)
    _, counts = seed_rotations(flat, seed_mass=0.99, max_seed_cells=50)
    np.testing.assert_array_equal(counts, [50, 50])
    rot, counts = seed_rotations(flat, seed_mass=None, top_k=3)
    assert rot.shape == (2, 3, 3, 3) and (counts == 3).all()
    logp = np.log(rng.dirichlet(np.ones(len(healpix_grid(ORDER))), size=2))
    mixed = PosePrediction(centres, np.ones(2), centres[:, None], np.ones((2, 1)), ORDER, logp)
    _, counts = seed_rotations(mixed, seed_mass=0.5, max_seed_cells=10_000)
    for row, c in zip(logp, counts):  # the smallest number of cells holding half the mass
        p = np.sort(np.exp(row))[::-1]
        assert p[:c].sum() >= 0.5 > p[:c - 1].sum()


def test_bad_settings_are_rejected(particle_set):
    particles, images, volume, _ = particle_set
    assert fallback_threshold("auto") == AUTO_FALLBACK_Z
    assert fallback_threshold("none") is None and fallback_threshold(None) is None
    assert fallback_threshold("-2.5") == -2.5 and fallback_threshold(1) == 1.0
    for bad in ("sometimes", float("nan"), True):
        with pytest.raises(ValueError, match="fallback"):
            fallback_threshold(bad)
    pred = _prediction(particles.rotations)
    with pytest.raises(ValueError, match="seed_mass"):
        seed_rotations(pred, seed_mass=1.5)
    for bad, word in ((dict(fallback_z="maybe"), "fallback"), (dict(fallback_z=float("inf")), "fallback"),
                      (dict(seed_mass=0.0), "seed_mass"), (dict(seed_mass="auto"), "seed_mass"),
                      (dict(method="ball"), "method"), (dict(local_range_deg=120.0), "local range"),
                      (dict(top_k=0), "top_k"), (dict(max_seed_cells=0), "max_seed_cells")):
        with pytest.raises(ValueError, match=word):
            DeepPriorSearch(**bad)
    with pytest.raises(ValueError, match="rotation"):
        fit_zscores(particles, volume, particles.rotations[:2], None, None, 10.0, images)
