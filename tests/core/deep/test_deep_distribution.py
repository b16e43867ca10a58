"""One particle's predicted distribution for the viewers (:func:`bayespose.core.deep.predict.distribution_on_grid`)."""

import numpy as np
import pytest

from bayespose.core.deep.predict import distribution_on_grid
from bayespose.core.geometry.rotations import random_rotations


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
