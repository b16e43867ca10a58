"""One particle's predicted distribution for the viewers (:func:`bayespose.core.deep.predict.distribution_on_grid`),
and the refined modes and confidences of a grid distribution (:func:`bayespose.core.deep.predict.grid_modes`)."""

import numpy as np
import pytest

from bayespose.core.deep.predict import distribution_on_grid, grid_modes
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import geodesic_distance_deg, project_to_so3, random_rotations
from bayespose.core.geometry.symmetry import symmetry_group


def test_distribution_on_grid_normalises_grid_or_top_k():
    """Grid model: softmax of the log-probabilities over the whole grid (shift-invariant); quaternion model: the
    top-K probabilities renormalised (uniform when they are all 0)."""
    grid = random_rotations(5, 1)
    logp = np.log(np.array([1.0, 2.0, 3.0, 4.0, 10.0])) + 123.0
    rots, p = distribution_on_grid(logp, grid, grid[:2], np.array([0.5, 0.5]))
    np.testing.assert_array_equal(rots, grid)
    np.testing.assert_allclose(p, np.array([1, 2, 3, 4, 10]) / 20.0)
    rots, p = distribution_on_grid(None, None, grid[:3], np.array([0.2, 0.2, 0.4]))
    assert rots.shape == (3, 3, 3)
    np.testing.assert_allclose(p, [0.25, 0.25, 0.5])
    np.testing.assert_allclose(distribution_on_grid(None, None, grid[:2], np.zeros(2))[1], [0.5, 0.5])
    with pytest.raises(ValueError, match="grid"):
        distribution_on_grid(logp[:3], grid, grid[:1], np.ones(1))
    with pytest.raises(ValueError, match="grid_rotations"):
        distribution_on_grid(logp, None, grid[:1], np.ones(1))


def _dense_modes(log_probs, rotations, spacing_deg, group, radius_spacings=1.5):
    """The definition over the whole grid: for each particle, every cell whose nearest symmetry mate lies within
    ``radius_spacings`` spacings of the best cell, weighted by its probability, folded to that mate."""
    p = np.exp(log_probs - log_probs.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    best = rotations[np.argmax(p, axis=1)]
    limit = np.cos(np.radians(radius_spacings * spacing_deg)) - 1e-9
    m, conf, counted = np.zeros((len(p), 3, 3)), np.zeros(len(p)), np.zeros(p.shape, bool)
    for g in group:
        mates = rotations @ g
        near = ((np.einsum("nij,kij->nk", best, mates) - 1) / 2 >= limit) & ~counted
        counted |= near
        m += np.einsum("nk,kij->nij", np.where(near, p, 0.0), mates)
        conf += np.where(near, p, 0.0).sum(1)
    return project_to_so3(m), conf


@pytest.mark.parametrize("symmetry", ["C1", "C4", "D2", "O"])
def test_grid_modes_equal_the_dense_definition(symmetry):
    """The neighbour-table modes and confidences of :func:`grid_modes` equal the definition computed over the whole
    grid (peaked and flat distributions, order 2)."""
    grid = healpix_grid(2)
    rng = np.random.default_rng(4)
    centre = grid.rotations[rng.integers(0, len(grid), 40)]
    log_probs = rng.normal(size=(40, len(grid))) * 2 + 40 * (np.einsum("nij,kij->nk", centre, grid.rotations) - 1)
    log_probs[:5] = rng.normal(size=(5, len(grid))) * 0.1  # nearly flat
    modes, conf = grid_modes(log_probs, 2, symmetry)
    ref_modes, ref_conf = _dense_modes(log_probs, grid.rotations, grid.spacing_deg, symmetry_group(symmetry))
    assert geodesic_distance_deg(modes, ref_modes).max() < 1e-3
    np.testing.assert_allclose(conf, ref_conf, atol=1e-9)
    assert conf[5:].min() > 0.3 and conf[:5].max() < 0.1  # peaked vs flat (24 mates of O: 0.08)
