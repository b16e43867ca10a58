"""Settings of an EM refinement (:class:`RefineConfig`) and the rules every caller shares: the assignment and prior
modes, the half-set split and the minimum number of particles per gold-standard half set.

The CLI (``bayespose refine``), the Scipion protocol and the engine take the mode names from :data:`MODES`,
:data:`PRIOR_MODES` and :data:`HALF_SPLITS` and check the half-set sizes with :func:`check_half_set_sizes`
(the engine through :func:`split_half_sets`), so a setting or a rule is defined here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

__all__ = ["RefineConfig", "Mode", "PriorMode", "HalfSplit", "MODES", "PRIOR_MODES", "HALF_SPLITS", "MIN_PER_HALF",
           "MAX_FINEST_ORDER",
           "RESUMABLE_SETTINGS", "half_set_sizes", "check_half_set_sizes", "split_half_sets", "subset_counts"]

Mode = Literal["soft", "hard"]  # soft: posterior-weighted (EM); hard: the best pose only (MLE/MAP baseline)
PriorMode = Literal["uniform", "estimate"]  # rotation prior: Haar, or the viewing-direction density re-estimated
HalfSplit = Literal["input", "random"]  # gold-standard half sets: the input's (rlnRandomSubset), or a random split
MODES: tuple[str, ...] = get_args(Mode)
PRIOR_MODES: tuple[str, ...] = get_args(PriorMode)
HALF_SPLITS: tuple[str, ...] = get_args(HalfSplit)

MAX_FINEST_ORDER = 6  # finest sampling of a refinement (0.94°)
MIN_PER_HALF = 10  # particles per gold-standard half set: the FSC of fewer is meaningless

# settings a resumed run may change: they do not change what an iteration computes (beyond float rounding)
RESUMABLE_SETTINGS = ("iterations", "final_full_resolution", "batch_size", "device", "threads")


@dataclass
class RefineConfig:
    """EM settings. Angles in degrees, shifts in px, resolutions in Å.

    Angular sampling: every iteration scores the global HEALPix grid of ``healpix_order`` (72 · 8^order rotations,
    step 60 / 2^order degrees) and refines the significant cells (with a ring of finer cells around the most
    probable) coarse-to-fine up to the order the current resolution needs (``resolution / (diameter / 2)`` radians
    at the particle's edge) or, finer, until the step no longer exceeds the particles' median posterior expected
    error of the previous iteration (the poses' accuracy, not the grid, then limits them); at least one level and at
    most ``max_healpix_order``. With ``local_search`` the search turns local (±``local_range_deg``, default 3 steps,
    around each particle's current pose, step of the current order) once the global search has converged: the finest
    order is reached and the mean pose change is below its step. Off by default, measured: at box 64 a local ±11.25°
    grid (123 rotations per particle) cost 1.6x the CPU time of the global order 2 + 2 levels search (5.2 s vs 3.2 s
    for 150 particles, SNR 0.3), because per-particle rotations share no projections while the global grid and its
    refinement lattice are projected once for all particles; and a global search can still correct a wrong pose.
    Local searches pay off for large boxes and fine samplings (order >= 5).

    Solvent mask of the references (no user mask): the soft sphere of the particle diameter and, with
    ``envelope_mask``, each half map's own envelope (:func:`bayespose.core.imaging.volumes.envelope_mask`: the map
    at 15 Å or its resolution, above 0.2 of its maximum, extended 6 Å, soft to 14 Å; a dynamic mask as cryoSPARC's
    refinements make). The envelope keeps the solvent's noise out of the references; the FSC, resolution and output
    maps keep the sphere. Measured on 500 relion_project particles at SNR 0.03 (3J9G fragment, 64 px): one E-step
    against the final half maps of a sphere-only refinement, mean pose error 5.95° with the sphere, 4.09° with the
    envelope.

    Half sets (``half_split``): ``"input"`` takes the particles' own (``rlnRandomSubset``) when every particle
    has 1 or 2, else splits at random; ``"random"`` always splits at random (seeded by ``seed``).
    """

    iterations: int = 10  # maximum number of iterations
    healpix_order: int = 2  # coarse global grid scored exhaustively (15°)
    max_healpix_order: int = 6  # finest sampling the refinement may reach (0.94°), as the poses allow
    shift_range_px: float = 3.0
    shift_step_px: float = 1.0
    symmetry: str = "C1"
    mode: Mode = "soft"
    prior_mode: PriorMode = "uniform"
    prior_pseudocount: float = 0.5  # per viewing direction, in particles
    prior_order: int = 2  # HEALPix order of the estimated viewing-direction density (192 pixels)
    initial_lowpass_A: float = 30.0
    extra_shells: float = 5.0  # score and insert this many Fourier shells beyond the current resolution
    particle_diameter_A: float | None = None  # angular sampling and solvent mask (default: 0.9 · box)
    candidate_mass: float = 0.999  # posterior mass of the candidate rotations re-scored with the shifts
    max_candidates: int = 32  # per particle; broader coarse posteriors take the shared-grid path
    local_search: bool = False  # switch to local searches once the global search has converged (see below)
    # after the last iteration, reconstruct both halves from ALL frequencies up to Nyquist at the converged joint
    # weights (RELION's final iteration); the result's maps, FSC and resolution are then those of this pass
    final_full_resolution: bool = True
    local_range_deg: float | None = None  # local search half-width (default: 3 angular steps)
    solvent_flatten: bool = True  # soft spherical mask of the particle diameter on the references (no user mask)
    envelope_mask: bool = True  # inside the sphere, each reference masked by its own envelope (see above)
    join_halves_below_A: float | None = 40.0  # average the half maps below this resolution (None: never)
    initial_scale: float | None = None  # reference scale of the first iteration (None: method of moments)
    half_split: HalfSplit = "input"  # gold-standard half sets (see above)
    batch_size: int = 32
    device: str | None = None
    threads: int | None = None
    seed: int = 0

    @property
    def estimator(self) -> str:
        """The pose estimator reported as the particles' alignment: MAP in hard mode, else MMSE."""
        return "map" if self.mode == "hard" else "mmse"

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) for a setting the engine cannot run with."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prior_mode not in PRIOR_MODES:
            raise ValueError(f"prior mode must be one of {PRIOR_MODES}, got {self.prior_mode!r}")
        if self.half_split not in HALF_SPLITS:
            raise ValueError(f"half split must be one of {HALF_SPLITS}, got {self.half_split!r}")
        if self.iterations < 1:
            raise ValueError("need at least one iteration")
        from bayespose.core.assign.search import PoseSearch  # light module: no torch

        if not 0 <= self.healpix_order <= PoseSearch.MAX_HEALPIX_ORDER:
            raise ValueError(f"healpix order (the coarse grid scored exhaustively) must be in "
                             f"0..{PoseSearch.MAX_HEALPIX_ORDER}, got {self.healpix_order}")
        if not self.healpix_order <= self.max_healpix_order <= MAX_FINEST_ORDER:
            raise ValueError(f"need healpix order <= max healpix order <= {MAX_FINEST_ORDER}, got "
                             f"{self.healpix_order} and {self.max_healpix_order}")
        if not 0 <= self.prior_order <= 4:
            raise ValueError(f"prior order must be in 0..4, got {self.prior_order}")
        if not 0 < self.candidate_mass <= 1:
            raise ValueError(f"candidate mass must be in (0, 1], got {self.candidate_mass}")
        if self.max_candidates < 1:
            raise ValueError("max candidates must be >= 1")
        if self.shift_range_px < 0 or not self.shift_step_px > 0:
            raise ValueError("shift range must be >= 0 px and shift step > 0 px")
        if not self.initial_lowpass_A > 0:
            raise ValueError(f"initial low-pass must be > 0 Å, got {self.initial_lowpass_A}")
        if self.local_range_deg is not None and not 0 < self.local_range_deg <= 90:
            raise ValueError(f"local range must be in (0, 90] degrees, got {self.local_range_deg}")
        if self.initial_scale is not None and not self.initial_scale > 0:
            raise ValueError(f"initial scale must be > 0, got {self.initial_scale}")
        from bayespose.core.geometry.symmetry import symmetry_group  # scipy: only when checking

        symmetry_group(self.symmetry)


# ------------------------------------------------------------------------------------------------ half sets
_FROM_INPUT = "the input's half sets (rlnRandomSubset)"
_RANDOM = "a random split"


def half_set_sizes(n: int, subset_counts: Mapping[int, int] | None, split: HalfSplit) -> tuple[tuple[int, int], str]:
    """Sizes of half sets 1 and 2 of ``n`` particles and where they come from (for messages).

    ``subset_counts``: ``{half-set value: number of particles}`` of the input's own half sets (None: it has
    none). They are used with ``split="input"`` when every particle has 1 or 2; otherwise the split is random,
    ``n - n // 2`` and ``n // 2`` particles.
    """
    counts = {int(k): int(v) for k, v in (subset_counts or {}).items()}
    if split == "input" and set(counts) == {1, 2} and sum(counts.values()) == n:
        return (counts[1], counts[2]), _FROM_INPUT
    return (n - n // 2, n // 2), _RANDOM


def check_half_set_sizes(n: int, subset_counts: Mapping[int, int] | None, split: HalfSplit) -> None:
    """Raise ``ValueError`` (one line) when a gold-standard half set would hold fewer than :data:`MIN_PER_HALF`
    particles (arguments as in :func:`half_set_sizes`)."""
    sizes, source = half_set_sizes(n, subset_counts, split)
    if min(sizes) < MIN_PER_HALF:
        raise ValueError(f"too few particles: {n} give half sets of {sizes[0]} and {sizes[1]} ({source}); EM "
                         f"refinement needs at least {MIN_PER_HALF} per half set")


def subset_counts(half_set: np.ndarray | None) -> dict[int, int] | None:
    """``{half-set value: number of particles}`` of an input's half sets (``ParticleSet.half_set``; None: none)."""
    if half_set is None:
        return None
    values, counts = np.unique(np.asarray(half_set), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def split_half_sets(half_set: np.ndarray | None, split: HalfSplit, seed: int, n: int) -> tuple[np.ndarray, str]:
    """The half set (1 or 2) of each of ``n`` particles, (N,) int, and where it comes from; raises ``ValueError``
    when a half set would be too small. ``half_set``: the input's own half sets (``ParticleSet.half_set``) or
    None; the random split is a seeded permutation (``numpy.random.default_rng(seed)``)."""
    counts = subset_counts(half_set)
    check_half_set_sizes(n, counts, split)
    _, source = half_set_sizes(n, counts, split)
    if source == _FROM_INPUT:
        return np.asarray(half_set, dtype=int), source
    return np.where(np.random.default_rng(seed).permutation(n) % 2 == 0, 1, 2), f"{source} (seed {seed})"
