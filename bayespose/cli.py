"""The ``bayespose`` command: the Scipion protocols' jobs on plain ``.star``/``.mrcs``/``.mrc``/``.cs`` files.

Every sub-command calls the same core function as its protocol. Bad arguments or unreadable inputs end with one
readable line on stderr and exit code 2 (usage) or 1 (input/processing error); outputs are written completely or
not at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_INPUT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An error to show the user as one line (no traceback)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line instead of usage + message
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _progress_printer(label: str):
    """A progress callback ``(done, total)`` printing a one-line bar on stderr."""
    start = time.time()

    def report(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = done / max(time.time() - start, 1e-9)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({rate:.0f}/s)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


# ----------------------------------------------------------------------------------------------- simulate
def _add_simulate(sub):
    p = sub.add_parser("simulate", help="simulate particles with known poses from a map",
                       description="Simulate particles from a map (projection, optional CTF, shifts, white noise) "
                                   "and write DIR/particles.star (RELION 3.1, ground-truth poses) and "
                                   "DIR/particles.mrcs.")
    p.add_argument("--map", required=True, type=_existing_file, help="input map (MRC); pixel size from its header")
    p.add_argument("--n", required=True, type=_positive_int, help="number of particles")
    p.add_argument("--snr", required=True, type=float,
                   help="signal-to-noise ratio: signal variance / noise variance over the box; 0 = noiseless")
    p.add_argument("--pose-dist", default="uniform",
                   help="pose distribution: uniform | igso3:ETA (isotropic Gaussian on SO(3) around the identity with "
                        "scale ETA in radians, paper 000 App. F1: small = concentrated, std of the angle ~0.67 ETA)"
                        " | preferred (mostly top views, uniform in-plane) [uniform]")
    p.add_argument("--ctf", action="store_true", help="apply a CTF (defocus drawn in --defocus range)")
    p.add_argument("--defocus", nargs=2, type=_positive_float, default=(1.0, 2.5), metavar=("MIN", "MAX"),
                   help="defocus range in µm (underfocus positive) [1.0 2.5]")
    p.add_argument("--voltage", type=_positive_float, default=300.0, help="voltage in kV [300]")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm [2.7]")
    p.add_argument("--amp-contrast", type=float, default=0.1, help="amplitude contrast fraction [0.1]")
    p.add_argument("--max-shift", type=float, default=0.0, help="origins uniform in ±MAX px per axis [0]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset

    spec = SimulationSpec(n_particles=args.n, snr=None if args.snr == 0 else args.snr,
                          pose_distribution=args.pose_dist, ctf=args.ctf, defocus_min_um=args.defocus[0],
                          defocus_max_um=args.defocus[1], voltage_kV=args.voltage, cs_mm=args.cs,
                          amplitude_contrast=args.amp_contrast, max_shift_px=args.max_shift, seed=args.seed)
    spec.validate()
    particles = simulate_dataset(args.map, spec, args.out, progress=_progress_printer("simulating"))
    print(f"wrote {len(particles)} particles ({particles.box} px, {particles.pixel_size:.3f} Å/px) to "
          f"{args.out / 'particles.star'}")
    return 0


# ---------------------------------------------------------------------------------------------- import-cs
def _add_import_cs(sub):
    p = sub.add_parser("import-cs", help="convert a cryoSPARC .cs file to a RELION 3.1 star file",
                       description="Read a cryoSPARC particle .cs (and its passthrough file) and write a RELION "
                                   "3.1 star file with the same poses, shifts and CTF.")
    p.add_argument("--cs", required=True, type=_existing_file, help="cryoSPARC particles .cs file")
    p.add_argument("--passthrough", type=_existing_file, help="passthrough .cs of the same job (CTF, blobs)")
    p.add_argument("--blob-root", type=Path,
                   help="folder the .cs blob paths are relative to (the cryoSPARC project folder)")
    p.add_argument("--pixel-size", type=_positive_float, help="override the pixel size (Å/px)")
    p.add_argument("--out", required=True, type=Path, help="output .star file")
    p.set_defaults(func=_run_import_cs)


def _run_import_cs(args) -> int:
    from bayespose.core.io.cryosparc import read_cryosparc
    from bayespose.core.io.relion_star import write_star

    particles = read_cryosparc(args.cs, passthrough_path=args.passthrough, blob_root=args.blob_root,
                               pixel_size=args.pixel_size)
    write_star(args.out, particles)
    aligned = "with poses" if particles.has_alignment else "without poses"
    print(f"wrote {len(particles)} particles {aligned} to {args.out}")
    return 0


# -------------------------------------------------------------------------------------------- plot-poses
def _add_plot_poses(sub):
    p = sub.add_parser("plot-poses", help="plot the pose distribution of a star file (PNG)",
                       description="Viewing-direction density (Mollweide) and in-plane angle histogram.")
    p.add_argument("--particles", required=True, type=_existing_file, help="RELION star file with angles")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.set_defaults(func=_run_plot_poses)


def _run_plot_poses(args) -> int:
    from bayespose.core.io.relion_star import read_star
    from bayespose.plotting.poses import plot_pose_distribution

    particles = read_star(args.particles)
    if not particles.has_alignment:
        raise CliError(f"{args.particles} has no rlnAngleRot/Tilt/Psi columns: no poses to plot")
    plot_pose_distribution(particles.rotations, args.out, title=Path(args.particles).name)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ assign
_MAP_PIXEL_RTOL = 0.01  # the map's and the particles' pixel sizes must agree within 1 %


def _add_assign(sub):
    p = sub.add_parser("assign", help="Bayesian pose assignment (MMSE / MAP / MLE) of particles against a map",
                       description="For every particle of a RELION star file, the posterior over rotations and "
                                   "shifts against a reference map (Gaussian noise, per-particle CTF); writes a "
                                   "RELION 3.1 star with the chosen poses (rlnAngleRot/Tilt/Psi, "
                                   "rlnOriginX/YAngst), rlnMaxValueProbDistribution, rlnNrOfSignificantSamples, "
                                   "bpExpectedErrorDeg (posterior expected angular error, degrees), "
                                   "bpConcentration, bpLogEvidence and the other estimators' angles.")
    p.add_argument("--particles", required=True, type=_existing_file, help="input RELION star file (with CTF)")
    p.add_argument("--map", required=True, type=_existing_file,
                   help="reference map (MRC) with the particles' box and pixel size (within 1 %%)")
    p.add_argument("--mask", type=_existing_file, help="optional mask (MRC, map box): the map is multiplied by it")
    p.add_argument("--sym", default="C1", help="point group in RELION's notation (C1, Cn, Dn, T, O, I, I1-I4) [C1]")
    p.add_argument("--estimator", choices=("mmse", "map", "mle"), default="mmse",
                   help="pose written to rlnAngle*/rlnOrigin*: posterior mean (mmse), most probable (map) or best "
                        "likelihood (mle) [mmse]")
    p.add_argument("--prior", default="uniform",
                   help="rotation prior: uniform | igso3:ETA (isotropic Gaussian around the identity, ETA in rad) | "
                        "local:DEG (Gaussian around each input pose, local grid of ±DEG; needs star angles) | "
                        "preferred[:ROT,TILT,KAPPA,FRACTION] (preferred viewing direction) [uniform]")
    p.add_argument("--healpix-order", type=int, choices=range(0, 5), default=2, metavar="R",
                   help="global grid: HEALPix order 0-4 (spacing 60°/2^R: 60, 30, 15, 7.5, 3.75°) [2]")
    p.add_argument("--refine-levels", type=int, choices=range(0, 4), default=2, metavar="L",
                   help="coarse-to-fine halvings of the grid in the significant cells, 0-3 [2]")
    p.add_argument("--local-step", type=_positive_float, metavar="DEG", help="local grid step in degrees [DEG/4]")
    p.add_argument("--max-res", type=_positive_float, metavar="A",
                   help="highest resolution scored, in Å [Nyquist]")
    p.add_argument("--shift-range", type=float, default=3.0, metavar="PX", help="shift search radius in px [3]")
    p.add_argument("--shift-step", type=_positive_float, default=1.0, metavar="PX", help="shift grid step in px [1]")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to score: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--out", required=True, type=Path, help="output RELION 3.1 star file")
    p.set_defaults(func=_run_assign)


def _check_map_matches(volume, map_pixel_size: float, particles, map_path: Path) -> None:
    """One-line errors for a map whose box or pixel size (header, Å/px) differs from the particles'."""
    if volume.shape[0] != particles.box:
        raise CliError(f"the map {map_path} has a box of {volume.shape[0]} px but the particles have "
                       f"{particles.box} px")
    if map_pixel_size > 0 and abs(map_pixel_size - particles.pixel_size) > _MAP_PIXEL_RTOL * particles.pixel_size:
        raise CliError(f"the map {map_path} has {map_pixel_size:.4f} Å/px but the particles have "
                       f"{particles.pixel_size:.4f} Å/px (more than 1 % apart)")


def _read_particles_and_map(particles_path: Path, map_path: Path):
    """``(particles, map)`` read from a RELION star file and an MRC map, with :func:`_check_map_matches`'s checks
    (same box; pixel sizes within 1 %) and a note on stderr when the map header has no pixel size (Å/px); the
    particles' pixel size is then assumed."""
    from bayespose.core.io.mrc import read_map
    from bayespose.core.io.relion_star import read_star

    particles = read_star(particles_path)
    volume, map_px = read_map(map_path)
    _check_map_matches(volume, map_px, particles, map_path)
    if map_px <= 0:
        sys.stderr.write(f"note: {map_path} has no pixel size in its header; assuming the particles' "
                         f"{particles.pixel_size:.4f} Å/px\n")
    return particles, volume


def _read_mask(mask_path: Path, shape: tuple[int, ...]):
    """The mask (MRC) at ``mask_path``; a one-line error when its shape (voxels) differs from the map's ``shape``."""
    from bayespose.core.io.mrc import read_map

    mask, _ = read_map(mask_path)
    if mask.shape != shape:
        raise CliError(f"the mask {mask_path} has shape {mask.shape}, the map {shape}")
    return mask


def _run_assign(args) -> int:
    from dataclasses import replace

    import numpy as np

    from bayespose.core.assign.engine import PoseSearch, assign_poses
    from bayespose.core.geometry.priors import prior_from_spec
    from bayespose.core.io.relion_star import write_star

    particles, volume = _read_particles_and_map(args.particles, args.map)
    if args.mask is not None:
        volume = volume * _read_mask(args.mask, volume.shape)
    if args.prior.strip().lower().startswith("local") and not particles.has_alignment:
        raise CliError(f"--prior {args.prior} searches around the input poses, but {args.particles} has no "
                       "rlnAngleRot/Tilt/Psi columns")
    if not particles.has_ctf:
        sys.stderr.write(f"note: {args.particles} has no CTF columns; scoring without CTF\n")
    spec = prior_from_spec(args.prior, particles.rotations)
    search = PoseSearch(healpix_order=args.healpix_order, refine_levels=args.refine_levels,
                        max_resolution_A=args.max_res, shift_range_px=args.shift_range,
                        shift_step_px=args.shift_step, symmetry=args.sym.strip().upper(),
                        local_range_deg=spec.local_range_deg, local_step_deg=args.local_step,
                        device=None if args.device == "auto" else args.device, threads=args.threads)
    search.validate()
    result = assign_poses(particles, volume, search, spec.prior, progress=_progress_printer("assigning"))
    # columns of an earlier bayespose run (e.g. another estimator's angles) would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    write_star(args.out, result.to_particle_set(fresh, args.estimator))
    print(f"assigned {len(particles)} particles ({args.estimator.upper()}, prior {spec.prior.describe()}): median "
          f"expected error {np.median(result.expected_error_deg):.2f}°, median pmax {np.median(result.pmax):.3f}, "
          f"{result.timings.get('total_s', 0.0):.1f} s; wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- train / predict
def _add_train(sub):
    p = sub.add_parser("train", help="train a pose-prediction network on aligned particles",
                       description="Supervised training of a network that predicts each particle's pose "
                                   "distribution over SO(3) from its image (Image2Sphere-style grid head, or a "
                                   "quaternion-regression baseline), on particles whose poses are known (a RELION "
                                   "refinement or a simulation). Writes the best-validation checkpoint MODEL.pt "
                                   "(a resumable last state next to it) and MODEL_training.png (loss and "
                                   "validation-error curves).")
    p.add_argument("--particles", required=True, type=_existing_file,
                   help="RELION star file of aligned particles (rlnAngleRot/Tilt/Psi, CTF if any)")
    p.add_argument("--sym", default="C1", help="point group of the particles in RELION's notation; symmetry mates "
                                               "share the training target [C1]")
    p.add_argument("--model", choices=("so3grid", "quaternion"), default="so3grid",
                   help="so3grid: distribution on a HEALPix x in-plane grid (Image2Sphere-style e3nn head); "
                        "quaternion: regression baseline (one pose) [so3grid]")
    p.add_argument("--epochs", type=_positive_int, default=30, help="maximum number of epochs [30]")
    p.add_argument("--net-box", type=_positive_int, default=32, metavar="PX",
                   help="images are Fourier-cropped to this box (px) before the network: a multiple of 4, at least 8 "
                        "and at most the particle box [32]")
    p.add_argument("--grid-order", type=int, choices=range(0, 4), default=2, metavar="R",
                   help="HEALPix order of the output grid of so3grid, 0-3 (15° spacing at 2) [2]")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="particles per optimisation step [64]")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (Adam) [0.001]")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the particles held out for validation and early stopping, in (0, 1) [0.1]")
    p.add_argument("--patience", type=_positive_int, default=5,
                   help="stop after this many epochs without a better validation loss [5]")
    p.add_argument("--no-augment", action="store_true", help="no in-plane rotation augmentation of the images")
    p.add_argument("--ctf-correction", choices=("phase_flip", "none"), default="phase_flip",
                   help="phase-flip the images with their CTF before the network (needs CTF columns), or not "
                        "[phase_flip]")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, initialisation, batches) [0]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from the last state saved next to --out")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint (.pt)")
    p.set_defaults(func=_run_train)


def _training_png(checkpoint: Path) -> Path:
    """``MODEL.pt`` -> ``MODEL_training.png`` (same folder)."""
    return checkpoint.with_name(checkpoint.stem + "_training.png")


def _run_train(args) -> int:
    from bayespose.core.deep import TrainConfig, train_pose_network
    from bayespose.core.geometry.symmetry import symmetry_group
    from bayespose.core.io.relion_star import read_star
    from bayespose.plotting.deep import plot_training_history

    if not 0.0 < args.val_fraction < 1.0:
        raise CliError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.net_box < 8 or args.net_box % 4:
        raise CliError(f"--net-box must be a multiple of 4 and at least 8 px, got {args.net_box}")
    symmetry = args.sym.strip().upper()
    symmetry_group(symmetry)  # ValueError with the accepted names
    particles = read_star(args.particles)
    if not particles.has_alignment:
        raise CliError(f"{args.particles} has no rlnAngleRot/Tilt/Psi columns: training needs particles with known "
                       "poses (e.g. from a refinement or a simulation)")
    if args.net_box > particles.box:
        raise CliError(f"--net-box {args.net_box} px is larger than the particles' box ({particles.box} px); images "
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
    result = train_pose_network(particles, config, args.out, progress=_progress_printer, resume=args.resume)
    png = _training_png(Path(result.checkpoint))
    plot_training_history(result.history, png, best_epoch=result.best_epoch,
                          title=f"{args.model} network on {len(particles)} particles ({Path(args.particles).name})")
    best = next((row for row in result.history if row.get("epoch") == result.best_epoch), None)
    error = (f", validation median error {best['val_median_error_deg']:.1f}°"
             if best and best.get("val_median_error_deg") is not None else "")
    print(f"trained a {args.model} network on {len(particles)} particles: best epoch {result.best_epoch} of "
          f"{len(result.history)}{error}; wrote {result.checkpoint} and {png}")
    return 0


def _add_predict(sub):
    p = sub.add_parser("predict", help="predict particle poses with a trained network (optionally + MMSE)",
                       description="Predict each particle's pose distribution with a network from 'bayespose "
                                   "train' and write a RELION 3.1 star with the most probable pose "
                                   "(rlnAngleRot/Tilt/Psi; origins kept) and bpDeepConfidence / "
                                   "bpDeepTopProbability columns. With --refine-map, the predicted distribution "
                                   "becomes the prior of an MMSE assignment restricted to the most probable "
                                   "predicted regions (deep prior MMSE); particles whose best pose there does not "
                                   "fit the data are re-assigned by the global search (--fallback). The star then "
                                   "carries the MMSE poses, the posterior columns of 'bayespose assign' and "
                                   "bpDeepFitZ / bpDeepFallback. Also writes OUT_poses.png (pose "
                                   "distribution) and, when the input star has poses, OUT_errors.png (angles "
                                   "between the predicted and the input poses).")
    p.add_argument("--model", required=True, type=_existing_file, help="network checkpoint from 'bayespose train'")
    p.add_argument("--particles", required=True, type=_existing_file,
                   help="RELION star file with the network's box and pixel size (within 0.1 %%)")
    p.add_argument("--top-k", type=_positive_int, default=8, metavar="K",
                   help="number of most probable grid poses kept per particle (searched around by "
                        "--refine-map with --seed-mass none) [8]")
    p.add_argument("--refine-map", type=_existing_file, metavar="MAP",
                   help="reference map (MRC, the particles' box and pixel size): refine with the deep prior MMSE")
    p.add_argument("--local-range", type=_positive_float, metavar="DEG",
                   help="with --refine-map: local grid half-width around each top-K pose, degrees [engine default]")
    p.add_argument("--shift-range", type=float, default=3.0, metavar="PX",
                   help="with --refine-map: shift search radius in px [3]")
    p.add_argument("--shift-step", type=_positive_float, default=1.0, metavar="PX",
                   help="with --refine-map: shift grid step in px [1]")
    p.add_argument("--max-res", type=_positive_float, metavar="A",
                   help="with --refine-map: highest resolution scored, in Å [Nyquist]")
    p.add_argument("--seed-mass", type=_seed_mass, metavar="F|none",
                   help="with --refine-map: search around the predicted cells that hold this fraction of the "
                        "network's probability (wider for uncertain particles; 'none' = the top-K poses) "
                        "[engine default, 0.99]")
    p.add_argument("--fallback", type=_fallback_setting, default="auto", metavar="auto|none|Z",
                   help="with --refine-map: particles whose best deep-prior pose does not fit the data (fit "
                        "z-score below Z; auto = the engine's measured default, -1.5) are re-assigned by the global "
                        "search; 'none' keeps every deep-prior result [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="particles per network batch [256]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--out", required=True, type=Path, help="output RELION 3.1 star file")
    p.set_defaults(func=_run_predict)


def _seed_mass(text: str):
    """--seed-mass: a fraction in (0, 1], or 'none' (returned as the string) for the fixed top-K seeds."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'none', got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'none', got {value}")
    return value


def _fallback_setting(text: str):
    """--fallback: 'auto', 'none' or a finite z threshold (float)."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return word
    try:
        value = float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a z threshold (a number), got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite z threshold, got {text!r}")
    return value


def _load_network(path: Path, device: str | None):
    """:func:`bayespose.core.deep.load_pose_network` with a one-line error for a file that is no checkpoint."""
    import pickle

    from bayespose.core.deep import load_pose_network

    try:
        return load_pose_network(path, device=device)
    except (CliError, ValueError, FileNotFoundError):
        raise
    except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{path} is not a bayespose pose-network checkpoint ({first})") from None


_NETWORK_PIXEL_RTOL = 1e-3  # particles and network: pixel sizes within 0.1 % (what predict_poses accepts)


def _check_network_matches(network, particles, model_path: Path) -> None:
    """One-line errors for particles whose box (px) or pixel size (Å/px, 0.1 %) differ from the training
    particles'.

    A network sees Fourier-cropped images in pixel units: particles at another pixel size show the molecule at
    another magnification, so their predictions would be silently wrong; resample them first.
    """
    if int(network.box) != particles.box:
        raise CliError(f"the network {model_path} was trained on {network.box} px particles but these have "
                       f"{particles.box} px; re-extract or resize them (e.g. relion_image_handler --new_box)")
    if abs(float(network.pixel_size) - particles.pixel_size) > _NETWORK_PIXEL_RTOL * float(network.pixel_size):
        raise CliError(f"the network {model_path} was trained at {float(network.pixel_size):.4f} Å/px but the "
                       f"particles have {particles.pixel_size:.4f} Å/px (more than 0.1 % apart); rescale them "
                       "(e.g. relion_image_handler --rescale_angpix)")


def _prediction_pngs(out: Path) -> tuple[Path, Path]:
    """``OUT.star`` -> (``OUT_poses.png``, ``OUT_errors.png``) next to it."""
    return out.with_name(out.stem + "_poses.png"), out.with_name(out.stem + "_errors.png")


def _run_predict(args) -> int:
    from dataclasses import replace

    import numpy as np
    import torch

    from bayespose.core.assign.engine import PoseSearch
    from bayespose.core.deep import deep_prior_assign, pose_error_metrics, predict_poses
    from bayespose.core.io.mrc import read_map
    from bayespose.core.io.relion_star import read_star, write_star
    from bayespose.plotting.deep import plot_angular_errors
    from bayespose.plotting.poses import plot_pose_distribution

    device = None if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    particles = read_star(args.particles)
    network = _load_network(args.model, device)
    _check_network_matches(network, particles, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    volume = None
    if args.refine_map is not None:
        volume, map_px = read_map(args.refine_map)
        _check_map_matches(volume, map_px, particles, args.refine_map)
        if not particles.has_ctf:
            sys.stderr.write(f"note: {args.particles} has no CTF columns; the MMSE refinement scores without CTF\n")
    prediction = predict_poses(network, particles, top_k=args.top_k, batch_size=args.batch_size, device=device,
                               progress=_progress_printer("predicting"))
    # columns of an earlier bayespose run would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    output = prediction.to_particle_set(fresh)
    result = None
    if volume is not None:
        search = PoseSearch(shift_range_px=args.shift_range, shift_step_px=args.shift_step,
                            max_resolution_A=args.max_res, symmetry=str(network.symmetry).upper(), device=device,
                            threads=args.threads)
        search.validate()
        seeds = {} if args.seed_mass is None else {"seed_mass": None if args.seed_mass == "none" else args.seed_mass}
        result = deep_prior_assign(particles, prediction, volume, search, progress=_progress_printer("refining"),
                                   local_range_deg=args.local_range, fallback=args.fallback, **seeds)
        output = result.to_particle_set(output, "mmse")
    write_star(args.out, output)
    poses_png, errors_png = _prediction_pngs(args.out)
    what = "deep-prior MMSE" if result is not None else "network"
    plot_pose_distribution(output.rotations, poses_png, title=f"{what} poses of {len(particles)} particles",
                           reference=particles.rotations)
    written = [str(args.out), str(poses_png)]
    summary = (f"predicted {len(particles)} particles ({network.config.model}, top {args.top_k}): median "
               f"confidence {np.median(prediction.confidence):.3f}")
    if result is not None:
        summary += (f"; deep-prior MMSE: median expected error {np.median(result.expected_error_deg):.2f}°, "
                    f"{result.timings.get('fallback_particles', 0)} particles re-assigned by the global search "
                    f"(fallback {args.fallback}), {result.timings.get('scored_rotations_per_particle', 0.0):.0f} "
                    f"rotations scored per particle, {result.timings.get('total_s', 0.0):.1f} s")
    if particles.has_alignment:
        symmetry = str(network.symmetry).upper()
        errors = {"network": pose_error_metrics(prediction.rotations, particles.rotations, symmetry)}
        if result is not None:
            errors["deep-prior MMSE"] = pose_error_metrics(result.mmse_rotations, particles.rotations, symmetry)
        summary += "; vs the input poses: " + ", ".join(f"{k} median {m['median_deg']:.1f}°"
                                                         for k, m in errors.items())
        plot_angular_errors(_errors_to_input(prediction, result, particles, symmetry), errors_png,
                            title=f"angles to the input poses ({len(particles)} particles, {symmetry})")
        written.append(str(errors_png))
    print(f"{summary}; wrote {', '.join(written)}")
    return 0


def _errors_to_input(prediction, result, particles, symmetry: str) -> dict:
    """Symmetry-aware angles (degrees) between the input poses and the network mode / the MMSE poses."""
    from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group

    group = symmetry_group(symmetry)
    errors = {"network mode": symmetric_geodesic_distance_deg(prediction.rotations, particles.rotations, group)}
    if result is not None:
        errors["deep-prior MMSE"] = symmetric_geodesic_distance_deg(result.mmse_rotations, particles.rotations, group)
    return errors


# ------------------------------------------------------------------------------------------------ refine
_MIN_PER_HALF = 10  # gold-standard half sets: the FSC of fewer particles is meaningless


def _add_refine(sub):
    p = sub.add_parser("refine", help="EM 3D refinement with gold-standard half sets and rotational-prior estimation",
                       description="Refine a map from particles by expectation-maximisation: soft (posterior-weighted)"
                                   " or hard assignment over a HEALPix x in-plane x shift grid, Wiener-filtered "
                                   "reconstruction of two independent half maps, FSC resolution (0.143) and, with "
                                   "--prior estimate, the viewing-direction distribution (preferred orientation) "
                                   "as the rotation prior of the next iteration. Writes DIR/map.mrc, half1.mrc, "
                                   "half2.mrc, fsc.csv, particles.star (RELION 3.1, final MMSE poses), prior.npy/"
                                   ".json, history.json/.csv and PNG figures; DIR/iterations/ keeps the "
                                   "per-iteration files (for --resume).")
    p.add_argument("--particles", required=True, type=_existing_file,
                   help="input RELION star file with CTF (poses, if any, are not used; rlnRandomSubset 1/2, if "
                        "present, sets the half sets)")
    p.add_argument("--map", required=True, type=_existing_file,
                   help="initial map (MRC) with the particles' box and pixel size (within 1 %%); it is low-passed to"
                        " --lowpass first")
    p.add_argument("--mask", type=_existing_file,
                   help="optional soft mask (MRC, map box, values 0..1) applied to the reference maps")
    p.add_argument("--sym", default="C1", help="point group in RELION's notation (C1, Cn, Dn, T, O, I, I1-I4) [C1]")
    p.add_argument("--iters", type=_positive_int, metavar="N", help="maximum number of EM iterations [engine default]")
    p.add_argument("--prior", choices=("uniform", "estimate"), default="uniform",
                   help="rotation prior: uniform (Haar) or estimate the viewing-direction distribution each "
                        "iteration (M-step; in-plane uniform) [uniform]")
    p.add_argument("--mode", choices=("soft", "hard"), default="soft",
                   help="soft: posterior-weighted (EM); hard: best pose only (the MLE baseline) [soft]")
    p.add_argument("--lowpass", type=_positive_float, metavar="A",
                   help="initial low-pass filter of the map in Å (keeps the start free of detail it may have wrong) "
                        "[engine default]")
    p.add_argument("--healpix-order", type=int, choices=range(0, 7), metavar="R",
                   help="coarse global grid scored exhaustively, HEALPix order 0-6 (60°/2^R: 60, 30, 15, 7.5, 3.75°"
                        "...) [engine default]")
    p.add_argument("--max-healpix-order", type=int, choices=range(0, 7), metavar="R",
                   help="finest HEALPix order; significant cells are refined coarse-to-fine as the resolution asks "
                        "[engine default]")
    p.add_argument("--prior-order", type=int, choices=range(0, 5), metavar="R",
                   help="HEALPix order of the estimated viewing-direction density (--prior estimate) [engine "
                        "default]")
    p.add_argument("--shift-range", type=float, metavar="PX", help="shift search radius in px [engine default]")
    p.add_argument("--shift-step", type=_positive_float, metavar="PX", help="shift grid step in px [engine default]")
    p.add_argument("--diameter", type=_positive_float, metavar="A",
                   help="particle diameter in Å (angular sampling needed at the edge; solvent mask) [engine "
                        "default, from the box]")
    p.add_argument("--no-ctf", action="store_true",
                   help="ignore the CTF (only for simulated particles without CTF or CTF-corrected images); "
                        "without it, particles without CTF columns are an error")
    p.add_argument("--seed", type=int, default=0, help="random seed (half-set split when the star has none) [0]")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to compute: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--resume", action="store_true",
                   help="continue the refinement kept in DIR/iterations/ instead of starting anew")
    p.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty unless --resume)")
    p.set_defaults(func=_run_refine)


def _check_half_sizes(particles) -> None:
    """One-line error when a gold-standard half set would have fewer than ``_MIN_PER_HALF`` particles (the halves
    come from rlnRandomSubset when every particle has 1 or 2, else from a random split, as in the engine)."""
    import numpy as np

    n = len(particles)
    half = particles.half_set
    if half is not None and set(np.unique(half).tolist()) == {1, 2}:
        sizes = [int(np.sum(half == h)) for h in (1, 2)]
        where = "rlnRandomSubset"
    else:
        sizes = [n - n // 2, n // 2]
        where = "a random split"
    if min(sizes) < _MIN_PER_HALF:
        raise CliError(f"too few particles: {n} give half sets of {sizes[0]} and {sizes[1]} ({where}); EM "
                       f"refinement needs at least {_MIN_PER_HALF} per half set")


def _check_out_dir(out: Path, resume: bool) -> Path:
    """The engine's working folder ``out/iterations``; refuses to overwrite an earlier run unless resuming."""
    work = out / "iterations"
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if resume:
        if not work.is_dir() or not any(work.iterdir()):
            raise CliError(f"--resume: {work} holds no earlier refinement to continue")
    elif out.is_dir() and any(out.iterdir()):
        raise CliError(f"--out {out} is not empty (an earlier run?); use --resume to continue it or choose a new "
                       "folder")
    return work


def _run_refine(args) -> int:
    import inspect
    from dataclasses import replace

    import numpy as np

    from bayespose.core.refine.engine import RefineConfig, refine
    from bayespose.core.refine.outputs import write_refine_outputs

    particles, volume = _read_particles_and_map(args.particles, args.map)
    if args.no_ctf:
        particles = replace(particles, ctf=None)
    elif not particles.has_ctf:
        raise CliError(f"{args.particles} has no CTF columns (rlnDefocusU/V/Angle), which the likelihood and the "
                       "reconstruction need; pass --no-ctf for simulated particles without CTF or CTF-corrected "
                       "images")
    _check_half_sizes(particles)
    engine = inspect.signature(refine).parameters
    extra_args = {}
    if args.mask is not None:
        mask = _read_mask(args.mask, volume.shape)
        if not np.any(mask > 0):
            raise CliError(f"the mask {args.mask} is empty (no voxel > 0)")
        if "mask" not in engine:
            raise CliError("this version of the refinement engine does not support --mask")
        extra_args["mask"] = mask
    work = _check_out_dir(args.out, args.resume)
    if args.resume:
        if "resume" not in engine:
            raise CliError("this version of the refinement engine does not support --resume")
        extra_args["resume"] = True
    given = {"iterations": args.iters, "healpix_order": args.healpix_order, "max_healpix_order":
             args.max_healpix_order, "prior_order": args.prior_order, "shift_range_px": args.shift_range,
             "shift_step_px": args.shift_step, "initial_lowpass_A": args.lowpass,
             "particle_diameter_A": args.diameter, "threads": args.threads}
    config = RefineConfig(symmetry=args.sym.strip().upper(), mode=args.mode, prior_mode=args.prior,
                          device=None if args.device == "auto" else args.device, seed=args.seed,
                          **{k: v for k, v in given.items() if v is not None})  # unset: the engine's defaults
    if config.healpix_order > config.max_healpix_order:
        raise CliError(f"the coarse HEALPix order {config.healpix_order} is finer than the finest "
                       f"{config.max_healpix_order} (--healpix-order / --max-healpix-order)")
    config.validate()
    print(f"refining {len(particles)} particles: {config.iterations} iterations max, HEALPix order "
          f"{config.healpix_order}..{config.max_healpix_order}, shifts ±{config.shift_range_px:g} px step "
          f"{config.shift_step_px:g} px, initial low-pass {config.initial_lowpass_A:g} Å, {config.mode}, "
          f"{config.prior_mode} prior, symmetry {config.symmetry}")
    # columns of an earlier bayespose run (e.g. assign's estimator angles) would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    start = time.time()
    result = refine(fresh, volume, config, out_dir=work, log=print, progress=_progress_printer, **extra_args)
    write_refine_outputs(result, args.out, pixel_size=particles.pixel_size, particles_template=fresh, config=config,
                         title=Path(args.particles).name)
    print(f"refined {len(particles)} particles in {len(result.history)} iteration(s) ({args.mode}, {args.prior} "
          f"prior, symmetry {config.symmetry}): resolution {result.resolution_A:.1f} Å (FSC 0.143), "
          f"{time.time() - start:.0f} s; wrote {args.out / 'map.mrc'}, half maps, fsc.csv, particles.star, prior "
          f"and figures in {args.out}")
    return 0


# -------------------------------------------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="run the end-to-end demo on the map shipped with bayespose",
                       description="Simulate particles with known poses from the shipped 3J9G map, check the "
                                   "RELION star round trip, and plot poses and images.")
    p.add_argument("--out", type=Path, default=Path("bayespose_demo"), help="output folder [./bayespose_demo]")
    p.add_argument("--n", type=_positive_int, default=500, help="number of particles [500]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from bayespose.demo import run_demo

    run_demo(args.out, n_particles=args.n, seed=args.seed, progress=_progress_printer)
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from bayespose import __version__

    parser = _Parser(prog="bayespose",
                     description="Bayesian and learned particle-pose estimation for cryo-EM (plain-file commands; "
                                 "the same jobs exist as Scipion protocols).")
    parser.add_argument("--version", action="version", version=f"bayespose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_simulate, _add_import_cs, _add_plot_poses, _add_assign, _add_refine, _add_train, _add_predict,
                _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (CliError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        sys.stderr.write(f"bayespose {args.command}: error: {exc}\n")
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("bayespose: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
