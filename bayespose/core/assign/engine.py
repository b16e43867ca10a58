"""The engine: :func:`assign_poses` scores every particle's posterior over (rotation, shift) against a map, batch
by batch, and returns the estimators and statistics as a :class:`PoseAssignment`.

Pipeline: the search settings (:mod:`.search`) give the candidate poses (:mod:`._search_space`); the noise model
(:mod:`.noise_model`) gives the likelihood and each stage's frequency cut-off; every batch is scored on the first
grid (:mod:`._scoring`), then, in a global search, refined coarse-to-fine in its significant cells; each stage's
posterior gives the estimators and statistics (:mod:`._statistics`), which overwrite the previous stage's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.assign._cells import cell_ids, children_with_ring
from bayespose.core.assign._ragged import score_ragged
from bayespose.core.assign._scoring import ScoringCall, _Batch, _Scorer, _StageScores
from bayespose.core.assign._search_space import _SearchSpace, shift_lattice
from bayespose.core.assign._statistics import _significant_cells, _stage_results
from bayespose.core.assign.noise_model import (
    LOSS_SAMPLES,
    SIGNAL_FRACTION,
    NoiseModel,
    _band_radius,
    _loss_per_shell,
    _tolerance_radius,
    estimate_noise_model,
    geometric_radius,
)
from bayespose.core.assign.search import PoseSearch
from bayespose.core.geometry.grids import SO3Grid, cell_rotations, healpix_grid
from bayespose.core.geometry.priors import RotationPrior, UniformPrior
from bayespose.core.geometry.symmetry import symmetry_group
from bayespose.core.imaging.forward import PreparedVolume, prepared_for
from bayespose.core.imaging.noise import resolution_to_radius
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.results import ParticleResults
from bayespose.core.runtime import choose_device, torch_threads, work_bytes

__all__ = ["PoseAssignment", "assign_poses"]


@dataclass(kw_only=True)
class PoseAssignment(ParticleResults):
    """Per-particle results of :func:`assign_poses` (N rows): every estimator's poses (rotations RELION ``A``
    (N, 3, 3), origins (N, 2) Å) and the statistics ``pmax``, ``n_significant``, ``expected_error_deg``,
    ``concentration``, ``log_evidence`` (:class:`~bayespose.core.results.ParticleResults`, whose
    ``to_particle_set`` / ``star_columns`` / ``to_arrays`` write them); and of the run: the noise model, the size
    of the first grid (``n_rotations`` per particle x ``n_shifts``) and of the last stage's band
    (``n_frequencies``), ``timings`` (seconds, and the search's work: see :func:`assign_poses`), ``marginals``
    (particle index -> (rotations (K, 3, 3), probabilities (K,)) of the last stage) and ``scoring_calls`` (one
    :class:`ScoringCall` per scored batch and stage, in order)."""

    noise: NoiseModel
    n_rotations: int
    n_shifts: int
    n_frequencies: int
    timings: dict = field(default_factory=dict)
    marginals: dict = field(default_factory=dict)
    scoring_calls: list[ScoringCall] = field(default_factory=list)


def assign_poses(particles: ParticleSet, volume: np.ndarray | PreparedVolume, search: PoseSearch | None = None,
                 prior: RotationPrior | None = None, images: np.ndarray | None = None,
                 noise: NoiseModel | None = None, keep_marginals: Sequence[int] = (),
                 progress: Callable[[int, int], None] | None = None, seed: int = 0,
                 centers: np.ndarray | None = None, seed_cells: np.ndarray | None = None,
                 on_marginals: Callable[[np.ndarray, dict], None] | None = None,
                 distributed: bool = False) -> PoseAssignment:
    """Posterior pose assignment of ``particles`` against ``volume`` (D, D, D) at the particles' pixel size (or the
    map already prepared by :func:`~bayespose.core.imaging.forward.prepare_volume`, for several searches of it).

    Global search: the HEALPix grid of ``search.healpix_order`` scored with the frequency cut-off matched to its
    spacing; then, ``refine_levels`` times, the cells that hold ``refine_mass`` of each particle's posterior are
    split into 8 children each (:func:`~bayespose.core.geometry.grids.split_cells`, RELION's oversampling), those
    with at least ``refine_ring_ratio`` of the most probable cell's posterior also get a ring of children of their
    adjacent cells (:func:`~bayespose.core.assign._cells.children_with_ring`: the truth may lie just across a cell
    border), and they are scored at the cut-off matched to the halved spacing. A particle whose significant cells on
    the first grid exceed ``refine_max_cells`` (a broad posterior, typical at low SNR, where the first grid is too
    coarse for the first cut) is rescored on the whole grid of the next order (``broad_finer_grid``; one shared
    matrix product like the first grid) and refined from there; beyond that, a broad posterior keeps its current
    result.
    Local search: the local grid around each input pose. ``prior``: the rotation prior (default uniform).
    ``images``: the particle images (N, D, D) if already in memory (else read from the files, batch by batch).
    ``noise``: a given noise model (else estimated from the particles, with ``seed``). ``keep_marginals``:
    particle indices whose rotation posterior (final stage) is returned in ``result.marginals``. ``centers``
    (N, C, 3, 3) or (N, 3, 3): the centres of the local search (default: the particles' input poses); several per
    particle search the union of their balls; needs ``search.local_range_deg``. ``seed_cells`` (N, C) int: a
    seeded global search: instead of the whole HEALPix grid of ``search.healpix_order``, only these cells (indices
    into ``healpix_grid(search.healpix_order)``, -1 = none; e.g. the cells near a pose network's predictions) are
    scored first, then refined coarse-to-fine as in the global search; their projections come from a cache shared
    by all particles (each cell is projected once); shifts are searched around the input origins, as in a local
    search. ``progress(done, total)`` is called after each batch (the particles of this process). Torch uses
    ``search.threads`` CPU threads (all cores when None) during the call; its setting is restored afterwards.

    Streaming: ``on_marginals(index, marginals)`` is called after each batch with the batch's particle indices and
    ``{particle: (rotations (K, 3, 3), probabilities (K,))}`` of their final stage, so that a caller can use every
    particle's posterior without holding all of them (memory O(batch), not O(N·K)). Images are read batch by
    batch, and batches shrink for big boxes so that their buffers stay within
    :func:`~bayespose.core.runtime.work_bytes`. ``distributed``: under ``torchrun`` (:mod:`bayespose.core.parallel`)
    this process scores every ``world_size``-th batch, the noise model is estimated once (main process, from all
    particles) and the per-particle results (and ``marginals``) are combined, so every process returns what one
    process would; ``on_marginals`` sees this process's batches only; ``timings`` are this process's.

    ``timings``: ``setup_s``, ``scoring_s``, ``total_s``, ``scoring_gflops``, ``refined_particles`` (per level),
    ``broad_particles`` (rescored on a finer order's whole grid; ``broad_per_level``: per level), ``radii_px``
    (each stage's cut-off, Fourier px) and ``scored_rotations_per_particle`` (rotations scored per particle over
    all stages, each with the shift lattice: the measure of the search's work).
    """
    search = search or PoseSearch()
    search.validate()
    prior = prior or UniformPrior()
    n = len(particles)
    if n == 0:
        raise ValueError("no particles to assign")
    device = choose_device(search.device)
    with torch_threads(search.threads or os.cpu_count()):
        t0 = time.perf_counter()
        prepared = prepared_for(volume, particles.box, device)
        space, seed_cells = _search_space(search, particles, centers, seed_cells)
        local = search.local_range_deg is not None
        cap = resolution_to_radius(particles.box, particles.pixel_size, search.max_resolution_A)
        if noise is None:
            def estimate() -> NoiseModel:
                return estimate_noise_model(particles, prepared, cap, images, search.mask_radius_px, seed=seed)

            noise = parallel.main_first(estimate) if distributed else estimate()
        if noise.ctf2 is None:  # a copy: the caller's model stays as given
            noise = replace(noise, ctf2=np.ones_like(noise.noise_power))
        radii = _stage_radii(prepared, noise, space.spacing_deg, cap, 0 if local else search.refine_levels,
                             search.smoothness_nats)
        deltas = shift_lattice(search.shift_range_px, search.shift_step_px)
        centred = (local or seed_cells is not None) and particles.origins_A is not None  # around the input origins
        run = _Run(search=search, space=space, prior=prior,
                   scorer=_Scorer(prepared, noise, deltas, particles.box, search.max_scores_per_chunk, device),
                   radii=radii, deltas=deltas, centers_px=particles.origins_px if centred else np.zeros((n, 2)),
                   group=symmetry_group(search.symmetry), pixel_size=particles.pixel_size,
                   out=ParticleResults.zeros(n), keep={int(i) for i in keep_marginals}, seed_cells=seed_cells,
                   shared_log_pi=prior.log_density(space.grid.rotations)
                   if space.shared and not prior.per_particle else None, sink=on_marginals)
        timings = {"setup_s": time.perf_counter() - t0}
        batch_size = _batch_size(search.batch_size, len(deltas), len(run.scorer.frequencies(max(radii))),
                                 particles.box, device)
        batches = (parallel.my_batches(n, batch_size) if distributed
                   else [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)])
        done, mine = 0, sum(len(index) for index in batches)
        for index in batches:
            run.assign(_Batch.load(particles, index, images, run.centers_px, device))
            done += len(index)
            if progress:
                progress(done, mine)
        if distributed:
            _combine_processes(run, np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64))
        scorer = run.scorer
        timings.update(scoring_s=scorer.seconds, total_s=time.perf_counter() - t0,
                       scoring_gflops=scorer.flops / max(scorer.seconds, 1e-9) / 1e9, refined_particles=run.n_refined,
                       broad_particles=sum(run.n_broad), broad_per_level=run.n_broad,
                       radii_px=radii, scored_rotations_per_particle=run.scored / n)
    return PoseAssignment(**vars(run.out), noise=noise, n_rotations=space.size, n_shifts=len(deltas),
                          n_frequencies=len(scorer.frequencies(radii[-1])), timings=timings,
                          marginals=run.marginals, scoring_calls=scorer.calls)


def _batch_size(batch_size: int, n_shifts: int, n_frequencies: int, box: int, device: torch.device) -> int:
    """Particles per batch: ``batch_size``, fewer when one batch's buffers (the shifted images (B, J, M) complex64
    at the largest cut-off, the images and CTFs (B, D, D // 2 + 1)) would exceed
    :func:`~bayespose.core.runtime.work_bytes` (box 256 at Nyquist with 29 shifts: 6 MB per particle)."""
    per_particle = 8 * n_shifts * n_frequencies + 12 * box * (box // 2 + 1)
    return max(1, min(batch_size, int(work_bytes(device) // per_particle)))


def _combine_processes(run: _Run, mine: np.ndarray) -> None:
    """Distributed run: every process's rows of the per-particle results (this process filled ``mine``), and the
    kept marginals of all processes, on every process."""
    names = run.out.result_fields()
    for name, combined in zip(names, parallel.combine_rows([getattr(run.out, name) for name in names], mine)):
        setattr(run.out, name, combined)
    if run.keep:
        for part in parallel.all_gather_objects(run.marginals):
            run.marginals.update(part)


def _search_space(search: PoseSearch, particles: ParticleSet, centers: np.ndarray | None,
                  seed_cells: np.ndarray | None) -> tuple[_SearchSpace, np.ndarray | None]:
    """The first grid of the search (local balls around ``centers`` or the input poses, or the global grid) and
    the checked ``seed_cells`` (N, C) int64 (None: the whole grid); raises ``ValueError`` on inconsistent input."""
    n = len(particles)
    local = search.local_range_deg is not None
    if centers is not None:
        if not local:
            raise ValueError("search centres need a local search: set PoseSearch.local_range_deg")
        centers = np.asarray(centers, dtype=np.float64)
        if len(centers) != n:
            raise ValueError(f"{len(centers)} sets of search centres for {n} particles")
    space = _SearchSpace(search, (particles.rotations if centers is None else centers) if local else None)
    if seed_cells is not None:
        if local:
            raise ValueError("seed cells belong to the (coarse-to-fine) global search: leave local_range_deg unset")
        seed_cells = np.asarray(seed_cells, dtype=np.int64)
        if seed_cells.ndim != 2 or len(seed_cells) != n:
            raise ValueError(f"seed cells must be (N, C) = ({n}, C) grid indices, got shape {seed_cells.shape}")
        if (seed_cells >= space.size).any() or (seed_cells < -1).any() or not (seed_cells >= 0).any(1).all():
            raise ValueError(f"seed cells must be indices in [0, {space.size}) (or -1), at least one per particle")
    return space, seed_cells


def _stage_radii(prepared: PreparedVolume, noise: NoiseModel, spacing_deg: float, cap: float, levels: int,
                 smoothness_nats: float) -> list[float]:
    """Each stage's cut-off (Fourier px; the first grid of spacing ``spacing_deg``, then ``levels`` halvings):
    information-matched (:func:`information_radius`), but never below the geometric one (:func:`geometric_radius`:
    at high SNR the information criterion alone would keep only a few coefficients, too few to tell the views
    apart), and never above ``cap`` nor the reference's signal band (:func:`signal_radius`: shells beyond it hold
    less than 1 % of the information, e.g. a map Fourier-padded to a finer pixel)."""
    # each level's expected loss per shell, computed once: the finest level's also gives the signal band
    cumulative = [np.cumsum(_loss_per_shell(prepared, noise, spacing_deg / 2 ** (level + 1), cap, LOSS_SAMPLES, 0))
                  for level in range(levels + 1)]
    band = _band_radius(cumulative[-1], SIGNAL_FRACTION, cap)
    return [min(max(_tolerance_radius(cumulative[level], smoothness_nats, cap),
                    geometric_radius(spacing_deg / 2 ** level)), band, cap) for level in range(levels + 1)]


@dataclass
class _Run:
    """What the batches of one :func:`assign_poses` call share, and the results they fill (``out``, N rows;
    ``marginals``; the work counters ``n_refined`` per level and ``scored`` (particle, rotation) pairs)."""

    search: PoseSearch
    space: _SearchSpace
    prior: RotationPrior
    scorer: _Scorer
    radii: list[float]  # each stage's cut-off, Fourier px: the first grid, then each refinement level
    deltas: np.ndarray  # (J, 2) px: the shift lattice
    centers_px: np.ndarray  # (N, 2) px: the shift centres
    group: np.ndarray  # (G, 3, 3) symmetry group
    pixel_size: float
    out: ParticleResults
    keep: set[int]  # particles whose marginals are kept
    seed_cells: np.ndarray | None  # (N, C) first cells of a seeded global search
    shared_log_pi: np.ndarray | None  # (K,) log prior of the shared grid, when it is the same for all particles
    sink: Callable[[np.ndarray, dict], None] | None = None  # receives each batch's final marginals
    marginals: dict = field(default_factory=dict, init=False)
    batch_marginals: dict = field(default_factory=dict, init=False)  # the current batch's, for ``sink``
    n_refined: list[int] = field(init=False)  # particles refined, per level
    n_broad: list[int] = field(init=False)  # particles rescored on the whole grid of the next order, per level
    scored: int = field(default=0, init=False)
    _finer: dict[int, SO3Grid] = field(default_factory=dict, init=False)  # HEALPix order -> whole grid

    def __post_init__(self):
        self.n_refined = [0] * (len(self.radii) - 1)
        self.n_broad = [0] * (len(self.radii) - 1)

    def assign(self, batch: _Batch) -> None:
        """Score ``batch`` on the first grid (all of it, or its seeded cells), then refine it coarse-to-fine."""
        if self.seed_cells is not None:
            scores, rotations, cells = self._score_seeded(batch)
        else:
            scores, rotations, cells = self._score_grid(batch)
        self._store(batch.index, scores, rotations, self.space.spacing_deg)
        if len(self.radii) > 1:
            self._refine(batch, scores, cells)
        if self.sink is not None:
            self.sink(batch.index, self.batch_marginals)
            self.batch_marginals = {}

    def _score_grid(self, batch: _Batch) -> tuple[_StageScores, np.ndarray, None]:
        """The whole first grid (shared, or each particle's local grid); its projections are cached."""
        rotations, log_q = self.space.grid_for(batch.index)
        log_pi = self.shared_log_pi if self.shared_log_pi is not None else self.prior.log_density(rotations,
                                                                                                  batch.index)
        scores = self.scorer.score(batch, self.radii[0], rotations, log_q, log_pi, cache_key="grid")
        self.scored += int(np.isfinite(log_q).sum()) * (len(batch.index) if log_q.ndim == 1 else 1)
        return scores, rotations, None

    def _score_seeded(self, batch: _Batch) -> tuple[_StageScores, np.ndarray, np.ndarray]:
        """The seeded cells of the coarse grid (padding -1 repeats a valid cell with log q = -inf), projected once
        each (lattice cache); returns their scores, rotations (B, C, 3, 3) and cell indices (B, C)."""
        cells = self.seed_cells[batch.index]
        valid = cells >= 0
        cells = np.where(valid, cells, cells.max(1, keepdims=True))
        rotations = self.space.grid.rotations[cells]  # (B, C, 3, 3)
        log_q = np.where(valid, self.space.log_q[cells], -np.inf)
        scores = score_ragged(self.scorer, batch, self.radii[0], rotations, log_q,
                              self.prior.log_density(rotations, batch.index), lattice_ids=cells)
        self.scored += int(valid.sum())
        return scores, rotations, cells

    def _refine(self, batch: _Batch, scores: _StageScores, cells: np.ndarray | None, grid: SO3Grid | None = None,
                start: int = 1) -> None:
        """Coarse-to-fine from level ``start``: per level, each particle's cells holding ``refine_mass`` of its
        posterior split into 8 children, with a ring of children of the adjacent cells around the most probable
        ones (:func:`children_with_ring`), scored at the level's cut-off. ``scores``: those of the HEALPix grid
        ``grid`` (default: the first grid, of order ``healpix_order + start - 1``); ``cells`` (B, C): each
        particle's cells of it (None: the whole grid). A particle with more than ``refine_max_cells`` significant
        cells is too broad to refine cell by cell: on a whole shared grid of a global search (the first one, or a
        finer one it was rescored on) it is rescored on the whole grid of the next order (:meth:`_score_finer_grid`)
        and refined from there (recursively); otherwise it keeps its current result (the posterior over the whole
        grid it was scored on)."""
        search = self.search
        grid = grid or self.space.grid
        if cells is not None:
            cell_dir, cell_psi = grid.direction_index[cells], grid.euler_deg[cells, 2]
        else:
            cell_dir = np.broadcast_to(grid.direction_index, (len(batch.index), len(grid)))
            cell_psi = np.broadcast_to(grid.euler_deg[:, 2], (len(batch.index), len(grid)))
        active = np.arange(len(batch.index))  # batch rows still being refined
        for level in range(start, len(self.radii)):
            p_rot = torch.exp(scores.log_rot - torch.logsumexp(scores.log_rot, 1, keepdim=True)).cpu().numpy()
            significant = _significant_cells(p_rot, search.refine_mass)
            ok = np.array([len(c) <= search.refine_max_cells for c in significant])
            if level == start and not ok.all() and self._finer_grid(level) is not None:
                broad = batch.rows(active[~ok])
                self._refine(broad, self._score_finer_grid(broad, level), None, self._finer_grid(level),
                             start=level + 1)
            if not ok.any():
                break
            active, significant = active[ok], [c for c, keep_row in zip(significant, ok) if keep_row]
            width = max(len(c) for c in significant)
            chosen = np.stack([np.pad(c, (0, width - len(c)), mode="edge") for c in significant])  # (R, width)
            valid = np.stack([np.arange(width) < len(c) for c in significant])
            rows_ok = np.nonzero(ok)[0]
            parent_dir = np.take_along_axis(cell_dir[rows_ok], chosen, axis=1)
            parent_psi = np.take_along_axis(cell_psi[rows_ok], chosen, axis=1)
            p_parent = np.take_along_axis(p_rot[ok], chosen, axis=1)
            ringed = valid & (p_parent >= search.refine_ring_ratio * p_parent[:, :1])  # most probable first
            cell_dir, cell_psi, valid = children_with_ring(search.healpix_order + level - 1, parent_dir, parent_psi,
                                                           valid, ringed)
            children = cell_rotations(search.healpix_order + level, cell_dir, cell_psi)  # (R, W', 3, 3)
            sub = batch.rows(active)
            # lattice ids carry the level: the projection cache is keyed by radius only, and levels whose radii
            # coincide (e.g. all capped at Nyquist) must not share ids (cell i of level 1 is not cell i of level 2)
            ids = cell_ids(search.healpix_order + level, cell_dir, cell_psi, coarse=False) + (level << 40)
            scores = score_ragged(self.scorer, sub, self.radii[level], children, np.where(valid, 0.0, -np.inf),
                                  self.prior.log_density(children, sub.index), lattice_ids=ids, stage=level)
            self._store(sub.index, scores, children, self.space.spacing_deg / 2 ** level)
            self.n_refined[level - 1] += len(active)
            self.scored += int(valid.sum())

    def _finer_grid(self, level: int) -> SO3Grid | None:
        """The whole HEALPix grid of order ``healpix_order + level`` (one finer than the grid whose posteriors were
        found broad), for the broad posteriors of a global search (None: not a shared global grid, seeded cells,
        ``broad_finer_grid`` off, no further level to refine from it, or finer than
        :attr:`PoseSearch.MAX_HEALPIX_ORDER`)."""
        search = self.search
        order = search.healpix_order + level
        if not (search.broad_finer_grid and self.space.shared and self.seed_cells is None
                and level + 1 < len(self.radii) and order <= PoseSearch.MAX_HEALPIX_ORDER):
            return None
        if order not in self._finer:
            self._finer[order] = healpix_grid(order)
        return self._finer[order]

    def _score_finer_grid(self, sub: _Batch, level: int) -> _StageScores:
        """Broad particles ``sub`` on the whole grid of order ``healpix_order + level`` at that level's cut-off:
        all its rotations, projected once (cached) and shared by all particles, one matrix product per chunk like
        the first grid; stores the result as their stage ``level``."""
        grid = self._finer_grid(level)
        log_pi = self.prior.log_density(grid.rotations, sub.index)
        scores = self.scorer.score(sub, self.radii[level], grid.rotations, np.log(grid.weights), log_pi,
                                   cache_key=("finer grid", level), stage=level)
        self._store(sub.index, scores, grid.rotations, grid.spacing_deg)
        self.n_broad[level - 1] += len(sub.index)
        self.scored += len(grid) * len(sub.index)
        return scores

    def _store(self, index: np.ndarray, scores: _StageScores, rotations: np.ndarray, spacing_deg: float) -> None:
        """Write one stage's estimators and statistics into rows ``index`` of ``out``; keep the asked marginals."""
        stage, p_rot = _stage_results(scores, rotations, self.centers_px[index], self.deltas, self.group,
                                      spacing_deg, self.pixel_size)
        self.out.set_rows(index, stage)
        for row, i in enumerate(index):
            i = int(i)
            if i in self.keep or self.sink is not None:
                marginal = (rotations if rotations.ndim == 3 else rotations[row], p_rot[row])
                if i in self.keep:
                    self.marginals[i] = marginal
                if self.sink is not None:
                    self.batch_marginals[i] = marginal
