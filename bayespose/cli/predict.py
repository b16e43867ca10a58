"""``bayespose predict``: poses from a trained network, optionally refined by deep-prior MMSE."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bayespose.cli._common import (
    CliError,
    check_map_matches,
    check_outputs,
    existing_file,
    positive_float,
    positive_int,
    progress_printer,
    usage_errors,
)
from bayespose.core.deep.vocabulary import (
    AUTO_FALLBACK_DEFICIT,
    AUTO_FALLBACK_Z,
    DEFAULT_SEED_MASS,
    NETWORK_PIXEL_RTOL,
    PRIOR_INPLANE_TURNS,
    fallback_threshold,
)


def add_parser(sub) -> None:
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
    p.add_argument("--model", required=True, type=existing_file, help="network checkpoint from 'bayespose train'")
    p.add_argument("--particles", required=True, type=existing_file,
                   help=f"RELION star file with the network's box and pixel size (within "
                        f"{100 * NETWORK_PIXEL_RTOL:g} %%)")
    p.add_argument("--top-k", type=positive_int, default=8, metavar="K",
                   help="number of most probable grid poses kept per particle (searched around by "
                        "--refine-map with --seed-mass none) [8]")
    p.add_argument("--inplane-turns", type=positive_int, metavar="T",
                   help="grid network: also predict each image turned in-plane by 360/T degree steps and average the "
                        "turned-back log probabilities (T must divide the grid's in-plane angles; 1 = one pass) "
                        f"[8, or fewer where 8 does not divide them; with --refine-map {PRIOR_INPLANE_TURNS}: the MMSE "
                        "search decides the pose, and 2 turns give it the same accuracy at a third of the network's "
                        "time]")
    p.add_argument("--refine-map", type=existing_file, metavar="MAP",
                   help="reference map (MRC, the particles' box and pixel size): refine with the deep prior MMSE")
    p.add_argument("--local-range", type=positive_float, metavar="DEG",
                   help="with --refine-map: local grid half-width around each top-K pose, degrees [engine default]")
    p.add_argument("--shift-range", type=float, default=3.0, metavar="PX",
                   help="with --refine-map: shift search radius in px [3]")
    p.add_argument("--shift-step", type=positive_float, default=1.0, metavar="PX",
                   help="with --refine-map: shift grid step in px [1]")
    p.add_argument("--max-res", type=positive_float, metavar="A",
                   help="with --refine-map: highest resolution scored, in Å [Nyquist]")
    p.add_argument("--seed-mass", type=_seed_mass, default=DEFAULT_SEED_MASS, metavar="F|none",
                   help="with --refine-map: search around the predicted cells that hold this fraction of the "
                        "network's probability (wider for uncertain particles; 'none' = the top-K poses) "
                        f"[{DEFAULT_SEED_MASS:g}]")
    p.add_argument("--fallback", type=_fallback_setting, default="auto", metavar="auto|none|Z",
                   help="with --refine-map: particles whose best deep-prior pose does not fit the data (fit "
                        f"z-score below Z; auto = the engine's measured default, {AUTO_FALLBACK_Z:g}) are re-assigned "
                        "by the global search; 'none' keeps every deep-prior result [auto]")
    p.add_argument("--fallback-deficit", type=_fraction_below_two, default=AUTO_FALLBACK_DEFICIT, metavar="F",
                   help="with --refine-map and --fallback: re-assign only particles whose best pose also leaves "
                        "more than this fraction of its expected signal energy unexplained (at high SNR a small "
                        "model mismatch alone makes the z-score significant); 0 = the z-score alone "
                        f"[{AUTO_FALLBACK_DEFICIT:g}]")
    p.add_argument("--batch-size", type=positive_int, default=256, help="particles per network batch [256]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda when available (auto), cpu or cuda [auto]")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads [all cores]")
    p.add_argument("--out", required=True, type=Path, help="output RELION 3.1 star file")
    p.set_defaults(func=run)


def _seed_mass(text: str) -> float | None:
    """--seed-mass: a fraction in (0, 1], or 'none' (None: the fixed top-K seeds)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'none', got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'none', got {value}")
    return value


def _fraction_below_two(text: str) -> float:
    """--fallback-deficit: a fraction of the signal energy in [0, 2)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 2:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 2), got {text!r}")
    return value


def _fallback_setting(text: str) -> str:
    """--fallback: 'auto', 'none' or a finite z threshold (checked by ``fallback_threshold``; kept as written)."""
    try:
        fallback_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a finite z threshold, got {text!r}") from None
    return text.strip().lower()


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


def _check_network_matches(network, particles, model_path: Path) -> None:
    """One-line errors for particles whose box (px) or pixel size (Å/px, ``NETWORK_PIXEL_RTOL``) differ from the
    training particles'.

    A network sees Fourier-cropped images in pixel units: particles at another pixel size show the molecule at
    another magnification, so their predictions would be silently wrong; resample them first.
    """
    if int(network.box) != particles.box:
        raise CliError(f"the network {model_path} was trained on {network.box} px particles but these have "
                       f"{particles.box} px; re-extract or resize them (e.g. relion_image_handler --new_box)")
    if abs(float(network.pixel_size) - particles.pixel_size) > NETWORK_PIXEL_RTOL * float(network.pixel_size):
        raise CliError(f"the network {model_path} was trained at {float(network.pixel_size):.4f} Å/px but the "
                       f"particles have {particles.pixel_size:.4f} Å/px (more than {100 * NETWORK_PIXEL_RTOL:g} % "
                       "apart); rescale them (e.g. relion_image_handler --rescale_angpix)")


def _prediction_pngs(out: Path) -> tuple[Path, Path]:
    """``OUT.star`` -> (``OUT_poses.png``, ``OUT_errors.png``) next to it."""
    return out.with_name(out.stem + "_poses.png"), out.with_name(out.stem + "_errors.png")


def run(args) -> int:
    from dataclasses import replace

    import numpy as np
    import torch

    from bayespose.core.deep import pose_error_metrics
    from bayespose.core.io.mrc import read_map
    from bayespose.core.io.relion_star import read_star, write_star
    from bayespose.core.parallel import is_main, processes_note

    device = None if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    particles = read_star(args.particles)
    check_outputs(files={"--out": args.out, "the poses figure": _prediction_pngs(args.out)[0],
                         "the errors figure": _prediction_pngs(args.out)[1]},
                  inputs={"--model": args.model, "--particles": args.particles, "--refine-map": args.refine_map},
                  particles=particles)
    network = _load_network(args.model, device)
    _check_network_matches(network, particles, args.model)
    if args.inplane_turns is not None and network.config.model == "so3grid":
        from bayespose.core.deep.predict import inplane_turns

        with usage_errors():
            inplane_turns(network.grid_order, args.inplane_turns)
    volume = None
    if args.refine_map is not None:
        volume, map_px = read_map(args.refine_map)
        check_map_matches(volume, map_px, particles, args.refine_map)
        if not particles.has_ctf:
            sys.stderr.write(f"note: {args.particles} has no CTF columns; the MMSE refinement scores without CTF\n")
    # columns of an earlier bayespose run would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    out = _predict_in_blocks(args, network, fresh, volume, device)
    output = replace(fresh, rotations=out.pop("rotations"), origins_A=out.pop("origins_A"),
                     extra={**fresh.extra, **out.pop("columns")})
    if not is_main():
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_star(args.out, output)
    refined = volume is not None
    summary = (f"predicted {len(particles)} particles{processes_note()} ({network.config.model}, top {args.top_k}): "
               f"median confidence {np.median(out['confidence']):.3f}")
    if refined:
        summary += (f"; deep-prior MMSE: median expected error {np.median(out['expected_error_deg']):.2f}°, "
                    f"{int(out['fallback_particles'])} particles re-assigned by the global search (fallback "
                    f"{args.fallback}), {out['scored_rotations'] / len(particles):.0f} rotations scored per "
                    f"particle, {out['total_s']:.1f} s")
    written = _write_figures(args, particles, output, out, refined, str(network.symmetry).upper())
    if particles.has_alignment:
        symmetry = str(network.symmetry).upper()
        errors = {"network": pose_error_metrics(out["network_rotations"], particles.rotations, symmetry)}
        if refined:
            errors["deep-prior MMSE"] = pose_error_metrics(output.rotations, particles.rotations, symmetry)
        summary += "; vs the input poses: " + ", ".join(f"{k} median {m['median_deg']:.1f}°"
                                                         for k, m in errors.items())
    print(f"{summary}; wrote {', '.join([str(args.out), *written])}")
    return 0


def _predict_in_blocks(args, network, particles, volume, device) -> dict:
    """The network's prediction (and, with ``volume``, the deep-prior MMSE) of ``particles`` block by block
    (:func:`~bayespose.core.deep.blocks.predict_in_blocks`: memory flat in N); under torchrun every process does
    every ``world_size``-th block and the per-particle results are combined on every process. Returns the output
    rotations (N, 3, 3) and origins (N, 2) Å, the star ``columns``, the network's own rotations and confidences
    and the totals of the deep-prior search."""
    from dataclasses import replace

    import numpy as np

    from bayespose.core import parallel
    from bayespose.core.assign import PoseSearch
    from bayespose.core.deep import DeepPriorSearch
    from bayespose.core.deep.blocks import block_size, predict_in_blocks, prepared_reference, prior_noise_model

    n = len(particles)
    search = noise = config = None
    if volume is not None:
        search = PoseSearch(shift_range_px=args.shift_range, shift_step_px=args.shift_step,
                            max_resolution_A=args.max_res, symmetry=str(network.symmetry).upper(), device=device,
                            threads=args.threads)
        with usage_errors():
            search.validate()
            config = DeepPriorSearch(seed_mass=args.seed_mass, local_range_deg=args.local_range,
                                     fallback_z=fallback_threshold(args.fallback),
                                     fallback_deficit=args.fallback_deficit)
        volume = prepared_reference(volume, particles.box, search)  # once for the noise model and every block
        # one model for all blocks and processes
        noise = parallel.main_first(lambda: prior_noise_model(particles, volume, search))
    rows = {"rotations": np.zeros((n, 3, 3)), "origins_A": np.zeros((n, 2)), "network_rotations": np.zeros((n, 3, 3)),
            "confidence": np.zeros(n), "expected_error_deg": np.zeros(n)}
    columns, totals, mine = {}, np.zeros(3), []  # totals: fallback particles, scored rotations, seconds
    report = progress_printer("refining" if volume is not None else "predicting")
    blocks = predict_in_blocks(network, particles, volume, search, config, noise=noise, top_k=args.top_k,
                               batch_size=args.batch_size, device=device, turns=args.inplane_turns,
                               blocks=parallel.my_batches(n, block_size(network)))
    for block in blocks:
        index, prediction, result = block.index, block.prediction, block.assignment
        output = prediction.to_particle_set(block.particles)
        if result is not None:
            refined = result.to_particle_set(output, "mmse")  # drops the network's columns: keep them beside it
            output = replace(refined, extra={**output.extra, **refined.extra})
            rows["expected_error_deg"][index] = result.expected_error_deg
            totals += (result.timings.get("fallback_particles", 0), len(index) * result.timings.get(
                "scored_rotations_per_particle", 0.0), result.timings.get("total_s", 0.0))
        rows["rotations"][index], rows["origins_A"][index] = output.rotations, output.origins_A
        rows["network_rotations"][index], rows["confidence"][index] = prediction.rotations, prediction.confidence
        for name, values in output.extra.items():
            if name not in particles.extra:
                columns.setdefault(name, np.zeros(n, dtype=np.asarray(values).dtype))[index] = values
        mine.append(index)
        report(sum(len(i) for i in mine), n)
    mine = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    dtypes = {}  # every process's columns (a process may have had no block)
    for part in parallel.all_gather_objects({name: values.dtype.str for name, values in columns.items()}):
        dtypes.update(part)
    names = sorted(dtypes)
    for name in names:
        columns.setdefault(name, np.zeros(n, dtype=np.dtype(dtypes[name])))
    combined = parallel.combine_rows([*rows.values(), *(columns[name] for name in names)], mine)
    out = dict(zip(rows, combined[:len(rows)]), columns=dict(zip(names, combined[len(rows):])))
    out.update(zip(("fallback_particles", "scored_rotations", "total_s"), parallel.all_reduce_sum(totals)))
    return out


def _write_figures(args, particles, output, out: dict, refined: bool, symmetry: str) -> list[str]:
    """OUT_poses.png and, when the input carries poses, OUT_errors.png; returns the paths written."""
    from bayespose.plotting import save_figure
    from bayespose.plotting.deep import plot_angular_errors
    from bayespose.plotting.poses import plot_pose_distribution

    poses_png, errors_png = _prediction_pngs(args.out)
    what = "deep-prior MMSE" if refined else "network"
    save_figure(plot_pose_distribution(output.rotations, title=f"{what} poses of {len(particles)} particles",
                                       reference=particles.rotations), poses_png)
    if not particles.has_alignment:
        return [str(poses_png)]
    save_figure(plot_angular_errors(_errors_to_input(out["network_rotations"], output.rotations if refined
                                                     else None, particles, symmetry),
                                    title=f"angles to the input poses ({len(particles)} particles, {symmetry})"),
                errors_png)
    return [str(poses_png), str(errors_png)]


def _errors_to_input(network_rotations, mmse_rotations, particles, symmetry: str) -> dict:
    """Symmetry-aware angles (degrees) between the input poses and the network modes / the MMSE poses (None:
    not refined), rotations (N, 3, 3) RELION ``A``."""
    from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group

    group = symmetry_group(symmetry)
    errors = {"network mode": symmetric_geodesic_distance_deg(network_rotations, particles.rotations, group)}
    if mmse_rotations is not None:
        errors["deep-prior MMSE"] = symmetric_geodesic_distance_deg(mmse_rotations, particles.rotations, group)
    return errors
