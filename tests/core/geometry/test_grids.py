"""Tests of bayespose.core.geometry.grids: RELION HEALPix grids and local grids with Haar quadrature weights.

Ground truth from outside the code under test: healpy's own pixel functions, RELION 3.1's sampling table
(``relion_refine`` writes ``_sampling.star``), closed-form Haar integrals (E tr R = 0, E tr^2 R = 1,
E R_ij R_kl = delta_ik delta_jl / 3) and the Haar measure of a geodesic ball, (t - sin t) / pi.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import healpy
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from bayespose.core.geometry.grids import (
    haar_ball_volume,
    healpix_grid,
    local_grid,
    local_grids,
    local_offsets,
    neighbour_table,
)
from bayespose.core.geometry.rotations import euler_to_matrix, geodesic_distance_deg, random_rotations
from bayespose.data import demo_map_path
from tests.helpers import need_relion

MAP_3J9G = demo_map_path()


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_healpix_grid_size_and_orthonormal(order: int) -> None:
    g = healpix_grid(order)
    assert len(g) == 72 * 8**order
    assert g.n_directions == 12 * 4**order and g.n_psi == 6 * 2**order
    assert g.spacing_deg == pytest.approx(60.0 / 2**order)
    r = g.rotations
    np.testing.assert_allclose(np.swapaxes(r, 1, 2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    assert g.weights.sum() == pytest.approx(1.0, abs=1e-12)
    # Euler metadata reproduces the matrices (RELION ZYZ, rotations.euler_to_matrix is the convention)
    np.testing.assert_allclose(euler_to_matrix(g.euler_deg), r, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_healpix_grid_no_duplicates(order: int) -> None:
    g = healpix_grid(order)
    tree = cKDTree(g.rotations.reshape(-1, 9))
    d, _ = tree.query(g.rotations.reshape(-1, 9), k=2)
    nn_deg = np.degrees(2 * np.arcsin(d[:, 1] / np.sqrt(8.0)))  # chordal -> geodesic
    # neighbours are never closer than ~0.85 * spacing (the smallest HEALPix pixel separation)
    assert nn_deg.min() > 0.8 * g.spacing_deg


def test_healpix_directions_match_healpy_and_index_layout() -> None:
    order = 2
    g = healpix_grid(order)
    nside = 2**order
    expected = np.stack(healpy.pix2vec(nside, np.arange(12 * nside**2), nest=True), axis=1)
    np.testing.assert_allclose(g.rotations[:, 2, :], expected[g.direction_index], atol=1e-12)
    # layout k = direction * n_psi + psi_index, psi = j * 360 / n_psi starting at 0 (RELION's setOrientations)
    k = np.arange(len(g))
    np.testing.assert_array_equal(g.direction_index, k // g.n_psi)
    np.testing.assert_array_equal(g.psi_index, k % g.n_psi)
    np.testing.assert_allclose(g.euler_deg[:, 2], g.psi_index * 360.0 / g.n_psi)
    assert (g.euler_deg[:, 0] > -180).all() and (g.euler_deg[:, 0] <= 180).all()
    # even coverage of the sphere: direction moments match the uniform ones (0 and I/3), and every spherical cap
    # {d : d.a > c} holds the fraction (1 - c) / 2 of the directions up to the pixels cut by its boundary, whose
    # share is O(perimeter / pixel size) / Npix = O(1 / Nside) (measured max 0.046 / Nside at orders 1-4)
    dirs = g.rotations[g.psi_index == 0][:, 2, :]
    np.testing.assert_allclose(dirs.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(dirs.T @ dirs / len(dirs), np.eye(3) / 3, atol=0.05 / nside**2)
    axes = random_rotations(50, np.random.default_rng(5))[:, 2, :]
    for c in (-0.5, 0.0, 0.5, 0.8):
        frac = (dirs @ axes.T > c).mean(axis=0)
        assert np.abs(frac - (1 - c) / 2).max() < 0.1 / nside


def test_healpix_grid_covers_so3() -> None:
    """Covering radius bound: for a pose A with direction d, let d_g be the nearest pixel centre (angle a <=
    healpy.max_pixrad) and Q the rotation about an axis perpendicular to d that carries d to d_g; the grid poses
    with direction d_g are a psi-circle spaced by step, so one of them is A Q composed with an in-plane rotation
    about d of angle b <= step / 2. Two rotations about perpendicular axes compose to angle
    2 arccos(cos(a/2) cos(b/2)), which bounds the distance to the nearest grid pose."""
    rng = np.random.default_rng(0)
    queries = random_rotations(2000, rng)
    for order in (1, 2, 3):
        g = healpix_grid(order)
        tree = cKDTree(g.rotations.reshape(-1, 9))
        _, idx = tree.query(queries.reshape(-1, 9))  # nearest in chordal = nearest in geodesic distance
        dist = geodesic_distance_deg(queries, g.rotations[idx])
        a = healpy.max_pixrad(2**order)
        b = np.radians(g.spacing_deg / 2)
        bound = np.degrees(2 * np.arccos(np.cos(a / 2) * np.cos(b / 2)))
        assert dist.max() <= bound
        assert np.median(dist) < 0.6 * g.spacing_deg  # order 2: 15 deg grid, median distance ~7.3 deg
        # (order 2, RELION's "15 degrees": bound 16.4 deg, measured max 11.5 deg)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_healpix_quadrature_haar_moments(order: int) -> None:
    """Equal weights integrate Haar moments: E tr R = 0, E tr(R)^2 = 1, E tr(R)^3 = 1, E R_ij R_kl = d_ik d_jl / 3.

    The psi sum is exact for in-plane degree < n_psi; the HEALPix midpoint rule on the directions has an O(pixel
    area) = O(1/Nside^2) error on quadratic functions of the direction (measured 0.047 / Nside^2 on E tr^2), so
    the tolerance is 0.06 / Nside^2; odd moments vanish exactly by the HEALPix z -> -z symmetry.
    """
    g = healpix_grid(order)
    nside = 2**order
    r, w = g.rotations, g.weights
    tr = np.trace(r, axis1=1, axis2=2)
    assert abs(w @ tr) < 1e-12
    assert abs(w @ tr**2 - 1.0) < 0.06 / nside**2
    assert abs(w @ tr**3 - 1.0) < 0.12 / nside**2
    second = np.einsum("k,kij,kab->ijab", w, r, r)
    exact = np.einsum("ia,jb->ijab", np.eye(3), np.eye(3)) / 3.0
    assert np.abs(second - exact).max() < 0.06 / nside**2
    # first moments vanish exactly (E R = 0 under Haar)
    np.testing.assert_allclose(np.einsum("k,kij->ij", w, r), 0.0, atol=1e-12)


def test_healpix_quadrature_error_converges_like_pixel_area() -> None:
    errs = []
    for order in (1, 2, 3):
        g = healpix_grid(order)
        tr = np.trace(g.rotations, axis1=1, axis2=2)
        errs.append(abs(g.weights @ tr**2 - 1.0))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert ((ratios > 3.5) & (ratios < 4.5)).all()  # halving the pixel size divides the error by 4


@pytest.mark.relion
def test_healpix_grid_matches_relion_sampling_table(tmp_path: Path) -> None:
    """relion_refine writes its (unperturbed) direction table to ``_sampling.star``; compare rot, tilt in order."""
    need_relion("relion_refine", "relion_project")
    starfile = pytest.importorskip("starfile")
    ang = tmp_path / "ang.star"
    ang.write_text(
        "\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnImagePixelSize #3\n"
        "_rlnImageSize #4\n_rlnImageDimensionality #5\n_rlnVoltage #6\n_rlnSphericalAberration #7\n"
        "_rlnAmplitudeContrast #8\n1 opticsGroup1 4.4 64 2 300 2.7 0.1\n\n"
        "data_particles\n\nloop_\n_rlnAngleRot #1\n_rlnAngleTilt #2\n_rlnAnglePsi #3\n_rlnImageName #4\n"
        "_rlnOpticsGroup #5\n10 20 30 1@x.mrcs 1\n40 50 60 2@x.mrcs 1\n70 80 90 3@x.mrcs 1\n"
    )
    subprocess.run(["relion_project", "--i", str(MAP_3J9G), "--o", "proj", "--ang", "ang.star"],
                   cwd=tmp_path, check=True, capture_output=True)
    for order in (1, 2):
        out = tmp_path / f"o{order}"
        out.mkdir()
        subprocess.run(
            ["relion_refine", "--o", f"{out.name}/run", "--i", "proj.star", "--ref", str(MAP_3J9G),
             "--ini_high", "30", "--iter", "1", "--pad", "1", "--ctf_corrected_ref", "--particle_diameter", "250",
             "--zero_mask", "--oversampling", "0", "--healpix_order", str(order), "--offset_range", "0",
             "--offset_step", "1", "--sym", "C1", "--K", "1", "--tau2_fudge", "1", "--j", "1",
             "--dont_combine_weights_via_disc", "--pool", "3"],
            cwd=tmp_path, check=True, capture_output=True,
        )
        blocks = starfile.read(out / "run_it001_sampling.star", always_dict=True)
        general = blocks["sampling_general"]
        psi_step = float(np.asarray(general["rlnPsiStep"]).ravel()[0])
        table = blocks["sampling_directions"]
        g = healpix_grid(order)
        ours = g.euler_deg[g.psi_index == 0][:, :2]
        relion = np.stack([table["rlnAngleRot"].to_numpy(), table["rlnAngleTilt"].to_numpy()], axis=1)
        assert relion.shape == ours.shape
        rot_diff = (ours[:, 0] - relion[:, 0] + 180.0) % 360.0 - 180.0
        assert np.abs(rot_diff).max() < 1e-4
        np.testing.assert_allclose(ours[:, 1], relion[:, 1], atol=1e-4)
        assert psi_step == pytest.approx(g.spacing_deg)


def test_local_grid_contains_centre_and_stays_in_range() -> None:
    rng = np.random.default_rng(1)
    center = random_rotations(1, rng)[0]
    g = local_grid(center, range_deg=12.0, step_deg=3.0)
    np.testing.assert_allclose(g.rotations[0], center, atol=1e-14)
    dist = geodesic_distance_deg(center, g.rotations)
    assert dist.max() <= 12.0 + 1e-9
    assert dist[1:].min() == pytest.approx(3.0, abs=1e-6)  # nearest lattice neighbours at one step
    # cubic lattice, |v| <= 4 steps: 257 points (count of integer vectors with norm <= 4)
    ints = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert len(g) == int((np.linalg.norm(ints, axis=1) <= 4).sum())
    r = g.rotations
    np.testing.assert_allclose(np.swapaxes(r, 1, 2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    assert g.weights.sum() == pytest.approx(1.0)
    # weights follow the Haar density in exponential coordinates: (2 - 2 cos t) / t^2 relative to the centre
    t = np.radians(dist[1:])
    np.testing.assert_allclose(g.weights[1:] / g.weights[0], (2 - 2 * np.cos(t)) / t**2, rtol=1e-9)
    assert (g.direction_index == -1).all()


@pytest.mark.parametrize("range_deg,step_deg,tol", [(10.0, 1.0, 0.01), (30.0, 3.0, 0.01), (180.0, 10.0, 0.002),
                                                    (10.0, 2.5, 0.06)])
def test_local_grid_haar_volume(range_deg: float, step_deg: float, tol: float) -> None:
    """The Riemann sum of the Haar density over the lattice cells equals the Haar measure of the geodesic ball,
    (t - sin t) / pi, up to the lattice-count boundary error (~1 % at range/step = 10, ~4 % at 4)."""
    _, w, volume = local_offsets(range_deg, step_deg)
    exact = (np.radians(range_deg) - np.sin(np.radians(range_deg))) / np.pi
    assert haar_ball_volume(np.radians(range_deg)) == pytest.approx(exact)
    assert volume == pytest.approx(exact, rel=tol)


def test_local_grid_volume_against_monte_carlo_fraction() -> None:
    """Independent of the closed form: the fraction of uniform rotations within 30 deg of a centre."""
    rng = np.random.default_rng(2)
    center = random_rotations(1, rng)[0]
    q = random_rotations(400_000, rng)
    frac = (geodesic_distance_deg(center, q) <= 30.0).mean()
    _, _, volume = local_offsets(30.0, 2.0)
    se = np.sqrt(frac * (1 - frac) / len(q))
    assert abs(volume - frac) < 5 * se + 0.01 * frac


def test_local_grids_batched_matches_single() -> None:
    rng = np.random.default_rng(3)
    centers = random_rotations(5, rng)
    rots, w = local_grids(centers, range_deg=8.0, step_deg=2.0)
    single = local_grid(centers[3], 8.0, 2.0)
    assert rots.shape == (5, len(single), 3, 3)
    np.testing.assert_allclose(rots[3], single.rotations, atol=1e-14)
    np.testing.assert_allclose(w, single.weights)
    np.testing.assert_allclose(rots[:, 0], centers, atol=1e-14)
    # same offsets for every particle: centers[i]^T rots[i, k] does not depend on i
    rel = np.einsum("nji,nkjl->nkil", centers, rots)
    np.testing.assert_allclose(rel, np.broadcast_to(rel[0], rel.shape), atol=1e-12)
    # and they are the rotation vectors of the cubic lattice
    v = np.degrees(Rotation.from_matrix(rel[0]).as_rotvec()) / 2.0
    np.testing.assert_allclose(v, np.round(v), atol=1e-9)


def test_subset_keeps_haar_mass() -> None:
    g = healpix_grid(1)
    top = g.subset(g.euler_deg[:, 1] < 90.0)  # northern half of the directions
    assert top.weights.sum() == pytest.approx(1.0)
    # HEALPix (Nside = 2): 48 pixels, 8 of them on the equator ring z = 0, the rest split evenly north / south
    assert top.haar_volume == pytest.approx(20 / 48)
    np.testing.assert_allclose(top.haar_volume * top.weights, g.weights[g.euler_deg[:, 1] < 90.0])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        healpix_grid(-1)
    with pytest.raises(ValueError):
        healpix_grid(1.5)
    with pytest.raises(ValueError):
        local_grid(np.eye(3), range_deg=0.0, step_deg=1.0)
    with pytest.raises(ValueError):
        local_grid(np.eye(3), range_deg=10.0, step_deg=-1.0)
    with pytest.raises(ValueError):
        local_grid(2 * np.eye(3), range_deg=10.0, step_deg=1.0)
    with pytest.raises(ValueError):
        local_grids(np.eye(3), range_deg=10.0, step_deg=1.0)


def test_split_cells_partition_their_parent_cells():
    import healpy

    from bayespose.core.geometry.grids import cell_rotations, healpix_grid, split_cells
    from bayespose.core.geometry.rotations import geodesic_distance_deg, random_rotations

    coarse = healpix_grid(1)
    np.testing.assert_allclose(cell_rotations(1, coarse.direction_index, coarse.euler_deg[:, 2]), coarse.rotations,
                               atol=1e-12)
    cells = np.arange(0, len(coarse), 37)
    child_dir, child_psi = split_cells(1, coarse.direction_index[cells], coarse.euler_deg[cells, 2])
    children = cell_rotations(2, child_dir, child_psi)
    assert children.shape == (len(cells), 8, 3, 3)
    # each child's viewing direction lies in its parent pixel, and its psi in the parent's interval
    dirs = children[:, :, 2, :].reshape(-1, 3)
    pix = healpy.vec2pix(2, dirs[:, 0], dirs[:, 1], dirs[:, 2], nest=True)
    np.testing.assert_array_equal(pix, np.repeat(coarse.direction_index[cells], 8))
    assert np.all(np.abs(child_psi - coarse.euler_deg[cells, 2][:, None]) == 7.5)  # ±Δ/4 with Δ = 30°
    # the children directions are exactly the order-2 HEALPix pixel centres
    fine = healpix_grid(2)
    fine_dirs = fine.rotations[fine.psi_index == 0][:, 2, :]
    assert np.max(np.min(np.linalg.norm(dirs[:, None] - fine_dirs[None], axis=2), axis=1)) < 1e-9
    # splitting every cell of order 0 twice: 64 children per cell, equal-mass (uniform samples spread evenly)
    g0 = healpix_grid(0)
    d1, p1 = split_cells(0, g0.direction_index, g0.euler_deg[:, 2])
    d2, p2 = split_cells(1, d1, p1)
    flat = cell_rotations(2, d2, p2).reshape(-1, 3, 3)
    assert len(flat) == len(healpix_grid(2))
    sample = random_rotations(6000, 5)
    counts = np.bincount(np.argmax(np.einsum("nij,kij->nk", sample, flat), axis=1), minlength=len(flat))
    assert counts.std() / counts.mean() < 0.25 + 1 / np.sqrt(counts.mean())
    # and the refined set is as fine as the order-2 grid: every fine-grid rotation has a child within its spacing
    d = geodesic_distance_deg(fine.rotations[::50, None], flat[None])
    assert d.min(axis=1).max() < fine.spacing_deg


@pytest.mark.parametrize("order, range_deg", [(1, 30.0), (1, 50.0), (2, 15.0), (2, 22.5)])
def test_neighbour_table_is_every_cell_within_the_range(order, range_deg):
    """Each row of neighbour_table (built from the psi-0 rows by turning psi) holds exactly the cells whose centre
    lies within the range of the row's cell, by the pairwise angles of all cells (tr(A1 A2^T) = 1 + 2 cos t),
    cells at exactly one grid step included (ranges equal to the spacing), itself first, then ascending."""
    rotations = healpix_grid(order).rotations
    table = neighbour_table(order, range_deg)
    cos_limit = np.cos(np.radians(range_deg + 1e-6))
    for start in range(0, len(rotations), 512):
        block = rotations[start:start + 512]
        cos = (np.einsum("aij,bij->ab", block, rotations) - 1.0) / 2.0
        for row, c in enumerate(cos, start):
            expected = np.flatnonzero(c >= cos_limit)
            got = table[row][table[row] >= 0]
            assert got[0] == row and np.all(np.diff(got[1:]) > 0), got
            np.testing.assert_array_equal(np.sort(got), expected)
    assert (table[:, -1] >= 0).any()  # the width is the largest row's
