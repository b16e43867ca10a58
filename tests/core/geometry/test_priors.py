"""Priors: normalisation w.r.t. Haar, IGSO3 prior equals the so3_distributions density, grid prior lookups, and the
spec parser's errors."""

import numpy as np
import pytest

from bayespose.core.geometry import so3_distributions as so3d
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import GridPrior, IGSO3Prior, UniformPrior, ViewingDirectionPrior, prior_from_spec
from bayespose.core.geometry.rotations import random_rotations


def test_priors_are_normalised_densities_wrt_haar():
    sample = random_rotations(40000, 0)
    for prior in (UniformPrior(), IGSO3Prior(random_rotations(1, 1)[0], 0.8),
                  ViewingDirectionPrior(so3d.PreferredOrientation.default_top_view())):
        mean_density = np.exp(prior.log_density(sample)[0]).mean()
        assert mean_density == pytest.approx(1.0, abs=0.05), prior.name


def test_igso3_prior_matches_the_exact_density_and_is_per_particle():
    means = random_rotations(3, 2)
    rots = random_rotations(50, 3)
    prior = IGSO3Prior(means, 0.3)
    values = prior.log_density(rots, np.array([2, 0]))
    for row, i in enumerate([2, 0]):
        np.testing.assert_allclose(values[row], so3d.igso3_log_density(rots, means[i], 0.3), atol=1e-3)
    per_particle_rots = np.stack([rots[:10], rots[10:20]])
    np.testing.assert_allclose(prior.log_density(per_particle_rots, np.array([1, 1]))[1],
                               so3d.igso3_log_density(rots[10:20], means[1], 0.3), atol=1e-3)


def test_grid_prior_looks_up_the_cell_of_any_rotation():
    grid = healpix_grid(1)
    rng = np.random.default_rng(4)
    log_w = rng.standard_normal((2, len(grid)))
    prior = GridPrior(1, log_w)
    np.testing.assert_array_equal(prior.cell_index(grid.rotations), np.arange(len(grid)))
    expected = log_w - np.logaddexp.reduce(log_w, axis=1, keepdims=True) + np.log(len(grid))
    np.testing.assert_allclose(prior.log_density(grid.rotations, np.array([1, 0])), expected[[1, 0]])
    # a rotation slightly off a grid point belongs to that point's cell
    from scipy.spatial.transform import Rotation

    nudged = grid.rotations[::97] @ Rotation.from_rotvec([0.02, -0.01, 0.015]).as_matrix()
    np.testing.assert_array_equal(prior.cell_index(nudged), np.arange(len(grid))[::97])
    with pytest.raises(ValueError, match="log weights"):
        GridPrior(1, np.zeros((2, 10)))


def test_prior_specs():
    assert isinstance(prior_from_spec("uniform").prior, UniformPrior)
    assert prior_from_spec("igso3:0.5").prior.eta == 0.5
    spec = prior_from_spec("local:9", random_rotations(4, 0))
    assert spec.local_range_deg == 9 and spec.prior.per_particle
    assert isinstance(prior_from_spec("preferred:0,90,20,0.5").prior, ViewingDirectionPrior)
    for bad, message in (("local:9", "input poses"), ("igso3:x", "bad prior"), ("banana", "unknown prior"),
                         ("preferred:1,2", "bad prior")):
        with pytest.raises(ValueError, match=message):
            prior_from_spec(bad)
