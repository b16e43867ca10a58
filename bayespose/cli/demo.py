"""``bayespose demo``: the end-to-end demo on the map shipped with bayespose."""

from __future__ import annotations

from pathlib import Path

from bayespose.cli._common import positive_int, progress_printer


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the map shipped with bayespose",
                       description="Simulate particles with known poses from the shipped 3J9G map, check the "
                                   "RELION star round trip, and plot poses and images.")
    p.add_argument("--out", type=Path, default=Path("bayespose_demo"), help="output folder [./bayespose_demo]")
    p.add_argument("--n", type=positive_int, default=500, help="number of particles [500]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.set_defaults(func=run)


def run(args) -> int:
    from bayespose.demo import run_demo

    run_demo(args.out, n_particles=args.n, seed=args.seed, progress=progress_printer)
    return 0
