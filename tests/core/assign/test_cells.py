"""The refinement's cells (bayespose.core.assign._cells): the ring around a kept cell holds the finer cell nearest
to any pose near that cell, which the kept cell's own 8 children do not (the miss the ring fixes)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from bayespose.core.assign._cells import cell_ids, children_with_ring
from bayespose.core.geometry.grids import cell_rotations, healpix_grid, split_cells
from bayespose.core.geometry.rotations import geodesic_distance_deg

ORDER = 1  # parent cells of order 1 (30°), children of order 2


def _all_children_lattice(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cell of a refinement level of ``order``: directions, in-plane centres (i + 1/2) Δ, rotations."""
    n_psi = 6 * 2 ** order
    dirs = np.repeat(np.arange(12 * 4 ** order), n_psi)
    psis = np.tile((np.arange(n_psi) + 0.5) * 360.0 / n_psi, 12 * 4 ** order)
    return dirs, psis, cell_rotations(order, dirs[None], psis[None])[0]


def test_ring_holds_the_nearest_finer_cell_of_every_pose_near_the_kept_cell():
    grid = healpix_grid(ORDER)
    rng = np.random.default_rng(0)
    parents = rng.choice(len(grid), 12, replace=False)
    lat_dir, lat_psi, lat_rot = _all_children_lattice(ORDER + 1)
    lat_ids = cell_ids(ORDER + 1, lat_dir, lat_psi, coarse=False)
    missed = {0: 0, 1: 0}
    for parent in parents:
        # poses within 0.35 of a parent spacing of the parent's centre: inside it or just across its border
        axes = rng.standard_normal((200, 3))
        axes *= np.radians(rng.uniform(0, 0.35 * grid.spacing_deg, 200))[:, None] / np.linalg.norm(axes, axis=1,
                                                                                                   keepdims=True)
        poses = grid.rotations[parent] @ Rotation.from_rotvec(axes).as_matrix()
        nearest = lat_ids[np.argmin(np.stack([geodesic_distance_deg(lat_rot, p[None]) for p in poses]), axis=1)]
        for ring in (0, 1):
            d, p, valid = children_with_ring(ORDER, grid.direction_index[[parent]][None],
                                             grid.euler_deg[[parent], 2][None], np.ones((1, 1), bool),
                                             np.full((1, 1), bool(ring)))
            ids = cell_ids(ORDER + 1, d[valid], p[valid], coarse=False)
            assert len(np.unique(ids)) == len(ids)  # each cell once
            missed[ring] += int((~np.isin(nearest, ids)).sum())
            if ring == 0:  # without a ring: exactly the 8 children of split_cells
                child_dir, child_psi = split_cells(ORDER, grid.direction_index[[parent]], grid.euler_deg[[parent], 2])
                np.testing.assert_array_equal(np.sort(ids), np.sort(cell_ids(ORDER + 1, child_dir, child_psi,
                                                                             coarse=False).ravel()))
            else:
                assert 50 <= len(ids) <= 64  # 4 x 4 x 4 (fewer at the 8 HEALPix pixels with 7 neighbours)
    print(f"poses whose nearest finer cell is not refined: children only {missed[0]}, with the ring {missed[1]}")
    assert missed[1] == 0
    assert missed[0] > 200  # the miss the ring fixes (333 of these 2400 poses)


def test_padding_and_several_kept_cells_per_row():
    """Rows with different numbers of kept cells: padding is marked invalid, the ring goes around the first
    ``ringed`` cells only, and overlapping blocks of adjacent kept cells count each cell once."""
    grid = healpix_grid(ORDER)
    a, b = 5, int(np.argmin(geodesic_distance_deg(grid.rotations, grid.rotations[5][None]) + 1e3 * (
        np.arange(len(grid)) == 5)))  # cell 5 and its nearest neighbour cell
    direction = grid.direction_index[[[a, b], [a, a]]]
    psi = grid.euler_deg[[[a, b], [a, a]], 2]
    valid = np.array([[True, True], [True, False]])
    d, p, ok = children_with_ring(ORDER, direction, psi, valid, ringed=np.array([[True, False], [True, True]]))
    row0 = cell_ids(ORDER + 1, d[0][ok[0]], p[0][ok[0]], coarse=False)
    row1 = cell_ids(ORDER + 1, d[1][ok[1]], p[1][ok[1]], coarse=False)
    assert len(np.unique(row0)) == len(row0) and len(np.unique(row1)) == len(row1)
    child_dir, child_psi = split_cells(ORDER, grid.direction_index[[b]], grid.euler_deg[[b], 2])
    b_children = cell_ids(ORDER + 1, child_dir, child_psi, coarse=False).ravel()
    assert np.isin(b_children, row0).all()  # the second cell's own children are refined
    assert set(row1) < set(row0)  # row 1 = cell a with its ring only (its padding's ring flag is ignored)
    assert len(row0) < len(row1) + 8  # b's children overlap a's ring (adjacent cells)
