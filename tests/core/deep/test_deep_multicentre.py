"""Multi-centre local search of the MMSE engine (the search space of deep-prior MMSE): union of balls, each region
scored once, identical to a single-centre search when the centres coincide."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.assign._search_space import _SearchSpace
from bayespose.core.geometry.rotations import geodesic_distance_deg, random_rotations
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_map
from bayespose.data import fragment_map_path


def _turn(rots, deg, seed):
    rng = np.random.default_rng(seed)
    axes = rng.standard_normal((len(rots), 3))
    axes *= np.radians(deg) / np.linalg.norm(axes, axis=1, keepdims=True)
    return rots @ Rotation.from_rotvec(axes).as_matrix()


def test_union_of_balls_scores_each_region_once():
    search = PoseSearch(local_range_deg=10.0, local_step_deg=2.5)
    c0 = random_rotations(3, rng=0)
    centres = np.stack([c0, _turn(c0, 8.0, 1), c0, random_rotations(3, rng=2)], axis=1)  # (3, 4, 3, 3)
    space = _SearchSpace(search, centres)
    single = _SearchSpace(search, c0)
    rots, log_q = space.grid_for(np.arange(3))
    k = single.size
    for i in range(3):
        kept = rots[i][np.isfinite(log_q[i])]
        # every kept rotation lies in some ball and no rotation is scored twice
        d_centres = geodesic_distance_deg(kept[:, None], centres[i][None])
        assert (d_centres.min(1) <= 10.0 + 1e-6).all()
        d_pairs = geodesic_distance_deg(kept[:, None], kept[None])
        assert (d_pairs + np.eye(len(kept)) * 1e3).min() > 1e-6
        # a duplicated centre adds nothing; an overlapping one adds less than a ball; a far one a whole ball
        assert 2 * k < len(kept) < 3 * k
        np.testing.assert_allclose(np.exp(log_q[i][np.isfinite(log_q[i])]).sum(), 1.0, atol=1e-9)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("multicentre")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=12, snr=0.1, seed=3), out)
    volume, _ = read_map(fragment_map_path())
    return particles, volume


def test_duplicate_centres_equal_single_centre_search(small_set):
    particles, volume = small_set
    start = _turn(particles.rotations, 6.0, 4)
    search = PoseSearch(local_range_deg=12.0, local_step_deg=4.0, shift_range_px=1.0, threads=1)
    one = assign_poses(particles, volume, search, centers=start)
    two = assign_poses(particles, volume, search, centers=np.stack([start, start], axis=1), noise=one.noise)
    np.testing.assert_allclose(two.mmse_rotations, one.mmse_rotations, atol=1e-5)
    np.testing.assert_allclose(two.log_evidence, one.log_evidence, atol=1e-3)
    assert two.timings["scored_rotations_per_particle"] == one.timings["scored_rotations_per_particle"]


def test_extra_far_centres_do_not_change_a_confident_answer(small_set):
    """A decoy ball far from the truth holds no posterior mass: the MMSE poses equal those of the true ball
    alone, and the decoy doubles the scored rotations."""
    particles, volume = small_set
    start = _turn(particles.rotations, 6.0, 5)
    decoy = random_rotations(len(particles), rng=6)
    search = PoseSearch(local_range_deg=12.0, local_step_deg=4.0, shift_range_px=1.0, threads=1)
    one = assign_poses(particles, volume, search, centers=start)
    both = assign_poses(particles, volume, search, centers=np.stack([decoy, start], axis=1), noise=one.noise)
    far = geodesic_distance_deg(decoy, particles.rotations) > 40
    np.testing.assert_allclose(both.mmse_rotations[far], one.mmse_rotations[far], atol=1e-3)
    assert geodesic_distance_deg(one.mmse_rotations, particles.rotations).mean() < 6.0
    assert both.timings["scored_rotations_per_particle"] > 1.5 * one.timings["scored_rotations_per_particle"]


def test_centres_need_a_local_search(small_set):
    particles, volume = small_set
    with pytest.raises(ValueError, match="local"):
        assign_poses(particles, volume, PoseSearch(), centers=particles.rotations[:, None])
    with pytest.raises(ValueError, match="centres"):
        assign_poses(particles, volume, PoseSearch(local_range_deg=10), centers=particles.rotations[:3, None])


def test_seeded_search_with_every_cell_equals_the_global_search(small_set):
    """Seed cells = the whole coarse grid reproduces the global coarse-to-fine search (same posterior, same
    refinement); seeds near the truth give the same answer while scoring a few % of the rotations."""
    from bayespose.core.deep.prior_refine import cells_near
    from bayespose.core.geometry.grids import healpix_grid

    particles, volume = small_set
    search = PoseSearch(shift_range_px=1.0, threads=1)
    glob = assign_poses(particles, volume, search)
    k = len(healpix_grid(search.healpix_order))
    every = assign_poses(particles, volume, search, noise=glob.noise,
                         seed_cells=np.tile(np.arange(k), (len(particles), 1)))
    np.testing.assert_allclose(every.mmse_rotations, glob.mmse_rotations, atol=1e-5)
    np.testing.assert_allclose(every.log_evidence, glob.log_evidence, rtol=1e-5)
    seeds = cells_near(_turn(particles.rotations, 5.0, 7)[:, None], search.healpix_order, 20.0)
    near = assign_poses(particles, volume, search, noise=glob.noise, seed_cells=seeds)
    same = geodesic_distance_deg(near.mmse_rotations, glob.mmse_rotations) < 0.05
    assert same.mean() >= 0.75, geodesic_distance_deg(near.mmse_rotations, glob.mmse_rotations)
    err_near = geodesic_distance_deg(near.mmse_rotations, particles.rotations)
    err_glob = geodesic_distance_deg(glob.mmse_rotations, particles.rotations)
    assert np.median(err_near) < np.median(err_glob) + 0.5
    assert near.timings["scored_rotations_per_particle"] < 0.05 * glob.timings["scored_rotations_per_particle"]
    with pytest.raises(ValueError, match="seed cells"):
        assign_poses(particles, volume, search, seed_cells=np.full((len(particles), 2), k))
