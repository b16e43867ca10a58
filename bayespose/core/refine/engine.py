"""EM 3D refinement with rotational-prior estimation (Xu, Balanov, Singer & Bendory (2026), "Bayesian perspective
for orientation determination in cryo-EM with application to structural heterogeneity analysis", Acta Cryst. D 82,
doi:10.48550/arXiv.2412.03723, sec. 4 and App. F2), with RELION's gold-standard half sets (Scheres (2012), "RELION:
Implementation of a Bayesian approach to cryo-EM structure determination", J. Struct. Biol. 180, 519-530,
doi:10.1016/j.jsb.2012.09.006).

:func:`refine` sets up an :class:`~bayespose.core.refine.state.EMState` and calls :func:`run_iteration` until
the maximum number of iterations or convergence. Each iteration, for each half set h independently, against its
own reference V_h:

* **E-step** (:mod:`._estep`) — :func:`bayespose.core.assign.engine.assign_poses` on the HEALPix grid, refined
  coarse to fine in the significant cells (or locally around the current poses once the global search has
  converged, with ``local_search``), up to the current resolution + ``extra_shells`` Fourier shells; each
  particle's MMSE / MAP / MLE poses and the candidate rotations of its posterior.
* **M-step** (:mod:`._mstep`) — the joint (rotation, shift) weights on those candidates (hard mode: the best one)
  inserted into the half set's Fourier accumulator; σ²(shell) from the residuals (reference scale 1 from the
  second iteration on); with ``prior_mode="estimate"`` the viewing-direction density from the posterior mass of
  both halves, the :class:`bayespose.core.geometry.priors.DirectionDensityPrior` of the next E-step (one prior
  for both halves: a 192-pixel histogram carries no high-resolution information).
* **Maps** (:mod:`._maps`) — FSC between the unregularised half maps gives the resolution (0.143) and τ²
  (RELION's rule); the references of the next iteration are the Wiener half maps, solvent-flattened (the user's
  mask, or a soft sphere of the particle diameter times each half map's own envelope, ``envelope_mask``) and
  averaged below ``join_halves_below_A``.

Convergence: the resolution has not improved by 1 % for 2 iterations, the mean pose change is below the current
angular step and the poses ask for no finer sampling (:func:`~._estep.sampling_for`). **Final full-resolution pass**
(``final_full_resolution``, default on; RELION's final iteration): after the last iteration each particle's data are
inserted once more at ALL frequencies up to Nyquist (``D // 2`` Fourier px) at the last E-step's joint weights, for
both halves; the FSC of these unregularised half maps gives the final FSC, resolution and τ², then the Wiener half
maps and the combined map. It is not an iteration (no history entry, no pose update). Units: Å, degrees, RELION
``A`` rotations, origins in Å (``rlnOriginX/YAngst``).

Files (``out_dir``): after each iteration the state (:meth:`EMState.save`: ``it###_half{1,2}.mrc``,
``it###_map.mrc``, ``it###_state.npz``, ``history.json``), after the final pass ``final_half{1,2}.mrc``,
``final_map.mrc`` and ``final_state.npz``. ``refine(..., resume=True)`` continues from the last complete
iteration and ends exactly as an uninterrupted run would (same inputs and settings, checked with the run's
fingerprint); with no complete iteration it starts from the beginning. A resumed finished run returns the saved
final maps, or, if the final pass is missing, recomputes the joint-weight supports with one E-step against the
saved references and redoes the final pass. A fresh start removes an earlier run's engine files from ``out_dir``.

Data-parallel (``torchrun``, :mod:`bayespose.core.parallel`): every process runs the same iterations; each E-step
scores every ``world_size``-th batch of particles (the per-particle results are combined), each process inserts its
own particles, and the Fourier accumulators, noise residuals and direction mass are summed over the processes
before the maps are made, so every process holds the state one process would (within float rounding of the sums);
only the main process writes files and log lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.assign import NoiseModel, estimate_noise_model
from bayespose.core.geometry.priors import DirectionDensityPrior
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import prepare_volume
from bayespose.core.imaging.noise import noise_power_from_background, radial_average, resolution_to_radius
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.imaging.reconstruct import FourierAccumulator, lowpass
from bayespose.core.imaging.volumes import soft_sphere_mask
from bayespose.core.io.mrc import read_images
from bayespose.core.refine._estep import STATISTICS, HalfEStep, Sampling, e_step, sampling_for
from bayespose.core.refine._maps import Maps, maps_from, references_from
from bayespose.core.refine._mstep import direction_density, m_step
from bayespose.core.refine.config import RefineConfig, split_half_sets
from bayespose.core.refine.state import (
    EMState,
    FinalState,
    IterationLog,
    check_same_run,
    last_complete_iteration,
    remove_engine_files,
    run_fingerprint,
)
from bayespose.core.results import ParticleResults
from bayespose.core.runtime import choose_device, torch_threads

__all__ = ["refine", "run_iteration", "RefineResult", "RefineRun"]


@dataclass
class RefineResult:
    """What :func:`refine` returns. Maps (D, D, D) float32 [z, y, x]; FSC frequencies in 1/Å, resolution in Å."""

    map: np.ndarray
    half_maps: tuple
    fsc_frequencies: np.ndarray  # 1/Å
    fsc: np.ndarray
    resolution_A: float
    particles: ParticleSet  # MMSE poses (hard mode: MAP) + per-particle results in extra
    direction_prior: np.ndarray  # density (relative to uniform) on HEALPix NEST pixels of order prior_order
    prior_order: int
    history: list = field(default_factory=list)
    converged: bool = False
    noise_power: np.ndarray | None = None  # final σ² per shell (unnormalised DFT units)


@dataclass(frozen=True)
class RefineRun:
    """The fixed inputs of one :func:`refine` call (what does not change from one iteration to the next), built
    by :func:`refine` after checking them; :func:`run_iteration` takes it with the state."""

    particles: ParticleSet
    images: np.ndarray | None  # (N, D, D) in memory, or None (read from the files batch by batch)
    config: RefineConfig
    device: torch.device
    mask: np.ndarray | None  # the user's mask: references and FSC
    reference_mask: np.ndarray | None  # the user's mask, or the soft solvent sphere, or None
    envelope: bool  # references masked by their own envelope inside the sphere (no user mask, see RefineConfig)
    diameter: float  # Å
    group: np.ndarray  # symmetry matrices
    halves: np.ndarray  # (N,) int: each particle's half set, 1 or 2
    half_source: str  # where the half sets come from (for the log)
    out_dir: Path | None
    log: Callable[[str], None] | None
    progress: Callable[[str], Callable[[int, int], None]] | None

    @property
    def box(self) -> int:
        return self.particles.box

    @property
    def px(self) -> float:
        return self.particles.pixel_size

    @property
    def nyquist(self) -> float:
        return resolution_to_radius(self.box, self.px, None)

    def say(self, line: str) -> None:
        if self.log and parallel.is_main():
            self.log(line)


# ------------------------------------------------------------------------------------------------ refine
def refine(particles: ParticleSet, initial_map: np.ndarray, config: RefineConfig | None = None,
           out_dir: str | Path | None = None, images: np.ndarray | None = None,
           log: Callable[[str], None] | None = print,
           progress: Callable[[str], Callable[[int, int], None]] | None = None,
           mask: np.ndarray | None = None, resume: bool = False) -> RefineResult:
    """EM refinement of ``initial_map`` (D, D, D) from ``particles`` (with CTF). See the module docstring.

    ``out_dir``: the working folder (per-iteration state and maps, ``history.json``, the final pass; see
    :class:`~bayespose.core.refine.state.EMState`). ``images``: particle images (N, D, D) if in memory. ``log``:
    one line per iteration (None: silent). ``progress(label)`` returns a ``callback(done, total)`` for each half
    set's E-step and M-step (labels ``"iteration I half H E-step"`` / ``"... M-step"``). ``mask``: (D, D, D) in
    [0, 1], applied to the half maps before they become references and used for the FSC. ``resume``: continue
    from the last complete iteration in ``out_dir`` (``ValueError`` naming what differs if the particles, maps or
    settings are not those of the saved run); start from the beginning when there is none. Returns the final map,
    half maps, FSC and resolution (those of the final full-resolution pass unless
    ``config.final_full_resolution`` is False; the per-iteration maps stay in ``out_dir``), particles with MMSE
    poses (hard mode: MAP poses) and half sets, and the viewing-direction prior. Raises ``ValueError`` on bad input
    (nothing written then), e.g. fewer than :data:`~bayespose.core.refine.config.MIN_PER_HALF` particles in a
    half set.
    """
    config = config or RefineConfig()
    run, initial_map = _setup(particles, initial_map, config, out_dir, images, log, progress, mask, resume)
    fingerprint = run_fingerprint(particles, initial_map, run.mask, config, run.halves)
    with torch_threads(config.threads):
        state = _start(run, initial_map, fingerprint, resume)
        while state.iteration < config.iterations and not state.converged:
            state = run_iteration(state, run)
            if run.out_dir is not None and parallel.is_main():
                state.save(run.out_dir, run.px)
        maps = _final_maps(state, run) if config.final_full_resolution else state.maps
    final = replace(state.results.to_particle_set(particles, config.estimator), half_set=state.halves.astype(int))
    return RefineResult(maps.combined, (maps.half_maps[0], maps.half_maps[1]), np.asarray(maps.fsc_frequencies),
                        np.asarray(maps.fsc), float(maps.resolution), final, np.asarray(state.prior_density),
                        config.prior_order, list(state.history), bool(state.converged),
                        np.asarray(state.noise.noise_power))


def _setup(particles: ParticleSet, initial_map: np.ndarray, config: RefineConfig, out_dir, images, log, progress,
           mask, resume: bool) -> tuple[RefineRun, np.ndarray]:
    """Check the inputs (``ValueError``, nothing written) and gather them; returns the run and the initial map as
    float32."""
    config.validate()
    n, box, px = len(particles), particles.box, particles.pixel_size
    halves, half_source = split_half_sets(particles.half_set, config.half_split, config.seed, n)
    initial_map = np.asarray(initial_map, dtype=np.float32)
    if initial_map.shape != (box,) * 3:
        raise ValueError(f"initial map box {initial_map.shape} does not match the particle box {box} px")
    if images is not None and np.shape(images) != (n, box, box):
        raise ValueError(f"images must have shape ({n}, {box}, {box}), got {np.shape(images)}")
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape != (box,) * 3:
            raise ValueError(f"mask shape {mask.shape} does not match the map box {box} px")
        if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1 or mask.max() == 0:
            raise ValueError("mask values must be in [0, 1] and not all zero")
    if resume and out_dir is None:
        raise ValueError("resume needs the output folder of the run to continue")
    device = choose_device(config.device)
    diameter = config.particle_diameter_A or 0.9 * box * px
    reference_mask = mask if mask is not None else (
        soft_sphere_mask(box, diameter / 2 / px) if config.solvent_flatten else None)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    envelope = mask is None and config.solvent_flatten and config.envelope_mask
    run = RefineRun(particles, images, config, device, mask, reference_mask, envelope, diameter,
                    symmetry_group(config.symmetry),
               halves, half_source, out_dir, log, progress)
    return run, initial_map


def _start(run: RefineRun, initial_map: np.ndarray, fingerprint: dict, resume: bool) -> EMState:
    """The state saved after the last complete iteration (``resume``; the same run, checked), or the start."""
    if resume:
        done = last_complete_iteration(run.out_dir)
        if done:
            state = EMState.load(run.out_dir, done)
            check_same_run(state.fingerprint, fingerprint, run.out_dir)
            run.say(f"resuming after iteration {done} (resolution {state.resolution:.1f} Å)")
            return state
        run.say(f"no complete iteration in {run.out_dir}: starting from the beginning")
    if run.out_dir is not None and parallel.is_main() and remove_engine_files(run.out_dir):
        run.say(f"removed the files of an earlier refinement in {run.out_dir}")
    parallel.barrier()  # no process starts before an earlier run's files are gone
    return _initial_state(run, initial_map, fingerprint)


def _initial_state(run: RefineRun, initial_map: np.ndarray, fingerprint: dict) -> EMState:
    """Iteration 0: both half maps the initial map low-passed to ``initial_lowpass_A``, the noise model from the
    particles (reference scale by the method of moments, or ``initial_scale``), a uniform prior."""
    config, px = run.config, run.px
    start_map = lowpass(initial_map, config.initial_lowpass_A, px).cpu().numpy()
    if config.initial_scale is None:
        reference = references_from([start_map], run.reference_mask, None, px, join=False,
                                    envelope_at_A=config.initial_lowpass_A if run.envelope else None)[0]
        radius = min(run.box * px / config.initial_lowpass_A, run.nyquist)
        try:
            noise = parallel.main_first(lambda: estimate_noise_model(
                run.particles, prepare_volume(reference, device=run.device), radius, run.images, seed=config.seed))
        except ValueError as exc:
            raise ValueError(f"{exc} (or give the reference scale: RefineConfig.initial_scale)") from None
    else:
        noise = _noise_without_scale(run.particles, run.images, config)
    counts = [int(np.sum(run.halves == h)) for h in (1, 2)]
    run.say(f"half sets of {counts[0]} and {counts[1]} particles: {run.half_source}")
    maps = Maps([start_map, start_map], start_map, None, None, float(config.initial_lowpass_A), None)
    return EMState(0, run.halves, maps, noise=noise, prior_density=np.ones(12 * 4 ** config.prior_order),
                   fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------------ one iteration
def run_iteration(state: EMState, run: RefineRun) -> EMState:
    """One EM iteration from ``state`` (not modified): E-step and M-step of both half sets, new maps, noise model
    and prior, convergence bookkeeping and the history entry; returns the next state (with the supports of the
    final pass)."""
    t0, config, it = time.perf_counter(), run.config, state.iteration + 1
    radius = min(run.box * run.px / state.resolution + config.extra_shells, run.nyquist)
    sampling = sampling_for(config, state.resolution, run.diameter, state.local, _accuracy(state))
    esteps, msteps = _half_passes(state, run, sampling, radius, f"iteration {it}", m_steps=True)
    results = ParticleResults.zeros(len(state.halves), STATISTICS) if state.results is None \
        else state.results.copy_results()
    for rows, estep in zip(_half_rows(state), esteps):
        results.set_rows(rows, estep.results)
    maps = maps_from([m.accumulator for m in msteps], run.px, run.mask)
    noise_sum, noise_count = msteps[0].noise_sum + msteps[1].noise_sum, msteps[0].noise_count + msteps[1].noise_count
    noise = NoiseModel(np.where(noise_count > 0, noise_sum / np.maximum(noise_count, 1), state.noise.noise_power),
                       1.0, state.noise.ctf2)
    prior_density = state.prior_density
    if config.prior_mode == "estimate":
        prior_density = direction_density(esteps[0].direction_mass + esteps[1].direction_mass, config.prior_order,
                                          config.prior_pseudocount)
    previous = state.results.poses(config.estimator)[0] if state.results is not None else None
    change = _pose_change(results.poses(config.estimator)[0], previous, run.group)
    gain = maps.resolution < state.best_resolution * 0.99
    best, no_gain = (maps.resolution, 0) if gain else (state.best_resolution, state.no_gain + 1)
    finer = sampling_for(config, maps.resolution, run.diameter, state.local,
                         float(np.median(results.expected_error_deg))).finest_order > sampling.finest_order
    converged = no_gain >= 2 and change < sampling.step_deg and not finer
    go_local = (config.local_search and not state.local and it >= 2
                and sampling.finest_order >= config.max_healpix_order and change < sampling.step_deg)
    broad = sum(len(e.support.broad_rows) for e in esteps)
    entry = IterationLog(it, sampling.finest_order, float(run.box * run.px / radius), float(maps.resolution),
                         float(np.mean(results.log_evidence)), change, time.perf_counter() - t0,
                         "local" if state.local else "global", sampling.step_deg,
                         float(np.mean(results.n_candidates)), int(broad), bool(converged))
    _log_iteration(run, entry, sampling, go_local)
    return EMState(it, state.halves, maps, best, no_gain, noise, prior_density, results, state.local or go_local,
                   converged, [*state.history, entry], state.fingerprint, supports=[e.support for e in esteps])


def _accuracy(state: EMState) -> float | None:
    """The particles' median posterior expected error (degrees) after the state's iteration (None before the
    first): what the angular sampling of the next E-step should resolve."""
    if state.results is None:
        return None
    return float(np.median(state.results.expected_error_deg))


def _half_rows(state: EMState) -> list[np.ndarray]:
    return [np.nonzero(state.halves == h)[0] for h in (1, 2)]


@dataclass
class _MStepSums:
    """What the iteration keeps of a half set's M-step: its Fourier accumulator and residual power per shell."""

    accumulator: FourierAccumulator
    noise_sum: np.ndarray
    noise_count: np.ndarray


def _half_passes(state: EMState, run: RefineRun, sampling: Sampling, radius: float, label: str,
                 m_steps: bool) -> tuple[list[HalfEStep], list[_MStepSums]]:
    """E-step (and, with ``m_steps``, M-step) of both half sets against the state's references, up to ``radius``
    (Fourier px); progress labels ``"{label} half H E-step"`` / ``"... M-step"``."""
    config = run.config
    estimate = config.prior_mode == "estimate"
    prior = DirectionDensityPrior(config.prior_order, state.prior_density) if estimate else None
    references = references_from(state.maps.half_maps, run.reference_mask, config.join_halves_below_A, run.px,
                                 join=state.iteration > 0, envelope_at_A=state.resolution if run.envelope else None)
    esteps, msteps = [], []
    for h, rows in enumerate(_half_rows(state)):
        half = run.particles.subset(rows)
        if state.local:
            half = replace(half, rotations=state.results.mmse_rotations[rows],
                           origins_A=state.results.mmse_origins_A[rows])
        name = f"{label} half {h + 1}"
        sub_progress = (lambda tag, _name=name: run.progress(f"{_name} {tag}")) if run.progress else None
        estep = e_step(half, run.images[rows] if run.images is not None else None, references[h], state.noise,
                       sampling, radius, prior, config, run.device, sub_progress,
                       direction_order=config.prior_order if estimate and m_steps else None)
        esteps.append(estep)
        if m_steps:
            mstep = m_step(estep.support, config, run.device, sub_progress)
            msteps.append(_MStepSums(mstep.accumulator, mstep.noise_sum, mstep.noise_count))
            del mstep  # its prepared reference (0.5 GB at box 256) must not live through the other half's passes
    return esteps, msteps


def _pose_change(a: np.ndarray, b: np.ndarray | None, group: np.ndarray) -> float:
    """Mean angle (degrees, symmetry-aware) between two sets of RELION rotations (N, 3, 3); NaN without ``b``."""
    if b is None:
        return float("nan")
    if len(group) > 1:
        return float(np.mean(symmetric_geodesic_distance_deg(a, b, group)))
    trace = np.einsum("nij,nij->n", a, b)
    return float(np.mean(np.degrees(np.arccos(np.clip((trace - 1) / 2, -1, 1)))))


def _log_iteration(run: RefineRun, entry: IterationLog, sampling: Sampling, go_local: bool) -> None:
    run.say(f"iteration {entry.iteration}: {sampling.describe()}, scored to {entry.scored_resolution_A:.1f} Å, "
            f"resolution {entry.resolution_A:.1f} Å (FSC 0.143), log-likelihood {entry.log_likelihood:.1f}, "
            f"pose change {entry.pose_change_deg:.2f}°, {entry.mean_candidates:.1f} rotations/particle"
            f"{f' ({entry.broad_particles} broad)' if entry.broad_particles else ''}, {entry.seconds:.1f} s"
            + (" — converged (no resolution gain for 2 iterations, pose change below the step)"
               if entry.converged else "")
            + (" — switching to local searches" if go_local and not entry.converged else ""))


# ------------------------------------------------------------------------------------------------ final pass
def _final_maps(state: EMState, run: RefineRun) -> Maps:
    """The maps of the final full-resolution pass after the state's iteration: computed from the last E-step's
    supports, or, when no iteration ran in this call (a resumed run), read back from ``out_dir`` or recomputed."""
    supports = state.supports
    if supports is None:
        saved = FinalState.load(run.out_dir, state.iteration)
        if saved is not None:
            return saved.maps
        supports = _recompute_supports(state, run)
    return _final_pass(supports, state.iteration, run)


def _recompute_supports(state: EMState, run: RefineRun) -> list:
    """The joint-weight supports of both halves from one more E-step against the saved references (a resumed,
    finished run: the last E-step's weights live in memory only)."""
    radius = min(run.box * run.px / state.resolution + run.config.extra_shells, run.nyquist)
    sampling = sampling_for(run.config, state.resolution, run.diameter, state.local, _accuracy(state))
    esteps, _ = _half_passes(state, run, sampling, radius, f"final after iteration {state.iteration}",
                             m_steps=False)
    return [e.support for e in esteps]


def _final_pass(supports: list, it: int, run: RefineRun) -> Maps:
    """RELION's final reconstruction: each half's data inserted at ALL frequencies up to Nyquist (``D // 2``
    Fourier px) at the last E-step's joint weights (scored on that E-step's band), the FSC and resolution of
    these unregularised full-resolution half maps, the half maps with τ² from that FSC and the combined map
    (whole-map τ²). Saved as :class:`FinalState` in ``out_dir``."""
    t0 = time.perf_counter()
    accumulators = []
    for h, support in enumerate(supports):
        name = f"final half {h + 1}"
        sub_progress = (lambda tag, _name=name: run.progress(f"{_name} {tag}")) if run.progress else None
        accumulators.append(m_step(support, run.config, run.device, sub_progress,
                                   insert_radius=float(run.box // 2)).accumulator)
    maps = maps_from(accumulators, run.px, run.mask)
    run.say(f"final reconstruction to Nyquist ({2 * run.px:.1f} Å) at the weights of iteration {it}: resolution "
            f"{maps.resolution:.1f} Å (FSC 0.143), {time.perf_counter() - t0:.1f} s")
    if run.out_dir is not None and parallel.is_main():
        FinalState(it, maps).save(run.out_dir, run.px)
    return maps


def _noise_without_scale(particles: ParticleSet, images: np.ndarray | None, config: RefineConfig) -> NoiseModel:
    """First-iteration noise model with a given reference scale (``config.initial_scale``): noise power from the
    particles' background, mean CTF² per shell."""
    rng = np.random.default_rng(config.seed)
    n = len(particles)
    index = np.sort(rng.choice(n, size=min(n, 1000), replace=False))
    imgs = images[index] if images is not None else read_images(particles, index)
    noise_power = noise_power_from_background(imgs)
    ctf2 = np.ones_like(noise_power)
    if particles.ctf is not None:
        ctf2 = radial_average((ctf_2d(particles.ctf.subset(index), particles.pixel_size, particles.box) ** 2)
                              .mean(0).numpy(), particles.box)
    return NoiseModel(noise_power, float(config.initial_scale), ctf2)

