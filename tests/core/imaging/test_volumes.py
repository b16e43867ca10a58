"""The shipped asymmetric fragment is what asymmetric_fragment makes of the shipped map, and it has lost the
ring's symmetry (a 180° and a 60° turn about z no longer map it onto itself)."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from bayespose.core.imaging.volumes import asymmetric_fragment, central_slices
from bayespose.core.io.mrc import read_map
from bayespose.data import demo_map_path, fragment_map_path


def rotated_correlation(volume, angle_deg):
    d = volume.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1).reshape(-1, 3) @ Rotation.from_euler("z", angle_deg, degrees=True).as_matrix().T
    moved = map_coordinates(volume, [pts[:, 2] + d // 2, pts[:, 1] + d // 2, pts[:, 0] + d // 2], order=1)
    return np.corrcoef(moved, volume.ravel())[0, 1]


def test_fragment_file_matches_function_and_breaks_symmetry():
    ring, _ = read_map(demo_map_path())
    fragment, pixel_size = read_map(fragment_map_path())
    assert abs(pixel_size - 4.4) < 1e-5
    np.testing.assert_allclose(fragment, asymmetric_fragment(ring), atol=1e-6)
    assert rotated_correlation(ring, 180) > 0.99 and rotated_correlation(ring, 60) > 0.9  # the ring's symmetry
    assert rotated_correlation(fragment, 180) < 0.6 and rotated_correlation(fragment, 60) < 0.6


def test_central_slices_are_the_middle_sections_in_zyx_order():
    vol = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)  # [z, y, x]
    xy, xz, yz = central_slices(vol)
    np.testing.assert_array_equal(xy, vol[2])
    np.testing.assert_array_equal(xz, vol[:, 3, :])
    np.testing.assert_array_equal(yz, vol[:, :, 4])
    assert (xy.shape, xz.shape, yz.shape) == ((6, 8), (4, 8), (4, 6))
    with pytest.raises(ValueError, match="3D"):
        central_slices(vol[0])
