"""``bayespose train``: train a pose-prediction network on aligned particles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bayespose.cli._common import (
    CliError,
    UsageError,
    check_outputs,
    existing_file,
    positive_float,
    positive_int,
    progress_printer,
    read_particles_and_map,
    usage_errors,
)
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, DEFAULT_PRETRAIN_STEPS, MODEL_TYPES, TRAINING_DEFAULTS

_DEFAULT = TRAINING_DEFAULTS


def _steps(text: str) -> int:
    """--pretrain-steps: a whole number >= 0 (1e4 accepted)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 0, got {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 0, got {text!r}")
    return int(value)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a pose-prediction network on aligned particles and/or their map",
                       description="Supervised training of a network that predicts each particle's pose "
                                   "distribution over SO(3) from its image (Image2Sphere-style grid head, or a "
                                   "quaternion-regression baseline), on particles whose poses are known (a RELION "
                                   "refinement or a simulation). With --map (the particles' consensus map), the "
                                   "network is first pre-trained on unlimited synthetic projections of the map "
                                   "made with the particles' own CTFs, noise spectrum, shifts and normalisation, "
                                   "then fine-tuned on the particles: useful networks from hundreds of particles; "
                                   "with --map and particles without poses, a map-only network. Writes the "
                                   "best-validation checkpoint MODEL.pt (its confidence calibrated on the "
                                   "held-out particles; a resumable last state next to it) and MODEL_training.png "
                                   "(loss and validation-error curves).")
    p.add_argument("--particles", required=True, type=existing_file,
                   help="RELION star file of the particles (rlnAngleRot/Tilt/Psi for supervised training; CTF if "
                        "any); with --map their images also give the noise spectrum and their CTFs and origins "
                        "the imaging conditions of the synthetic projections")
    p.add_argument("--map", type=existing_file, metavar="MAP",
                   help="the particles' consensus map (MRC, their box and pixel size): pre-train on its projections")
    p.add_argument("--pretrain-steps", type=_steps, default=None, metavar="N",
                   help=f"with --map: optimisation steps on synthetic projections (0: none) [{DEFAULT_PRETRAIN_STEPS}]")
    p.add_argument("--weight-column", metavar="NAME",
                   help="weight each particle's loss by this star column (e.g. rlnMaxValueProbDistribution): "
                        "particles with uncertain consensus poses teach less [equal weights]")
    p.add_argument("--sym", default="C1", help="point group of the particles in RELION's notation; symmetry mates "
                                               "share the training target [C1]")
    p.add_argument("--model", choices=MODEL_TYPES, default="so3grid",
                   help="so3grid: distribution on a HEALPix x in-plane grid (Image2Sphere-style e3nn head); "
                        "quaternion: regression baseline (one pose) [so3grid]")
    p.add_argument("--epochs", type=positive_int, default=_DEFAULT["epochs"],
                   help=f"maximum number of epochs on the particles (each at least 2048 samples) "
                        f"[{_DEFAULT['epochs']}]")
    p.add_argument("--net-box", type=positive_int, default=32, metavar="PX",
                   help="images are Fourier-cropped to this box (px) before the network: a multiple of 4, at least 8 "
                        "and at most the particle box [32]")
    p.add_argument("--grid-order", type=int, choices=range(0, 4), default=_DEFAULT["grid_order"], metavar="R",
                   help=f"HEALPix order of the output grid of so3grid, 0-3 (15° spacing at 2, 7.5° at 3) "
                        f"[{_DEFAULT['grid_order']}]")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="particles per optimisation step [32 below 1000 training particles, 64 below 10000, else 128]")
    p.add_argument("--lr", type=positive_float, default=_DEFAULT["learning_rate"],
                   help=f"learning rate (AdamW; fine-tuning after pre-training uses "
                        f"{_DEFAULT['finetune_lr_factor']:g} of it) [{_DEFAULT['learning_rate']:g}]")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the particles held out for validation and early stopping, in (0, 1) [0.1]")
    p.add_argument("--patience", type=positive_int, default=5,
                   help="stop after this many epochs without a better validation loss [5]")
    p.add_argument("--no-augment", action="store_true", help="no in-plane rotation augmentation of the images")
    p.add_argument("--ctf-correction", choices=CTF_CORRECTIONS, default="phase_flip",
                   help="phase-flip the images with their CTF before the network (needs CTF columns), or not "
                        "[phase_flip]")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, initialisation, batches) [0]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from the last state saved next to --out (the same "
                        "particles and settings; --epochs and --patience may be raised)")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint (.pt)")
    p.set_defaults(func=run)


def _training_png(checkpoint: Path) -> Path:
    """``MODEL.pt`` -> ``MODEL_training.png`` (same folder)."""
    return checkpoint.with_name(checkpoint.stem + "_training.png")


def run(args) -> int:
    from bayespose.core.deep import TrainConfig, train_pose_network
    from bayespose.core.deep.train import last_state_path
    from bayespose.core.geometry.symmetry import symmetry_group
    from bayespose.core.io.relion_star import read_star
    from bayespose.core.parallel import is_main, processes_note
    from bayespose.plotting import save_figure
    from bayespose.plotting.deep import plot_training_history

    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.net_box < 8 or args.net_box % 4:
        raise UsageError(f"--net-box must be a multiple of 4 and at least 8 px, got {args.net_box}")
    symmetry = args.sym.strip().upper()
    with usage_errors():
        symmetry_group(symmetry)  # the accepted names
    volume = None
    if args.map is not None:
        particles, volume = read_particles_and_map(args.particles, args.map)
    else:
        particles = read_star(args.particles)
    check_outputs(files={"--out": args.out, "the resumable state": last_state_path(args.out),
                         "the training figure": _training_png(args.out)},
                  inputs={"--particles": args.particles, "--map": args.map}, particles=particles)
    pretrain_steps = (args.pretrain_steps if args.pretrain_steps is not None else DEFAULT_PRETRAIN_STEPS) \
        if volume is not None else 0
    if args.pretrain_steps and volume is None:
        raise UsageError("--pretrain-steps needs --map (the map to make the synthetic projections from)")
    if not particles.has_alignment and not pretrain_steps:
        raise CliError(f"{args.particles} has no rlnAngleRot/Tilt/Psi columns: training needs particles with known "
                       "poses (e.g. from a refinement or a simulation), or --map to train from the map only")
    if volume is not None and args.model != "so3grid":
        raise UsageError("--map (training from the map) needs --model so3grid")
    if args.weight_column is not None and args.weight_column not in particles.extra:
        raise CliError(f"{args.particles} has no column {args.weight_column} for --weight-column")
    if args.net_box > particles.box:
        raise UsageError(f"--net-box {args.net_box} px is larger than the particles' box ({particles.box} px); images "
                       "are only ever cropped, not padded")
    ctf_correction = args.ctf_correction
    if ctf_correction != "none" and not particles.has_ctf:
        sys.stderr.write(f"note: {args.particles} has no CTF columns; training without CTF correction\n")
        ctf_correction = "none"
    config = TrainConfig(model=args.model, net_box=args.net_box, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, val_fraction=args.val_fraction, patience=args.patience,
                         symmetry=symmetry, grid_order=args.grid_order, augment=not args.no_augment,
                         ctf_correction=ctf_correction, seed=args.seed, pretrain_steps=pretrain_steps,
                         weight_column=args.weight_column,
                         device=None if args.device == "auto" else args.device, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = train_pose_network(particles, config, args.out, progress=progress_printer, resume=args.resume,
                                volume=volume)
    png = _training_png(Path(result.checkpoint))
    if is_main():  # under torchrun the other processes trained their slices of each batch and write nothing
        save_figure(plot_training_history(result.history, best_epoch=result.best_epoch,
                                          title=f"{args.model} network on {len(particles)} particles "
                                                f"({Path(args.particles).name})"
                                                + (f" + map {Path(args.map).name}" if volume is not None else "")),
                    png)
    best = next((row for row in result.history if row.get("epoch") == result.best_epoch), None)
    error = (f", validation median error {best['val_median_error_deg']:.1f}°"
             if best and best.get("val_median_error_deg") is not None else "")
    what = f"{len(particles)} particles" if particles.has_alignment else "its map only"
    if volume is not None and particles.has_alignment:
        what = f"its map ({pretrain_steps} steps) and {len(particles)} particles"
    print(f"trained a {args.model} network on {what}{processes_note()}: best epoch {result.best_epoch} of "
          f"{len(result.history)}{error}, calibration temperature {result.temperature:.3g}; wrote "
          f"{result.checkpoint} and {png}")
    return 0
