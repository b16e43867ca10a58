"""How to search: :class:`PoseSearch`, the settings of :func:`~bayespose.core.assign.assign_poses`, and their limits.

The limits are defined here once (class constants of :class:`PoseSearch`); the CLI (``bayespose assign``) and the
Scipion protocol offer the same ranges by reading them from here. Importing this module imports neither torch nor
scipy (the CLI builds its parser from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

__all__ = ["PoseSearch", "HealpixOrder"]

HealpixOrder = Literal[0, 1, 2, 3, 4]
"""HEALPix orders of the coarse global grid: 72·8^r rotations, spacing 60/2^r degrees (60° .. 3.75°)."""


@dataclass
class PoseSearch:
    """How to search. Angles in degrees, shifts in px, resolution in Å.

    ``local_range_deg`` None: global HEALPix grid of ``healpix_order`` (72·8^r rotations, spacing ~60/2^r deg),
    then ``refine_levels`` coarse-to-fine halvings of the grid in each particle's significant cells (the children of
    the cells holding ``refine_mass`` of its posterior, plus a ring of children of the adjacent cells around its
    cells with at least ``refine_ring_ratio`` of its most probable cell's posterior (a rule that treats equivalent
    modes alike): :func:`~bayespose.core.assign._cells.children_with_ring`). Otherwise a
    local grid of ±``local_range_deg`` around each particle's centre pose (its input pose) with lattice step
    ``local_step_deg`` (default: range / 4), and shifts centred on the input origins. Several centres per particle
    (``assign_poses(..., centers=(N, C, 3, 3))``, e.g. a pose network's top-K rotations): the union of the C
    balls, each region scored once. Shifts: candidate origins on a square lattice of ``shift_step_px`` inside a
    disk of ``shift_range_px``.

    Limits (:meth:`validate`): ``healpix_order`` in :attr:`HEALPIX_ORDERS` (the coarse grid is scored
    exhaustively for every particle: order 4 is already 294,912 rotations; finer samplings come from the
    refinement levels, which score only the significant cells), ``healpix_order + refine_levels <=``
    :attr:`MAX_FINEST_ORDER` (the finest HEALPix grid, 0.23°), ``0 <`` ``local_range_deg`` ``<=``
    :attr:`MAX_LOCAL_RANGE_DEG`, ``shift_range_px >= 0`` and ``shift_step_px > 0``.
    """

    HEALPIX_ORDERS: ClassVar[tuple[int, ...]] = get_args(HealpixOrder)
    MAX_HEALPIX_ORDER: ClassVar[int] = max(get_args(HealpixOrder))
    MAX_FINEST_ORDER: ClassVar[int] = 8
    MAX_LOCAL_RANGE_DEG: ClassVar[float] = 90.0

    healpix_order: HealpixOrder = 2
    refine_levels: int = 3  # coarse-to-fine: halvings of the grid in the significant cells (0: coarse grid only)
    refine_mass: float = 0.999  # posterior mass whose cells are refined
    refine_max_cells: int = 128  # particles with more significant cells keep the coarse result
    broad_finer_grid: bool = True  # posteriors broader than refine_max_cells: rescored on the next orders' grids
    refine_ring_ratio: float = 0.05  # cells with this fraction of the top cell's posterior get a ring (> 1: none)
    max_resolution_A: float | None = None  # cap on the scored resolution (None: Nyquist)
    smoothness_nats: float = 30.0  # each stage's cut-off: a pose half a grid step off loses at most this much
    shift_range_px: float = 3.0
    shift_step_px: float = 1.0
    symmetry: str = "C1"
    local_range_deg: float | None = None
    local_step_deg: float | None = None
    batch_size: int = 64
    max_scores_per_chunk: int = 8_000_000  # B·J·K_chunk float32 scores held at once (32 MB)
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # CPU threads during the call (None: all cores); torch's setting is restored after
    mask_radius_px: float | None = None  # background outside this radius gives the noise (default box/2)

    @classmethod
    def max_refine_levels(cls, healpix_order: int) -> int:
        """The most refinement levels allowed on top of a coarse grid of ``healpix_order``."""
        return cls.MAX_FINEST_ORDER - healpix_order

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) when a setting is outside its limits (class doc) or the symmetry is
        unknown."""
        from bayespose.core.geometry.symmetry import symmetry_group  # here: importing this module stays light

        if self.healpix_order not in self.HEALPIX_ORDERS:
            raise ValueError(f"healpix order must be in 0..{self.MAX_HEALPIX_ORDER}, got {self.healpix_order}")
        if not 0 <= self.refine_levels <= self.max_refine_levels(self.healpix_order):
            raise ValueError(f"refinement levels must be in 0..{self.max_refine_levels(self.healpix_order)} "
                             f"(healpix order + levels <= {self.MAX_FINEST_ORDER}), got {self.refine_levels}")
        if self.shift_range_px < 0 or not self.shift_step_px > 0:
            raise ValueError("shift range must be >= 0 px and shift step > 0 px")
        if self.local_range_deg is not None and not 0 < self.local_range_deg <= self.MAX_LOCAL_RANGE_DEG:
            raise ValueError(f"local range must be in (0, {self.MAX_LOCAL_RANGE_DEG:g}] degrees, "
                             f"got {self.local_range_deg}")
        if not self.refine_ring_ratio >= 0:
            raise ValueError(f"refine ring ratio must be >= 0, got {self.refine_ring_ratio}")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        symmetry_group(self.symmetry)
