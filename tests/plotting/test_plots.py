"""Pose plots: the viewing-direction density reads 1 for uniform poses and peaks where the views are."""

import numpy as np

from bayespose.core.geometry.rotations import euler_to_matrix, random_rotations
from bayespose.plotting.poses import plot_pose_distribution, viewing_direction_density


def test_uniform_density_reads_one_and_peak_is_located():
    _, _, uniform = viewing_direction_density(random_rotations(50000, 0), nside=4)
    assert abs(uniform.mean() - 1) < 0.05 and uniform.std() < 0.15
    # all views within a few degrees of rot=60, tilt=60 -> the peak sits at lon 60°, lat 30°
    rng = np.random.default_rng(1)
    angles = np.column_stack([60 + rng.normal(0, 2, 500), 60 + rng.normal(0, 2, 500), rng.uniform(-180, 180, 500)])
    lon_edges, lat_edges, density = viewing_direction_density(euler_to_matrix(angles), nside=8)
    i, j = np.unravel_index(np.argmax(density), density.shape)
    assert abs(np.degrees((lon_edges[j] + lon_edges[j + 1]) / 2) - 60) < 8
    assert abs(np.degrees((lat_edges[i] + lat_edges[i + 1]) / 2) - 30) < 8


def test_pose_plot_writes_png(tmp_path):
    path = tmp_path / "poses.png"
    plot_pose_distribution(random_rotations(200, 2), path, title="t", reference=random_rotations(200, 3))
    assert path.read_bytes()[:4] == b"\x89PNG"
