"""Viewing-direction densities on the sphere, binned on HEALPix pixels, and their longitude/latitude rasters.

The viewing direction of a RELION pose ``A`` is its third row ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``
(:func:`bayespose.core.geometry.rotations.viewing_directions`). Rasters use longitude = rot and latitude =
90° - tilt, in radians: healpy's ``theta`` is the tilt and ``phi`` the rot. Densities are numpy arrays over the
``12 nside²`` HEALPix pixels, RING numbering unless a function says NEST.
"""

from __future__ import annotations

import healpy
import numpy as np

from bayespose.core.geometry.rotations import viewing_directions

__all__ = ["healpix_raster", "direction_marginal", "viewing_direction_density", "nest_density_raster"]


def healpix_raster(values: np.ndarray, nest: bool = False, n_lon: int = 360,
                   n_lat: int = 180) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample per-pixel ``values`` (12 nside²,) on a regular longitude/latitude raster (e.g. for a Mollweide map).

    Returns ``(lon_edges (n_lon + 1,), lat_edges (n_lat + 1,), raster (n_lat, n_lon))``: edges in radians
    (longitude -π..π = rot, latitude -π/2..π/2 = 90° - tilt); each raster cell holds the value of the HEALPix pixel
    (RING numbering, or NEST with ``nest``) that contains the cell centre.
    """
    values = np.asarray(values).reshape(-1)
    nside = healpy.npix2nside(len(values))  # raises ValueError on a wrong length
    lon_edges = np.linspace(-np.pi, np.pi, int(n_lon) + 1)
    lat_edges = np.linspace(-np.pi / 2, np.pi / 2, int(n_lat) + 1)
    lon_c, lat_c = np.meshgrid((lon_edges[:-1] + lon_edges[1:]) / 2, (lat_edges[:-1] + lat_edges[1:]) / 2)
    return lon_edges, lat_edges, values[healpy.ang2pix(nside, np.pi / 2 - lat_c, lon_c, nest=nest)]


def direction_marginal(rotations: np.ndarray, probabilities: np.ndarray, nside: int) -> np.ndarray:
    """Mass of each viewing direction: the probabilities (K,) of RELION poses ``rotations`` (K, 3, 3) summed per
    HEALPix pixel (RING numbering, ``nside``) of their viewing direction. Returns (12 nside²,) summing to the total
    mass given. Raises ``ValueError`` when the lengths differ."""
    d = viewing_directions(np.asarray(rotations, dtype=np.float64)).reshape(-1, 3)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(d) != len(p):
        raise ValueError(f"{len(d)} rotations but {len(p)} probabilities")
    pix = healpy.vec2pix(int(nside), d[:, 0], d[:, 1], d[:, 2])
    return np.bincount(pix, weights=p, minlength=healpy.nside2npix(int(nside)))


def viewing_direction_density(rotations: np.ndarray, nside: int | None = None, n_lon: int = 360,
                              n_lat: int = 180) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density of the viewing directions of RELION poses ``rotations`` (N, 3, 3), binned on equal-area HEALPix
    pixels and sampled on a lon/lat raster (see :func:`healpix_raster`).

    ``nside`` defaults to the largest power of two (<= 16) that leaves >= 8 particles per pixel on average, so
    sparse sets still give a readable map. Returns ``(lon_edges_rad, lat_edges_rad, density (n_lat, n_lon))`` with
    the density relative to uniform: uniformly distributed directions read 1 everywhere.
    """
    d = viewing_directions(np.asarray(rotations, dtype=np.float64)).reshape(-1, 3)
    if nside is None:
        nside = 1
        while nside < 16 and 12 * (2 * nside) ** 2 * 8 <= len(d):
            nside *= 2
    n_pix = healpy.nside2npix(nside)
    counts = np.bincount(healpy.vec2pix(nside, d[:, 0], d[:, 1], d[:, 2]), minlength=n_pix) if len(d) else \
        np.zeros(n_pix)
    return healpix_raster(counts * n_pix / max(len(d), 1), n_lon=n_lon, n_lat=n_lat)


def nest_density_raster(density: np.ndarray, n_lon: int = 360,
                        n_lat: int = 180) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A NEST HEALPix density (12 nside² values, e.g. a refinement's ``prior.npy``) on a lon/lat raster:
    :func:`healpix_raster` with NEST numbering."""
    return healpix_raster(np.asarray(density, dtype=np.float64), nest=True, n_lon=n_lon, n_lat=n_lat)
