"""Speed of the pose-scoring kernel next to torch.matmul on the same machine, in the same run (issue 3, item 3).

What it measures (CPU, float32, ``--threads`` threads, default all cores):

* ``torch.matmul`` GFLOP/s of a large square product (the machine's practical ceiling) and of the exact shapes
  the scorer multiplies: the cross term ``(B·J, 2M) @ (2M, Kc)`` and the norm term ``(B, M) @ (M, Kc)``.
* The scoring kernel of :func:`bayespose.core.assign.assign_poses` on simulated particles (fragment map, CTF,
  SNR ``--snr``, origins within ±2 px) at box 64 (4.4 Å/px) and box 128 (the map Fourier-padded to 128 px,
  2.2 Å/px), HEALPix order 2 and 3, shifts within 3 px at 1 px steps (J = 29):

  - ``kernel``: the global grid at full resolution (Nyquist cut-off, ``refine_levels=0``,
    ``smoothness_nats=inf``): particles/s end to end, the engine's own ``timings["scoring_gflops"]`` (its flop
    count over its scoring time, which includes building the projection table once), and the steady state
    (batches after the first, projection table cached) in GFLOP/s and as a ratio to the matmul rates;
  - ``c2f``: the default coarse-to-fine search (``PoseSearch(healpix_order=r)``: information-matched cut-offs and
    two refinement levels): particles/s and the median angular error against the true poses (a sanity check).

  The engine's flop count is checked against an independent count ``N · (2·J·K·2M + 2·K·M)`` from the grid
  sizes it reports; the per-batch numbers come from the engine's log of its scoring calls
  (``result.scoring_calls``). Each configuration runs in a fresh subprocess so that its peak memory (max RSS, from
  ``resource.getrusage``) is its own; matmul is timed in the same subprocess just before and after the kernel.

The machine may be shared: matmul rates are the best of a few repeats, the CPU time used by other processes
during each run is recorded, and ``--wait-quiet S`` waits up to S seconds for an idle machine before each
configuration. On a busy machine, ``--omp-passive`` (OMP_WAIT_POLICY=PASSIVE) avoids OpenMP threads spinning at
barriers while a core is taken by another process.

Usage::

    .venv/bin/python benchmarks/speed.py [--quick] [--out benchmarks/results/speed] [--threads N]

Writes ``speed.md`` (tables) and ``speed.json`` (raw numbers) (``speed_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import own_cpu_s, system_busy_s  # noqa: E402  (benchmarks/ is the script's folder)

from bayespose.core.assign import PoseSearch, assign_poses  # noqa: E402
from bayespose.core.geometry.rotations import geodesic_distance_deg  # noqa: E402
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset  # noqa: E402
from bayespose.core.io.mrc import read_images, read_map, write_map  # noqa: E402
from bayespose.core.io.relion_star import read_star  # noqa: E402
from bayespose.data import fragment_map_path  # noqa: E402

SHIFT_RANGE_PX = 3.0
SHIFT_STEP_PX = 1.0
BATCH = 64


# ------------------------------------------------------------------------------------------------ matmul
def matmul_gflops(m: int, k: int, n: int, repeats: int = 5, min_seconds: float = 0.2) -> float:
    """Best-of-``repeats`` GFLOP/s of ``torch.matmul`` for float32 (m, k) @ (k, n) (2·m·k·n flops per product)."""
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    torch.matmul(a, b)  # warm-up
    flops = 2.0 * m * k * n
    inner = max(1, int(min_seconds / max(_time(lambda: torch.matmul(a, b)), 1e-6)))
    best = min(_time(lambda: [torch.matmul(a, b) for _ in range(inner)]) for _ in range(repeats)) / inner
    return flops / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def square_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The practical ceiling: a large square float32 product."""
    return matmul_gflops(size, size, size, repeats)


# ------------------------------------------------------------------------------------------------ data
def fourier_pad_map(volume: np.ndarray, new_box: int) -> np.ndarray:
    """Band-limited interpolation of a cubic map (D, D, D) onto (D', D', D') with D' >= D (even sizes) by zero-padding
    its centred 3D DFT; the pixel size becomes ``px · D / D'`` and voxel values keep their scale."""
    d = volume.shape[0]
    if new_box < d or d % 2 or new_box % 2:
        raise ValueError(f"need even sizes with new box >= box, got {d} -> {new_box}")
    spectrum = np.fft.fftshift(np.fft.fftn(volume.astype(np.float64)))
    spectrum[0, :, :] = spectrum[:, 0, :] = spectrum[:, :, 0] = 0.0  # the unpaired Nyquist planes
    lo = (new_box - d) // 2
    padded = np.zeros((new_box,) * 3, dtype=complex)
    padded[lo:lo + d, lo:lo + d, lo:lo + d] = spectrum
    out = np.fft.ifftn(np.fft.ifftshift(padded)).real * (new_box / d) ** 3
    return out.astype(np.float32)


def make_dataset(box: int, n: int, snr: float, work: Path, seed: int = 1) -> Path:
    """Simulated particles (fragment map, CTF, origins within ±2 px) at box 64 (4.4 Å/px) or 128 (2.2 Å/px);
    returns the star path (cached in ``work``)."""
    out = work / f"box{box}_n{n}_snr{snr:g}"
    star = out / "particles.star"
    if star.exists():
        return star
    map_path = fragment_map_path()
    if box != 64:
        volume, px = read_map(map_path)
        map_path = work / f"fragment_{box}.mrc"
        write_map(map_path, fourier_pad_map(volume, box), px * volume.shape[0] / box)
    simulate_dataset(map_path, SimulationSpec(n_particles=n, snr=snr, max_shift_px=2.0, seed=seed), out)
    return star


def map_for(box: int, work: Path) -> Path:
    return fragment_map_path() if box == 64 else work / f"fragment_{box}.mrc"


# ------------------------------------------------------------------------------------------------ worker
def run_config(cfg: dict) -> dict:
    """One configuration (in its own process): matmul, the engine, matmul again; returns the numbers."""
    torch.set_num_threads(cfg["threads"])
    particles = read_star(cfg["star"])
    images = read_images(particles)
    volume, _ = read_map(cfg["map"])
    rss_before = _max_rss_mb()
    search = PoseSearch(healpix_order=cfg["order"], shift_range_px=SHIFT_RANGE_PX, shift_step_px=SHIFT_STEP_PX,
                        batch_size=cfg["batch"], threads=cfg["threads"])
    if cfg["mode"] == "kernel":
        search.refine_levels = 0
        search.max_resolution_A = None  # Nyquist
        search.smoothness_nats = float("inf")  # no information-matched cut-off: full resolution
    square_before = square_gflops()
    busy0, own0 = system_busy_s(), own_cpu_s()
    t0 = time.perf_counter()
    result = assign_poses(particles, volume, search, images=images)
    wall = time.perf_counter() - t0
    others = max(0.0, (system_busy_s() - busy0) - (own_cpu_s() - own0)) / wall
    square_after = square_gflops()
    errors = geodesic_distance_deg(result.mmse_rotations, particles.rotations)
    n = len(particles)
    timings = result.timings
    engine_flops = timings["scoring_gflops"] * timings["scoring_s"] * 1e9
    out = dict(cfg, n=n, wall_s=wall, particles_per_s=n / wall, setup_s=timings["setup_s"],
               scoring_s=timings["scoring_s"], engine_gflops=timings["scoring_gflops"],
               n_rotations=result.n_rotations, n_shifts=result.n_shifts, radii_px=timings["radii_px"],
               refined=timings["refined_particles"], square_gflops=max(square_before, square_after),
               square_gflops_before=square_before, square_gflops_after=square_after,
               median_error_deg=float(np.median(errors)), mean_error_deg=float(np.mean(errors)),
               max_rss_mb=_max_rss_mb(), rss_before_mb=rss_before, load_avg=os.getloadavg()[0],
               other_cores_busy=others)
    if cfg["mode"] == "kernel":
        first, rest = result.scoring_calls[0], result.scoring_calls[1:]  # one call per batch (no refinement)
        m, j, k = first.frequencies, first.shifts, first.rotations
        expected = n * (2.0 * j * k * 2 * m + 2.0 * k * m)
        out.update(m=m, chunk=first.chunk, flops_engine=engine_flops, flops_expected=expected,
                   flop_count_ok=bool(abs(engine_flops / expected - 1) < 1e-3))
        if rest:
            seconds = sum(c.seconds for c in rest)
            out["steady_gflops"] = sum(c.flops for c in rest) / seconds / 1e9
            out["steady_particles_per_s"] = sum(c.particles for c in rest) / seconds
            out["best_batch_gflops"] = max(c.flops / c.seconds for c in rest) / 1e9
            out["first_batch_extra_s"] = first.seconds - seconds / sum(c.particles for c in rest) * first.particles
        bj, kc = first.particles * j, first.chunk
        out["gemm_cross_gflops"] = matmul_gflops(bj, 2 * m, kc)
        out["gemm_norm_gflops"] = matmul_gflops(first.particles, m, kc)
        out["gemm_shape"] = f"({bj} x {2 * m}) @ ({2 * m} x {kc})"
    return out


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _wait_quiet(limit_s: float = 600.0, threshold_cores: float = 0.15) -> float:
    """Waits (up to ``limit_s``) until the machine is nearly idle over 3 s; returns the busy cores seen last."""
    t0 = time.time()
    while True:
        busy0 = system_busy_s()
        time.sleep(3.0)
        busy = (system_busy_s() - busy0) / 3.0
        if busy < threshold_cores or time.time() - t0 > limit_s:
            return busy


# ------------------------------------------------------------------------------------------------ report
def markdown(results: list[dict], env: dict) -> str:
    lines = [f"# Scoring-kernel speed ({env['cpu']}, {env['cores']} cores, torch {env['torch']})", "",
             f"Command: `{env['command']}`; started {env['date']}; load average at start {env['load_start']:.2f}; "
             f"OMP_WAIT_POLICY {env['omp_wait_policy']}.",
             "", "## Kernel: global grid at full resolution (Nyquist), shifts ±3 px step 1 (J = 29)", "",
             "| box | order | rotations | M coeffs | N | threads | particles/s | engine GFLOP/s | steady GFLOP/s "
             "| best batch GFLOP/s | matmul square | matmul same shape | steady / square | steady / same shape "
             "| flop count | max RSS MB | other procs (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["mode"] != "kernel":
            continue
        steady = r.get("steady_gflops", float("nan"))
        lines.append(
            f"| {r['box']} | {r['order']} | {r['n_rotations']} | {r['m']} | {r['n']} | {r['threads']} "
            f"| {r['particles_per_s']:.1f} "
            f"| {r['engine_gflops']:.1f} | {steady:.1f} | {r.get('best_batch_gflops', float('nan')):.1f} "
            f"| {r['square_gflops']:.1f} | {r['gemm_cross_gflops']:.1f} "
            f"| {steady / r['square_gflops']:.2f} | {steady / r['gemm_cross_gflops']:.2f} "
            f"| {'ok' if r['flop_count_ok'] else 'MISMATCH'} | {r['max_rss_mb']:.0f} | {r['other_cores_busy']:.1f} |")
    lines += ["", "engine GFLOP/s: the engine's `timings['scoring_gflops']` (its flop count over all its scoring time, "
              "including building the projection table once); steady: batches after the first (table cached); "
              "best batch: the fastest of those batches (as the matmul rates are best-of-5); matmul same shape: the "
              "cross-term GEMM the scorer runs per chunk; other procs: CPU cores used by other processes during the "
              "run (the machine may be shared; with 2 threads on 2 cores any other load stalls OpenMP barriers).",
              "",
              "## Default coarse-to-fine search (information-matched cut-offs, 2 refinement levels)", "",
              "| box | order | N | threads | particles/s | scoring s | engine GFLOP/s | radii px | refined "
              "| median error deg | max RSS MB | other procs (cores) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["mode"] != "c2f":
            continue
        radii = ", ".join(f"{x:.1f}" for x in r["radii_px"])
        lines.append(f"| {r['box']} | {r['order']} | {r['n']} | {r['threads']} | {r['particles_per_s']:.1f} "
                     f"| {r['scoring_s']:.2f} | {r['engine_gflops']:.1f} | {radii} | {r['refined']} "
                     f"| {r['median_error_deg']:.2f} | {r['max_rss_mb']:.0f} | {r['other_cores_busy']:.1f} |")
    return "\n".join(lines) + "\n"


def configs(quick: bool, threads: list[int], work: Path, snr: float) -> list[dict]:
    if quick:
        plan = [("kernel", 64, 2, 128), ("kernel", 128, 2, 128), ("c2f", 64, 2, 128)]
    else:
        plan = [("kernel", 64, 2, 512), ("kernel", 64, 3, 128), ("kernel", 128, 2, 128), ("kernel", 128, 3, 128),
                ("c2f", 64, 2, 512), ("c2f", 64, 3, 128), ("c2f", 128, 2, 128), ("c2f", 128, 3, 128)]
    out = []
    for mode, box, order, n in plan:
        star = make_dataset(box, n, snr, work)
        for t in threads:
            out.append(dict(mode=mode, box=box, order=order, batch=BATCH, threads=t, star=str(star),
                            map=str(map_for(box, work))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="box 64 and 128 at order 2 only, 128 particles")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed")
    parser.add_argument("--work", type=Path, default=None, help="simulated data (default: a temporary folder)")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="thread counts to run each configuration with (default: 1 and all cores)")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS until other processes use < 0.15 cores")
    parser.add_argument("--only", nargs="+", default=None, metavar="MODE:BOX:ORDER",
                        help="run only these configurations, e.g. kernel:64:2 c2f:128:3")
    parser.add_argument("--stem", default=None, help="output file stem (default speed or speed_quick)")
    parser.add_argument("--merge-with", type=Path, default=None, metavar="JSON",
                        help="an earlier speed.json: keep, per configuration and thread count, the run during which "
                             "other processes used the least CPU")
    parser.add_argument("--omp-passive", action="store_true",
                        help="run the workers with OMP_WAIT_POLICY=PASSIVE (robust on a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_config(json.loads(args.worker))))
        return 0
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    env = dict(cpu=_cpu_name(), cores=os.cpu_count(), threads=args.threads, torch=torch.__version__,
               python=platform.python_version(),
               command="python " + " ".join(["benchmarks/speed.py"] + (argv if argv is not None else sys.argv[1:])),
               date=time.strftime("%Y-%m-%d %H:%M"), load_start=os.getloadavg()[0], snr=args.snr,
               omp_wait_policy="PASSIVE" if args.omp_passive else os.environ.get("OMP_WAIT_POLICY", "default"))
    results = []
    plan = configs(args.quick, args.threads, work, args.snr)
    if args.only:
        plan = [c for c in plan if f"{c['mode']}:{c['box']}:{c['order']}" in args.only]
    for cfg in plan:
        if args.wait_quiet > 0:
            cfg["busy_cores_before"] = _wait_quiet(args.wait_quiet)
        env_vars = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_passive else {}))
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                              text=True, env=env_vars)
        if done.returncode:
            raise RuntimeError(f"worker failed for {cfg}:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(_summary(r), flush=True)
    env["load_end"] = os.getloadavg()[0]
    if args.merge_with:
        results, env = merge_runs(json.loads(args.merge_with.read_text()), results, env)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("speed_quick" if args.quick else "speed")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, results=results), indent=1))
    text = markdown(results, env)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    if tmp:
        tmp.cleanup()
    return 0


def merge_runs(earlier: dict, results: list[dict], env: dict) -> tuple[list[dict], dict]:
    """Per (mode, box, order, threads), the run with the least CPU used by other processes (earlier or now)."""
    def key(r):
        return r["mode"], r["box"], r["order"], r["threads"]

    for r in earlier["results"]:
        r.setdefault("run_command", earlier["environment"]["command"])
    for r in results:
        r.setdefault("run_command", env["command"])
    chosen = {key(r): r for r in earlier["results"]}
    for r in results:
        if key(r) not in chosen or r["other_cores_busy"] < chosen[key(r)]["other_cores_busy"]:
            chosen[key(r)] = r
    order = [key(r) for r in earlier["results"]] + [key(r) for r in results if key(r) not in
                                                     {key(e) for e in earlier["results"]}]
    env = dict(env, command=f"{earlier['environment']['command']}, then {env['command']} (merged: per row the "
               "run with the least other-process CPU; each row's run_command in the JSON)")
    return [chosen[k] for k in order], env


def _summary(r: dict) -> str:
    head = (f"{r['mode']:6s} box {r['box']:3d} order {r['order']} N {r['n']:4d} threads {r['threads']}: "
            f"{r['particles_per_s']:7.1f} particles/s")
    if r["mode"] == "kernel":
        steady = r.get("steady_gflops", float("nan"))
        return (f"{head}, engine {r['engine_gflops']:.1f} GFLOP/s, steady {steady:.1f} GFLOP/s, matmul square "
                f"{r['square_gflops']:.1f} / same shape {r['gemm_cross_gflops']:.1f} -> ratio "
                f"{steady / r['square_gflops']:.2f} / {steady / r['gemm_cross_gflops']:.2f}, "
                f"max RSS {r['max_rss_mb']:.0f} MB, other processes {r['other_cores_busy']:.1f} cores")
    return (f"{head}, median error {r['median_error_deg']:.2f} deg, max RSS {r['max_rss_mb']:.0f} MB, "
            f"other processes {r['other_cores_busy']:.1f} cores")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
