"""One particle's predicted distribution for the viewers (:func:`bayespose.core.deep.predict.distribution_on_grid`),
the refined modes and confidences of a grid distribution (:func:`bayespose.core.deep.predict.grid_modes`), and the
in-plane test-time turns of the grid model (:func:`~bayespose.core.deep.predict.turn_back_log_probs`)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bayespose.core.deep import TrainConfig
from bayespose.core.deep.data import inplane_rotation_matrix, rotate_shift_images
from bayespose.core.deep.models import build_model
from bayespose.core.deep.predict import (
    distribution_on_grid,
    grid_modes,
    inplane_turns,
    predict_from_inputs,
    turn_back_log_probs,
)
from bayespose.core.geometry.grids import containing_cell, healpix_grid
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


@pytest.mark.parametrize("angle", [15.0, 90.0, 135.0, 270.0])
def test_turn_back_puts_each_cell_at_the_pose_of_the_unturned_image(angle):
    """A turned image's pose is ``Rz(a) A`` (:func:`~bayespose.core.deep.data.inplane_rotation_matrix`, checked by
    projection in test_deep_data.py): a distribution concentrated on the cell holding ``Rz(a) A``, turned back,
    is concentrated on the cell of ``A`` (order 2: 24 psi angles, step 15°)."""
    order = 2
    grid = healpix_grid(order)
    cells = np.random.default_rng(4).choice(len(grid.rotations), 50, replace=False)
    turned = containing_cell(order, inplane_rotation_matrix(angle) @ grid.rotations[cells])
    log_probs = np.full((len(cells), len(grid.rotations)), -50.0)
    log_probs[np.arange(len(cells)), turned] = 0.0
    np.testing.assert_array_equal(np.argmax(turn_back_log_probs(log_probs, order, angle), axis=1), cells)
    with pytest.raises(ValueError, match="psi step"):
        turn_back_log_probs(log_probs, order, 10.0)


def test_inplane_turns_divide_the_grids_psi_angles():
    assert [inplane_turns(order) for order in (0, 1, 2, 3)] == [2, 4, 8, 8]  # 6, 12, 24, 48 psi angles
    assert inplane_turns(3, 1) == 1 and inplane_turns(3, 16) == 16
    with pytest.raises(ValueError, match="divide"):
        inplane_turns(3, 5)


def test_averaged_prediction_is_equivariant_to_its_turns():
    """With T turns the prediction is an average over the group of T in-plane turns, so for an image turned by
    one of them (90°: an exact pixel rotation) it equals the prediction of the unturned image, turned — for any
    network, here an untrained one (a missing average or a turn-back that is not a psi shift breaks it; its
    direction is checked above); one pass is not equivariant."""
    torch.manual_seed(0)
    config = TrainConfig(net_box=16, grid_order=1, device="cpu")
    network = SimpleNamespace(model=build_model("so3grid", 16, 1).eval(), config=config, grid_order=1,
                              symmetry="C1", temperature=1.0)
    c = torch.arange(16.0) - 8  # content inside a disc about pixel D // 2: turns by 90° are exact permutations
    images = torch.randn(6, 16, 16) * ((c[:, None] ** 2 + c[None, :] ** 2) <= 36)
    turned = rotate_shift_images(images, np.full(6, 90.0))
    assert torch.allclose(rotate_shift_images(turned, np.full(6, 270.0)), images, atol=1e-5)
    for turns, equivariant in ((4, True), (1, False)):
        plain = predict_from_inputs(network, images, turns=turns, device="cpu").log_probabilities
        rotated = predict_from_inputs(network, turned, turns=turns, device="cpu").log_probabilities
        close = np.allclose(turn_back_log_probs(rotated, 1, 90.0), plain, atol=1e-4)
        assert close == equivariant, turns
