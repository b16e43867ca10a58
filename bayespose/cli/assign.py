"""``bayespose assign``: Bayesian (MMSE / MAP / MLE) pose assignment against a map."""

from __future__ import annotations

import sys
from pathlib import Path

from bayespose.cli._common import (
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
from bayespose.core.results import ESTIMATORS


def add_parser(sub) -> None:
    p = sub.add_parser("assign", help="Bayesian pose assignment (MMSE / MAP / MLE) of particles against a map",
                       description="For every particle of a RELION star file, the posterior over rotations and "
                                   "shifts against a reference map (Gaussian noise, per-particle CTF); writes a "
                                   "RELION 3.1 star with the chosen poses (rlnAngleRot/Tilt/Psi, "
                                   "rlnOriginX/YAngst), rlnMaxValueProbDistribution, rlnNrOfSignificantSamples, "
                                   "bpExpectedErrorDeg (posterior expected angular error, degrees), "
                                   "bpConcentration, bpLogEvidence and the other estimators' angles.")
    p.add_argument("--particles", required=True, type=existing_file, help="input RELION star file (with CTF)")
    p.add_argument("--map", required=True, type=existing_file,
                   help="reference map (MRC) with the particles' box and pixel size (within 1 %%)")
    p.add_argument("--mask", type=existing_file, help="optional mask (MRC, map box): the map is multiplied by it")
    p.add_argument("--sym", default="C1", help="point group in RELION's notation (C1, Cn, Dn, T, O, I, I1-I4) [C1]")
    p.add_argument("--estimator", choices=ESTIMATORS, default="mmse",
                   help="pose written to rlnAngle*/rlnOrigin*: posterior mean (mmse), most probable (map) or best "
                        "likelihood (mle) [mmse]")
    p.add_argument("--prior", default="uniform",
                   help="rotation prior: uniform | igso3:ETA (isotropic Gaussian around the identity, ETA in rad) | "
                        "local:DEG (Gaussian around each input pose, local grid of ±DEG; needs star angles) | "
                        "preferred[:ROT,TILT,KAPPA,FRACTION] (preferred viewing direction) [uniform]")
    orders = PoseSearch.HEALPIX_ORDERS
    p.add_argument("--healpix-order", type=int, choices=orders, default=2, metavar="R",
                   help=f"global grid: HEALPix order {orders[0]}-{orders[-1]} (spacing 60°/2^R: "
                        f"{', '.join(f'{60 / 2 ** r:g}' for r in orders)}°) [2]")
    p.add_argument("--refine-levels", type=int, choices=range(0, PoseSearch.MAX_FINEST_ORDER + 1),
                   default=PoseSearch.refine_levels, metavar="L",
                   help="coarse-to-fine halvings of the grid in the significant cells and around the most probable "
                        f"ones, 0 to {PoseSearch.MAX_FINEST_ORDER}-R (final spacing 60°/2^(R+L); 4 levels from "
                        f"order 2 reach 0.94°, worth it at SNR >= 0.1) [{PoseSearch.refine_levels}]")
    p.add_argument("--local-step", type=positive_float, metavar="DEG", help="local grid step in degrees [DEG/4]")
    p.add_argument("--max-res", type=positive_float, metavar="A",
                   help="highest resolution scored, in Å [Nyquist]")
    p.add_argument("--shift-range", type=float, default=3.0, metavar="PX", help="shift search radius in px [3]")
    p.add_argument("--shift-step", type=positive_float, default=1.0, metavar="PX", help="shift grid step in px [1]")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to score: cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--out", required=True, type=Path, help="output RELION 3.1 star file")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from bayespose.core.assign import assign_poses
    from bayespose.core.geometry.priors import prior_from_spec
    from bayespose.core.io.relion_star import write_star
    from bayespose.core.parallel import is_main, processes_note

    particles, volume = read_particles_and_map(args.particles, args.map)
    check_outputs(files={"--out": args.out}, inputs={"--particles": args.particles, "--map": args.map,
                                                     "--mask": args.mask}, particles=particles)
    if args.mask is not None:
        volume = volume * read_mask(args.mask, volume.shape)
    if args.prior.strip().lower().startswith("local") and not particles.has_alignment:
        raise UsageError(f"--prior {args.prior} searches around the input poses, but {args.particles} has no "
                         "rlnAngleRot/Tilt/Psi columns")
    if not particles.has_ctf:
        sys.stderr.write(f"note: {args.particles} has no CTF columns; scoring without CTF\n")
    with usage_errors():
        spec = prior_from_spec(args.prior, particles.rotations)
    search = PoseSearch(healpix_order=args.healpix_order, refine_levels=args.refine_levels,
                        max_resolution_A=args.max_res, shift_range_px=args.shift_range,
                        shift_step_px=args.shift_step, symmetry=args.sym.strip().upper(),
                        local_range_deg=spec.local_range_deg, local_step_deg=args.local_step,
                        device=None if args.device == "auto" else args.device, threads=args.threads)
    with usage_errors():
        search.validate()
    result = assign_poses(particles, volume, search, spec.prior, progress=progress_printer("assigning"),
                          distributed=True)  # under torchrun: this process's share of the particles
    if is_main():
        write_star(args.out, result.to_particle_set(particles, args.estimator))  # stale result columns dropped
    print(f"assigned {len(particles)} particles{processes_note()} ({args.estimator.upper()}, prior "
          f"{spec.prior.describe()}): median expected error {np.median(result.expected_error_deg):.2f}°, median "
          f"pmax {np.median(result.pmax):.3f}, "
          f"{result.timings.get('total_s', 0.0):.1f} s; wrote {args.out}")
    return 0
