"""The training loop's parts: where batches come from (real particles, synthetic projections), the learning-rate
schedule, the batch and epoch sizes chosen from the data size, and the optimisation steps.

Schedule (:class:`Schedule`; "stable validation curves"):

* **pre-training** on synthetic projections of the map: ``pretrain_steps`` Adam steps in chunks of
  :data:`PRETRAIN_CHUNK_STEPS` (one history row, validation and saved state each), linear warm-up over the first
  :data:`WARMUP_FRACTION` of the steps, then cosine decay to :data:`FINAL_LR_FRACTION` of the learning rate;
  the synthetic noise amplitude rises linearly from the config's ``pretrain_noise_start`` of the particles' to
  theirs over the first :data:`NOISE_RAMP_FRACTION` of the steps;
* **fine-tuning** on the particles (or plain training without a map): epochs of at least
  :data:`MIN_EPOCH_SAMPLES` samples (small sets are passed several times per epoch, so that validation and
  early stopping see comparable amounts of training), learning rate ``learning_rate`` (``finetune_lr_factor`` of
  it after pre-training) with a linear warm-up over :data:`WARMUP_STEPS` steps, halved after
  :data:`PLATEAU_EPOCHS` epochs without a better validation loss (the state records it, so a resumed run
  continues exactly).

Batch size from the data size (:func:`auto_batch_size`): 32 particles per step below 1000 training particles, 64
below 10 000, 128 above (larger sets afford less noisy gradients at the same number of epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.deep.data import augment_inputs, inplane_rotation_matrix

__all__ = ["auto_batch_size", "epoch_batches", "RealSource", "SyntheticSource", "Schedule", "run_steps"]

PRETRAIN_CHUNK_STEPS = 250
MIN_EPOCH_SAMPLES = 2048
WARMUP_FRACTION = 0.03
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.05
PLATEAU_EPOCHS = 2
PLATEAU_FACTOR = 0.5
NOISE_RAMP_FRACTION = 0.6


def auto_batch_size(n_train: int) -> int:
    """Particles per optimisation step for ``n_train`` training particles (module doc)."""
    return 32 if n_train < 1000 else 64 if n_train < 10_000 else 128


def epoch_batches(n_train: int, batch_size: int) -> int:
    """Optimisation steps of one fine-tuning epoch: at least :data:`MIN_EPOCH_SAMPLES` samples, whole passes."""
    passes = max(1, -(-MIN_EPOCH_SAMPLES // max(n_train, 1)))
    return max(1, -(-passes * n_train // batch_size))


class DiskRows:
    """(N, W, W) float32 rows in a raw file (C order, no header), read on demand: ``rows[index]`` reads just those
    rows (one seek and read each), so a process holds one batch, not the data set; the OS's page cache may keep
    what it likes. Used for training sets too large for RAM (:func:`~.train._work_images`)."""

    def __init__(self, path, shape: tuple[int, int, int]):
        self.path, self.shape = path, tuple(shape)
        self._row_bytes = 4 * shape[1] * shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.asarray(index, dtype=np.int64).reshape(-1)  # particle indices (arrays, as the sources pass)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        with open(self.path, "rb") as f:
            for k, r in enumerate(rows):
                f.seek(int(r) * self._row_bytes)
                out[k] = np.frombuffer(f.read(self._row_bytes), dtype=np.float32).reshape(self.shape[1:])
        return out


@dataclass
class RealSource:
    """Batches of real particles: ``work_images`` (N, W, W) CPU (:func:`~.data.preprocess_images` with a work box;
    a tensor, or :class:`DiskRows` for large sets),
    ``rotations`` (N, 3, 3), ``weights`` (N,) or None (per-particle loss weights, mean 1). Augmentation (when
    ``augment``): a uniform in-plane turn and a shift drawn from ``shift_pool`` (S, 2) px of the work box (the
    particles' picking offsets), or uniform within ``±shift_uniform`` px of the work box without a pool; the
    turn is interpolated at the work box (:func:`~.data.augment_inputs`)."""

    work_images: torch.Tensor | DiskRows
    rotations: np.ndarray
    weights: np.ndarray | None
    net_box: int
    augment: bool
    shift_pool: np.ndarray | None
    shift_uniform: float

    def _rows(self, index: np.ndarray) -> torch.Tensor:
        rows = self.work_images[index]
        return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        """Unaugmented network inputs (B, n, n) CPU of particles ``index`` (validation, prediction)."""
        parts = [augment_inputs(self._rows(index[s:s + 1024]), self.net_box) for s in range(0, len(index), 1024)]
        return torch.cat(parts) if parts else torch.zeros((0, self.net_box, self.net_box))

    def batch(self, index: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
        """Inputs (B, n, n) CPU, rotations (B, 3, 3) (turned with the images) and weights (B,) or None."""
        x, rot = self._rows(index), self.rotations[index]
        if self.augment:
            angle = rng.uniform(0.0, 360.0, len(index))
            if self.shift_pool is not None:
                shift = self.shift_pool[rng.integers(0, len(self.shift_pool), len(index))]
            else:
                shift = rng.uniform(-self.shift_uniform, self.shift_uniform, (len(index), 2))
            x = augment_inputs(x, self.net_box, angle, shift)
            rot = inplane_rotation_matrix(angle) @ rot
        else:
            x = augment_inputs(x, self.net_box)
        return x, rot, None if self.weights is None else self.weights[index]


@dataclass
class SyntheticSource:
    """Batches of synthetic projections (:class:`~.synthetic.SyntheticProjections`); the noise is drawn with
    ``generator`` (a torch generator on the source's device, saved with the run)."""

    projections: object
    generator: torch.Generator

    def batch(self, size: int, rng: np.random.Generator, noise_scale: float = 1.0
              ) -> tuple[torch.Tensor, np.ndarray, None]:
        x, rot = self.projections.sample(size, rng, self.generator, noise_scale)
        return x, rot, None


@dataclass
class Schedule:
    """Learning rate of each step (module doc): ``base`` (the config's rate), ``pretrain_steps``, ``finetune``
    (rate factor of fine-tuning: ``finetune_lr_factor`` after pre-training, 1 without); and the noise amplitude
    of the synthetic projections per pre-training step, from ``noise_start`` of the particles' to theirs."""

    base: float
    pretrain_steps: int
    finetune: float
    noise_start: float = 1.0

    def pretrain_noise(self, step: int) -> float:
        """Noise amplitude factor of pre-training step ``step`` (0-based): linear from ``noise_start`` to 1 over the
        first :data:`NOISE_RAMP_FRACTION` of the steps, then 1 (the particles' noise)."""
        ramp = NOISE_RAMP_FRACTION * max(self.pretrain_steps, 1)
        return self.noise_start + (1.0 - self.noise_start) * min(1.0, step / ramp)

    def pretrain(self, step: int) -> float:
        """Rate of pre-training step ``step`` (0-based)."""
        total = max(self.pretrain_steps, 1)
        warm = max(1, int(WARMUP_FRACTION * total))
        if step < warm:
            return self.base * (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return self.base * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def finetune_rate(self, step: int, scale: float) -> float:
        """Rate of fine-tuning step ``step`` (0-based, counted from the first fine-tuning step) after the plateau
        halvings ``scale``."""
        return self.base * self.finetune * scale * min(1.0, (step + 1) / WARMUP_STEPS)


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, task, batches, rates, device,
              callback: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Optimisation steps over ``batches`` (a sized list of zero-argument callables returning ``(inputs,
    rotations, weights)``) at learning rates ``rates`` (one per batch); returns the mean training loss and the
    number of samples. A batch of one sample is skipped after the first (BatchNorm needs two).

    Data-parallel run (``model`` a DistributedDataParallel wrapper): every process draws the same batches (same
    seeds) and trains on its slice of each (:func:`bayespose.core.parallel.my_slice`), the gradients averaged over
    the processes; the loss and samples returned are those of the whole batches."""
    model.train()
    total, count = 0.0, 0
    for b, (make, rate) in enumerate(zip(batches, rates)):
        x, rot, weights = make()
        if len(rot) < 2 and count:
            continue
        mine = parallel.my_slice(len(rot))
        x, rot, weights = x[mine], rot[mine], None if weights is None else weights[mine]
        for group in optimizer.param_groups:
            group["lr"] = rate
        out = model(x.to(device))
        loss = task.loss(out, task.targets(rot).to(device),
                         None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(rot)
        count += len(rot)
        if callback:
            callback(b + 1, len(batches))
    total, count = parallel.all_reduce_sum(np.array([total, count], dtype=np.float64))
    return float(total) / max(float(count), 1.0), int(count)
