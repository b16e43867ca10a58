"""RELION Euler/matrix/quaternion conventions, distances and SO(3) projection, checked against independent
formulas (RELION's Euler_angles2matrix written out, the relion plugin's matrixFromGeometry)."""

import numpy as np
import pytest

from bayespose.core.geometry import rotations as rot
from tests.helpers import relion_euler_matrix as relion_euler_angles2matrix


@pytest.fixture
def angles():
    rng = np.random.default_rng(1)
    return np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)])


def test_euler_to_matrix_is_relions_a(angles):
    mats = rot.euler_to_matrix(angles)
    expected = np.stack([relion_euler_angles2matrix(*a) for a in angles])
    np.testing.assert_allclose(mats, expected, atol=1e-12)


def test_scipion_relion_plugin_matrix_is_a_transposed(angles):
    from relion.convert.convert_deprecated import matrixFromGeometry

    for a in angles[:10]:
        m = matrixFromGeometry(np.zeros(3), a, True)
        np.testing.assert_allclose(m[:3, :3], rot.euler_to_matrix(a).T, atol=1e-12)


def test_matrix_to_euler_round_trip_including_gimbal_lock(angles):
    special = np.array([[30.0, 0.0, 40.0], [10.0, 180.0, -20.0], [0.0, 90.0, 0.0]])
    for a in (angles, special):
        mats = rot.euler_to_matrix(a)
        back = rot.matrix_to_euler(mats)
        np.testing.assert_allclose(rot.euler_to_matrix(back), mats, atol=1e-7)  # scipy: ~1e-8 at gimbal lock
    back = rot.matrix_to_euler(rot.euler_to_matrix(angles))
    np.testing.assert_allclose(back, angles, atol=1e-8)  # away from gimbal lock the angles themselves return


def test_quaternions_scalar_first_and_canonical(angles):
    mats = rot.euler_to_matrix(angles)
    q = rot.matrix_to_quaternion(mats)
    assert np.all(q[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0)
    np.testing.assert_allclose(rot.quaternion_to_matrix(q), mats, atol=1e-12)
    np.testing.assert_allclose(rot.quaternion_to_matrix(-q), mats, atol=1e-12)
    # standard formula for a rotation by theta about z: q = (cos theta/2, 0, 0, sin theta/2)
    theta = np.radians(70)
    rz = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    np.testing.assert_allclose(rot.matrix_to_quaternion(rz), [np.cos(theta / 2), 0, 0, np.sin(theta / 2)],
                               atol=1e-12)


def test_geodesic_and_chordal_distances():
    rng = np.random.default_rng(2)
    base = rot.random_rotations(20, rng)
    theta = rng.uniform(0, 180, 20)
    axis = rng.standard_normal((20, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    from scipy.spatial.transform import Rotation

    delta = Rotation.from_rotvec(axis * np.radians(theta)[:, None]).as_matrix()
    other = base @ delta
    np.testing.assert_allclose(rot.geodesic_distance_deg(base, other), theta, atol=1e-6)
    np.testing.assert_allclose(rot.geodesic_distance_deg(other, base), theta, atol=1e-6)
    np.testing.assert_allclose(rot.chordal_distance(base, other), 2 * np.sqrt(2) * np.sin(np.radians(theta) / 2),
                               atol=1e-10)


def test_project_to_so3_finds_nearest_rotation():
    rng = np.random.default_rng(3)
    r = rot.random_rotations(30, rng)
    # a rotation times a positive diagonal (SVD-visible stretch) projects back to the rotation
    stretched = r @ np.diag([3.0, 0.5, 0.2])
    np.testing.assert_allclose(rot.project_to_so3(np.einsum("nij,jk,nlk->nil", r, np.diag([3.0, 0.5, 0.2]), r) @ r),
                               r, atol=1e-10)
    noisy = r + 0.3 * rng.standard_normal(r.shape)
    p = rot.project_to_so3(noisy)
    np.testing.assert_allclose(p @ p.transpose(0, 2, 1), np.broadcast_to(np.eye(3), p.shape), atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(p), 1.0, atol=1e-10)
    # no random rotation is closer in Frobenius norm than the projection
    candidates = rot.random_rotations(5000, rng)
    for m, best in zip(noisy[:5], p[:5]):
        assert rot.chordal_distance(m, best) <= rot.chordal_distance(m[None], candidates).min() + 1e-12
    # a reflection-containing matrix still maps to det +1
    assert np.linalg.det(rot.project_to_so3(-np.eye(3))) == pytest.approx(1.0)
    assert stretched.shape == r.shape


def test_random_rotations_are_haar_uniform():
    r = rot.random_rotations(20000, 4)
    np.testing.assert_allclose(r.mean(0), 0, atol=0.02)  # E[R] = 0 under Haar
    np.testing.assert_allclose((r ** 2).mean(0), 1 / 3, atol=0.02)  # E[R_ij^2] = 1/3


def test_viewing_direction_is_relions_third_row():
    a = rot.euler_to_matrix(np.array([[30.0, 40.0, 77.0]]))
    rot_, tilt = np.radians([30.0, 40.0])
    np.testing.assert_allclose(rot.viewing_directions(a)[0],
                               [np.cos(rot_) * np.sin(tilt), np.sin(rot_) * np.sin(tilt), np.cos(tilt)], atol=1e-12)
