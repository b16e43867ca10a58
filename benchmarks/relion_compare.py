"""bayespose vs RELION 3.1 on the same particles: wall time and angular error against the known poses (issue 3,
item 3).

Data: particles simulated from the asymmetric fragment map (64 px, 4.4 Å/px) with CTF (defocus 1-2.5 µm), origins
within ±2 px and white noise at each SNR of ``--snrs`` (signal variance / noise variance over the box). Both
programs get the same star file with the poses removed (RELION 3.1 star, optics table; CTF kept) and the true map.

* RELION: ``relion_refine`` for ONE iteration with the known map as reference, following the command measured to
  work in ../shared/data/README.md ("A one-iteration known map assignment"): ``--iter 1 --K 1 --healpix_order R
  --oversampling 1 --ctf --ctf_corrected_ref --ini_high 10 --pad 2 --zero_mask --norm --scale --tau2_fudge 1
  --j 2 --pool 10 --dont_combine_weights_via_disc``, with the offsets of the bayespose search
  (``--offset_range 3 --offset_step 1``; the README's run used 5). Its poses are read from
  ``run_it001_data.star`` (rlnAngleRot/Tilt/Psi: RELION's best, i.e. maximum-posterior, orientation). Its wall
  time includes the M step (one reconstruction), which bayespose does not do; ``relion_reconstruct`` of the same
  particles is timed separately as an estimate of that part.
* bayespose: :func:`assign_poses` (images read from the files, ``threads`` threads) at HEALPix order R with
  ``refine_levels`` 1 (the finest grid = RELION's oversampled order R+1: equal sampling) and 2 (the default), the
  same shift lattice; MMSE, MAP and MLE poses.

Errors: geodesic angle (degrees) between each estimated rotation and the true one; origin error in px.

Usage::

    .venv/bin/python benchmarks/relion_compare.py [--quick] [--n 200] [--snrs 0.1 0.03 0.01]

Writes ``relion_compare.md`` and ``relion_compare.json`` into ``--out`` (default benchmarks/results/speed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import Contention  # noqa: E402  (benchmarks/ is the script's folder)

from bayespose.core.assign import PoseSearch, assign_poses  # noqa: E402
from bayespose.core.geometry.rotations import euler_to_matrix, geodesic_distance_deg  # noqa: E402
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset  # noqa: E402
from bayespose.core.io.mrc import read_map  # noqa: E402
from bayespose.core.io.relion_star import read_star  # noqa: E402
from bayespose.data import fragment_map_path  # noqa: E402

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def simulate(snr: float, n: int, work: Path, seed: int) -> Path:
    """Particles with known poses (cached in ``work``); returns the dataset folder (particles.star inside)."""
    folder = work / f"snr{snr:g}_n{n}_seed{seed}"
    if not (folder / "particles.star").exists():
        simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=n, snr=snr, max_shift_px=2.0, seed=seed),
                         folder)
    return folder


def strip_poses(star: Path, out: Path) -> Path:
    """A copy of a RELION 3.1 star without the pose columns (so that no program can see the truth)."""
    tables = starfile.read(star, always_dict=True)
    tables["particles"] = tables["particles"].drop(columns=[c for c in POSE_COLUMNS
                                                            if c in tables["particles"].columns])
    starfile.write(tables, out, overwrite=True)
    return out


def truth(star: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(image name -> row, rotations (N,3,3) RELION A, origins (N,2) px) of the simulated particles."""
    table = starfile.read(star, always_dict=True)["particles"]
    px = read_star(star).pixel_size
    rot = euler_to_matrix(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float))
    org = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / px
    return {name: i for i, name in enumerate(table["rlnImageName"])}, rot, org


def run_relion(folder: Path, star_in: Path, order: int, threads: int, diameter_A: float, offset_range: float,
               offset_step: float, map_path: Path | None = None) -> dict:
    """One relion_refine iteration against the true map (``map_path``, default the fragment map); returns wall time
    and its poses (in truth's order)."""
    out = folder / f"relion_o{order}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    cmd = ["relion_refine", "--o", f"{out.name}/run", "--i", star_in.name, "--ref", str(map_path or fragment_map_path()),
           "--ini_high", "10", "--iter", "1", "--pad", "2", "--ctf", "--ctf_corrected_ref",
           "--particle_diameter", f"{diameter_A:g}", "--zero_mask", "--oversampling", "1",
           "--healpix_order", str(order), "--offset_range", f"{offset_range:g}", "--offset_step", f"{offset_step:g}",
           "--sym", "C1", "--K", "1", "--tau2_fudge", "1", "--norm", "--scale", "--j", str(threads),
           "--dont_combine_weights_via_disc", "--pool", "10"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    data = out / "run_it001_data.star"
    if done.returncode or not data.exists():
        raise RuntimeError(f"relion_refine failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    table = starfile.read(data, always_dict=True)["particles"]
    names, _, _ = truth(folder / "particles.star")
    order_rows = np.array([names[name] for name in table["rlnImageName"]])
    rot = np.zeros((len(names), 3, 3))
    org = np.zeros((len(names), 2))
    rot[order_rows] = euler_to_matrix(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float))
    px = read_star(folder / "particles.star").pixel_size
    org[order_rows] = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / px
    pmax = np.zeros(len(names))
    pmax[order_rows] = table["rlnMaxValueProbDistribution"].to_numpy(float)
    recon_s = _time_reconstruct(folder, data)
    return dict(wall_s=wall, rotations=rot, origins_px=org, pmax=pmax, reconstruct_s=recon_s, command=" ".join(cmd))


def _time_reconstruct(folder: Path, data: Path) -> float | None:
    """Wall time of ``relion_reconstruct --ctf`` from RELION's assigned poses (the M step's main work)."""
    if shutil.which("relion_reconstruct") is None:
        return None
    t0 = time.perf_counter()
    done = subprocess.run(["relion_reconstruct", "--i", str(data.relative_to(folder)), "--o",
                           str((data.parent / "recon.mrc").relative_to(folder)), "--ctf"], cwd=folder,
                          capture_output=True, text=True)
    return time.perf_counter() - t0 if done.returncode == 0 else None


def run_bayespose(star_in: Path, order: int, levels: int, threads: int, offset_range: float,
                  offset_step: float, map_path: Path | None = None) -> dict:
    """assign_poses on the pose-free star (images read from disk) against ``map_path`` (default the fragment
    map); wall time includes reading and setup."""
    t0 = time.perf_counter()
    particles = read_star(star_in)
    volume, _ = read_map(map_path or fragment_map_path())
    search = PoseSearch(healpix_order=order, refine_levels=levels, shift_range_px=offset_range,
                        shift_step_px=offset_step, threads=threads)
    result = assign_poses(particles, volume, search)
    wall = time.perf_counter() - t0
    out = dict(wall_s=wall, timings=result.timings, pmax=result.pmax, expected_error_deg=result.expected_error_deg)
    for est in ("mmse", "map", "mle"):
        rot, org_A = result.poses(est)
        out[est] = (rot, org_A / particles.pixel_size)
    return out


def errors(rot: np.ndarray, org: np.ndarray, true_rot: np.ndarray, true_org: np.ndarray) -> dict:
    ang = geodesic_distance_deg(rot, true_rot)
    shift = np.linalg.norm(org - true_org, axis=1)
    return dict(mean_deg=float(ang.mean()), median_deg=float(np.median(ang)), p90_deg=float(np.percentile(ang, 90)),
                frac_within_10deg=float((ang < 10).mean()), mean_shift_px=float(shift.mean()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 particles, SNR 0.1 and 0.01")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.03, 0.01])
    parser.add_argument("--healpix-order", type=int, default=2)
    parser.add_argument("--refine-levels", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offset-range", type=float, default=3.0, help="px (both programs)")
    parser.add_argument("--offset-step", type=float, default=1.0, help="px (both programs)")
    parser.add_argument("--particle-diameter", type=float, default=260.0, help="Å, RELION's mask")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed")
    args = parser.parse_args(argv)
    if shutil.which("relion_refine") is None:
        print("relion_refine is not on PATH: nothing to compare", file=sys.stderr)
        return 1
    if args.quick:
        args.n, args.snrs = 60, [0.1, 0.01]
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for snr in args.snrs:
        folder = simulate(snr, args.n, work, args.seed)
        star_in = strip_poses(folder / "particles.star", folder / "no_poses.star")
        _, true_rot, true_org = truth(folder / "particles.star")
        with Contention() as busy:
            relion = run_relion(folder, star_in, args.healpix_order, args.threads, args.particle_diameter,
                                args.offset_range, args.offset_step)
        row = dict(snr=snr, n=args.n, load_avg=os.getloadavg()[0], relion=dict(
            wall_s=relion["wall_s"], reconstruct_s=relion["reconstruct_s"], command=relion["command"],
            other_cores_busy=busy.other_cores,
            median_pmax=float(np.median(relion["pmax"])),
            **errors(relion["rotations"], relion["origins_px"], true_rot, true_org)))
        print(f"SNR {snr:g}: RELION {relion['wall_s']:.1f} s, errors {row['relion']['mean_deg']:.2f} / "
              f"{row['relion']['median_deg']:.2f} deg", flush=True)
        for levels in args.refine_levels:
            with Contention() as busy:
                bp = run_bayespose(star_in, args.healpix_order, levels, args.threads, args.offset_range,
                                   args.offset_step)
            entry = dict(wall_s=bp["wall_s"], scoring_s=bp["timings"]["scoring_s"], other_cores_busy=busy.other_cores,
                         setup_s=bp["timings"]["setup_s"], median_pmax=float(np.median(bp["pmax"])),
                         median_expected_error_deg=float(np.median(bp["expected_error_deg"])))
            for est in ("mmse", "map", "mle"):
                entry[est] = errors(*bp[est], true_rot, true_org)
            row[f"bayespose_levels{levels}"] = entry
            print(f"  bayespose order {args.healpix_order}+{levels}: {bp['wall_s']:.1f} s, MMSE "
                  f"{entry['mmse']['mean_deg']:.2f} / {entry['mmse']['median_deg']:.2f}, MAP "
                  f"{entry['map']['mean_deg']:.2f} / {entry['map']['median_deg']:.2f}, MLE "
                  f"{entry['mle']['mean_deg']:.2f} / {entry['mle']['median_deg']:.2f} deg", flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "relion_compare_quick" if args.quick else "relion_compare"
    meta = dict(command="python benchmarks/relion_compare.py" + (" --quick" if args.quick else ""),
                healpix_order=args.healpix_order, refine_levels=args.refine_levels, threads=args.threads,
                offset_range_px=args.offset_range, offset_step_px=args.offset_step,
                particle_diameter_A=args.particle_diameter, seed=args.seed, date=time.strftime("%Y-%m-%d %H:%M"),
                relion_version=_relion_version())
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    text = markdown(rows, meta)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    if tmp:
        tmp.cleanup()
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    r = meta["healpix_order"]
    lines = [f"# bayespose vs RELION {meta['relion_version']} (one iteration, known map), {meta['threads']} threads",
             "", f"Command: `{meta['command']}` ({meta['date']}). Fragment map, 64 px, 4.4 Å/px, CTF, origins "
             f"±2 px; shifts searched ±{meta['offset_range_px']:g} px step {meta['offset_step_px']:g} by both. "
             f"RELION: `--healpix_order {r} --oversampling 1` (coarse {r}, fine {r + 1}); bayespose: order {r} + "
             "refine levels L (finest order r + L; L = 1 is RELION's finest sampling). Errors: geodesic angle to the "
             "true rotation, mean / median (degrees); RELION's pose is its maximum-posterior one.", "",
             "| SNR | N | method | wall s | mean err | median err | 90% | within 10° | mean shift err px "
             "| other procs (cores) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rel = row["relion"]
        recon = f" (of which ~{rel['reconstruct_s']:.1f} s M step)" if rel.get("reconstruct_s") else ""
        lines.append(f"| {row['snr']:g} | {row['n']} | RELION{recon} | {rel['wall_s']:.1f} | {rel['mean_deg']:.2f} "
                     f"| {rel['median_deg']:.2f} | {rel['p90_deg']:.1f} | {rel['frac_within_10deg']:.2f} "
                     f"| {rel['mean_shift_px']:.2f} | {rel['other_cores_busy']:.1f} |")
        for key, entry in row.items():
            if not key.startswith("bayespose"):
                continue
            levels = key.removeprefix("bayespose_levels")
            for est in ("mmse", "map", "mle"):
                e = entry[est]
                lines.append(f"| {row['snr']:g} | {row['n']} | bayespose {est.upper()} L={levels} "
                             f"| {entry['wall_s']:.1f} | {e['mean_deg']:.2f} | {e['median_deg']:.2f} "
                             f"| {e['p90_deg']:.1f} | {e['frac_within_10deg']:.2f} | {e['mean_shift_px']:.2f} "
                             f"| {entry['other_cores_busy']:.1f} |")
    return "\n".join(lines) + "\n"


def _relion_version() -> str:
    try:
        done = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True)
        for line in (done.stdout + done.stderr).splitlines():
            if "version" in line.lower():
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return "3.1"


if __name__ == "__main__":
    sys.exit(main())
