"""The shipped asymmetric fragment is what asymmetric_fragment makes of the shipped map, and it has lost the
ring's symmetry (a 180° and a 60° turn about z no longer map it onto itself); the envelope mask's geometry (in Å)
and what it keeps of a real map."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from bayespose.core.imaging.volumes import asymmetric_fragment, central_slices, envelope_mask, soft_sphere_mask
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


def _radius_px(box):
    c = np.arange(box) - box // 2
    return np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def test_envelope_mask_extends_the_thresholded_map_by_near_and_far_in_angstrom():
    box, px = 48, 2.0
    r = _radius_px(box)
    ball = (r <= 6).astype(np.float32)  # radius 6 px = 12 Å
    mask = envelope_mask(ball, px, lowpass_A=8.0, threshold=0.2, near_A=6.0, far_A=14.0)
    # 1 up to 6 Å = 3 px past the ball's edge, 0 from 14 Å = 7 px (1.5 px slack for the 8 Å low-pass's blur);
    # distances taken in px instead of Å would reach 6 and 14 px
    assert mask[r <= 6 + 3 - 1.5].min() == 1.0
    assert mask[r >= 6 + 7 + 1.5].max() == 0.0
    shell = (r > 6 + 3 + 1.5) & (r < 6 + 7 - 1.5)
    assert 0 < mask[shell].min() and mask[shell].max() < 1  # the raised-cosine edge
    inside = soft_sphere_mask(box, 10.0)
    assert np.all(envelope_mask(ball, px, 8.0, inside=inside) <= inside)
    np.testing.assert_array_equal(envelope_mask(np.zeros_like(ball), px, 8.0, inside=inside), inside)
    with pytest.raises(ValueError, match="near_A"):
        envelope_mask(ball, px, 8.0, near_A=14.0, far_A=6.0)


def test_envelope_of_a_real_map_keeps_its_density_in_a_fraction_of_the_sphere():
    fragment, px = read_map(fragment_map_path())
    sphere = soft_sphere_mask(fragment.shape[0], 0.45 * fragment.shape[0])
    mask = envelope_mask(fragment, px, lowpass_A=15.0, inside=sphere)
    energy = float((fragment ** 2 * mask).sum() / (fragment ** 2 * sphere).sum())
    assert energy > 0.995 and mask.sum() < 0.3 * sphere.sum()
