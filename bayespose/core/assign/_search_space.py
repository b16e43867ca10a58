"""The candidate poses: the rotations scored first for each batch (:class:`_SearchSpace`) and the shift lattice."""

from __future__ import annotations

import math

import numpy as np

from bayespose.core.assign.search import PoseSearch
from bayespose.core.geometry.grids import healpix_grid, local_offsets


def shift_lattice(range_px: float, step_px: float) -> np.ndarray:
    """Origins offsets (J, 2) px on a square lattice of ``step_px`` inside the disk of radius ``range_px``
    (the zero offset first)."""
    n = int(math.floor(range_px / step_px + 1e-9))
    ax = np.arange(-n, n + 1) * step_px
    grid = np.stack(np.meshgrid(ax, ax, indexing="xy"), axis=-1).reshape(-1, 2)
    grid = grid[np.einsum("ij,ij->i", grid, grid) <= range_px ** 2 + 1e-9]
    return grid[np.argsort(np.einsum("ij,ij->i", grid, grid), kind="stable")]

class _SearchSpace:
    """The rotations scored first for a batch: one shared HEALPix grid, or per-particle local grids.

    Local grids: ``centers`` (N, 3, 3) (one ball per particle, all offsets kept) or (N, C, 3, 3) (several centres
    per particle). With several centres the searched region is the union of the C balls of radius ``range``; the
    lattice point ``c_j E_k`` of ball j is kept only when no earlier centre ``c_j'`` (j' < j) lies within
    ``range`` of it, so every part of the union is covered by exactly one ball's lattice (overlaps are neither
    scored twice nor weighted twice) and each kept point carries its ball's Haar quadrature weight. Rows are
    compacted (kept points first) and padded with log q = -inf; the weights are normalised per particle.

    Attributes: ``shared`` (one grid for all particles), ``grid`` (the HEALPix :class:`SO3Grid`, global search),
    ``log_q`` (K,) log quadrature weights of the grid or of one ball, ``size`` K, ``spacing_deg`` the grid step.
    """

    def __init__(self, search: PoseSearch, centers: np.ndarray | None):
        if search.local_range_deg is None:
            self.grid = healpix_grid(search.healpix_order)
            self.shared = True
            self.log_q = np.log(self.grid.weights)
            self.spacing_deg = self.grid.spacing_deg
        else:
            if centers is None:
                raise ValueError("a local search needs input poses (particles with alignment)")
            centers = np.asarray(centers, dtype=np.float64)
            if centers.ndim not in (3, 4) or centers.shape[-2:] != (3, 3):
                raise ValueError(f"local search centres must be (N, 3, 3) or (N, C, 3, 3), got {centers.shape}")
            step = search.local_step_deg or search.local_range_deg / 4.0
            offsets, weights, _ = local_offsets(search.local_range_deg, step)
            self.shared = False
            self.offsets = offsets
            self.centers = centers
            self.range_deg = float(search.local_range_deg)
            self.log_q = np.log(weights)
            self.spacing_deg = step
        self.size = len(self.log_q)

    def grid_for(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rotations ((K, 3, 3) shared or (B, K', 3, 3)) and log quadrature weights ((K,) or (B, K'))."""
        if self.shared:
            return self.grid.rotations, self.log_q
        if self.centers.ndim == 3:
            return np.einsum("bij,kjl->bkil", self.centers[index], self.offsets), self.log_q
        c = self.centers[index]  # (B, C, 3, 3)
        b, n_c = c.shape[:2]
        rots = np.einsum("bcij,kjl->bckil", c, self.offsets)  # (B, C, K, 3, 3)
        trace = np.einsum("bdij,bckij->bckd", c, rots)  # tr(c_d^T R): cos of the angle to every centre
        inside = trace >= 1.0 + 2.0 * math.cos(math.radians(self.range_deg)) - 1e-9
        earlier = np.tril(np.ones((n_c, n_c), dtype=bool), -1)  # earlier[j, j'] = j' < j
        keep = ~(inside & earlier[None, :, None, :]).any(-1)  # (B, C, K)
        keep = keep.reshape(b, -1)
        order = np.argsort(~keep, axis=1, kind="stable")  # kept points first
        width = int(keep.sum(1).max())
        order = order[:, :width]
        rots = np.take_along_axis(rots.reshape(b, -1, 3, 3), order[:, :, None, None], axis=1)
        log_q = np.where(np.take_along_axis(keep, order, axis=1),
                         np.tile(self.log_q, n_c)[order], -np.inf)
        log_q = log_q - np.logaddexp.reduce(log_q, axis=1, keepdims=True)
        return rots, log_q

