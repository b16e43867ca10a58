"""``bayespose plot-poses``: the pose distribution of a star file as a PNG."""

from __future__ import annotations

from pathlib import Path

from bayespose.cli._common import CliError, check_outputs, existing_file, figure_path


def add_parser(sub) -> None:
    p = sub.add_parser("plot-poses", help="plot the pose distribution of a star file (PNG)",
                       description="Viewing-direction density (Mollweide) and in-plane angle histogram.")
    p.add_argument("--particles", required=True, type=existing_file, help="RELION star file with angles")
    p.add_argument("--out", required=True, type=Path,
                   help="output figure: PNG, or the format its suffix names (.pdf, .svg, ...); .png is added to a "
                        "name without suffix")
    p.set_defaults(func=run)


def run(args) -> int:
    from bayespose.core.io.relion_star import read_star
    from bayespose.plotting import save_figure
    from bayespose.plotting.poses import plot_pose_distribution

    out = figure_path(args.out)
    particles = read_star(args.particles)
    check_outputs(files={"--out": out}, inputs={"--particles": args.particles}, particles=particles)
    if not particles.has_alignment:
        raise CliError(f"{args.particles} has no rlnAngleRot/Tilt/Psi columns: no poses to plot")
    save_figure(plot_pose_distribution(particles.rotations, title=Path(args.particles).name), out)
    print(f"wrote {out}")
    return 0
