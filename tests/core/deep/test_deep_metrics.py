"""Deep pose metrics against hand-computed cases (papers 002 eq. 3-6, 001 eq. 16)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bayespose.core.deep.metrics import pose_error_metrics, reprojection_rmse
from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.geometry.symmetry import symmetry_group
from bayespose.core.io.mrc import read_map
from bayespose.data import demo_map_path, fragment_map_path


def _about(axis, deg):
    return Rotation.from_rotvec(np.radians(deg) * np.asarray(axis, float) / np.linalg.norm(axis)).as_matrix()


def test_metrics_hand_computed():
    true = random_rotations(4, rng=0)
    offsets = [2.0, 8.0, 12.0, 40.0]  # degrees, about assorted axes (right multiplication)
    axes = [(1, 0, 0), (0, 1, 1), (1, 2, 3), (0, 0, 1)]
    pred = np.stack([t @ _about(a, d) for t, a, d in zip(true, axes, offsets)])
    m = pose_error_metrics(pred, true)
    assert m["mane_deg"] == pytest.approx(np.mean(offsets), abs=1e-6)
    assert m["median_deg"] == pytest.approx(10.0, abs=1e-6)
    assert m["frac_below_5"] == 0.25 and m["frac_below_10"] == 0.5 and m["frac_below_15"] == 0.75
    assert m["wmane_deg"] == pytest.approx(m["mane_deg"])
    w = np.array([1.0, 1.0, 1.0, 0.0])  # weighted: the bad one ignored
    assert pose_error_metrics(pred, true, weights=w)["wmane_deg"] == pytest.approx((2 + 8 + 12) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        pose_error_metrics(pred, true, weights=-w)


def test_metrics_symmetry_aware():
    """A prediction that is a symmetry mate A @ L_g of the truth (plus 3°) has 3° error with the symmetry, a large
    one without."""
    true = random_rotations(6, rng=1)
    group = symmetry_group("D2")
    pred = np.stack([t @ group[1 + i % 3] @ _about((1, 1, 0), 3.0) for i, t in enumerate(true)])
    sym = pose_error_metrics(pred, true, "D2")
    naive = pose_error_metrics(pred, true, "C1")
    assert sym["mane_deg"] == pytest.approx(3.0, abs=1e-6)
    assert naive["mane_deg"] > 150.0  # D2 mates are 180° turns


def test_reprojection_rmse_properties():
    volume, _ = read_map(fragment_map_path())
    true = random_rotations(8, rng=2)
    assert reprojection_rmse(volume, true, true) == pytest.approx(0.0, abs=1e-6)
    small = reprojection_rmse(volume, true @ _about((0, 1, 0), 3.0), true)
    large = reprojection_rmse(volume, random_rotations(8, rng=3), true)
    assert 0.0 < small < 0.5 * large
    # scale-free, and a symmetry mate of a symmetric map reprojects the same (001: defined for any symmetry)
    assert reprojection_rmse(10 * volume, random_rotations(8, rng=3), true) == pytest.approx(large, rel=1e-4)
    ring, _ = read_map(demo_map_path())  # exactly C2 about z
    mates = true @ symmetry_group("C2")[1]
    assert reprojection_rmse(ring, mates, true) < 0.02
