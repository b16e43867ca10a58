"""Viewing-direction densities on HEALPix pixels and their lon/lat rasters (:mod:`bayespose.core.geometry.directions`):
uniform poses read 1, a peak sits where the views are, masses are conserved and NEST / RING numbering is honoured
(checked against healpy's own pixel centres)."""

import healpy
import numpy as np
import pytest

from bayespose.core.geometry.directions import (
    direction_marginal,
    healpix_raster,
    nest_density_raster,
    viewing_direction_density,
)
from bayespose.core.geometry.rotations import euler_to_matrix, random_rotations


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


def test_direction_marginal_sums_mass_into_the_pixel_of_each_view():
    nside = 4
    rng = np.random.default_rng(2)
    rot, tilt = 30.0, 100.0
    poses = euler_to_matrix(np.column_stack([np.full(5, rot), np.full(5, tilt), rng.uniform(-180, 180, 5)]))
    weights = np.array([0.1, 0.2, 0.3, 0.15, 0.05])
    mass = direction_marginal(poses, weights, nside)
    expected_pixel = healpy.ang2pix(nside, np.radians(tilt), np.radians(rot))  # theta = tilt, phi = rot
    assert mass.shape == (12 * nside ** 2,)
    assert mass[expected_pixel] == pytest.approx(weights.sum())
    assert mass.sum() == pytest.approx(weights.sum())
    with pytest.raises(ValueError, match="probabilities"):
        direction_marginal(poses, weights[:3], nside)


def test_rasters_use_ring_or_nest_numbering():
    nside = 2
    values = np.zeros(12 * nside ** 2)
    pixel = 17
    values[pixel] = 1.0
    for nest, raster_fn in ((False, lambda v: healpix_raster(v)), (True, nest_density_raster)):
        lon_edges, lat_edges, raster = raster_fn(values)
        assert raster.shape == (180, 360) and len(lon_edges) == 361 and len(lat_edges) == 181
        theta, phi = healpy.pix2ang(nside, pixel, nest=nest)  # the pixel centre must fall in a lit cell
        i = np.searchsorted(lat_edges, np.pi / 2 - theta) - 1
        j = np.searchsorted(lon_edges, (phi + np.pi) % (2 * np.pi) - np.pi) - 1
        assert raster[i, j] == 1.0
        assert 0 < raster.mean() < 0.1  # one pixel of 48 lit
    with pytest.raises(ValueError):
        healpix_raster(np.zeros(13))
