"""``bayespose train``: train a pose-prediction network on aligned particles."""

from __future__ import annotations

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
    usage_errors,
)
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, MODEL_TYPES


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a pose-prediction network on aligned particles",
                       description="Supervised training of a network that predicts each particle's pose "
                                   "distribution over SO(3) from its image (Image2Sphere-style grid head, or a "
                                   "quaternion-regression baseline), on particles whose poses are known (a RELION "
                                   "refinement or a simulation). Writes the best-validation checkpoint MODEL.pt "
                                   "(a resumable last state next to it) and MODEL_training.png (loss and "
                                   "validation-error curves).")
    p.add_argument("--particles", required=True, type=existing_file,
                   help="RELION star file of aligned particles (rlnAngleRot/Tilt/Psi, CTF if any)")
    p.add_argument("--sym", default="C1", help="point group of the particles in RELION's notation; symmetry mates "
                                               "share the training target [C1]")
    p.add_argument("--model", choices=MODEL_TYPES, default="so3grid",
                   help="so3grid: distribution on a HEALPix x in-plane grid (Image2Sphere-style e3nn head); "
                        "quaternion: regression baseline (one pose) [so3grid]")
    p.add_argument("--epochs", type=positive_int, default=30, help="maximum number of epochs [30]")
    p.add_argument("--net-box", type=positive_int, default=32, metavar="PX",
                   help="images are Fourier-cropped to this box (px) before the network: a multiple of 4, at least 8 "
                        "and at most the particle box [32]")
    p.add_argument("--grid-order", type=int, choices=range(0, 4), default=2, metavar="R",
                   help="HEALPix order of the output grid of so3grid, 0-3 (15° spacing at 2) [2]")
    p.add_argument("--batch-size", type=positive_int, default=64, help="particles per optimisation step [64]")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (Adam) [0.001]")
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
    particles = read_star(args.particles)
    check_outputs(files={"--out": args.out, "the resumable state": last_state_path(args.out),
                         "the training figure": _training_png(args.out)},
                  inputs={"--particles": args.particles}, particles=particles)
    if not particles.has_alignment:
        raise CliError(f"{args.particles} has no rlnAngleRot/Tilt/Psi columns: training needs particles with known "
                       "poses (e.g. from a refinement or a simulation)")
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
                         ctf_correction=ctf_correction, seed=args.seed,
                         device=None if args.device == "auto" else args.device, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = train_pose_network(particles, config, args.out, progress=progress_printer, resume=args.resume)
    png = _training_png(Path(result.checkpoint))
    if is_main():  # under torchrun the other processes trained their slices of each batch and write nothing
        save_figure(plot_training_history(result.history, best_epoch=result.best_epoch,
                                          title=f"{args.model} network on {len(particles)} particles "
                                                f"({Path(args.particles).name})"), png)
    best = next((row for row in result.history if row.get("epoch") == result.best_epoch), None)
    error = (f", validation median error {best['val_median_error_deg']:.1f}°"
             if best and best.get("val_median_error_deg") is not None else "")
    print(f"trained a {args.model} network on {len(particles)} particles{processes_note()}: best epoch "
          f"{result.best_epoch} of {len(result.history)}{error}; wrote {result.checkpoint} and {png}")
    return 0
