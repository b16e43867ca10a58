"""``bayespose simulate``: particles with known poses from a map."""

from __future__ import annotations

from pathlib import Path

from bayespose.cli._common import (
    check_outputs,
    existing_file,
    positive_float,
    positive_int,
    progress_printer,
    usage_errors,
)


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate particles with known poses from a map",
                       description="Simulate particles from a map (projection, optional CTF, shifts, white noise) "
                                   "and write DIR/particles.star (RELION 3.1, ground-truth poses) and "
                                   "DIR/particles.mrcs.")
    p.add_argument("--map", required=True, type=existing_file, help="input map (MRC); pixel size from its header")
    p.add_argument("--n", required=True, type=positive_int,
                   help="number of particles (a whole number; 1e4 = 10000 is accepted); the images must fit in "
                        "memory and on disk, which is checked before simulating")
    p.add_argument("--snr", required=True, type=float,
                   help="signal-to-noise ratio: signal variance / noise variance over the box; 0 = noiseless")
    p.add_argument("--pose-dist", default="uniform",
                   help="pose distribution: uniform | igso3:ETA (isotropic Gaussian on SO(3) around the identity with "
                        "scale ETA in radians, Xu et al. 2026 App. F1: small = concentrated, std of the angle ~0.67 "
                        "ETA)"
                        " | preferred (mostly top views, uniform in-plane) [uniform]")
    p.add_argument("--ctf", action="store_true", help="apply a CTF (defocus drawn in --defocus range)")
    p.add_argument("--defocus", nargs=2, type=positive_float, default=(1.0, 2.5), metavar=("MIN", "MAX"),
                   help="defocus range in µm (underfocus positive) [1.0 2.5]")
    p.add_argument("--voltage", type=positive_float, default=300.0, help="voltage in kV [300]")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm [2.7]")
    p.add_argument("--amp-contrast", type=float, default=0.1, help="amplitude contrast fraction [0.1]")
    p.add_argument("--max-shift", type=float, default=0.0, help="origins uniform in ±MAX px per axis [0]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder; its particles.* and simulation.json are replaced as a unit (other files "
                        "there are kept)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset

    spec = SimulationSpec(n_particles=args.n, snr=None if args.snr == 0 else args.snr,
                          pose_distribution=args.pose_dist, ctf=args.ctf, defocus_min_um=args.defocus[0],
                          defocus_max_um=args.defocus[1], voltage_kV=args.voltage, cs_mm=args.cs,
                          amplitude_contrast=args.amp_contrast, max_shift_px=args.max_shift, seed=args.seed)
    with usage_errors():
        spec.validate()
    check_outputs(folders={"--out": args.out}, inputs={"--map": args.map})
    particles = simulate_dataset(args.map, spec, args.out, progress=progress_printer("simulating"))
    print(f"wrote {len(particles)} particles ({particles.box} px, {particles.pixel_size:.3f} Å/px) to "
          f"{args.out / 'particles.star'}")
    return 0
