"""The preferred-orientation pose distribution of the simulator takes its direction, concentration and fraction
(``SimulationSpec.preferred_*``): the views gather around the requested RELION (rot, tilt), in the requested
fraction; the defaults are the former fixed top view."""

import numpy as np
import pytest

from bayespose.core.geometry import so3_distributions as so3d
from bayespose.core.geometry.rotations import viewing_directions
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, sample_poses


def _within(poses: np.ndarray, direction: np.ndarray, degrees: float) -> float:
    cos = viewing_directions(poses) @ direction
    return float(np.mean(cos > np.cos(np.radians(degrees))))


def test_preferred_direction_kappa_and_fraction_are_honoured():
    rng = np.random.default_rng(0)
    # rot 90, tilt 90: the viewing direction (cos rot sin tilt, sin rot sin tilt, cos tilt) = +y
    poses = sample_poses(4000, "preferred", rng, preferred_direction_deg=(90.0, 90.0), preferred_kappa=200.0,
                         preferred_fraction=0.5)
    y = np.array([0.0, 1.0, 0.0])
    # kappa 200: the peak lies within ~10° (1 - exp(-200 (1 - cos 10°)) = 0.95); uniform views add ~0.4 %
    assert _within(poses, y, 10.0) == pytest.approx(0.5 * 0.95 + 0.5 * 0.0076, abs=0.03)
    assert _within(poses, np.array([0.0, 0.0, 1.0]), 10.0) < 0.02  # not the default top view
    everything = sample_poses(2000, "preferred", rng, preferred_fraction=1.0, preferred_kappa=0.0)
    # kappa 0 is uniform: a 30° cap holds (1 - cos 30°) / 2 = 6.7 % of the sphere
    assert _within(everything, y, 30.0) == pytest.approx((1 - np.cos(np.radians(30.0))) / 2, abs=0.02)


def test_defaults_are_the_top_view_and_spec_passes_its_fields():
    a = sample_poses(50, "preferred", np.random.default_rng(3))
    b = so3d.PreferredOrientation.default_top_view().sample(50, np.random.default_rng(3))
    np.testing.assert_allclose(a, b)
    spec = SimulationSpec(n_particles=10, pose_distribution="preferred", preferred_rot_deg=90.0,
                          preferred_tilt_deg=90.0, preferred_kappa=500.0, preferred_fraction=1.0)
    spec.validate()
    poses = sample_poses(300, spec.pose_distribution, np.random.default_rng(1), **spec.preferred())
    assert _within(poses, np.array([0.0, 1.0, 0.0]), 10.0) > 0.95
    with pytest.raises(ValueError, match="fraction"):
        SimulationSpec(n_particles=1, pose_distribution="preferred", preferred_fraction=1.5).validate()
    with pytest.raises(ValueError, match="kappa"):
        SimulationSpec(n_particles=1, pose_distribution="preferred", preferred_kappa=-1.0).validate()
