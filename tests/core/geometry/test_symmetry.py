"""Tests of bayespose.core.geometry.symmetry: group structure, RELION 3.1 settings, right action on poses, distances.

Ground truth comes from outside the code under test: RELION's own binaries (``relion_particle_symmetry_expand``,
``relion_image_handler --sym``, ``relion_project``), scipy's ``Rotation.create_group`` and hand-built rotations.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from bayespose.core.geometry.rotations import euler_to_matrix, geodesic_distance_deg, random_rotations
from bayespose.core.geometry.symmetry import (
    nearest_symmetry_mate,
    symmetric_geodesic_distance_deg,
    symmetry_group,
    symmetry_mates,
)
from bayespose.data import demo_map_path
from tests.helpers import need_relion

MAP_3J9G = demo_map_path()

ALL_NAMES = ["C1", "C2", "C4", "C7", "D2", "D3", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"]
ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "D2": 4, "D3": 6, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}


def _rot(axis, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    return Rotation.from_rotvec(np.radians(angle_deg) * a / np.linalg.norm(a)).as_matrix()


def _set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance (max abs entry) between two sets of 3x3 matrices; inf if the sizes differ."""
    if len(a) != len(b):
        return np.inf
    d = np.abs(a[:, None] - b[None]).max(axis=(2, 3))
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def _contains(group: np.ndarray, m: np.ndarray, tol: float = 1e-9) -> bool:
    return bool(np.abs(group - m).max(axis=(1, 2)).min() < tol)


def _write_relion31_star(path: Path, angles_deg: np.ndarray, box: int = 64, angpix: float = 1.0) -> None:
    """Minimal RELION 3.1 particle star (optics block + rot/tilt/psi, zero origins)."""
    import starfile

    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnAmplitudeContrast": [0.1],
        "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0], "rlnImagePixelSize": [angpix],
        "rlnImageSize": [box], "rlnImageDimensionality": [2],
    })
    n = len(angles_deg)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
        "rlnAngleRot": angles_deg[:, 0], "rlnAngleTilt": angles_deg[:, 1], "rlnAnglePsi": angles_deg[:, 2],
        "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n),
        "rlnDefocusU": np.full(n, 10000.0), "rlnDefocusV": np.full(n, 10000.0),
        "rlnDefocusAngle": np.zeros(n), "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def _random_relion_angles(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                            rng.uniform(-180, 180, n)])


def _rotate_volume(vol: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """W(x) = V(mat @ x), x = (x, y, z) in px from the centre box//2, array vol[z, y, x] (linear interp.)."""
    n = vol.shape[0]
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    src = mat @ np.stack([x, y, z]).reshape(3, -1).astype(float)
    return map_coordinates(vol, np.stack([src[2], src[1], src[0]]) + c, order=1, mode="constant").reshape(vol.shape)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ---------------------------------------------------------------- group structure


@pytest.mark.parametrize("name", ALL_NAMES)
def test_group_is_closed_orthogonal_and_of_right_order(name: str) -> None:
    g = symmetry_group(name)
    assert g.shape == (ORDERS[name], 3, 3)
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(g @ g.transpose(0, 2, 1), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    # all distinct
    d = np.abs(g[:, None] - g[None]).max(axis=(2, 3)) + np.eye(len(g)) * 10
    assert d.min() > 1e-3
    # closed under products (and therefore under inverses for a finite set)
    prods = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    nearest = np.abs(prods[:, None] - g[None]).max(axis=(2, 3)).min(axis=1)
    assert nearest.max() < 1e-9


def test_names_case_and_aliases() -> None:
    np.testing.assert_array_equal(symmetry_group("d7"), symmetry_group("D7"))
    np.testing.assert_array_equal(symmetry_group("i"), symmetry_group("I2"))
    np.testing.assert_array_equal(symmetry_group(" c3 "), symmetry_group("C3"))
    g = symmetry_group("C4")
    g[0] = 0.0  # callers get a copy, the cache must not be corrupted
    np.testing.assert_allclose(symmetry_group("C4")[0], np.eye(3))


@pytest.mark.parametrize("bad", ["", "X2", "C0", "D1", "D", "C", "Cs", "C2v", "Ci", "I5", "Oh", "D2h", 3])
def test_unknown_or_achiral_names_raise(bad) -> None:
    with pytest.raises(ValueError):
        symmetry_group(bad)


@pytest.mark.parametrize("name", ["C1", "C2", "C4", "C7", "D2", "D3", "D7", "O"])
def test_c_d_o_equal_scipy_create_group(name: str) -> None:
    ours = symmetry_group(name)
    theirs = Rotation.create_group(name, axis="Z").as_matrix()
    assert _set_distance(ours, theirs) < 1e-9


def test_axis_settings() -> None:
    # Cn / Dn: n-fold along z, a 2-fold along x (for odd n the y axis is not a 2-fold)
    d7 = symmetry_group("D7")
    assert _contains(d7, _rot((0, 0, 1), 360 / 7))
    assert _contains(d7, _rot((1, 0, 0), 180))
    assert not _contains(d7, _rot((0, 1, 0), 180))
    # T: 3-fold along z (scipy's T has 2-folds on x, y, z instead)
    t = symmetry_group("T")
    assert _contains(t, _rot((0, 0, 1), 120))
    assert not _contains(t, _rot((0, 0, 1), 180))
    assert _set_distance(t, Rotation.create_group("T").as_matrix()) > 0.1
    # I1 is scipy's I; the default I (= I2) is I1 turned by 90 degrees about z
    i1, i2 = symmetry_group("I1"), symmetry_group("I2")
    assert _set_distance(i1, Rotation.create_group("I").as_matrix()) < 1e-9
    assert _set_distance(i2, Rotation.create_group("I").as_matrix()) > 0.1
    rz90 = _rot((0, 0, 1), 90)
    assert _set_distance(i2, rz90 @ i1 @ rz90.T) < 1e-9
    for m in (_rot((1, 0, 0), 180), _rot((0, 1, 0), 180), _rot((0, 0, 1), 180)):
        assert _contains(i1, m) and _contains(i2, m)
    # I3 / I4: 5-fold along z, 2-fold along y; they differ by a 180-degree turn about x
    i3, i4 = symmetry_group("I3"), symmetry_group("I4")
    for g in (i3, i4):
        assert _contains(g, _rot((0, 0, 1), 72)) and _contains(g, _rot((0, 1, 0), 180))
    rx = _rot((1, 0, 0), 180)
    assert _set_distance(i4, rx @ i3 @ rx.T) < 1e-9
    assert _set_distance(i3, i4) > 0.1


# ---------------------------------------------------------------- against RELION's binaries


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C4", "D2", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"])
def test_mates_equal_relion_particle_symmetry_expand(name: str, tmp_path: Path) -> None:
    """RELION's expansion of pose A is the set {A @ L_g}: right action, RELION's axis setting."""
    need_relion("relion_particle_symmetry_expand")
    import starfile

    n = 4
    angles = _random_relion_angles(n, seed=sum(map(ord, name)))
    _write_relion31_star(tmp_path / "in.star", angles)
    subprocess.run(["relion_particle_symmetry_expand", "--i", str(tmp_path / "in.star"),
                    "--o", str(tmp_path / "out.star"), "--sym", name],
                   check=True, capture_output=True, timeout=60)
    out = starfile.read(tmp_path / "out.star")["particles"]
    group = symmetry_group(name)
    assert len(out) == n * len(group)
    expanded = euler_to_matrix(out[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    image_index = out["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    ours = symmetry_mates(euler_to_matrix(angles), group)
    for i in range(n):
        assert _set_distance(expanded[image_index == i], ours[i]) < 1e-3, f"pose {i}"
    # the left action L_g @ A is not what RELION does (for any non-trivial group)
    left = np.einsum("gij,jk->gik", group, euler_to_matrix(angles[0]))
    assert _set_distance(expanded[image_index == 0], left) > 0.05


@pytest.fixture(scope="module")
def relion_symmetrised_maps(tmp_path_factory) -> dict[str, np.ndarray]:
    need_relion("relion_image_handler")
    import mrcfile

    if not MAP_3J9G.exists():
        pytest.skip(f"test map missing: {MAP_3J9G}")
    out_dir = tmp_path_factory.mktemp("symmaps")
    maps = {}
    for sym in ("D2", "I2"):
        out = out_dir / f"sym_{sym}.mrc"
        subprocess.run(["relion_image_handler", "--i", str(MAP_3J9G), "--o", str(out), "--sym", sym],
                       check=True, capture_output=True, timeout=120)
        maps[sym] = mrcfile.read(out).astype(np.float64)
    maps["path_D2"] = out_dir / "sym_D2.mrc"
    return maps


@pytest.mark.relion
def test_relion_d2_map_is_invariant_under_our_d2(relion_symmetrised_maps) -> None:
    """Volume convention: V(L x) = V(x), x = (x, y, z) from box//2, mrcfile array vol[z, y, x]."""
    vol = relion_symmetrised_maps["D2"]
    corrs = [_corr(vol, _rotate_volume(vol, m)) for m in symmetry_group("D2")[1:]]
    assert min(corrs) > 0.99, corrs
    # a 4-fold about z is NOT a symmetry (the check discriminates)
    assert _corr(vol, _rotate_volume(vol, _rot((0, 0, 1), 90))) < 0.9


@pytest.mark.relion
def test_relion_i2_map_is_invariant_under_our_i2_not_i1(relion_symmetrised_maps) -> None:
    vol = relion_symmetrised_maps["I2"]
    c_i2 = [_corr(vol, _rotate_volume(vol, m)) for m in symmetry_group("I")[1:]]
    assert min(c_i2) > 0.99, min(c_i2)
    # the map is fairly round, so other settings still correlate, but clearly less
    c_i1 = [_corr(vol, _rotate_volume(vol, m)) for m in symmetry_group("I1")]
    assert np.mean(c_i1[1:]) < 0.97
    assert min(c_i1[1:]) < 0.96


@pytest.mark.relion
def test_relion_projections_of_symmetric_map_agree_for_right_mates(relion_symmetrised_maps, tmp_path) -> None:
    """relion_project of a D2 map: pose A and its mates A @ L give the same image, L @ A does not."""
    need_relion("relion_project")
    import mrcfile
    import starfile

    a = euler_to_matrix(np.array([37.0, 71.0, -122.0]))
    group = symmetry_group("D2")
    right = symmetry_mates(a, group)  # (4, 3, 3), right[0] = a
    left = np.einsum("gij,jk->gik", group[1:], a)
    from bayespose.core.geometry.rotations import matrix_to_euler

    angles = matrix_to_euler(np.concatenate([right, left]))
    _write_relion31_star(tmp_path / "poses.star", angles, box=64, angpix=4.4)
    subprocess.run(["relion_project", "--i", str(relion_symmetrised_maps["path_D2"]), "--o",
                    str(tmp_path / "proj"), "--ang", str(tmp_path / "poses.star")],
                   check=True, capture_output=True, timeout=120)
    imgs = mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64)
    assert len(imgs) == 7
    assert len(starfile.read(tmp_path / "proj.star")["particles"]) == 7
    right_corr = [_corr(imgs[0], imgs[k]) for k in range(1, 4)]
    left_corr = [_corr(imgs[0], imgs[k]) for k in range(4, 7)]
    assert min(right_corr) > 0.999, right_corr  # measured: 1.0000 for all three
    # measured 0.90 (L = Rz(180): the image turned in-plane), 0.17, 0.17
    assert max(left_corr) < 0.95 and min(left_corr) < 0.5, left_corr


# ---------------------------------------------------------------- action on poses, distances


@pytest.mark.parametrize("name", ["D7", "T", "I"])
def test_symmetric_distance_vs_plain_distance(name: str) -> None:
    group = symmetry_group(name)
    rng = np.random.default_rng(1)
    a = random_rotations(50, rng)
    g = rng.integers(1, len(group), size=50)
    b = a @ group[g]
    # mates are far apart in plain geodesic distance but at distance 0 under the group
    assert geodesic_distance_deg(a, b).min() > 10.0
    np.testing.assert_allclose(symmetric_geodesic_distance_deg(a, b, group), 0.0, atol=1e-5)
    # a known perturbation of eps degrees survives the folding exactly (eps below half the smallest mate gap)
    eps = 4.0
    axes = rng.standard_normal((50, 3))
    e = Rotation.from_rotvec(np.radians(eps) * axes / np.linalg.norm(axes, axis=1, keepdims=True)).as_matrix()
    c = a @ e @ group[g]
    np.testing.assert_allclose(symmetric_geodesic_distance_deg(a, c, group), eps, atol=1e-6)
    np.testing.assert_allclose(symmetric_geodesic_distance_deg(c, a, group), eps, atol=1e-6)
    # nearest mate of c to reference a is a @ e, one reference per pose and one shared reference
    np.testing.assert_allclose(nearest_symmetry_mate(c, a, group), a @ e, atol=1e-12)
    np.testing.assert_allclose(nearest_symmetry_mate(c[:1], a[0], group), (a @ e)[:1], atol=1e-12)


def test_fold_a_posterior_cloud_around_a_reference() -> None:
    """A cloud of poses around A, scattered over all mates, folds back around A (the MMSE use case)."""
    group = symmetry_group("O")
    rng = np.random.default_rng(2)
    a = random_rotations(1, rng)[0]
    axes = rng.standard_normal((500, 3))
    angles = rng.uniform(0, 10, 500)
    e = Rotation.from_rotvec(np.radians(angles)[:, None] * axes / np.linalg.norm(axes, axis=1,
                                                                                   keepdims=True)).as_matrix()
    scattered = a @ e @ group[rng.integers(0, len(group), 500)]
    folded = nearest_symmetry_mate(scattered, a, group)
    np.testing.assert_allclose(folded, a @ e, atol=1e-12)
    np.testing.assert_allclose(geodesic_distance_deg(a, folded), angles, atol=1e-6)


def test_symmetry_mates_shapes_and_values() -> None:
    group = symmetry_group("C4")
    a = random_rotations(3, 5)
    mates = symmetry_mates(a, group)
    assert mates.shape == (3, 4, 3, 3)
    rz90 = _rot((0, 0, 1), 90)
    # mate list is {A Rz(k 90)}: compare as sets with hand-built matrices
    for i in range(3):
        expected = np.stack([a[i] @ np.linalg.matrix_power(rz90, k) for k in range(4)])
        assert _set_distance(mates[i], expected) < 1e-12
    assert symmetry_mates(a[0], group).shape == (4, 3, 3)


def test_bad_shapes_raise() -> None:
    group = symmetry_group("C2")
    with pytest.raises(ValueError):
        symmetry_mates(np.zeros((3, 2, 2)), group)
    with pytest.raises(ValueError):
        nearest_symmetry_mate(random_rotations(3, 0), random_rotations(2, 0), group)
    with pytest.raises(ValueError):
        symmetric_geodesic_distance_deg(random_rotations(3, 0), random_rotations(2, 0), group)
    with pytest.raises(ValueError):
        symmetry_mates(random_rotations(3, 0), np.eye(3))


def test_symmetric_angle_deg_names_the_group():
    """The angle between a pose and its own symmetry mate is 0 under the group's name and the mate's rotation
    angle without symmetry; one (3, 3) pose broadcasts against a set."""
    from bayespose.core.geometry.symmetry import symmetric_angle_deg

    poses = random_rotations(6, 4)
    mates = poses @ Rotation.from_euler("z", 90, degrees=True).as_matrix()  # A @ L_g with a C4 element
    np.testing.assert_allclose(symmetric_angle_deg(poses, mates, "C4"), 0.0, atol=1e-6)
    np.testing.assert_allclose(symmetric_angle_deg(poses, mates, "C1"), 90.0, atol=1e-6)
    assert symmetric_angle_deg(poses[0], mates, "c4").shape == (6,)
    with pytest.raises(ValueError):
        symmetric_angle_deg(poses, mates, "X9")
