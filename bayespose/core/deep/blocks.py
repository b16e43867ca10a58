"""Network prediction and deep-prior MMSE of a whole particle set, block by block: memory flat in N, one network
pass per particle.

The so3grid network's predicted distribution is one float per cell of its HEALPix grid (36,864 on the default
order-3 grid, 147 kB per particle: 15 GB for 100,000 particles). :func:`predict_in_blocks` runs the network on
blocks of particles (:func:`block_size`: a block's distributions within about 256 MB), uses each block's
distribution at once as the seeds and prior of its deep-prior search
(:func:`~bayespose.core.deep.prior_refine.deep_prior_assign`) and drops it; only the per-particle results are kept.
One prepared map and one noise model (:func:`prior_noise_model`) serve every block, so the blocks score as a single
call over the whole set would. Used by ``bayespose predict`` and the Scipion protocol 'predict poses'; under
``torchrun`` the caller gives each process its blocks (:func:`bayespose.core.parallel.my_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np

from bayespose.core.assign import NoiseModel, PoseSearch
from bayespose.core.deep.predict import PosePrediction, predict_poses
from bayespose.core.deep.prior_refine import DeepPriorAssignment, DeepPriorSearch, deep_prior_assign
from bayespose.core.deep.vocabulary import PRIOR_INPLANE_TURNS
from bayespose.core.imaging.forward import PreparedVolume
from bayespose.core.imaging.particles import ParticleSet

__all__ = ["BlockResult", "block_size", "prepared_reference", "prior_noise_model", "predict_in_blocks",
           "concatenate_predictions", "concatenate_assignments"]

BLOCK_BYTES = 256e6  # predicted log probabilities held per block (float32)


def block_size(network) -> int:
    """Particles per block: their predicted log probabilities (4 bytes per grid cell and particle) within
    :data:`BLOCK_BYTES`, between 256 and 16,384 particles (quaternion networks: 16,384)."""
    from bayespose.core.geometry.grids import healpix_grid

    cells = len(healpix_grid(network.grid_order)) if network.config.model == "so3grid" else 1
    return int(min(16384, max(256, BLOCK_BYTES // (4 * cells))))


def prepared_reference(volume: np.ndarray | PreparedVolume, box: int, search: PoseSearch) -> PreparedVolume:
    """``volume`` prepared once on the search's device with its threads (a prepared map is used as it is), for the
    noise model and every block's search, check and fallback."""
    from bayespose.core.imaging.forward import prepared_for
    from bayespose.core.runtime import choose_device, torch_threads

    with torch_threads(search.threads):
        return prepared_for(volume, box, choose_device(search.device))


def prior_noise_model(particles: ParticleSet, volume: np.ndarray | PreparedVolume, search: PoseSearch) -> NoiseModel:
    """The noise model :func:`~bayespose.core.assign.assign_poses` would estimate for the whole of ``particles``
    (up to 1000 of them, seed 0) against ``volume`` (a (D, D, D) map or a prepared one), made once so that every
    block scores with it."""
    from bayespose.core.assign import estimate_noise_model
    from bayespose.core.imaging.noise import resolution_to_radius
    from bayespose.core.runtime import torch_threads

    prepared = prepared_reference(volume, particles.box, search)
    with torch_threads(search.threads):
        cap = resolution_to_radius(particles.box, particles.pixel_size, search.max_resolution_A)
        return estimate_noise_model(particles, prepared, cap, None, search.mask_radius_px)


@dataclass
class BlockResult:
    """One block of :func:`predict_in_blocks`: the rows ``index`` (B,) of the particle set, those ``particles``,
    the network's ``prediction`` (its ``log_probabilities`` dropped) and, with a map, the deep-prior
    ``assignment`` (else None)."""

    index: np.ndarray
    particles: ParticleSet
    prediction: PosePrediction
    assignment: DeepPriorAssignment | None


def predict_in_blocks(network, particles: ParticleSet, volume: np.ndarray | PreparedVolume | None = None,
                      search: PoseSearch | None = None, config: DeepPriorSearch | None = None, *,
                      blocks: Iterable[np.ndarray] | None = None, noise: NoiseModel | None = None, top_k: int = 8,
                      batch_size: int = 256, device=None, turns: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Iterator[BlockResult]:
    """Yield the prediction (and, with ``volume``, the deep-prior MMSE) of ``particles`` block by block (module doc).

    ``blocks``: the particle indices of each block (default: consecutive blocks of :func:`block_size`). ``volume``
    (D, D, D) the reference, or it prepared (None: the network alone); ``search`` and ``config`` the engine's and
    the deep prior's settings (defaults: :class:`~bayespose.core.assign.PoseSearch` with the network's symmetry,
    :class:`~bayespose.core.deep.prior_refine.DeepPriorSearch`); ``noise``: the noise model of all blocks (default
    :func:`prior_noise_model` of the whole set). ``turns``: the network's test-time in-plane turns (default: the
    network's own with no map, :data:`~bayespose.core.deep.vocabulary.PRIOR_INPLANE_TURNS` with one: the MMSE search
    decides the pose, measured). ``top_k``, ``batch_size``, ``device``: :func:`~bayespose.core.deep.predict_poses`'s.
    ``progress(done, total)``: particles of ``blocks`` done, after each block and each batch of its search.
    """
    if volume is not None:
        search = search or PoseSearch(symmetry=str(network.symmetry).upper(), device=device)
        volume = prepared_reference(volume, particles.box, search)
        noise = noise or prior_noise_model(particles, volume, search)
        turns = PRIOR_INPLANE_TURNS if turns is None else turns
    if blocks is None:
        size = block_size(network)
        blocks = [np.arange(s, min(s + size, len(particles))) for s in range(0, len(particles), size)]
    blocks = list(blocks)
    done, total = 0, sum(len(index) for index in blocks)
    for index in blocks:
        block = particles.subset(index)
        prediction = predict_poses(network, block, top_k=top_k, batch_size=batch_size, device=device, turns=turns)
        result = None
        if volume is not None:
            inner = _within_block(progress, done, len(index), total) if progress else None
            result = deep_prior_assign(block, prediction, volume, search, config, noise=noise, progress=inner)
        done += len(index)
        if progress:
            progress(done, total)
        yield BlockResult(index=np.asarray(index), particles=block, assignment=result,
                          prediction=replace(prediction, log_probabilities=None))


def _within_block(progress: Callable[[int, int], None], start: int, size: int, total: int):
    """The progress of a block's search (its batches, then its fallback's) as particles of the whole run."""
    return lambda done, _: progress(start + min(done, size), total)


def concatenate_predictions(predictions: list[PosePrediction]) -> PosePrediction:
    """One :class:`PosePrediction` of the blocks' particles in order (their ``log_probabilities`` dropped)."""
    first = predictions[0]
    join = {name: np.concatenate([getattr(p, name) for p in predictions])
            for name in ("rotations", "confidence", "top_rotations", "top_probabilities")}
    return replace(first, log_probabilities=None, **join)


# timings that are per-particle means (weighted by the block sizes); the other numbers add up
_MEAN_TIMINGS = ("scored_rotations_per_particle", "deep_scored_rotations_per_particle")


def concatenate_assignments(results: list[DeepPriorAssignment]) -> DeepPriorAssignment:
    """One :class:`DeepPriorAssignment` of the blocks' particles in order, from blocks scored with the same noise
    model and search (:func:`predict_in_blocks`): per-particle fields joined, ``noise`` and the sizes of the
    first block, ``scoring_calls`` joined, ``timings`` added up (per-particle rates averaged over the particles;
    the first block's cut-offs ``radii_px``, the rate ``scoring_gflops`` of the whole), ``marginals`` re-indexed to
    the joined rows."""
    first, sizes = results[0], [len(r.pmax) for r in results]
    values = {}
    for f in fields(DeepPriorAssignment):
        parts = [getattr(r, f.name) for r in results]
        if isinstance(parts[0], np.ndarray) and all(p is not None and len(p) == s for p, s in zip(parts, sizes)):
            values[f.name] = np.concatenate(parts)
        else:
            values[f.name] = parts[0]
    offsets = np.cumsum([0, *sizes[:-1]])
    values["marginals"] = {int(k) + int(o): v for r, o in zip(results, offsets) for k, v in r.marginals.items()}
    values["scoring_calls"] = [call for r in results for call in r.scoring_calls]
    timings = {}
    for key, value in first.timings.items():
        numbers = [r.timings.get(key, 0.0) for r in results]
        if not all(isinstance(v, (int, float, np.integer, np.floating)) for v in numbers):
            timings[key] = value  # radii_px and the per-level lists: the first block's
        elif key in _MEAN_TIMINGS:
            timings[key] = float(np.dot(numbers, sizes) / sum(sizes))
        else:
            timings[key] = sum(numbers)
    if "scoring_gflop" in timings:
        timings["scoring_gflops"] = timings["scoring_gflop"] / max(timings.get("scoring_s", 0.0), 1e-9)
    values["timings"] = timings
    return DeepPriorAssignment(**values)
