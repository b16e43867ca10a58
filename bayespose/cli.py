"""The ``bayespose`` command: the same jobs as the Scipion protocols, on plain ``.star``/``.mrcs``/``.mrc``/``.cs`` files.

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
    from .core.simulate_dataset import SimulationSpec, simulate_dataset

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
    from .core.io.cryosparc import read_cryosparc
    from .core.io.relion_star import write_star

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
    from .core.io.relion_star import read_star
    from .core.plots import plot_pose_distribution

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


def _run_assign(args) -> int:
    from dataclasses import replace

    import numpy as np

    from .core.io.mrc import read_map
    from .core.io.relion_star import read_star, write_star
    from .core.posterior import PoseSearch, assign_poses
    from .core.priors import prior_from_spec

    particles = read_star(args.particles)
    volume, map_px = read_map(args.map)
    _check_map_matches(volume, map_px, particles, args.map)
    if map_px <= 0:
        sys.stderr.write(f"note: {args.map} has no pixel size in its header; assuming the particles' "
                         f"{particles.pixel_size:.4f} Å/px\n")
    if args.mask is not None:
        mask, _ = read_map(args.mask)
        if mask.shape != volume.shape:
            raise CliError(f"the mask {args.mask} has shape {mask.shape}, the map {volume.shape}")
        volume = volume * mask
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
    from .demo import run_demo

    run_demo(args.out, n_particles=args.n, seed=args.seed, progress=_progress_printer)
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="bayespose",
                     description="Bayesian and learned particle-pose estimation for cryo-EM (plain-file commands; "
                                 "the same jobs exist as Scipion protocols).")
    parser.add_argument("--version", action="version", version=f"bayespose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_simulate, _add_import_cs, _add_plot_poses, _add_assign, _add_demo):
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
