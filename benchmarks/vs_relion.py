#!/usr/bin/env python
"""bayespose against RELION 3.1 on independent data: the table of issue 11 (assign and refine accuracy vs SNR,
maps vs truth), the FSC of our map vs ``relion_reconstruct`` from our own poses, and the calibration of the
expected error.

Data (independent of our simulator's image formation): the asymmetric 3J9G fragment
(``bayespose.data.fragment_map_path()``, 64³ px, 4.4 Å/px); N uniform poses, origins uniform in ±2 px per axis
(|origin| <= 2.8 px: inside both programs' ±3 px search), CTF (defocus 1.0-2.5 µm, astigmatism <= 200 Å, 300 kV)
drawn by our simulator into a RELION 3.1 star; the images are made by ``relion_project --ctf --add_noise
--white_noise S`` with S set from the clean projections' variance so that SNR = clean variance / noise variance
(../shared/data/README.md). The noisy stacks are made once per SNR and cached (RELION's noise is not seeded).

Runs per SNR (``--snrs``, default 0.1 0.03 0.01), all on the same particles:

* ``assign``: ``assign_poses`` against the TRUE map (default search), MMSE and MLE;
* RELION one iteration against the true map at equal sampling (``relion_refine --iter 1 --healpix_order 2
  --oversampling 2 --ctf_corrected_ref``: coarse 15°, finest 3.75° = our order 2 + 2 levels);
* RELION 3.1 ``relion_refine_mpi --auto_refine`` from the truth low-passed to 30 Å (em_refine.py's command);
* ``refine`` (SNR ``--refine-snrs``, default 0.03): bayespose soft EM from the same 30 Å start; its map, the map
  ``relion_reconstruct --ctf`` makes from its final poses, and RELION's map, each against the truth (FSC).

RELION runs take long (auto-refine ~1 h per SNR for 500 particles on 2 cores): they are cached in
``--work`` (``relion_*`` folders with a ``summary.json``) and reused by later calls; ``--relion-only`` runs just
them (to start in the background). ``--force-relion`` re-runs them.

Outputs (``--out``, default ``benchmarks/results/vs_relion``): ``README.md``, ``results.json``,
``fig1_fsc.png`` (FSC vs truth), ``fig2_calibration.png`` (expected vs actual error).

    .venv/bin/python benchmarks/vs_relion.py --work /tmp/vs_relion            # everything (RELION cached)
    .venv/bin/python benchmarks/vs_relion.py --work /tmp/vs_relion --relion-only
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_relion as rel  # noqa: E402
from _machine import Contention  # noqa: E402
from relion_compare import strip_poses  # noqa: E402

from bayespose.core.geometry.rotations import euler_to_matrix, geodesic_distance_deg  # noqa: E402
from bayespose.core.imaging.particles import ParticleSet  # noqa: E402
from bayespose.core.imaging.reconstruct import fsc, lowpass, resolution_at  # noqa: E402
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset  # noqa: E402
from bayespose.core.io.mrc import read_images, read_map, write_map  # noqa: E402
from bayespose.core.io.relion_star import read_star, write_star  # noqa: E402
from bayespose.data import fragment_map_path  # noqa: E402

START_A = 30.0
DIAMETER_A = 0.9 * 64 * 4.4  # RELION's --particle_diameter and our refine's default (0.9 box)


# ------------------------------------------------------------------------------------------------ data
def truth_set(work: Path, n: int, seed: int) -> tuple[ParticleSet, Path]:
    """The true poses, origins and CTFs (our simulator's star, clean images), cached in ``work/truth``."""
    folder = work / "truth"
    if not (folder / "particles.star").exists():
        simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=n, snr=None, max_shift_px=2.0, seed=seed),
                         folder)
    return read_star(folder / "particles.star"), folder / "particles.star"


def noisy_set(work: Path, truth: ParticleSet, truth_star: Path, snr: float) -> tuple[ParticleSet, np.ndarray, dict]:
    """relion_project particles at ``snr`` (made once, then read back: RELION's noise is not reproducible)."""
    star = work / "relion_data" / f"noisy_snr{snr:g}.star"
    info_path = star.with_suffix(".json")
    if not star.exists() or not info_path.exists():
        data = rel.relion_dataset(fragment_map_path(), truth_star, truth, snr, work / "relion_data")
        info_path.write_text(json.dumps({"snr_measured": data.snr, "white_noise": data.white_noise,
                                         "noise_variance": data.noise_variance}))
    particles = read_star(star)
    if geodesic_distance_deg(particles.rotations, truth.rotations).max() > 1e-3:
        raise RuntimeError(f"{star} does not carry the true poses")
    particles = replace(particles, half_set=truth.half_set)
    return particles, read_images(particles), json.loads(info_path.read_text())


def start_map(work: Path) -> Path:
    truth, px = read_map(fragment_map_path())
    path = work / f"start{START_A:g}.mrc"
    if not path.exists():
        write_map(path, lowpass(truth, START_A, px).numpy(), px)
    return path


# ------------------------------------------------------------------------------------------------ RELION
def _relion_poses(table, particles: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """RELION's output poses (rotations, origins px) in the order of ``particles`` (matched by image index)."""
    index = np.array([int(name.split("@")[0]) - 1 for name in table["rlnImageName"]])
    order = np.argsort(index)  # star row of particle 0, 1, ...
    rot = euler_to_matrix(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float))[order]
    org = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)[order] / particles.pixel_size
    if len(rot) != len(particles):
        raise RuntimeError(f"RELION returned {len(rot)} of {len(particles)} particles")
    return rot, org


def _run_logged(cmd: list[str], cwd: Path, log: Path) -> tuple[int, float, float]:
    with Contention() as load:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    log.write_text(" ".join(cmd) + "\n\n" + done.stdout + "\n" + done.stderr)
    return done.returncode, wall, load.other_cores


def relion_run(work: Path, snr: float, kind: str, force: bool) -> dict | None:
    """RELION run ``kind`` ("auto": auto-refine from 30 Å, "oneiter": one iteration at equal sampling on the true
    map) on the SNR's particles; cached in ``work/relion_{kind}_snr{snr}/summary.json`` (poses in ``poses.npz``)."""
    if shutil.which("relion_refine") is None:
        return None
    folder = work / f"relion_{kind}_snr{snr:g}"
    summary = folder / "summary.json"
    if summary.exists() and not force:
        return json.loads(summary.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "run").mkdir(parents=True)
    star_in = strip_poses(work / "relion_data" / f"noisy_snr{snr:g}.star", folder / "in.star")
    common = ["--i", star_in.name, "--o", "run/run", "--pad", "2", "--ctf", "--ctf_corrected_ref",
              "--particle_diameter", f"{DIAMETER_A:g}", "--zero_mask", "--offset_range", "3", "--offset_step", "1",
              "--sym", "C1", "--norm", "--scale", "--dont_combine_weights_via_disc", "--pool", "10"]
    if kind == "auto":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi", "--auto_refine",
               "--split_random_halves", "--ref", str(start_map(work)), "--ini_high", f"{START_A:g}",
               "--flatten_solvent", "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
               "--low_resol_join_halves", "40", "--j", "1", *common]
        data, final_map = folder / "run" / "run_data.star", folder / "run" / "run_class001.mrc"
    else:
        cmd = ["relion_refine", "--ref", str(fragment_map_path()), "--ini_high", "10", "--iter", "1", "--K", "1",
               "--tau2_fudge", "1", "--oversampling", "2", "--healpix_order", "2", "--j", "2", *common]
        data, final_map = folder / "run" / "run_it001_data.star", None
    print(f"[RELION {kind} SNR {snr:g}] {' '.join(cmd)}", flush=True)
    code, wall, other = _run_logged(cmd, folder, folder / "stdout.txt")
    if code or not data.exists():
        raise RuntimeError(f"RELION {kind} failed ({code}); see {folder / 'stdout.txt'}")
    table = starfile.read(data, always_dict=True)["particles"]
    particles = read_star(work / "relion_data" / f"noisy_snr{snr:g}.star")
    rot, org = _relion_poses(table, particles)
    order = np.argsort([int(name.split("@")[0]) for name in table["rlnImageName"]])
    np.savez(folder / "poses.npz", rotations=rot, origins_px=org,
             pmax=table["rlnMaxValueProbDistribution"].to_numpy(float)[order])
    out = {"kind": kind, "snr": snr, "command": " ".join(cmd), "wall_s": wall, "other_cores": other,
           "data_star": str(data), "map": str(final_map) if final_map else None}
    if kind == "auto":
        model = starfile.read(folder / "run" / "run_model.star", always_dict=True)["model_general"]
        out["reported_resolution_A"] = float(np.asarray(model["rlnCurrentResolution"]).ravel()[0])
        out["iterations"] = len(sorted((folder / "run").glob("run_it*_half1_model.star")))
    summary.write_text(json.dumps(out, indent=1))
    print(f"[RELION {kind} SNR {snr:g}] done in {wall:.0f} s (other cores {other:.1f})", flush=True)
    return out


def relion_poses(work: Path, snr: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    saved = np.load(work / f"relion_{kind}_snr{snr:g}" / "poses.npz")
    return saved["rotations"], saved["origins_px"]


def relion_reconstruct(work: Path, particles: ParticleSet, rotations: np.ndarray, origins_A: np.ndarray,
                       name: str) -> np.ndarray:
    """``relion_reconstruct --ctf`` of ``particles`` at the given poses (half sets joined): the map any program
    gets from these poses with RELION's own reconstruction (Wiener-free, gridding-corrected)."""
    folder = work / "reconstruct"
    folder.mkdir(parents=True, exist_ok=True)
    star = folder / f"{name}.star"
    write_star(star, replace(particles, rotations=rotations, origins_A=origins_A),
               relative_to=folder)
    out = folder / f"{name}.mrc"
    cmd = ["relion_reconstruct", "--i", star.name, "--o", out.name, "--ctf"]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode or not out.exists():
        raise RuntimeError(f"relion_reconstruct failed: {done.stderr[-1500:]}")
    return read_map(out)[0]


# ------------------------------------------------------------------------------------------------ metrics
def errors_deg(rotations: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return geodesic_distance_deg(rotations, truth)


def summary(err: np.ndarray) -> dict:
    e = np.asarray(err, dtype=np.float64)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "se": float(e.std(ddof=1) / math.sqrt(len(e))),
            "frac_over30": float((e > 30).mean()), "frac_under5": float((e < 5).mean()), "n": int(len(e))}


def fsc_vs_truth(volume: np.ndarray, truth: np.ndarray, px: float) -> dict:
    freq, values = fsc(volume, truth, px)
    freq, values = freq.numpy(), values.numpy()
    return {"fsc05_A": resolution_at(freq, values, 0.5), "fsc0143_A": resolution_at(freq, values, 0.143),
            "freq": freq.tolist(), "curve": values.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="cache of data and RELION runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_relion")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.03, 0.01])
    parser.add_argument("--refine-snrs", type=float, nargs="+", default=[0.03])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--relion-only", action="store_true", help="make the data and run RELION (cached), no more")
    parser.add_argument("--force-relion", action="store_true")
    parser.add_argument("--no-relion", action="store_true", help="use cached RELION runs only, run none")
    parser.add_argument("--relion-kinds", nargs="+", choices=["oneiter", "auto"], default=["oneiter", "auto"],
                        help="which RELION runs to make, in this order (one iteration: minutes; auto-refine: "
                             "~1 h per SNR on 2 cores)")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    truth, truth_star = truth_set(work, args.n, args.seed)
    for snr in args.snrs:
        noisy_set(work, truth, truth_star, snr)
    if not args.no_relion:
        for kind in args.relion_kinds:
            for snr in args.snrs:
                relion_run(work, snr, kind, args.force_relion)
    if args.relion_only:
        return 0
    from vs_relion_runs import run_all  # our runs and the report (kept apart: this file is RELION's side)

    return run_all(args, work, truth)


if __name__ == "__main__":
    sys.exit(main())
