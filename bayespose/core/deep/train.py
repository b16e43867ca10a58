"""Supervised training of a pose network on particles with known poses; checkpoints; loading.

Losses:

* ``so3grid``: cross-entropy ``-sum_k t_k log softmax(logits)_k`` against the cell(s) of
  ``healpix_grid(grid_order)`` containing the true rotation; with a point group every mate ``A @ L_g`` gets mass
  1/|G| (:func:`.data.grid_targets`; paper 002 "labels are expanded"). Cells: ``GridPrior.cell_index`` (the same
  cells :func:`.prior_refine.deep_prior_assign` uses as a prior).
* ``quaternion``: ``min_g 1 - <q_pred, q(A L_g)>²`` (paper 001 eq. 12, minimised over the symmetry mates).

Training: Adam; the particles are split once (seeded) into training and validation sets (``val_fraction``); an
epoch runs over the shuffled training set with in-plane rotation (uniform 0-360°) and shift (uniform within
``±shift_augment_px`` px of the network box) augmentation, the labels turned accordingly (:mod:`.data`); after
each epoch the validation loss and the validation angular errors of the predicted modes (symmetry-aware) are
logged. The checkpoint ``out_path`` is rewritten atomically whenever the validation loss improves; training stops
after ``patience`` epochs without improvement or at ``epochs``. A resumable state (model, optimiser, random
generators, split, history, the TrainConfig and the :func:`training_fingerprint` of the particles) is written
atomically after every epoch to ``<out_path stem>.last.pt`` next to it; a resume continues the run exactly (the
same numbers as an uninterrupted one) and is refused for other particles or settings.

Checkpoint (one ``torch.save`` dict, readable without bayespose's classes): ``format``, ``model`` (type),
``state_dict``, ``config`` (TrainConfig as dict), ``model_options``, ``box`` (px of the training particles),
``pixel_size`` (Å/px), ``net_pixel_size``, ``symmetry``, ``grid_order``, ``history``, ``best_epoch``,
``n_train``, ``n_val``, ``val_idx`` (the held-out particles, indices into the training set),
``bayespose_version``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from bayespose.core import parallel
from bayespose.core.deep.data import (
    grid_targets,
    inplane_rotation_matrix,
    read_network_inputs,
    rotate_shift_images,
    symmetry_quaternions,
)
from bayespose.core.deep.models import build_model
from bayespose.core.deep.predict import predict_from_inputs
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, MODEL_TYPES, CtfCorrection, ModelType
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
    threads (None: torch's default). ``lmax`` and the channel counts size the so3grid head; ``shift_augment_px``
    the random shifts (px of the network box) of the augmentation.
    """

    model: ModelType = "so3grid"
    net_box: int = 32
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    val_fraction: float = 0.1
    patience: int = 5
    symmetry: str = "C1"
    grid_order: int = 2
    augment: bool = True
    ctf_correction: CtfCorrection = "phase_flip"
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    lmax: int = 6
    channels: int = 64
    s2_channels: int = 32
    so3_channels: int = 8
    shift_augment_px: float = 1.0
    weight_decay: float = 1e-5

    def validate(self) -> None:
        if self.model not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODEL_TYPES)}")
        if self.net_box < 8 or self.net_box % 4:
            raise ValueError(f"net_box must be a multiple of 4 and >= 8 px, got {self.net_box}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.grid_order <= 3:
            raise ValueError(f"grid_order must be in 0..3 (72·8^order cells), got {self.grid_order}")
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {self.ctf_correction!r}")
        if not 1 <= self.lmax <= 12:
            raise ValueError(f"lmax must be in 1..12, got {self.lmax}")
        if self.shift_augment_px < 0:
            raise ValueError("shift_augment_px must be >= 0")
        symmetry_group(self.symmetry)

    def model_options(self) -> dict:
        if self.model == "so3grid":
            return dict(lmax=self.lmax, channels=self.channels, s2_channels=self.s2_channels,
                        so3_channels=self.so3_channels)
        return dict(channels=self.channels)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Config from a dict (unknown keys ignored, so older/newer checkpoints load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainResult:
    """``checkpoint``: path of the best-validation checkpoint; ``history``: one dict per epoch (epoch,
    train_loss, val_loss, val_mean_error_deg, val_median_error_deg, seconds); ``best_epoch`` (1-based)."""

    checkpoint: Path
    history: list[dict]
    best_epoch: int


@dataclass
class PoseNetwork:
    """A loaded network: ``model`` (torch Module, eval mode), ``config``, ``box`` (px of the training particles),
    ``pixel_size`` (Å/px), ``symmetry``, ``grid_order``, ``history``, ``metadata`` (the rest of the checkpoint)."""

    model: torch.nn.Module
    config: TrainConfig
    box: int
    pixel_size: float
    symmetry: str
    grid_order: int
    history: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


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

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.model == "so3grid":
            return -(target * torch.log_softmax(output, dim=1)).sum(1).mean()
        dots = torch.einsum("bi,bgi->bg", output, target)
        return (1.0 - dots ** 2).min(dim=1).values.mean()


def _make_model(config: TrainConfig) -> torch.nn.Module:
    return build_model(config.model, config.net_box, config.grid_order, **config.model_options())


def _checkpoint(run: _Run, config: TrainConfig, particles: ParticleSet) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "model": config.model,
        "state_dict": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
        "config": asdict(config), "model_options": config.model_options(), "box": int(particles.box),
        "pixel_size": float(particles.pixel_size),
        "net_pixel_size": float(particles.pixel_size) * particles.box / config.net_box,
        "symmetry": config.symmetry, "grid_order": int(config.grid_order), "history": list(run.history),
        "best_epoch": int(run.best_epoch), "n_train": int(len(run.train_idx)), "n_val": int(len(run.val_idx)),
        "val_idx": np.asarray(run.val_idx, dtype=np.int64).tolist(),
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
    pred = predict_from_inputs(network_like, inputs, top_k=1, batch_size=max(batch_size, 256), device=device)
    errors = symmetric_geodesic_distance_deg(pred.rotations, rotations, symmetry_group(task.config.symmetry))
    return total / max(len(inputs), 1), errors


# ------------------------------------------------------------------------------------------- resumable state
def training_fingerprint(particles: ParticleSet) -> dict:
    """What identifies a training set: particle count, box (px), pixel size (Å/px) and SHA-256 digests of the
    image references (file names + 0-based indices, in order), of the poses (RELION ``A`` rotations rounded to
    1e-6 and origins in Å rounded to 1e-4) and of the CTF parameters (None without CTF). Stored in the resumable
    state, so that a resume on other particles is refused (:func:`train_pose_network`)."""

    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    files = "\n".join(str(f) for f in np.asarray(particles.image_files)).encode()
    rotations = np.round(np.asarray(particles.rotations, dtype=np.float64), 6) + 0.0  # + 0.0: no negative zeros
    origins = particles.origins_A if particles.origins_A is not None else np.zeros((len(particles), 2))
    ctf = particles.ctf
    return {
        "particles": len(particles), "box": int(particles.box), "pixel_size": float(particles.pixel_size),
        "images": digest(np.frombuffer(files, dtype=np.uint8), np.asarray(particles.image_indices, dtype=np.int64)),
        "poses": digest(rotations, np.round(np.asarray(origins, dtype=np.float64), 4) + 0.0),
        "ctf": None if ctf is None else digest(*(np.asarray(getattr(ctf, f.name), dtype=np.float64)
                                                 for f in fields(ctf))),
    }


_FINGERPRINT_WORDS = {"particles": "number of particles", "box": "box (px)", "pixel_size": "pixel size (Å/px)",
                      "images": "image files or indices", "poses": "poses", "ctf": "CTF parameters"}
# settings that may change between an interrupted run and its resume (the others change what is trained)
_RESUMABLE_CHANGES = ("epochs", "patience", "device", "threads")


def _resume_differences(state: dict, config: TrainConfig, fingerprint: dict) -> list[str]:
    """What differs between a saved state and this run: training particles (fingerprint) and settings."""
    differences = []
    saved = state["fingerprint"]
    for key, word in _FINGERPRINT_WORDS.items():
        if saved.get(key) != fingerprint[key]:
            is_digest = key in ("images", "poses", "ctf")
            differences.append(word if is_digest else f"{word} {saved.get(key)!r} -> {fingerprint[key]!r}")
    before, now = asdict(TrainConfig.from_dict(state["config"])), asdict(config)
    differences += [f"{name} {before[name]!r} -> {now[name]!r}" for name in now
                    if name not in _RESUMABLE_CHANGES and before[name] != now[name]]
    return differences


def _load_resumable(last_path: Path, config: TrainConfig, particles: ParticleSet) -> dict:
    """The saved state at ``last_path`` after checking that it belongs to these particles and settings (one-line
    ``ValueError`` naming what differs otherwise)."""
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    if "fingerprint" not in state:
        raise ValueError(f"cannot resume {last_path}: it was written by an older bayespose that did not record its "
                         "training particles; remove it to train afresh")
    differences = _resume_differences(state, config, training_fingerprint(particles))
    if differences:
        raise ValueError(f"cannot resume {last_path}: it was trained on other particles or settings "
                         f"({'; '.join(differences)}); only epochs and patience may change, or remove it to "
                         "train afresh")
    return state


@dataclass
class _Run:
    """What a training run changes epoch by epoch (saved in the resumable state): the model, the optimiser, the
    numpy generator (batch order, augmentation), the split, the history and the early-stopping counters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    train_idx: np.ndarray
    val_idx: np.ndarray
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    epoch: int = 0  # the last completed epoch

    def state(self, config: TrainConfig, fingerprint: dict) -> dict:
        """The resumable state (``<stem>.last.pt``)."""
        return {"config": asdict(config), "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "history": self.history,
                "best_val": self.best_val, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "val_idx": self.val_idx, "train_idx": self.train_idx, "n_particles": fingerprint["particles"],
                "fingerprint": fingerprint, "numpy_rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state()}


def _start_run(config: TrainConfig, n: int, device, state: dict | None) -> _Run:
    """A new run (seeded: the split, then the initial weights) or, with a saved ``state``, the interrupted one."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(n)
    n_val = min(max(1, int(round(config.val_fraction * n))), n - 1)
    model = _make_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    run = _Run(model=model, optimizer=optimizer, rng=rng, train_idx=perm[n_val:], val_idx=np.sort(perm[:n_val]))
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        run.val_idx, run.train_idx = np.asarray(state["val_idx"]), np.asarray(state["train_idx"])
        run.history = list(state["history"])
        run.best_val, run.best_epoch, run.bad_epochs = state["best_val"], state["best_epoch"], state["bad_epochs"]
        run.epoch = int(state["epoch"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
    return run


def _train_epoch(run: _Run, task: _Task, inputs: torch.Tensor, rotations: np.ndarray, config: TrainConfig,
                 device, callback: Callable[[int, int], None] | None, model: torch.nn.Module | None = None) -> float:
    """One pass over the shuffled training set with in-plane augmentation; the mean training loss.

    ``model``: what computes the forward pass (default ``run.model``; a DistributedDataParallel wrapper of it in a
    data-parallel run, where every process draws the same batch order and augmentation and trains on its slice
    of each batch (:func:`bayespose.core.parallel.my_slice`), the gradients averaged over the processes)."""
    model = model or run.model
    model.train()
    order = run.rng.permutation(run.train_idx)
    total, count = 0.0, 0
    n_batches = -(-len(order) // config.batch_size)
    for b in range(n_batches):
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        if len(idx) < 2 and count:  # BatchNorm needs two samples; a lone last sample is skipped
            continue
        x, rot = inputs[idx], rotations[idx]
        if config.augment:
            angle = run.rng.uniform(0.0, 360.0, len(idx))
            shift = run.rng.uniform(-config.shift_augment_px, config.shift_augment_px, (len(idx), 2))
            x = rotate_shift_images(x, angle, shift)
            rot = inplane_rotation_matrix(angle) @ rot
        mine = parallel.my_slice(len(idx))
        out = model(x[mine].to(device))
        loss = task.loss(out, task.targets(rot[mine]).to(device))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total += float(loss.detach()) * len(out)
        count += len(out)
        if callback:
            callback(b + 1, n_batches)
    total, count = parallel.all_reduce_sum(np.array([total, count], dtype=np.float64))
    return total / max(count, 1)


def _validate_epoch(run: _Run, task: _Task, network_like: PoseNetwork, inputs: torch.Tensor, rotations: np.ndarray,
                    config: TrainConfig, device, train_loss: float, seconds_from: float) -> tuple[dict, bool]:
    """Validation of the epoch just trained: its history row (appended) and whether the loss improved (then the
    early-stopping counters are reset, else advanced)."""
    val_loss, errors = _evaluate(run.model, task, network_like, inputs[run.val_idx], rotations[run.val_idx],
                                 config.batch_size, device)
    row = {"epoch": run.epoch, "train_loss": train_loss, "val_loss": val_loss,
           "val_mean_error_deg": float(np.mean(errors)), "val_median_error_deg": float(np.median(errors)),
           "seconds": time.perf_counter() - seconds_from}
    run.history.append(row)
    improved = val_loss < run.best_val - 1e-7
    if improved:
        run.best_val, run.best_epoch, run.bad_epochs = val_loss, run.epoch, 0
    else:
        run.bad_epochs += 1
    return row, improved


def _check_training_inputs(particles: ParticleSet, config: TrainConfig, images: np.ndarray | None) -> None:
    config.validate()
    if not particles.has_alignment:
        raise ValueError("training a pose network needs particles with poses (angles); these have none")
    if len(particles) < 4:
        raise ValueError(f"need at least 4 particles to train (a training and a validation set), got "
                         f"{len(particles)}")
    if images is not None and len(images) != len(particles):
        raise ValueError(f"{len(images)} images for {len(particles)} particles")


def train_pose_network(particles: ParticleSet, config: TrainConfig, out_path: str | Path,
                       images: np.ndarray | None = None, log: Callable[[str], None] | None = print,
                       progress: Callable[[str], Callable[[int, int], None]] | None = None,
                       resume: bool = False) -> TrainResult:
    """Train a pose network on ``particles`` (they must have poses) and write the best checkpoint to ``out_path``.

    ``images`` (N, D, D): the particle images if in memory (else read from their files). ``log``: one line per
    epoch (None: silent). ``progress(label)`` returns a ``callback(done, total)`` called after each training
    batch (label ``"epoch E"``). ``resume``: continue from ``<stem>.last.pt`` if present; it must come from the
    same particles (:func:`training_fingerprint`) and settings, only ``epochs`` and ``patience`` (and the device
    and threads) may change, else a ``ValueError`` names what differs before the images are read or any file
    is written. See the module doc for losses, augmentation and files.
    """
    _check_training_inputs(particles, config, images)
    out_path = Path(out_path)
    last_path = last_state_path(out_path)
    log = log if log is not None and parallel.is_main() else (lambda _line: None)
    state = _load_resumable(last_path, config, particles) if resume and last_path.exists() else None
    if resume and state is None:
        log(f"no saved state at {last_path}: starting afresh")
    device = choose_device(config.device)
    with torch_threads(config.threads):
        t_setup = time.perf_counter()
        inputs = read_network_inputs(particles, images, config.net_box, config.ctf_correction)  # batch by batch
        rotations = np.asarray(particles.rotations, dtype=np.float64)
        task = _Task(config)
        run = _start_run(config, len(particles), device, state)
        if state is not None:
            log(f"resuming from {last_path} after epoch {run.epoch} (best epoch {run.best_epoch}, "
                f"val loss {run.best_val:.4f})")
        network_like = PoseNetwork(model=run.model, config=config, box=particles.box,
                                   pixel_size=particles.pixel_size, symmetry=config.symmetry,
                                   grid_order=config.grid_order)
        fingerprint = training_fingerprint(particles)
        log(f"training {config.model} on {len(run.train_idx)} particles, validating on {len(run.val_idx)} "
            f"(net box {config.net_box} px, {device}, setup {time.perf_counter() - t_setup:.1f} s)")
        model = parallel.data_parallel(run.model, device)  # the model itself in a one-process run
        while run.epoch < config.epochs and run.bad_epochs < config.patience:
            t0 = time.perf_counter()
            run.epoch += 1
            train_loss = _train_epoch(run, task, inputs, rotations, config, device,
                                      progress(f"epoch {run.epoch}") if progress else None, model)
            row, improved = _validate_epoch(run, task, network_like, inputs, rotations, config, device,
                                            train_loss, t0)
            # every process holds the same model; the main one's bookkeeping decides (no process stops alone)
            row, improved, run.best_val, run.best_epoch, run.bad_epochs = parallel.broadcast_object(
                (row, improved, run.best_val, run.best_epoch, run.bad_epochs))
            run.history[-1] = row
            if not parallel.is_main():
                continue
            if improved:
                _atomic_save(_checkpoint(run, config, particles), out_path)
            log(f"epoch {run.epoch:3d}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  val "
                f"error mean {row['val_mean_error_deg']:.1f}° median {row['val_median_error_deg']:.1f}°  "
                f"{row['seconds']:.1f} s" + ("  *" if improved else ""))
            _atomic_save(run.state(config, fingerprint), last_path)
    if run.bad_epochs >= config.patience:
        log(f"early stop: no validation improvement for {config.patience} epochs (best epoch {run.best_epoch})")
    if parallel.is_main():
        _finish_checkpoint(out_path, run.history)
    parallel.barrier()  # the checkpoint is complete before any process returns it
    return TrainResult(checkpoint=out_path, history=run.history, best_epoch=run.best_epoch)


def _finish_checkpoint(out_path: Path, history: list[dict]) -> None:
    """The checkpoint holds the history up to its best epoch; give it the whole history."""
    if not out_path.exists():
        raise RuntimeError(f"no checkpoint was written to {out_path}")
    ckpt = torch.load(out_path, map_location="cpu", weights_only=False)
    ckpt["history"] = list(history)
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
                       history=list(ckpt.get("history", [])), metadata=meta)
