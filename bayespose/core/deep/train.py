"""Supervised training of a pose network on particles with known poses and/or on synthetic projections of their
map; checkpoints; loading.

Losses:

* ``so3grid``: cross-entropy ``-sum_k w_k t_k log softmax(logits)_k`` against the cell(s) of
  ``healpix_grid(grid_order)`` containing the true rotation; with a point group every mate ``A @ L_g`` gets mass
  1/|G| (:func:`.data.grid_targets`; CESPED's "labels are expanded", Sanchez-Garcia et al. 2023). Cells:
  ``GridPrior.cell_index`` (the same cells :func:`.prior_refine.deep_prior_assign` uses as a prior).
* ``quaternion``: ``min_g 1 - <q_pred, q(A L_g)>²`` (Lian et al. 2022, eq. 12, minimised over the symmetry mates).

Per-particle weights (``weight_column``, e.g. ``rlnMaxValueProbDistribution`` or ``bpPmax`` of a refinement:
particles whose consensus pose is uncertain teach less) multiply the particle's loss (normalised to mean 1).

**Train from the map** (``volume`` given, ``pretrain_steps`` > 0): first ``pretrain_steps`` Adam steps on
unlimited synthetic projections of the map at uniformly random rotations, rendered with the particles' own CTFs,
noise power spectrum (estimated from their background as the MMSE engine does), reference scale, picking offsets
and normalisation (:class:`.synthetic.SyntheticProjections`), the noise at first ``pretrain_noise_start`` of
theirs and rising to theirs (a curriculum: clearer views first); then fine-tuning on the particles with their poses
at ``finetune_lr_factor`` of the learning rate. Particles without poses give a **map-only** network (the
pre-training alone; validated on a fixed synthetic set): a fast first guess for new data.

Training on particles (:mod:`._training` for the schedule, batch and epoch sizes): the particles are split once
(seeded) into training and validation sets (``val_fraction``); an epoch runs over the shuffled training set with
in-plane rotation (uniform 0-360°) and shift augmentation, the labels turned accordingly (:mod:`.data`). The
turns are interpolated on images Fourier-cropped to twice the network box, so that the interpolation does not
smooth the noise the network sees (real particles at prediction are not interpolated); the shifts are drawn from
the particles' own origins (their picking offsets; ``shift_augment_px`` None) or uniformly within
``±shift_augment_px`` px of the network box. After each epoch (or pre-training chunk) the validation loss and the
validation angular errors of the predicted modes (symmetry-aware) are logged, with the training throughput
(particles/s). The checkpoint ``out_path`` is rewritten atomically whenever the validation loss improves; training
stops after ``patience`` fine-tuning epochs without improvement or at ``epochs``. Finally (``calibrate``) the
logits of the best network are given a temperature fitted on the validation set
(:func:`.calibration.fit_temperature`), stored in the checkpoint and applied by :func:`.predict.predict_poses`.

A resumable state (model, optimiser, random generators, split, history, the TrainConfig and the
:func:`training_fingerprint` of the particles and map) is written atomically after every epoch to
``<out_path stem>.last.pt`` next to it; a resume continues the run exactly (the same numbers as an uninterrupted
one) and is refused for other particles, another map or other settings.

Checkpoint (one ``torch.save`` dict, readable without bayespose's classes): ``format``, ``model`` (type),
``state_dict``, ``config`` (TrainConfig as dict), ``model_options``, ``box`` (px of the training particles),
``pixel_size`` (Å/px), ``net_pixel_size``, ``symmetry``, ``grid_order``, ``history``, ``best_epoch``,
``n_train``, ``n_val``, ``val_idx`` (the held-out particles, indices into the training set; empty for a map-only
network), ``temperature`` (divides the logits), ``trained_on`` (``particles``, ``map+particles`` or ``map``),
``bayespose_version``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.deep import _training
from bayespose.core.deep._training import (
    PLATEAU_EPOCHS,
    PLATEAU_FACTOR,
    DiskRows,
    RealSource,
    Schedule,
    SyntheticSource,
    auto_batch_size,
    epoch_batches,
    run_steps,
)
from bayespose.core.deep.calibration import fit_temperature
from bayespose.core.deep.data import grid_targets, network_input_batches, symmetry_quaternions
from bayespose.core.deep.models import build_model, compact_alpha_samples
from bayespose.core.deep.predict import forward_batches, predict_from_inputs
from bayespose.core.deep.synthetic import SyntheticProjections
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, MODEL_TYPES, TRAINING_DEFAULTS, CtfCorrection, ModelType
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import GridPrior
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.atomic import atomic_file
from bayespose.core.runtime import choose_device, torch_threads

__all__ = ["TrainConfig", "TrainResult", "PoseNetwork", "train_pose_network", "load_pose_network",
           "last_state_path", "training_fingerprint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "bayespose-pose-network-1"


@dataclass
class TrainConfig:
    """How to train. Boxes in px, learning rate per Adam step, angles in degrees.

    ``model``: ``so3grid`` (Image2Sphere-style distribution on a HEALPix grid) or ``quaternion`` (regression).
    ``net_box``: images are Fourier-cropped to this box before the network (multiple of 4). ``grid_order``:
    output grid ``healpix_grid(grid_order)`` (72·8^order rotations, spacing 60/2^order degrees) of so3grid.
    ``ctf_correction``: ``phase_flip`` or ``none``. ``device``: None = cuda when available; ``threads``: CPU
    threads (None: torch's default). ``lmax`` and the channel counts size the so3grid head; ``channels``, the
    CNN encoder's width (64: measured on benchmarks/deep_poses.py's relion_project particles, pre-training
    reached after 144k synthetic samples the validation loss that 32 channels reached after 300k, at 0.93x the
    samples per second on 2 CPU cores; 96 learned no faster per sample at 0.65x the speed; lmax 6 none at 0.4x).
    ``encoder_final_blocks``: conv blocks at the encoder's last resolution (2: validation loss 3.03 instead of 3.10
    after 176k samples at the same speed; 3, at 4.5 % more time per step: with 9000 pre-training steps the 4000
    particles + map network reached 7.4° / 4.8° instead of 8.2° / 5.2° with two blocks and 8000 steps, both
    about 9 min). ``activation_alpha``: samples of the Euler angles alpha and gamma on the
    SO(3) activation's grid (None: :func:`~.models.compact_alpha_samples`, 12 at lmax 4, the activation 3x cheaper
    than e3nn's 20; 0: e3nn's grid, what networks trained before this setting use).
    ``batch_size``: particles per step (None: from the number of training particles, :func:`._training.
    auto_batch_size`). ``epochs``: most fine-tuning epochs (each at least 2048 samples). ``shift_augment_px``:
    random shifts of the augmentation, uniform within ± this many px of the network box (None: drawn from the
    particles' origins, their picking offsets; ±1 px when they have none). ``pretrain_steps``: steps on synthetic
    projections of the map (needs a map; 0: none). ``pretrain_noise_start``: the noise amplitude of the first
    synthetic projections, relative to the particles' (rising linearly to theirs over the first 60 % of the
    pre-training steps; 1: the particles' noise throughout; 0.5, four times their SNR at first, gave 9.4° / 5.9°
    instead of 9.6° / 6.1° mean / median on the relion_project test particles, 4000 particles + map).
    ``finetune_lr_factor``: learning rate of fine-tuning after pre-training, relative to ``learning_rate``.
    ``weight_column``: a per-particle column of the star (e.g. ``rlnMaxValueProbDistribution``) weighting each
    particle's loss (None: equal weights). ``calibrate``: fit a temperature of the logits on the validation set
    (so3grid).
    """

    model: ModelType = "so3grid"
    net_box: int = 32
    epochs: int = TRAINING_DEFAULTS["epochs"]
    batch_size: int | None = None
    learning_rate: float = TRAINING_DEFAULTS["learning_rate"]
    val_fraction: float = 0.1
    patience: int = 5
    symmetry: str = "C1"
    grid_order: int = TRAINING_DEFAULTS["grid_order"]
    augment: bool = True
    ctf_correction: CtfCorrection = "phase_flip"
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    lmax: int = 4
    channels: int = 64
    s2_channels: int = 32
    so3_channels: int = 4
    encoder_final_blocks: int = 3
    activation_alpha: int | None = None
    shift_augment_px: float | None = None
    weight_decay: float = 1e-5
    pretrain_steps: int = 0
    pretrain_noise_start: float = 0.5
    finetune_lr_factor: float = TRAINING_DEFAULTS["finetune_lr_factor"]
    weight_column: str | None = None
    calibrate: bool = True

    def validate(self) -> None:
        if self.model not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODEL_TYPES)}")
        if self.net_box < 8 or self.net_box % 4:
            raise ValueError(f"net_box must be a multiple of 4 and >= 8 px, got {self.net_box}")
        if self.epochs < 1 or self.patience < 1 or (self.batch_size is not None and self.batch_size < 2):
            raise ValueError("epochs and patience must be >= 1, batch_size >= 2 (or None)")
        if not self.learning_rate > 0 or not self.finetune_lr_factor > 0:
            raise ValueError(f"learning rate and its fine-tuning factor must be > 0, got {self.learning_rate}, "
                             f"{self.finetune_lr_factor}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.grid_order <= 3:
            raise ValueError(f"grid_order must be in 0..3 (72·8^order cells), got {self.grid_order}")
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {self.ctf_correction!r}")
        if not 1 <= self.lmax <= 12:
            raise ValueError(f"lmax must be in 1..12, got {self.lmax}")
        if self.shift_augment_px is not None and self.shift_augment_px < 0:
            raise ValueError("shift_augment_px must be >= 0 (or None: the particles' origins)")
        if self.encoder_final_blocks < 1:
            raise ValueError(f"encoder_final_blocks must be >= 1, got {self.encoder_final_blocks}")
        if self.activation_alpha not in (None, 0) and self.activation_alpha <= 2 * self.lmax:
            raise ValueError(f"activation_alpha must be > 2 lmax = {2 * self.lmax} (or 0 / None), got "
                             f"{self.activation_alpha}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if not 0.0 < self.pretrain_noise_start <= 1.0:
            raise ValueError(f"pretrain_noise_start must be in (0, 1], got {self.pretrain_noise_start}")
        symmetry_group(self.symmetry)

    def model_options(self) -> dict:
        if self.model == "so3grid":
            alpha = compact_alpha_samples(self.lmax) if self.activation_alpha is None else self.activation_alpha
            return dict(lmax=self.lmax, channels=self.channels, s2_channels=self.s2_channels,
                        so3_channels=self.so3_channels, final_blocks=self.encoder_final_blocks,
                        activation_alpha=alpha)
        return dict(channels=self.channels)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Config from a dict (unknown keys ignored, so older/newer checkpoints load; settings added later take the
        value that reproduces what older versions did, :data:`_BEFORE_THE_SETTING`)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**_BEFORE_THE_SETTING, **{k: v for k, v in values.items() if k in names}})


# what a config saved before these settings existed did (so that such a checkpoint or state is read as trained)
_BEFORE_THE_SETTING = {"encoder_final_blocks": 1, "pretrain_noise_start": 1.0, "activation_alpha": 0}


@dataclass
class TrainResult:
    """``checkpoint``: path of the best-validation checkpoint; ``history``: one dict per epoch (epoch, phase
    (``pretrain`` / ``finetune``), train_loss, val_loss, val_mean_error_deg, val_median_error_deg, samples,
    samples_per_s (training throughput, particles/s), lr, seconds); ``best_epoch`` (1-based); ``temperature``
    of the logits (1 when not calibrated)."""

    checkpoint: Path
    history: list[dict]
    best_epoch: int
    temperature: float = 1.0


@dataclass
class PoseNetwork:
    """A loaded network: ``model`` (torch Module, eval mode), ``config``, ``box`` (px of the training particles),
    ``pixel_size`` (Å/px), ``symmetry``, ``grid_order``, ``history``, ``metadata`` (the rest of the checkpoint),
    ``temperature`` (the logits are divided by it before the softmax; 1: uncalibrated)."""

    model: torch.nn.Module
    config: TrainConfig
    box: int
    pixel_size: float
    symmetry: str
    grid_order: int
    history: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    temperature: float = 1.0


def last_state_path(out_path: str | Path) -> Path:
    """The resumable state written next to checkpoint ``out_path``: ``<stem>.last.pt``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".last.pt")


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _version() -> str:
    try:
        from bayespose import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


class _Task:
    """Loss and labels of one model type."""

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.model == "so3grid":
            self.n_cells = len(healpix_grid(config.grid_order))
            self.cells = GridPrior(config.grid_order, np.zeros((1, self.n_cells))).cell_index

    def targets(self, rotations: np.ndarray) -> torch.Tensor:
        if self.config.model == "so3grid":
            return grid_targets(rotations, self.cells, self.n_cells, self.config.symmetry)
        return symmetry_quaternions(rotations, self.config.symmetry)

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each sample (B,)."""
        if self.config.model == "so3grid":
            return -(target * torch.log_softmax(output, dim=1)).sum(1)
        dots = torch.einsum("bi,bgi->bg", output, target)
        return (1.0 - dots ** 2).min(dim=1).values

    def loss(self, output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of the batch, weighted by ``weights`` (B,) when given."""
        each = self.per_sample(output, target)
        return each.mean() if weights is None else (each * weights).sum() / weights.sum().clamp_min(1e-12)


def _make_model(config: TrainConfig) -> torch.nn.Module:
    return build_model(config.model, config.net_box, config.grid_order, **config.model_options())


def _checkpoint(run: _Run, config: TrainConfig, particles: ParticleSet, trained_on: str) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "model": config.model,
        "state_dict": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
        "config": asdict(config), "model_options": config.model_options(), "box": int(particles.box),
        "pixel_size": float(particles.pixel_size),
        "net_pixel_size": float(particles.pixel_size) * particles.box / config.net_box,
        "symmetry": config.symmetry, "grid_order": int(config.grid_order), "history": list(run.history),
        "best_epoch": int(run.best_epoch), "n_train": int(len(run.train_idx)), "n_val": int(len(run.val_idx)),
        "val_idx": np.asarray(run.val_idx, dtype=np.int64).tolist(), "temperature": 1.0, "trained_on": trained_on,
        "bayespose_version": _version(),
    }


def _evaluate(model, task: _Task, network_like, inputs: torch.Tensor, rotations: np.ndarray, batch_size: int,
              device) -> tuple[float, np.ndarray]:
    """Validation loss and per-particle angular errors (degrees, symmetry-aware) of the predicted modes."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(inputs), batch_size):
            out = model(inputs[s:s + batch_size].to(device))
            target = task.targets(rotations[s:s + batch_size]).to(device)
            total += float(task.loss(out, target)) * len(out)
    # one pass (no test-time turns): the validation error of the network as trained, comparable with the loss
    pred = predict_from_inputs(network_like, inputs, top_k=1, batch_size=max(batch_size, 256), device=device,
                               turns=1)
    errors = symmetric_geodesic_distance_deg(pred.rotations, rotations, symmetry_group(task.config.symmetry))
    return total / max(len(inputs), 1), errors


# ------------------------------------------------------------------------------------------- resumable state
def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def training_fingerprint(particles: ParticleSet, volume: np.ndarray | None = None) -> dict:
    """What identifies a training set: particle count, box (px), pixel size (Å/px) and SHA-256 digests of the
    image references (file names + 0-based indices, in order), of the poses (RELION ``A`` rotations rounded to
    1e-6 and origins in Å rounded to 1e-4; None without poses), of the CTF parameters (None without CTF) and of
    the map (float32 voxels; None without a map). Stored in the resumable state, so that a resume on other
    particles or another map is refused (:func:`train_pose_network`)."""
    files = "\n".join(str(f) for f in np.asarray(particles.image_files)).encode()
    origins = particles.origins_A if particles.origins_A is not None else np.zeros((len(particles), 2))
    poses = None
    if particles.rotations is not None:
        rotations = np.round(np.asarray(particles.rotations, dtype=np.float64), 6) + 0.0  # + 0.0: no negative zeros
        poses = _digest(rotations, np.round(np.asarray(origins, dtype=np.float64), 4) + 0.0)
    ctf = particles.ctf
    return {
        "particles": len(particles), "box": int(particles.box), "pixel_size": float(particles.pixel_size),
        "images": _digest(np.frombuffer(files, dtype=np.uint8), np.asarray(particles.image_indices, dtype=np.int64)),
        "poses": poses,
        "ctf": None if ctf is None else _digest(*(np.asarray(getattr(ctf, f.name), dtype=np.float64)
                                                  for f in fields(ctf))),
        "map": None if volume is None else _digest(np.asarray(volume, dtype=np.float32)),
    }


_FINGERPRINT_WORDS = {"particles": "number of particles", "box": "box (px)", "pixel_size": "pixel size (Å/px)",
                      "images": "image files or indices", "poses": "poses", "ctf": "CTF parameters", "map": "map"}
# settings that may change between an interrupted run and its resume (the others change what is trained)
_RESUMABLE_CHANGES = ("epochs", "patience", "device", "threads")


def _resume_differences(state: dict, config: TrainConfig, fingerprint: dict) -> list[str]:
    """What differs between a saved state and this run: training particles and map (fingerprint) and settings."""
    differences = []
    saved = state["fingerprint"]
    for key, word in _FINGERPRINT_WORDS.items():
        if saved.get(key) != fingerprint[key]:
            is_digest = key in ("images", "poses", "ctf", "map")
            differences.append(word if is_digest else f"{word} {saved.get(key)!r} -> {fingerprint[key]!r}")
    before, now = asdict(TrainConfig.from_dict(state["config"])), asdict(config)
    differences += [f"{name} {before[name]!r} -> {now[name]!r}" for name in now
                    if name not in _RESUMABLE_CHANGES and before[name] != now[name]]
    return differences


def _load_resumable(last_path: Path, config: TrainConfig, particles: ParticleSet, volume: np.ndarray | None) -> dict:
    """The saved state at ``last_path`` after checking that it belongs to these particles, map and settings
    (one-line ``ValueError`` naming what differs otherwise)."""
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    if "fingerprint" not in state or "lr_scale" not in state:
        raise ValueError(f"cannot resume {last_path}: it was written by an older bayespose; remove it to train "
                         "afresh")
    differences = _resume_differences(state, config, training_fingerprint(particles, volume))
    if differences:
        raise ValueError(f"cannot resume {last_path}: it was trained on other particles or settings "
                         f"({'; '.join(differences)}); only epochs and patience may change, or remove it to "
                         "train afresh")
    return state


@dataclass
class _Run:
    """What a training run changes epoch by epoch (saved in the resumable state): the model, the optimiser, the
    numpy generator (batch order, augmentation, synthetic poses), the torch generator of the synthetic noise, the
    split, the history, the early-stopping counters, the fine-tuning steps done and the plateau rate factor."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    noise: torch.Generator
    train_idx: np.ndarray
    val_idx: np.ndarray
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    epoch: int = 0  # the last completed epoch (pre-training chunks and fine-tuning epochs)
    finetune_steps: int = 0
    lr_scale: float = 1.0

    def state(self, config: TrainConfig, fingerprint: dict) -> dict:
        """The resumable state (``<stem>.last.pt``)."""
        return {"config": asdict(config), "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "history": self.history,
                "best_val": self.best_val, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "val_idx": self.val_idx, "train_idx": self.train_idx, "n_particles": fingerprint["particles"],
                "fingerprint": fingerprint, "numpy_rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "noise_rng": self.noise.get_state(),
                "finetune_steps": self.finetune_steps, "lr_scale": self.lr_scale}


def _start_run(config: TrainConfig, n: int, supervised: bool, device, state: dict | None) -> _Run:
    """A new run (seeded: the split, then the initial weights) or, with a saved ``state``, the interrupted one.
    Without poses (``supervised`` False) there is no split: all particles only lend their imaging conditions."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(n)
    n_val = min(max(1, int(round(config.val_fraction * n))), n - 1) if supervised else 0
    model = _make_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    noise = torch.Generator(device=device)
    noise.manual_seed(config.seed + 1)
    run = _Run(model=model, optimizer=optimizer, rng=rng, noise=noise, train_idx=perm[n_val:],
               val_idx=np.sort(perm[:n_val]))
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        run.val_idx, run.train_idx = np.asarray(state["val_idx"]), np.asarray(state["train_idx"])
        run.history = list(state["history"])
        run.best_val, run.best_epoch, run.bad_epochs = state["best_val"], state["best_epoch"], state["bad_epochs"]
        run.epoch, run.finetune_steps, run.lr_scale = int(state["epoch"]), state["finetune_steps"], state["lr_scale"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        noise.set_state(state["noise_rng"])
    return run


# ------------------------------------------------------------------------------------------------ the data
@dataclass
class _Data:
    """What a run trains and validates on: ``real`` (the particles with poses, or None for a map-only run),
    ``synthetic`` (projections of the map, or None), ``val_inputs`` (V, n, n) / ``val_rotations`` (V, 3, 3)
    (held-out particles, or a fixed synthetic set for a map-only run), ``batch_size``."""

    real: RealSource | None
    synthetic: SyntheticSource | None
    val_inputs: torch.Tensor
    val_rotations: np.ndarray
    batch_size: int


MAP_ONLY_VALIDATION = 1024  # synthetic images of the fixed validation set of a map-only run


IN_MEMORY_WORK_BYTES = 1e9  # work-box images up to this size stay in RAM; more go to a scratch file on disk


def _work_images(particles: ParticleSet, images: np.ndarray | None, config: TrainConfig, scratch: Path | None = None,
                 batch: int = 1024) -> torch.Tensor | DiskRows:
    """The particles at the work box (twice the network box, at most the particle box; :func:`augment_inputs`),
    read and preprocessed ``batch`` images at a time: (N, W, W) float32.

    Memory stays flat in N: up to ``IN_MEMORY_WORK_BYTES`` (60,000 particles at work box 64) they are a tensor in
    RAM; a larger set is written once to the raw file ``scratch`` (removed by the caller) and read back row by row
    per batch (:class:`DiskRows`; measured before: 2.3 GB of RSS while reading 90,000 particles of 256 px, growing
    with N)."""
    work = min(particles.box, 2 * config.net_box)
    n = len(particles)
    on_disk = scratch is not None and n * work * work * 4 > IN_MEMORY_WORK_BYTES
    parts = []
    with open(scratch, "wb") if on_disk else nullcontext() as out:
        for x in network_input_batches(particles, images, config.net_box, config.ctf_correction, batch, work):
            if on_disk:
                out.write(x.numpy().astype(np.float32).tobytes())
            else:
                parts.append(x)
    return DiskRows(scratch, (n, work, work)) if on_disk else torch.cat(parts)


@contextmanager
def _scratch_path(out_path: Path) -> Iterator[Path]:
    """A hidden scratch file beside the checkpoint for this process's work-box images (one per process of a
    data-parallel run), removed when training ends, however it ends."""
    path = out_path.with_name(f".{out_path.stem}.inputs.{parallel.rank()}.f32")
    path.unlink(missing_ok=True)  # left by a killed run
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _loss_weights(particles: ParticleSet, column: str | None) -> np.ndarray | None:
    """Per-particle loss weights from star column ``column`` (clipped at 0, mean 1), None without a column."""
    if column is None:
        return None
    if column not in particles.extra:
        raise ValueError(f"no column {column!r} in the particles to weight the training loss with (have: "
                         f"{', '.join(sorted(particles.extra)) or 'none'})")
    w = np.clip(np.asarray(particles.extra[column], dtype=np.float64), 0.0, None)
    if not np.all(np.isfinite(w)) or not w.sum() > 0:
        raise ValueError(f"column {column!r} must hold finite values >= 0, not all zero, to weight the loss")
    return w / w.mean()


def _prepare_data(particles: ParticleSet, images: np.ndarray | None, volume: np.ndarray | None,
                  config: TrainConfig, run: _Run, device, scratch: Path | None = None) -> _Data:
    """The sources of a run (module doc): real particles (work-box images, in ``scratch`` when large: see
    :func:`_work_images`; shifts from their origins), the synthetic projections of the map, the validation set and
    the batch size."""
    n, d = config.net_box, particles.box
    supervised = particles.has_alignment
    real = synthetic = None
    if supervised:
        work = _work_images(particles, images, config, scratch)
        w = work.shape[-1]
        pool = None
        if config.shift_augment_px is None and particles.origins_px is not None and np.any(particles.origins_px):
            pool = -particles.origins_px * w / d  # the picking offsets, px of the work box
        shift = (1.0 if config.shift_augment_px is None else config.shift_augment_px) * w / n
        real = RealSource(work, np.asarray(particles.rotations, dtype=np.float64),
                          _loss_weights(particles, config.weight_column), n, config.augment, pool, shift)
    if volume is not None and config.pretrain_steps > 0:
        projections = SyntheticProjections.from_particles(
            volume, particles, n, config.ctf_correction, images=images, device=device, seed=config.seed,
            fallback_shift_px=(1.0 if config.shift_augment_px is None else config.shift_augment_px) * d / n)
        if config.shift_augment_px is not None:
            projections.shifts_px = None  # the config's uniform shifts, as for the particles
        synthetic = SyntheticSource(projections, run.noise)
    if real is not None:
        val_inputs, val_rotations = real.inputs(run.val_idx), real.rotations[run.val_idx]
    else:  # map only: a fixed synthetic validation set (its own generators: the run's stay untouched)
        gen = torch.Generator(device=synthetic.projections.device)
        gen.manual_seed(config.seed + 2)
        val_inputs, val_rotations = synthetic.projections.sample(
            MAP_ONLY_VALIDATION, np.random.default_rng(config.seed + 2), gen)
        val_inputs = val_inputs.cpu()
    size = config.batch_size or auto_batch_size(len(run.train_idx) if supervised else 10 ** 9)
    return _Data(real, synthetic, val_inputs, val_rotations, size)


# ------------------------------------------------------------------------------------------------ the loop
def _pretrain_epochs(config: TrainConfig, data: _Data) -> int:
    """Epochs (chunks of _training.PRETRAIN_CHUNK_STEPS steps) of pre-training."""
    return -(-config.pretrain_steps // _training.PRETRAIN_CHUNK_STEPS) if data.synthetic is not None else 0


def _train_one_epoch(run: _Run, task: _Task, data: _Data, config: TrainConfig, schedule: Schedule, device,
                     callback, model: torch.nn.Module) -> tuple[float, int, str, float]:
    """Epoch ``run.epoch`` (1-based, already advanced): a pre-training chunk or a fine-tuning epoch. Returns the
    mean training loss, the samples, the phase and the last learning rate. ``model``: what computes the forward
    pass (``run.model``, or its DistributedDataParallel wrapper in a data-parallel run: :func:`run_steps`)."""
    n_pre = _pretrain_epochs(config, data)
    size = data.batch_size
    if run.epoch <= n_pre:
        first = (run.epoch - 1) * _training.PRETRAIN_CHUNK_STEPS
        steps = range(first, min(first + _training.PRETRAIN_CHUNK_STEPS, config.pretrain_steps))
        batches = [lambda step=step: data.synthetic.batch(size, run.rng, schedule.pretrain_noise(step))
                   for step in steps]
        rates = [schedule.pretrain(step) for step in steps]
        phase = "pretrain"
    else:
        n_batches = epoch_batches(len(run.train_idx), size)
        order = np.concatenate([run.rng.permutation(run.train_idx)
                                for _ in range(-(-n_batches * size // len(run.train_idx)))])
        batches = [lambda idx=order[b * size:(b + 1) * size]: data.real.batch(idx, run.rng)
                   for b in range(n_batches)]
        rates = [schedule.finetune_rate(run.finetune_steps + b, run.lr_scale) for b in range(n_batches)]
        run.finetune_steps += n_batches
        phase = "finetune"
    loss, samples = run_steps(model, run.optimizer, task, batches, rates, device, callback)
    return loss, samples, phase, rates[-1] if rates else 0.0


def _validate_epoch(run: _Run, task: _Task, network_like: PoseNetwork, data: _Data, device, row: dict) -> bool:
    """Validation of the epoch just trained: completes its history ``row`` (appended) and returns whether the
    loss improved (then the early-stopping counters are reset, else advanced; in fine-tuning, the learning rate
    is halved after PLATEAU_EPOCHS epochs without improvement)."""
    val_loss, errors = _evaluate(run.model, task, network_like, data.val_inputs, data.val_rotations,
                                 data.batch_size, device)
    row.update(val_loss=val_loss, val_mean_error_deg=float(np.mean(errors)),
               val_median_error_deg=float(np.median(errors)))
    run.history.append(row)
    improved = val_loss < run.best_val - 1e-7
    if improved:
        run.best_val, run.best_epoch, run.bad_epochs = val_loss, run.epoch, 0
    elif row["phase"] == "finetune":
        run.bad_epochs += 1
        if run.bad_epochs % PLATEAU_EPOCHS == 0:
            run.lr_scale *= PLATEAU_FACTOR
    return improved


def _check_training_inputs(particles: ParticleSet, config: TrainConfig, images: np.ndarray | None,
                           volume: np.ndarray | None) -> None:
    config.validate()
    if volume is None and config.pretrain_steps:
        raise ValueError("pre-training on synthetic projections needs the particles' map (volume)")
    if not particles.has_alignment and (volume is None or not config.pretrain_steps):
        raise ValueError("training a pose network needs particles with poses (angles), or a map to pre-train on "
                         "(with pretrain_steps > 0); these particles have no poses")
    if particles.has_alignment and len(particles) < 4:
        raise ValueError(f"need at least 4 particles to train (a training and a validation set), got "
                         f"{len(particles)}")
    if images is not None and len(images) != len(particles):
        raise ValueError(f"{len(images)} images for {len(particles)} particles")
    if volume is not None and np.shape(volume) != (particles.box,) * 3:
        raise ValueError(f"map box {np.shape(volume)} does not match the particle box {particles.box} px")
    if volume is not None and config.model != "so3grid":
        raise ValueError("training from the map is implemented for the so3grid model")


def train_pose_network(particles: ParticleSet, config: TrainConfig, out_path: str | Path,
                       images: np.ndarray | None = None, log: Callable[[str], None] | None = print,
                       progress: Callable[[str], Callable[[int, int], None]] | None = None,
                       resume: bool = False, volume: np.ndarray | None = None) -> TrainResult:
    """Train a pose network on ``particles`` and/or on synthetic projections of their map ``volume`` (D, D, D)
    and write the best checkpoint to ``out_path``.

    With poses and no map (or ``pretrain_steps`` 0): supervised training on the particles. With a map and
    ``pretrain_steps`` > 0: pre-training on the map's projections under the particles' imaging conditions, then
    fine-tuning on the particles when they have poses (map-only otherwise). ``images`` (N, D, D): the particle
    images if in memory (else read from their files). ``log``: one line per epoch (None: silent).
    ``progress(label)`` returns a ``callback(done, total)`` called after each training batch (label
    ``"epoch E"``). ``resume``: continue from ``<stem>.last.pt`` if present; it must come from the same particles
    and map (:func:`training_fingerprint`) and settings, only ``epochs`` and ``patience`` (and the device and
    threads) may change, else a ``ValueError`` names what differs before the images are read or any file is
    written. See the module doc for losses, schedule, augmentation, calibration and files.
    """
    _check_training_inputs(particles, config, images, volume)
    out_path = Path(out_path)
    last_path = last_state_path(out_path)
    log = log if log is not None and parallel.is_main() else (lambda _line: None)
    state = _load_resumable(last_path, config, particles, volume) if resume and last_path.exists() else None
    if resume and state is None:
        log(f"no saved state at {last_path}: starting afresh")
    device = choose_device(config.device)
    trained_on = ("map+" if volume is not None and config.pretrain_steps else "") + (
        "particles" if particles.has_alignment else "")
    trained_on = trained_on.rstrip("+") or "map"
    with torch_threads(config.threads), _scratch_path(out_path) as scratch:
        t_setup = time.perf_counter()
        task = _Task(config)
        run = _start_run(config, len(particles), particles.has_alignment, device, state)
        data = _prepare_data(particles, images, volume, config, run, device, scratch)
        schedule = Schedule(config.learning_rate, config.pretrain_steps,
                            config.finetune_lr_factor if data.synthetic is not None else 1.0,
                            config.pretrain_noise_start)
        network_like = PoseNetwork(model=run.model, config=config, box=particles.box,
                                   pixel_size=particles.pixel_size, symmetry=config.symmetry,
                                   grid_order=config.grid_order)
        fingerprint = training_fingerprint(particles, volume)
        n_pre = _pretrain_epochs(config, data)
        log(f"training {config.model} ({trained_on}) on {len(run.train_idx) if data.real else 0} particles"
            f"{f' after {config.pretrain_steps} steps on projections of the map' if n_pre else ''}, validating on "
            f"{len(data.val_rotations)} {'particles' if data.real else 'synthetic images'} (net box "
            f"{config.net_box} px, batch {data.batch_size}, {device}, setup {time.perf_counter() - t_setup:.1f} s)")
        if state is not None:
            log(f"resuming from {last_path} after epoch {run.epoch} (best epoch {run.best_epoch}, "
                f"val loss {run.best_val:.4f})")
        model = parallel.data_parallel(run.model, device)  # the model itself in a one-process run
        while run.epoch < n_pre or (data.real is not None and run.epoch - n_pre < config.epochs
                                    and run.bad_epochs < config.patience):
            t0 = time.perf_counter()
            run.epoch += 1
            loss, samples, phase, rate = _train_one_epoch(run, task, data, config, schedule, device,
                                                          progress(f"epoch {run.epoch}") if progress else None,
                                                          model)
            train_s = time.perf_counter() - t0
            row = {"epoch": run.epoch, "phase": phase, "train_loss": loss, "samples": samples,
                   "samples_per_s": samples / max(train_s, 1e-9), "lr": rate}
            improved = _validate_epoch(run, task, network_like, data, device, row)
            row["seconds"] = time.perf_counter() - t0
            # every process holds the same model; the main one's bookkeeping decides (no process stops alone)
            row, improved, run.best_val, run.best_epoch, run.bad_epochs, run.lr_scale = parallel.broadcast_object(
                (row, improved, run.best_val, run.best_epoch, run.bad_epochs, run.lr_scale))
            run.history[-1] = row
            if not parallel.is_main():
                continue
            if improved:
                _atomic_save(_checkpoint(run, config, particles, trained_on), out_path)
            log(f"epoch {run.epoch:3d} {phase:8s} train loss {loss:.4f}  val loss {row['val_loss']:.4f}  val error "
                f"mean {row['val_mean_error_deg']:.1f}° median {row['val_median_error_deg']:.1f}°  "
                f"{row['samples_per_s']:.0f} particles/s  {row['seconds']:.1f} s" + ("  *" if improved else ""))
            _atomic_save(run.state(config, fingerprint), last_path)
        if run.bad_epochs >= config.patience:
            log(f"early stop: no validation improvement for {config.patience} epochs (best epoch {run.best_epoch})")
        temperature = _calibrate(out_path, task, data, config, device, log) if parallel.is_main() else 1.0
    if parallel.is_main():
        _finish_checkpoint(out_path, run.history, temperature)
    temperature = parallel.broadcast_object(temperature)
    parallel.barrier()  # the checkpoint is complete before any process returns it
    return TrainResult(checkpoint=out_path, history=run.history, best_epoch=run.best_epoch, temperature=temperature)


def _calibrate(out_path: Path, task: _Task, data: _Data, config: TrainConfig, device, log) -> float:
    """The temperature of the best network's logits fitted on the validation set (1 when not calibrating or for
    the quaternion model)."""
    if not config.calibrate or config.model != "so3grid" or not out_path.exists():
        return 1.0
    model = _make_model(config).to(device)
    model.load_state_dict(torch.load(out_path, map_location="cpu", weights_only=False)["state_dict"])
    logits = forward_batches(model, data.val_inputs, max(data.batch_size, 256), device)
    targets = task.targets(data.val_rotations)
    temperature = fit_temperature(logits, targets)
    log(f"calibration: temperature {temperature:.3f} (validation loss {float(task.loss(logits, targets)):.4f} -> "
        f"{float(task.loss(logits / temperature, targets)):.4f})")
    return temperature


def _finish_checkpoint(out_path: Path, history: list[dict], temperature: float = 1.0) -> None:
    """The checkpoint holds the history up to its best epoch; give it the whole history and the temperature."""
    if not out_path.exists():
        raise RuntimeError(f"no checkpoint was written to {out_path}")
    ckpt = torch.load(out_path, map_location="cpu", weights_only=False)
    ckpt["history"] = list(history)
    ckpt["temperature"] = float(temperature)
    _atomic_save(ckpt, out_path)


def load_pose_network(path: str | Path, device=None) -> PoseNetwork:
    """Load a checkpoint written by :func:`train_pose_network` (model in eval mode on ``device``; None = the
    configured device, cuda when available)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pose network checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bayespose pose network checkpoint")
    config = TrainConfig.from_dict(ckpt["config"])
    model = build_model(ckpt["model"], config.net_box, ckpt["grid_order"], **ckpt.get("model_options", {}))
    model.load_state_dict(ckpt["state_dict"])
    model.to(choose_device(device if device is not None else config.device)).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict",)}
    return PoseNetwork(model=model, config=config, box=int(ckpt["box"]), pixel_size=float(ckpt["pixel_size"]),
                       symmetry=ckpt["symmetry"], grid_order=int(ckpt["grid_order"]),
                       history=list(ckpt.get("history", [])), metadata=meta,
                       temperature=float(ckpt.get("temperature", 1.0)))
