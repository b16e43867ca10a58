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
from bayespose.core.deep.vocabulary import AUTO_FALLBACK_Z, DEFAULT_SEED_MASS, NETWORK_PIXEL_RTOL, fallback_threshold


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

    from bayespose.core.assign import PoseSearch
    from bayespose.core.deep import DeepPriorSearch, deep_prior_assign, pose_error_metrics, predict_poses
    from bayespose.core.io.mrc import read_map
    from bayespose.core.io.relion_star import read_star, write_star
    from bayespose.plotting import save_figure
    from bayespose.plotting.deep import plot_angular_errors
    from bayespose.plotting.poses import plot_pose_distribution

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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    volume = None
    if args.refine_map is not None:
        volume, map_px = read_map(args.refine_map)
        check_map_matches(volume, map_px, particles, args.refine_map)
        if not particles.has_ctf:
            sys.stderr.write(f"note: {args.particles} has no CTF columns; the MMSE refinement scores without CTF\n")
    prediction = predict_poses(network, particles, top_k=args.top_k, batch_size=args.batch_size, device=device,
                               progress=progress_printer("predicting"))
    # columns of an earlier bayespose run would be stale: drop them
    fresh = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
    output = prediction.to_particle_set(fresh)
    result = None
    if volume is not None:
        search = PoseSearch(shift_range_px=args.shift_range, shift_step_px=args.shift_step,
                            max_resolution_A=args.max_res, symmetry=str(network.symmetry).upper(), device=device,
                            threads=args.threads)
        with usage_errors():
            search.validate()
            config = DeepPriorSearch(seed_mass=args.seed_mass, local_range_deg=args.local_range,
                                     fallback_z=fallback_threshold(args.fallback))
        result = deep_prior_assign(particles, prediction, volume, search, config,
                                   progress=progress_printer("refining"))
        # the schema's to_particle_set drops every earlier bp column: keep the network's beside the MMSE results
        refined = result.to_particle_set(output, "mmse")
        output = replace(refined, extra={**output.extra, **refined.extra})
    write_star(args.out, output)
    poses_png, errors_png = _prediction_pngs(args.out)
    what = "deep-prior MMSE" if result is not None else "network"
    save_figure(plot_pose_distribution(output.rotations, title=f"{what} poses of {len(particles)} particles",
                                       reference=particles.rotations), poses_png)
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
        save_figure(plot_angular_errors(_errors_to_input(prediction, result, particles, symmetry),
                                        title=f"angles to the input poses ({len(particles)} particles, {symmetry})"),
                    errors_png)
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
