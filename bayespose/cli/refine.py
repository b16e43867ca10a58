"""``bayespose refine``: EM 3D refinement with gold-standard half sets and prior estimation."""

from __future__ import annotations

import time
from pathlib import Path

from bayespose.cli._common import (
    CliError,
    UsageError,
    check_outputs,
    existing_file,
    positive_float,
    positive_int,
    progress_printer,
    read_mask,
    read_particles_and_map,
    usage_errors,
)
from bayespose.core.assign.search import PoseSearch
from bayespose.core.refine.config import HALF_SPLITS, MAX_FINEST_ORDER, MODES, PRIOR_MODES


def add_parser(sub) -> None:
    p = sub.add_parser("refine", help="EM 3D refinement with gold-standard half sets and rotational-prior estimation",
                       description="Refine a map from particles by expectation-maximisation: soft (posterior-weighted)"
                                   " or hard assignment over a HEALPix x in-plane x shift grid, Wiener-filtered "
                                   "reconstruction of two independent half maps, FSC resolution (0.143) and, with "
                                   "--prior estimate, the viewing-direction distribution (preferred orientation) "
                                   "as the rotation prior of the next iteration. Writes DIR/map.mrc, half1.mrc, "
                                   "half2.mrc, fsc.csv, particles.star (RELION 3.1, final MMSE poses), prior.npy/"
                                   ".json, history.json/.csv and PNG figures; DIR/iterations/ keeps the "
                                   "per-iteration files (for --resume).")
    p.add_argument("--particles", required=True, type=existing_file,
                   help="input RELION star file with CTF (poses, if any, are not used; rlnRandomSubset 1/2, if "
                        "present, sets the half sets)")
    p.add_argument("--map", required=True, type=existing_file,
                   help="initial map (MRC) with the particles' box and pixel size (within 1 %%); it is low-passed to"
                        " --lowpass first")
    p.add_argument("--mask", type=existing_file,
                   help="optional soft mask (MRC, map box, values 0..1) applied to the reference maps and the FSC; "
                        "without it, the solvent sphere of --diameter and each half map's own envelope")
    p.add_argument("--no-envelope-mask", action="store_true",
                   help="without --mask, mask the references by the solvent sphere only, not also by each half "
                        "map's envelope (its 15 Å density above 0.2 of the maximum, extended 6-14 Å)")
    p.add_argument("--sym", default="C1", help="point group in RELION's notation (C1, Cn, Dn, T, O, I, I1-I4) [C1]")
    p.add_argument("--iters", type=positive_int, metavar="N", help="maximum number of EM iterations [engine default]")
    p.add_argument("--prior", choices=PRIOR_MODES, default="uniform",
                   help="rotation prior: uniform (Haar) or estimate the viewing-direction distribution each "
                        "iteration (M-step; in-plane uniform) [uniform]")
    p.add_argument("--mode", choices=MODES, default="soft",
                   help="soft: posterior-weighted (EM); hard: best pose only (the MLE baseline) [soft]")
    p.add_argument("--lowpass", type=positive_float, metavar="A",
                   help="initial low-pass filter of the map in Å (keeps the start free of detail it may have wrong) "
                        "[engine default]")
    p.add_argument("--healpix-order", type=int, choices=PoseSearch.HEALPIX_ORDERS, metavar="R",
                   help=f"coarse global grid scored exhaustively, HEALPix order 0-{PoseSearch.MAX_HEALPIX_ORDER} "
                        "(60°/2^R: 60, 30, 15, 7.5, 3.75°) [engine default]")
    p.add_argument("--max-healpix-order", type=int, choices=range(0, MAX_FINEST_ORDER + 1), metavar="R",
                   help="finest HEALPix order; significant cells are refined coarse-to-fine as far as the resolution "
                        "or the poses' expected error ask (6 = 0.94°) [engine default]")
    p.add_argument("--prior-order", type=int, choices=range(0, 5), metavar="R",
                   help="HEALPix order of the estimated viewing-direction density (--prior estimate) [engine "
                        "default]")
    p.add_argument("--shift-range", type=float, metavar="PX", help="shift search radius in px [engine default]")
    p.add_argument("--shift-step", type=positive_float, metavar="PX", help="shift grid step in px [engine default]")
    p.add_argument("--diameter", type=positive_float, metavar="A",
                   help="particle diameter in Å (angular sampling needed at the edge; solvent mask) [engine "
                        "default, from the box]")
    p.add_argument("--no-ctf", action="store_true",
                   help="ignore the CTF (only for simulated particles without CTF or CTF-corrected images); "
                        "without it, particles without CTF columns are an error")
    p.add_argument("--half-sets", choices=HALF_SPLITS, default="input",
                   help="gold-standard half sets: input = the star's rlnRandomSubset when every particle has 1 or 2 "
                        "(else a random split), random = a random split (--seed) [input]")
    p.add_argument("--seed", type=int, default=0, help="random seed (half-set split, noise estimate) [0]")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to compute: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--resume", action="store_true",
                   help="continue the refinement kept in DIR/iterations/ (same particles, maps and settings; --iters "
                        "may grow) instead of starting anew; with no complete iteration there, start from the "
                        "beginning")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: new, empty, or holding an unfinished run (replaced) unless --resume")
    p.set_defaults(func=run)


def _check_out_dir(out: Path, resume: bool) -> Path:
    """The engine's working folder ``out/iterations``. Without ``resume``, ``out`` must be new, empty or hold only
    an unfinished refinement (its ``iterations/`` files, no final outputs), which the new run replaces; a finished
    run or other files need a new folder or ``--resume``."""
    from bayespose.core.refine.state import engine_files

    work = out / "iterations"
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if resume:
        if not work.is_dir():
            raise CliError(f"--resume: {work} holds no earlier refinement to continue")
    elif out.is_dir() and any(out.iterdir()):
        entries = list(out.iterdir())
        unfinished = (entries == [work] and work.is_dir()
                      and {p.name for p in work.iterdir()} == {p.name for p in engine_files(work)})
        if not unfinished:
            raise CliError(f"--out {out} is not empty (a finished run or other files); use --resume to continue a "
                           "run or choose a new folder")
        print(f"--out {out} holds an unfinished refinement (no final outputs): replacing it")
    return work


def run(args) -> int:
    from dataclasses import replace

    import numpy as np

    from bayespose.core.parallel import barrier, is_main, processes_note
    from bayespose.core.refine import RefineConfig, check_half_set_sizes, refine, subset_counts
    from bayespose.core.refine.outputs import write_refine_outputs
    from bayespose.plotting.refine import refine_figure_writer

    particles, volume = read_particles_and_map(args.particles, args.map)
    check_outputs(folders={"--out": args.out}, inputs={"--particles": args.particles, "--map": args.map,
                                                       "--mask": args.mask}, particles=particles)
    if args.no_ctf:
        particles = replace(particles, ctf=None)
    elif not particles.has_ctf:
        raise CliError(f"{args.particles} has no CTF columns (rlnDefocusU/V/Angle), which the likelihood and the "
                       "reconstruction need; pass --no-ctf for simulated particles without CTF or CTF-corrected "
                       "images")
    check_half_set_sizes(len(particles), subset_counts(particles.half_set), args.half_sets)
    mask = None
    if args.mask is not None:
        mask = read_mask(args.mask, volume.shape)
        if not np.any(mask > 0):
            raise CliError(f"the mask {args.mask} is empty (no voxel > 0)")
    given = {"iterations": args.iters, "healpix_order": args.healpix_order, "max_healpix_order":
             args.max_healpix_order, "prior_order": args.prior_order, "shift_range_px": args.shift_range,
             "shift_step_px": args.shift_step, "initial_lowpass_A": args.lowpass,
             "particle_diameter_A": args.diameter, "threads": args.threads}
    config = RefineConfig(symmetry=args.sym.strip().upper(), mode=args.mode, prior_mode=args.prior,
                          half_split=args.half_sets, device=None if args.device == "auto" else args.device,
                          seed=args.seed, envelope_mask=not args.no_envelope_mask,
                          **{k: v for k, v in given.items() if v is not None})  # unset: the engine's defaults
    if config.healpix_order > config.max_healpix_order:
        raise UsageError(f"the coarse HEALPix order {config.healpix_order} is finer than the finest "
                         f"{config.max_healpix_order} (--healpix-order / --max-healpix-order)")
    with usage_errors():
        config.validate()
    work = _check_out_dir(args.out, args.resume)
    barrier()  # under torchrun: every process has checked the folder before the main one changes it
    print(f"refining {len(particles)} particles: {config.iterations} iterations max, HEALPix order "
          f"{config.healpix_order}..{config.max_healpix_order}, shifts ±{config.shift_range_px:g} px step "
          f"{config.shift_step_px:g} px, initial low-pass {config.initial_lowpass_A:g} Å, {config.mode}, "
          f"{config.prior_mode} prior, symmetry {config.symmetry}")
    # columns of an earlier bayespose run (e.g. assign's estimator angles) would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    start = time.time()
    result = refine(fresh, volume, config, out_dir=work, log=print, progress=progress_printer, mask=mask,
                    resume=args.resume)
    if is_main():
        write_refine_outputs(result, args.out, pixel_size=particles.pixel_size, particles_template=fresh,
                             config=config, figure_writer=refine_figure_writer(Path(args.particles).name))
    print(f"refined {len(particles)} particles{processes_note()} in {len(result.history)} iteration(s) "
          f"({args.mode}, {args.prior} prior, symmetry {config.symmetry}): resolution {result.resolution_A:.1f} Å "
          f"(FSC 0.143), {time.time() - start:.0f} s; wrote {args.out / 'map.mrc'}, half maps, fsc.csv, "
          f"particles.star, prior and figures in {args.out}")
    return 0
