"""Inference with a trained pose network: the predicted distribution over SO(3), its mode and a confidence.

Rotations are RELION ``A`` matrices (volume -> image). For the ``so3grid`` model the distribution is the softmax
of the logits divided by the network's temperature (fitted on held-out particles after training,
:mod:`.calibration`; 1 for an uncalibrated network) on ``healpix_grid(grid_order)`` (cell k = direction * n_psi +
psi index, :mod:`bayespose.core.geometry.grids`).

* **In-plane test-time augmentation** (``turns``, default :data:`DEFAULT_INPLANE_TURNS` where it divides the
  grid's in-plane angles): the network also sees the image turned by ``j * 360 / turns`` degrees, each predicted
  distribution is turned back (an exact shift of the grid's psi index: RELION's psi turns the image the other way,
  so ``Rz(a) A`` has psi - a) and their log probabilities are averaged and renormalised (a geometric mean: the
  softmax of the mean logits). The network is equivariant to in-plane turns only approximately (its CNN encoder is
  not), so the turns are an ensemble. Measured on relion_project particles (fragment map, box 64, SNR 0.1; network
  trained on 4000 particles + map): mean / median error 14.8° / 8.2° with one pass, 11.9° / 7.3° with 8 turns on
  1000 particles, > 30° among the more confident half 1.0 % -> 0.4 %; on 500 of them the geometric mean kept the
  one-pass calibration (predicted / observed mass within 10° 0.62 / 0.71, within 20° 0.93 / 0.93) where the mean of
  the probabilities was underconfident (0.53 / 0.72, 0.87 / 0.95) and less accurate (11.75° vs 11.55° mean).
* **Mode**: the most probable cell, refined below the grid spacing by the probability-weighted mean (projected on
  SO(3), 000 eq. 15-19) of the cells within 1.5 grid spacings of it, folded to its symmetry mates.
* **Confidence**: the probability mass of those cells (all cells within 1.5 spacings of the mode, counting every
  symmetry mate): 1 for a distribution concentrated at the mode, about (number of neighbours) / K for a flat one.
* **Top-K**: the K most probable cells (distinct cells; rotations and probabilities).

For the ``quaternion`` model (a point estimate) the mode is the network's output; the stand-in confidence is the
agreement of test-time augmentation: the image is also predicted turned in-plane by ``j * 360 / K`` degrees,
``j = 1 .. K-1``, each prediction turned back (``Rz(a)^T R``, :mod:`.data`) and folded to the symmetry mate nearest
the first; confidence = (sum of singular values of their mean matrix) / 3 (1 when all agree, ~0 when random).
``top_rotations`` are those K predictions with equal probabilities 1/K; ``log_probabilities`` is None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from bayespose.core.deep.data import inplane_rotation_matrix, read_network_inputs, rotate_shift_images
from bayespose.core.deep.vocabulary import NETWORK_PIXEL_RTOL
from bayespose.core.geometry.grids import containing_cell, healpix_grid, neighbour_table, psi_count
from bayespose.core.geometry.rotations import matrix_to_euler, project_to_so3, quaternion_to_matrix
from bayespose.core.geometry.symmetry import nearest_symmetry_mate, symmetry_group
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.results import ANGLE_LABELS, ParticleResults
from bayespose.core.runtime import choose_device

__all__ = ["PosePrediction", "predict_poses", "grid_modes", "network_inputs", "distribution_on_grid",
           "inplane_turns", "turn_back_log_probs"]

MODE_RADIUS_SPACINGS = 1.5  # neighbourhood of the best cell used for the refined mode and the confidence
DEFAULT_INPLANE_TURNS = 8  # test-time in-plane turns of the grid model (fewer where 8 does not divide n_psi)


@dataclass
class PosePrediction:
    """Per-particle output of a pose network (N particles). Rotations: RELION ``A``.

    ``rotations`` (N, 3, 3): the mode; ``confidence`` (N,) in [0, 1] (module doc); ``top_rotations`` (N, K, 3, 3)
    and ``top_probabilities`` (N, K); ``grid_order`` and ``log_probabilities`` (N, 72 * 8^order) natural-log
    probabilities on ``healpix_grid(grid_order)`` (None for the quaternion model); ``symmetry`` of the network.
    """

    rotations: np.ndarray
    confidence: np.ndarray
    top_rotations: np.ndarray
    top_probabilities: np.ndarray
    grid_order: int | None = None
    log_probabilities: np.ndarray | None = None
    symmetry: str = "C1"
    model: str = "so3grid"

    def __len__(self) -> int:
        return len(self.rotations)

    def results(self) -> ParticleResults:
        """The per-particle statistics of the schema (:mod:`bayespose.core.results`): ``deep_confidence`` and
        ``deep_top_probability`` (probability of the best cell; 1/K for the quaternion model)."""
        return ParticleResults(deep_confidence=np.asarray(self.confidence, dtype=np.float64),
                               deep_top_probability=np.asarray(self.top_probabilities[:, 0], dtype=np.float64))

    def star_columns(self) -> dict[str, np.ndarray]:
        """The star columns of :meth:`results` (``bpDeepConfidence``, ``bpDeepTopProbability``) and, with K > 1,
        ``bpDeepTop2AngleRot/Tilt/Psi`` (the second most probable cell, RELION degrees)."""
        columns = self.results().statistic_columns()
        if self.top_rotations.shape[1] > 1:
            angles = matrix_to_euler(self.top_rotations[:, 1])
            for col, label in enumerate(ANGLE_LABELS):
                columns[f"bpDeepTop2Angle{label}"] = angles[:, col]
        return columns

    def to_particle_set(self, particles: ParticleSet) -> ParticleSet:
        """A copy of ``particles`` with the predicted mode as rotation (origins kept; zeros when they have none)
        and the :meth:`star_columns` added to ``extra``."""
        if len(particles) != len(self):
            raise ValueError(f"prediction has {len(self)} particles, the set {len(particles)}")
        extra = dict(particles.extra)
        extra.update(self.star_columns())
        origins = particles.origins_A if particles.origins_A is not None else np.zeros((len(particles), 2))
        return replace(particles, rotations=np.asarray(self.rotations, dtype=np.float64), origins_A=origins,
                       extra=extra)


def network_inputs(network, particles: ParticleSet, images: np.ndarray | None = None,
                   batch_size: int = 1024) -> torch.Tensor:
    """Preprocessed network inputs (N, net_box, net_box) for all particles (images read in batches if None).

    The particles need the network's box (px) and pixel size (Å/px, within ``NETWORK_PIXEL_RTOL``)."""
    cfg = network.config
    if particles.box != network.box:
        raise ValueError(f"the network was trained on {network.box} px particles, these are {particles.box} px "
                         "(re-extract or re-train)")
    if network.pixel_size and abs(particles.pixel_size - network.pixel_size) > NETWORK_PIXEL_RTOL * network.pixel_size:
        raise ValueError(f"the network was trained at {network.pixel_size:g} Å/px, these particles are "
                         f"{particles.pixel_size:g} Å/px (more than {100 * NETWORK_PIXEL_RTOL:g} % apart)")
    if images is not None and len(images) != len(particles):
        raise ValueError(f"{len(images)} images for {len(particles)} particles")
    return read_network_inputs(particles, images, cfg.net_box, cfg.ctf_correction, batch_size)


@torch.no_grad()
def forward_batches(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Model outputs for ``inputs`` (N, D, D) in eval mode, batch by batch, concatenated on the CPU."""
    model.eval()
    out = []
    n = len(inputs)
    for s in range(0, n, batch_size):
        out.append(model(inputs[s:s + batch_size].to(device)).float().cpu())
        if progress:
            progress(min(s + batch_size, n), n)
    return torch.cat(out) if out else torch.zeros((0,))


def grid_modes(log_probs: np.ndarray, order: int, symmetry: str = "C1",
               radius_spacings: float = MODE_RADIUS_SPACINGS) -> tuple[np.ndarray, np.ndarray]:
    """Refined modes (N, 3, 3) and confidences (N,) from log probabilities (N, K) on ``healpix_grid(order)``.

    Mode: the probability-weighted mean, projected on SO(3), of the cells within ``radius_spacings`` grid
    spacings (symmetry-aware) of the best cell, each folded to its mate nearest the best cell. Confidence: the
    probability mass of those cells. The candidates of each symmetry mate come from a neighbour table around the
    cell containing ``best · L_g^T`` (radius + one spacing, then the exact angle test), so the cost is
    O(N · G · neighbours), not O(N · K): 0.2 s instead of 6 s for 1000 particles on the order-3 grid.
    """
    grid = healpix_grid(order)
    log_probs = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64)
    log_norm = torch.logsumexp(log_probs, dim=1).numpy()
    log_probs = log_probs.numpy()
    best = grid.rotations[np.argmax(log_probs, axis=1)]  # (N, 3, 3)
    radius = min(radius_spacings * grid.spacing_deg, 180.0)
    table = neighbour_table(int(order), round(radius + grid.spacing_deg, 6))
    cos_limit = np.cos(np.radians(radius)) - 1e-9  # regular grids put cells at exactly the radius: count them all
    cells, weights, mates = [], [], []
    for g in symmetry_group(symmetry):
        cand = table[containing_cell(order, best @ g.T)]  # (N, W): R_k L_g near best <=> R_k near best L_g^T
        mate = grid.rotations[np.maximum(cand, 0)] @ g  # (N, W, 3, 3)
        cos = (np.einsum("nij,nwij->nw", best, mate) - 1.0) / 2.0  # cos of the angle to the best cell
        near = (cand >= 0) & (cos >= cos_limit)
        cells.append(np.where(near, cand, -1))
        weights.append(np.where(near, np.exp(np.take_along_axis(log_probs, np.maximum(cand, 0), axis=1)
                                             - log_norm[:, None]), 0.0))
        mates.append(mate)
    cells, weights, mates = np.concatenate(cells, 1), np.concatenate(weights, 1), np.concatenate(mates, 1)
    # each cell counted once (its first near mate, as the group is ordered): drop later repeats within a row
    order_ = np.argsort(cells, axis=1, kind="stable")
    srt = np.take_along_axis(cells, order_, axis=1)
    repeat = np.zeros_like(srt, dtype=bool)
    repeat[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    np.put_along_axis(weights, order_, np.where(repeat, 0.0, np.take_along_axis(weights, order_, axis=1)), axis=1)
    m = np.einsum("nw,nwij->nij", weights, mates)
    return project_to_so3(m), np.clip(weights.sum(1), 0.0, 1.0)


def _top_cells(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, k) and probabilities (N, k) of the k most probable cells, most probable first."""
    values, idx = torch.topk(torch.as_tensor(log_probs), min(k, log_probs.shape[1]), dim=1)
    return idx.numpy(), np.exp(values.double().numpy())


def inplane_turns(order: int, turns: int | None = None) -> int:
    """The number of test-time in-plane turns for the grid of HEALPix ``order`` (``6 · 2^order`` psi angles):
    ``turns`` if it divides them (else ``ValueError``), or by default the largest of :data:`DEFAULT_INPLANE_TURNS`,
    4, 2, 1 that does (each turn must be a whole number of psi steps)."""
    n_psi = psi_count(order)
    if turns is None:
        return next(t for t in (DEFAULT_INPLANE_TURNS, 4, 2, 1) if n_psi % t == 0)
    if turns < 1 or n_psi % turns:
        raise ValueError(f"in-plane turns must divide the grid's {n_psi} in-plane angles, got {turns}")
    return int(turns)


def turn_back_log_probs(log_probs: np.ndarray | torch.Tensor, order: int, angle_deg: float
                        ) -> np.ndarray | torch.Tensor:
    """Log probabilities (N, K) on ``healpix_grid(order)`` predicted for images turned in-plane by ``angle_deg`` (a
    multiple of the psi step), as those of the unturned images: the turned image's pose is ``Rz(a) A``, whose psi
    is that of ``A`` minus a (RELION's psi turns the image clockwise), so cell (direction, j) of the original is
    cell (direction, j - a / step) of the turned one. A numpy array or a torch tensor, returned as the same."""
    n_psi = psi_count(order)
    shift = angle_deg / (360.0 / n_psi)
    if abs(shift - round(shift)) > 1e-6:
        raise ValueError(f"the turn {angle_deg}° is not a multiple of the grid's psi step {360.0 / n_psi}°")
    n, steps = len(log_probs), int(round(shift))
    if isinstance(log_probs, torch.Tensor):
        return torch.roll(log_probs.reshape(n, -1, n_psi), steps, dims=2).reshape(n, -1)
    return np.roll(np.asarray(log_probs).reshape(n, -1, n_psi), steps, axis=2).reshape(n, -1)


def _grid_log_probs(network, model: torch.nn.Module, inputs: torch.Tensor, turns: int, batch_size: int,
                    device: torch.device, progress: Callable[[int, int], None] | None) -> np.ndarray:
    """Calibrated log probabilities (N, K) float32 of the grid model: the renormalised mean of those of ``turns``
    in-plane turns of the inputs, each turned back (module doc). Summed in place in torch float32 (numpy float64
    arrays of N x 36864 made this step take 12.2 s for 8 turns of 1000 particles, in torch 4.4 s, 2.3 s of it the
    network itself)."""
    temperature = float(getattr(network, "temperature", 1.0))
    total = None
    for j in range(turns):
        angle = j * 360.0 / turns
        x = inputs if j == 0 else rotate_shift_images(inputs, np.full(len(inputs), angle))
        logits = forward_batches(model, x, batch_size, device,
                                 (lambda done, count, j=j: progress(j * count + done, turns * count))
                                 if progress else None)
        log_probs = turn_back_log_probs(torch.log_softmax(logits.float() / temperature, dim=1),
                                        network.grid_order, angle)
        total = log_probs if total is None else total.add_(log_probs)
    if turns > 1:  # one pass is normalised by its log_softmax already (the renormalisation cost 0.4 s per 400)
        total /= turns
        total -= torch.logsumexp(total, dim=1, keepdim=True)
    return total.numpy()


def predict_from_inputs(network, inputs: torch.Tensor, top_k: int = 8, batch_size: int = 256, device=None,
                        progress: Callable[[int, int], None] | None = None, turns: int | None = None
                        ) -> PosePrediction:
    """:func:`predict_poses` on already preprocessed inputs (N, net_box, net_box)."""
    dev = choose_device(device if device is not None else network.config.device)
    model = network.model.to(dev)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if network.config.model == "so3grid":
        turns = inplane_turns(network.grid_order, turns)
        log_probs = _grid_log_probs(network, model, inputs, turns, batch_size, dev, progress)
        grid = healpix_grid(network.grid_order)
        modes, conf = grid_modes(log_probs, network.grid_order, network.symmetry)
        idx, probs = _top_cells(log_probs, top_k)
        return PosePrediction(rotations=modes, confidence=conf, top_rotations=grid.rotations[idx],
                              top_probabilities=probs, grid_order=network.grid_order,
                              log_probabilities=log_probs, symmetry=network.symmetry,
                              model="so3grid")
    angles = np.arange(top_k) * 360.0 / top_k
    preds = []
    for j, a in enumerate(angles):
        x = inputs if a == 0 else rotate_shift_images(inputs, np.full(len(inputs), a))
        q = forward_batches(model, x, batch_size, dev, progress if j == 0 else None).double().numpy()
        preds.append(inplane_rotation_matrix(-a) @ quaternion_to_matrix(q))  # turn back: Rz(a)^T R
    preds = np.stack(preds, axis=1)  # (N, K, 3, 3)
    group = symmetry_group(network.symmetry)
    n, k = preds.shape[:2]
    folded = nearest_symmetry_mate(preds.reshape(-1, 3, 3), np.repeat(preds[:, 0], k, axis=0),
                                   group).reshape(n, k, 3, 3)
    conf = np.clip(np.linalg.svd(folded.mean(1), compute_uv=False).sum(1) / 3.0, 0.0, 1.0)
    return PosePrediction(rotations=preds[:, 0], confidence=conf, top_rotations=folded,
                          top_probabilities=np.full((n, k), 1.0 / k), grid_order=None, log_probabilities=None,
                          symmetry=network.symmetry, model="quaternion")


def predict_poses(network, particles: ParticleSet, images: np.ndarray | None = None, top_k: int = 8,
                  batch_size: int = 256, device=None,
                  progress: Callable[[int, int], None] | None = None, turns: int | None = None) -> PosePrediction:
    """Predict the pose distribution of every particle with a trained ``network`` (:func:`load_pose_network`).

    ``images`` (N, D, D): the particles' images if in memory (else read from their files). ``top_k``: number of
    most probable cells (so3grid) or test-time in-plane turns (quaternion) returned. ``turns``: the grid model's
    test-time in-plane turns (:func:`inplane_turns`; None: the default, 1: a single pass). ``device``: None = the
    network's configured device (cuda when available). ``progress(done, total)`` after each batch. The particles
    are centred by their origins when they have them (:mod:`.data`); the prediction is the rotation only.
    """
    if len(particles) == 0:
        raise ValueError("no particles to predict")
    inputs = network_inputs(network, particles, images)
    return predict_from_inputs(network, inputs, top_k, batch_size, device, progress, turns)


def distribution_on_grid(log_probabilities: np.ndarray | None, grid_rotations: np.ndarray | None,
                         top_rotations: np.ndarray, top_probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One particle's predicted distribution as ``(rotations (K, 3, 3), probabilities (K,))`` summing to 1.

    With the grid model (``log_probabilities`` (G,) on ``grid_rotations`` (G, 3, 3), e.g.
    ``healpix_grid(order).rotations``) the whole grid is used (normalised with log-sum-exp); otherwise (quaternion
    model: ``log_probabilities`` None) the top-K rotations (K, 3, 3) and their probabilities (K,), renormalised
    (uniform when they sum to 0). Rotations are RELION ``A`` matrices. Raises ``ValueError`` on mismatched lengths.
    """
    if log_probabilities is not None:
        if grid_rotations is None:
            raise ValueError("grid_rotations are needed with log_probabilities")
        logp = np.asarray(log_probabilities, dtype=np.float64).reshape(-1)
        rots = np.asarray(grid_rotations, dtype=np.float64).reshape(-1, 3, 3)
        if len(logp) != len(rots):
            raise ValueError(f"{len(logp)} log-probabilities for a grid of {len(rots)} rotations")
        p = np.exp(logp - logp.max())
        return rots, p / p.sum()
    rots = np.asarray(top_rotations, dtype=np.float64).reshape(-1, 3, 3)
    p = np.clip(np.asarray(top_probabilities, dtype=np.float64).reshape(-1), 0.0, None)
    if len(p) != len(rots) or not len(p):
        raise ValueError(f"need as many top probabilities as top rotations (> 0), got {len(p)} and {len(rots)}")
    total = p.sum()
    return rots, (p / total if total > 0 else np.full(len(p), 1.0 / len(p)))
