"""Our side of ``benchmarks/vs_relion.py``: bayespose's runs on the same relion_project particles, RELION's cached
runs read back, and the report (table, FSC curves, calibration of the expected error).

Per SNR: ``assign_poses`` against the true map with the default search (order 2 + 3 levels, 1.9°) and with
4 levels (0.94°); RELION auto-refine (from 30 Å) and RELION one iteration at equal sampling, read from their
cached folders. Per refine SNR: ``refine`` from the same 30 Å start; FSC against the truth of its map, of
``relion_reconstruct --ctf`` from its final poses and of RELION auto-refine's map (``run_class001.mrc``).
Errors are geodesic angles (degrees) between RELION pose matrices; the expected error is each particle's posterior
mean angle to its MMSE pose (``ParticleResults.expected_error_deg``). Our runs are cached in ``work/ours``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import starfile
from _machine import Contention

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.io.mrc import read_map
from bayespose.core.refine import RefineConfig, refine
from bayespose.data import fragment_map_path

SEARCHES = {"default (order 2 + 3 levels, 1.9°)": {}, "4 levels (0.94°)": {"refine_levels": 4}}


def _cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def assign_runs(vs, work: Path, truth, snr: float, threads: int) -> dict:
    """Our assign runs at one SNR (true map), each search of :data:`SEARCHES`: errors, expected errors, times."""
    particles, images, info = vs.noisy_set(work, truth, work / "truth" / "particles.star", snr)
    volume, _ = read_map(fragment_map_path())
    out = {"snr_measured": info["snr_measured"]}
    for name, kw in SEARCHES.items():
        def run(kw=kw):
            with Contention() as load:
                t0 = time.perf_counter()
                result = assign_poses(particles, volume, PoseSearch(threads=threads, **kw), images=images)
                wall = time.perf_counter() - t0
            err = {est: vs.errors_deg(result.poses(est)[0], truth.rotations).tolist() for est in ("mmse", "mle")}
            return {"errors": err, "expected": result.expected_error_deg.tolist(), "wall_s": wall,
                    "other_cores": load.other_cores}
        tag = "l4" if kw else "default"
        out[name] = _cached(work / "ours" / f"assign_snr{snr:g}_{tag}.json", run)
    return out


def refine_run(vs, work: Path, truth, snr: float, threads: int) -> dict:
    """Our refinement from the 30 Å start at ``snr`` (default settings; and, under ``"sphere_only"``, with the
    references masked by the solvent sphere alone, as RELION's ``--flatten_solvent`` without a mask); FSC vs truth
    of our maps, of relion_reconstruct from our final poses and of RELION auto-refine's map."""
    particles, images, _ = vs.noisy_set(work, truth, work / "truth" / "particles.star", snr)
    true_map, px = read_map(fragment_map_path())

    def run(tag: str, envelope: bool):
        start, _ = read_map(vs.start_map(work))
        config = RefineConfig(threads=threads, particle_diameter_A=vs.DIAMETER_A, envelope_mask=envelope)
        with Contention() as load:
            t0 = time.perf_counter()
            result = refine(particles, start, config, out_dir=work / "ours" / f"refine_snr{snr:g}{tag}",
                            images=images, log=print)
            wall = time.perf_counter() - t0
        ours = result.particles
        rebuilt = vs.relion_reconstruct(work, particles, ours.rotations, ours.origins_A, f"ours_snr{snr:g}{tag}")
        return {"errors": vs.errors_deg(ours.rotations, truth.rotations).tolist(), "wall_s": wall,
                "other_cores": load.other_cores, "resolution_A": result.resolution_A,
                "steps_deg": [h.angular_step_deg for h in result.history],
                "fsc_ours": vs.fsc_vs_truth(result.map, true_map, px),
                "fsc_relion_reconstruct_ours": vs.fsc_vs_truth(rebuilt, true_map, px)}

    out = _cached(work / "ours" / f"refine_snr{snr:g}.json", lambda: run("", True))
    out["sphere_only"] = _cached(work / "ours" / f"refine_snr{snr:g}_sphere.json", lambda: run("_sphere", False))
    relion_map = work / f"relion_auto_snr{snr:g}" / "run" / "run_class001.mrc"
    if relion_map.exists():
        out["fsc_relion"] = vs.fsc_vs_truth(read_map(relion_map)[0], true_map, px)
    return out


def relion_errors(vs, work: Path, truth, snr: float) -> dict:
    """RELION's cached runs at ``snr`` (auto-refine, one iteration): errors and the run summaries; an auto-refine
    still running (no summary yet) is read at its latest iteration (``"running_iteration"``, no wall time)."""
    out = {}
    for kind in ("auto", "oneiter"):
        folder = work / f"relion_{kind}_snr{snr:g}"
        if (folder / "summary.json").exists():
            rot, _ = vs.relion_poses(work, snr, kind)
            out[kind] = {**json.loads((folder / "summary.json").read_text()),
                         "errors": vs.errors_deg(rot, truth.rotations).tolist()}
        elif kind == "auto" and (iterations := sorted((folder / "run").glob("run_it*_data.star"))):
            latest = iterations[-1]
            particles = vs.read_star(work / "relion_data" / f"noisy_snr{snr:g}.star")
            rot, _ = vs._relion_poses(starfile.read(latest, always_dict=True)["particles"], particles)
            out[kind] = {"running_iteration": int(latest.name[6:9]), "wall_s": None, "other_cores": None,
                         "errors": vs.errors_deg(rot, truth.rotations).tolist()}
    return out


def _fmt(err) -> str:
    from vs_relion import summary

    s = summary(err)
    return f"{s['mean']:.2f} ± {s['se']:.2f} / {s['median']:.2f} ({100 * s['frac_over30']:.0f} % > 30°)"


def calibration_bins(expected, actual, bins: int = 8) -> list[dict]:
    """Particles in ``bins`` quantile bins of expected error: mean expected vs mean actual error per bin (a
    calibrated expected error lies on the diagonal)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    edges = np.quantile(expected, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, expected, side="right") - 1, 0, bins - 1)
    return [{"expected": float(expected[which == b].mean()), "actual": float(actual[which == b].mean()),
             "n": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def report(out: Path, results: dict) -> None:
    """README.md, results.json and the two figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    lines = ["# bayespose vs RELION 3.1 on independent relion_project particles", "",
             f"{results['n']} particles of the 3J9G fragment (64 px, 4.4 Å/px), CTF, uniform poses, origins ±2 px; "
             "images by `relion_project --ctf --add_noise`. Mean ± SE / median geodesic error (degrees), % > 30°. "
             f"Machine: {results['machine']}. Reproduce: `{results['command']}`.", "",
             "| SNR | assign, default (1.9°) MMSE | MLE | assign, 4 levels (0.94°) MMSE | MLE | RELION auto-refine "
             "| RELION 1 iteration (3.75°) | default / RELION auto | 4 levels / RELION auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for snr, row in results["snrs"].items():
        ours, rel = row["assign"], row["relion"]
        d, l4 = ours[list(SEARCHES)[0]], ours[list(SEARCHES)[1]]
        auto = rel.get("auto", {}).get("errors")
        one = rel.get("oneiter", {}).get("errors")
        ratios = [f"{np.mean(run['errors']['mmse']) / np.mean(auto):.2f}" if auto else "–" for run in (d, l4)]
        running = rel.get("auto", {}).get("running_iteration")
        note = f" (still running: iteration {running})" if running else ""
        lines.append(f"| {snr} | {_fmt(d['errors']['mmse'])} | {_fmt(d['errors']['mle'])} | "
                     f"{_fmt(l4['errors']['mmse'])} | {_fmt(l4['errors']['mle'])} | "
                     f"{_fmt(auto) + note if auto else '–'} | {_fmt(one) if one else '–'} | {ratios[0]} | "
                     f"{ratios[1]} |")
    lines += ["", "Wall time (s; 2 threads; other cores busy meanwhile in brackets):", "",
              "| SNR | assign default | assign 4 levels | RELION auto-refine | RELION 1 iteration |", "|---|---|---|---|---|"]
    for snr, row in results["snrs"].items():
        ours, rel = row["assign"], row["relion"]
        cells = [f"{ours[k]['wall_s']:.0f} ({ours[k]['other_cores']:.1f})" for k in SEARCHES]
        cells += [("–" if k not in rel else f"running (iteration {rel[k]['running_iteration']})"
                   if rel[k].get("wall_s") is None else f"{rel[k]['wall_s']:.0f} ({rel[k]['other_cores']:.1f})")
                  for k in ("auto", "oneiter")]
        lines.append(f"| {snr} | " + " | ".join(cells) + " |")
    lines += ["", "MLE − MMSE error, paired per particle (mean ± SE, degrees; positive: the MMSE is better):", ""]
    for snr, row in results["snrs"].items():
        cells = []
        for name in SEARCHES:
            d = np.asarray(row["assign"][name]["errors"]["mle"]) - np.asarray(row["assign"][name]["errors"]["mmse"])
            cells.append(f"{name}: {d.mean():+.2f} ± {d.std(ddof=1) / math.sqrt(len(d)):.2f}")
        lines.append(f"- SNR {snr}: " + "; ".join(cells))
    lines += ["", "Calibration of the expected error (mean expected / mean actual, MMSE):", ""]
    for snr, row in results["snrs"].items():
        for name in SEARCHES:
            run = row["assign"][name]
            lines.append(f"- SNR {snr}, {name}: {np.mean(run['expected']) / np.mean(run['errors']['mmse']):.2f} "
                         f"(median ratio {np.median(run['expected']) / np.median(run['errors']['mmse']):.2f})")
    for snr, ref in results.get("refine", {}).items():
        auto = results["snrs"].get(snr, {}).get("relion", {}).get("auto")
        lines += ["", f"## refine from 30 Å, SNR {snr}", "",
                  f"Poses: ours {_fmt(ref['errors'])}; RELION auto-refine {_fmt(auto['errors']) if auto else '–'}. "
                  f"Our wall time {ref['wall_s']:.0f} s (other cores {ref['other_cores']:.1f}); angular steps "
                  f"{', '.join(f'{s:g}' for s in ref['steps_deg'])}°.", ""]
        sphere = ref.get("sphere_only")
        if sphere:
            lines += [f"Ours with the references masked by the solvent sphere alone (`--no-envelope-mask`; RELION "
                      f"ran with its sphere, `--flatten_solvent` without `--solvent_mask`): {_fmt(sphere['errors'])}, "
                      f"{sphere['wall_s']:.0f} s (other cores {sphere['other_cores']:.1f}).", ""]
        lines += ["| map vs truth | FSC 0.5 | FSC 0.143 |", "|---|---|---|"]
        rows = [("ours (map.mrc)", ref, "fsc_ours"), ("relion_reconstruct from our poses", ref,
                                                       "fsc_relion_reconstruct_ours"),
                ("ours, sphere only", sphere or {}, "fsc_ours"),
                ("relion_reconstruct from our sphere-only poses", sphere or {}, "fsc_relion_reconstruct_ours"),
                ("RELION auto-refine (run_class001.mrc)", ref, "fsc_relion")]
        for label, run, key in rows:
            if key in run:
                lines.append(f"| {label} | {run[key]['fsc05_A']:.1f} Å | {run[key]['fsc0143_A']:.1f} Å |")
    lines += ["", "![FSC vs truth](fig1_fsc.png)", "", "![calibration](fig2_calibration.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    _figures(out, results)


def _figures(out: Path, results: dict) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    refines = results.get("refine", {})
    if refines:
        fig = Figure(figsize=(6.5 * len(refines), 4.5))
        for i, (snr, ref) in enumerate(refines.items()):
            ax = fig.add_subplot(1, len(refines), i + 1)
            for label, key in (("bayespose map", "fsc_ours"), ("relion_reconstruct, our poses",
                                                              "fsc_relion_reconstruct_ours"),
                               ("RELION auto-refine map", "fsc_relion")):
                if key in ref:
                    ax.plot(ref[key]["freq"], ref[key]["curve"], label=label)
            if "sphere_only" in ref:
                ax.plot(ref["sphere_only"]["fsc_ours"]["freq"], ref["sphere_only"]["fsc_ours"]["curve"], ls=":",
                        color="C0", label="bayespose map, sphere only")
            ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
            ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC vs truth", title=f"refine from 30 Å, SNR {snr}")
            ax.legend()
        fig.tight_layout()
        save_figure(fig, out / "fig1_fsc.png")
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for snr, row in results["snrs"].items():
        for name, marker in zip(SEARCHES, "os"):
            run = row["assign"][name]
            bins = calibration_bins(run["expected"], run["errors"]["mmse"])
            x, y = [b["expected"] for b in bins], [b["actual"] for b in bins]
            top = max(top, *x, *y)
            ax.plot(x, y, marker=marker, label=f"SNR {snr}, {name}")
    ax.plot([0, top], [0, top], color="0.5", lw=0.8, ls="--", label="calibrated")
    ax.set(xlabel="expected error (deg, bin mean)", ylabel="actual MMSE error (deg, bin mean)",
           title="Calibration of the expected error", xscale="log", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "fig2_calibration.png")


def run_all(args, work: Path, truth) -> int:
    import vs_relion as vs

    results = {"n": len(truth), "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
               "command": "python benchmarks/vs_relion.py --work WORK", "snrs": {}, "refine": {}}
    for snr in args.snrs:
        print(f"[ours] assign SNR {snr:g}", flush=True)
        results["snrs"][f"{snr:g}"] = {"assign": assign_runs(vs, work, truth, snr, args.threads),
                                       "relion": relion_errors(vs, work, truth, snr)}
    for snr in args.refine_snrs:
        print(f"[ours] refine SNR {snr:g}", flush=True)
        results["refine"][f"{snr:g}"] = refine_run(vs, work, truth, snr, args.threads)
    report(args.out, results)
    print((args.out / "README.md").read_text())
    return 0
