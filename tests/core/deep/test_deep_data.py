"""Deep pose prediction, data side: the in-plane augmentation label convention against real projections,
Fourier cropping, normalisation, phase flipping and centring, symmetry-expanded targets."""

import numpy as np
import pytest
import torch

from bayespose.core.deep.data import (
    fourier_resize,
    grid_targets,
    inplane_rotation_matrix,
    normalise_background,
    preprocess_images,
    rotate_shift_images,
    symmetry_quaternions,
)
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import GridPrior
from bayespose.core.geometry.rotations import matrix_to_quaternion, random_rotations
from bayespose.core.geometry.symmetry import symmetry_group
from bayespose.core.imaging.forward import project
from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.io.mrc import read_map
from bayespose.data import fragment_map_path


@pytest.fixture(scope="module")
def fragment():
    volume, pixel_size = read_map(fragment_map_path())
    return volume, pixel_size


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_inplane_rotation_label_matches_projection(fragment):
    """Turning a projection of pose A by a (content from +x towards +y) gives the projection of Rz(a) A; the
    opposite sign does not."""
    volume, _ = fragment
    rots = random_rotations(4, rng=3)
    angles = np.array([90.0, 120.0, 150.0, -110.0])  # the wrong sign is >= 140° away
    turned = rotate_shift_images(project(volume, rots), angles).numpy()
    right = project(volume, inplane_rotation_matrix(angles) @ rots).numpy()
    wrong = project(volume, inplane_rotation_matrix(-angles) @ rots).numpy()
    for i in range(4):
        assert _corr(turned[i], right[i]) > 0.99
        assert _corr(turned[i], wrong[i]) < _corr(turned[i], right[i]) - 0.05


def test_rotate_shift_integer_cases():
    """A quarter turn (+90°: +x goes to +y) is an exact pixel permutation about D // 2; integer shifts are rolls."""
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.standard_normal((1, 16, 16)), dtype=torch.float32)
    img[:, 0, :] = 0  # row 0 / column 0 have no partner under a turn about pixel 8
    img[:, :, 0] = 0
    out = rotate_shift_images(img, [90.0])[0].numpy()
    c = 8
    src = img[0].numpy()
    # image'(x, y) = image(Rz(90)^T (x, y)) = image(y, -x): out[c + y, c + x] = src[c - x, c + y]
    for y in range(-7, 8):
        for x in range(-7, 8):
            assert out[c + y, c + x] == pytest.approx(src[c - x, c + y], abs=1e-5)
    shifted = rotate_shift_images(img, [0.0], [[2.0, -3.0]])[0].numpy()
    np.testing.assert_allclose(shifted[5:-5, 5:-5], np.roll(src, (-3, 2), axis=(0, 1))[5:-5, 5:-5], atol=1e-5)


def test_fourier_resize_keeps_low_frequencies():
    """Cropping a band-limited image keeps its values (sampled at the coarser grid); the mean is preserved."""
    n = 64
    y, x = np.mgrid[:n, :n] - n // 2
    img = 1.5 + np.cos(2 * np.pi * 3 * x / n) + 0.5 * np.sin(2 * np.pi * 5 * y / n)
    small = fourier_resize(torch.as_tensor(img[None], dtype=torch.float32), 32)[0].numpy()
    ys, xs = np.mgrid[:32, :32] - 16
    expected = 1.5 + np.cos(2 * np.pi * 3 * xs / 32) + 0.5 * np.sin(2 * np.pi * 5 * ys / 32)
    np.testing.assert_allclose(small, expected, atol=1e-4)


def test_normalise_background_statistics():
    rng = np.random.default_rng(1)
    imgs = torch.as_tensor(3.0 + 2.5 * rng.standard_normal((3, 32, 32)), dtype=torch.float32)
    out = normalise_background(imgs)
    c = np.arange(32) - 16
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > 16 ** 2
    bg = out[:, torch.as_tensor(outside)]
    np.testing.assert_allclose(bg.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(bg.std(1).numpy(), 1.0, atol=1e-5)


def test_preprocess_centres_and_phase_flips(fragment):
    """An off-centre image with a CTF, preprocessed, matches the centred phase-flipped projection (made
    independently: |CTF| applied to the centred projection)."""
    from bayespose.core.imaging.ctf import ctf_2d

    volume, px = fragment
    rots = random_rotations(2, rng=5)
    origins = np.array([[3.0, -2.0], [-1.5, 4.0]]) * px
    ctf = CTFParams.constant(2, defocus_u=40000.0, defocus_v=38000.0, defocus_angle=30.0)  # flips below 17 Å
    imgs = project(volume, rots, origins, px, ctf).numpy()
    particles = ParticleSet(pixel_size=px, box=64, image_files=["x", "x"], image_indices=[0, 1], rotations=rots,
                            origins_A=origins, ctf=ctf)
    net = preprocess_images(imgs, particles, None, 32).numpy()
    clean = torch.fft.rfft2(project(volume, rots)) * ctf_2d(ctf, px, 64).abs()
    ref = preprocess_images(torch.fft.irfft2(clean, s=(64, 64)).numpy(),
                            ParticleSet(pixel_size=px, box=64, image_files=["x", "x"], image_indices=[0, 1]),
                            None, 32, ctf_correction="none").numpy()
    for i in range(2):
        assert _corr(net[i], ref[i]) > 0.995
    # without phase flipping the CTF-modulated image differs clearly
    raw = preprocess_images(imgs, particles, None, 32, ctf_correction="none").numpy()
    assert _corr(raw[0], ref[0]) < 0.95


def test_grid_targets_symmetry_mates_share_mass():
    order = 1
    grid = healpix_grid(order)
    cells = GridPrior(order, np.zeros((1, len(grid)))).cell_index
    rots = random_rotations(5, rng=2)
    t1 = grid_targets(rots, cells, len(grid), "C1").numpy()
    np.testing.assert_allclose(t1.sum(1), 1.0)
    assert ((t1 > 0).sum(1) == 1).all()
    assert (np.argmax(t1, 1) == cells(rots)).all()
    t4 = grid_targets(rots, cells, len(grid), "C4").numpy()
    np.testing.assert_allclose(t4.sum(1), 1.0)
    group = symmetry_group("C4")
    for g in group:  # every mate's cell holds at least a quarter of the mass
        assert (t4[np.arange(5), cells(rots @ g)] >= 0.25 - 1e-6).all()
    # a mate as the label gives the same target
    np.testing.assert_allclose(grid_targets(rots @ group[1], cells, len(grid), "C4").numpy(), t4)


def test_symmetry_quaternions_are_the_mates():
    rots = random_rotations(3, rng=4)
    q = symmetry_quaternions(rots, "D2").numpy()
    assert q.shape == (3, 4, 4)
    group = symmetry_group("D2")
    for g in range(4):
        expected = matrix_to_quaternion(rots @ group[g])
        np.testing.assert_allclose(np.abs(np.einsum("ni,ni->n", q[:, g], expected)), 1.0, atol=1e-6)
