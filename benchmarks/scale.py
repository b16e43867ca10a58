"""Scale: time and peak memory of assign, refine (one iteration), train and predict against the number of particles
N (1k-100k) and the box (64, 128, 256); the speed-up of 2 data-parallel processes; the scoring kernel's GFLOP/s next
to torch.matmul in the same process; RELION 3.1 side by side at box 128; a projection for 100k particles of 256 px
on one GPU (issue 13, section 4).

Data (``--work``, default /work/bench/h-scale; several GB): the fragment map of the package (64 px, 4.4 Å/px)
Fourier-padded to 128 and 256 px (2.2 and 1.1 Å/px), 2000 simulated particles per box (CTF, SNR 0.03, origins within
±2 px) in one stack, and star files of N = 1000, 10,000 and 100,000 particles whose rows refer to those images in
turn (image i % 2000: a memory-mapped stack that repeats images; 100,000 distinct 256 px images would be 26 GB). The
metadata (poses, CTF, half sets) repeat too; the engines do not know.

Sections (``--sections``, default all):

* ``memory``: every command of the CLI as a user runs it (a subprocess: ``bayespose assign|refine|train|predict``
  with default settings, ``refine --iters 1``, ``train --epochs 1``, ``predict`` with the network of the 1k run),
  2 threads. Peak RSS from ``/usr/bin/time`` (the kernel's high-water mark of the process); the RSS and the
  progress of the run (its progress bar) sampled every 0.2 s. A run that exceeds ``--limit-s`` is stopped there
  (then its peak is that of the particles it processed, and its trace shows whether memory still grows with the
  particles processed: the "flat trend" of N = 100k).
* ``speed``: the scoring kernel (global grid at Nyquist, the engine's flop count) at box 64, 128 and 256, with
  ``torch.matmul``'s rate of a large square product and of the kernel's own GEMM shape measured in the same
  process before and after (benchmarks/speed.py's worker).
* ``parallel``: assign (box 128) and one refine iteration (box 64) of 1000 particles as 1 process x 1 thread,
  1 process x 2 threads and ``torchrun --nproc-per-node 2`` x 1 thread; the speed-up of the 2 processes.
* ``relion``: ``relion_refine`` (one iteration, known map, HEALPix order 2 + oversampling 1 = 7.5° in the fine
  pass, offsets ±3 px step 1, ``--j 2``) against ``bayespose assign`` (order 2 + 1 level: the same finest
  sampling; and the default order 2 + 2 levels) on the same 100 particles of 128 px, errors against the truth.
* ``report``: ``scale.md`` / ``scale.json`` / ``scale.png`` in ``--out`` from the saved results (``--sections
  report`` alone redraws them), with the GPU projection.

The machine may be shared: every run records the CPU that other processes used meanwhile (``other cores``), and wall
times are only compared within one section's runs. Reproduce: ``.venv/bin/python benchmarks/scale.py`` (hours on a
busy 2-core machine; ``--quick``: N = 1000 only, no 100k star, box 128 only for train and predict).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import Contention, own_cpu_s, system_busy_s  # noqa: E402  (benchmarks/ is the script's folder)

from bayespose.core.io.mrc import read_map, write_map  # noqa: E402
from bayespose.core.io.relion_star import read_star, write_star  # noqa: E402
from bayespose.data import fragment_map_path  # noqa: E402

BASE_N = 2000
SNR = 0.03
SIZES = (1000, 10_000, 100_000)
BOXES = (64, 128, 256)
COMMANDS = ("assign", "refine", "train", "predict")
PROGRESS = re.compile(r"(\d+)/(\d+) \(")


# ------------------------------------------------------------------------------------------------ data
def make_data(work: Path, boxes=BOXES, sizes=SIZES) -> None:
    """Maps, base stacks and tiled star files in ``work/data`` (kept between runs)."""
    from speed import fourier_pad_map

    from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    volume, px = read_map(fragment_map_path())
    for box in boxes:
        map_path = map_for(work, box)
        if not map_path.exists():
            write_map(map_path, volume if box == 64 else fourier_pad_map(volume, box), px * volume.shape[0] / box)
        base = data / f"base{box}"
        if not (base / "particles.star").exists():
            simulate_dataset(map_path, SimulationSpec(n_particles=BASE_N, snr=SNR, max_shift_px=2.0, seed=1), base)
        particles = None
        for n in sizes:
            star = star_for(work, box, n)
            if not star.exists():
                particles = particles or read_star(base / "particles.star")
                write_star(star, particles.subset(np.arange(n) % len(particles)))


def map_for(work: Path, box: int) -> Path:
    return work / "data" / f"fragment_{box}.mrc"


def star_for(work: Path, box: int, n: int) -> Path:
    return work / "data" / f"box{box}_n{n}.star"


# ------------------------------------------------------------------------------------------------ monitored runs
def monitored(cmd: list[str], log: Path, limit_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time``; sample the RSS of its process tree and its progress every 0.2 s; stop
    it (SIGINT, then SIGKILL) after ``limit_s``. Returns wall time, peak RSS (MB, the largest process's high-water
    mark), whether it completed, the last progress (done, total) and the trace [(t, rss MB, done, total)]."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd]
    busy0, own0, t0 = system_busy_s(), own_cpu_s(children=True), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env)
        trace, stopped = [], False
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            time.sleep(0.2)
            t = time.perf_counter() - t0
            try:
                tree = [p for p in parent.children(recursive=True) if p.is_running()]
                rss = sum(p.memory_info().rss for p in tree) / 1e6
            except psutil.Error:
                continue
            done = _progress(log)
            trace.append((round(t, 1), round(rss, 1), *done))
            if t > limit_s and not stopped:
                stopped = True
                for p in tree:
                    if p.name().startswith("python"):
                        p.send_signal(signal.SIGINT)
                threading.Timer(30.0, lambda procs=tree: [p.kill() for p in procs if p.is_running()]).start()
        wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    peaks = [int(x) for x in re.findall(r"MAXRSS_KB (\d+)", text)]
    own = own_cpu_s(children=True) - own0  # the run's CPU seconds (its processes, waited for)
    other = max(0.0, (system_busy_s() - busy0) - own) / wall
    return dict(command=" ".join(cmd), wall_s=wall, completed=proc.returncode == 0 and not stopped,
                returncode=proc.returncode, stopped_at_limit=stopped, peak_rss_mb=max(peaks) / 1e3 if peaks else
                max((r for _, r, *_ in trace), default=float("nan")), progress=_progress(log),
                trace=_thin(trace), cpu_s=own, other_cores=other, load_avg=os.getloadavg()[0])


def _progress(log: Path) -> tuple[int, int]:
    """The last ``done/total`` of the run's progress bar (0, 0 before the first)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 4000))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return 0, 0
    found = PROGRESS.findall(tail)
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def _thin(trace: list, keep: int = 400) -> list:
    step = max(1, len(trace) // keep)
    return trace[::step] + trace[-1:]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bayespose.cli", *args]


def command_for(kind: str, work: Path, box: int, n: int, out: Path, model: Path | None = None) -> list[str]:
    """The CLI command of one memory run (2 threads, CPU, defaults otherwise)."""
    star, map_path = str(star_for(work, box, n)), str(map_for(work, box))
    common = ["--threads", "2", "--device", "cpu"]
    if kind == "assign":
        return cli("assign", "--particles", star, "--map", map_path, *common, "--out", str(out / "assigned.star"))
    if kind == "refine":
        return cli("refine", "--particles", star, "--map", map_path, "--iters", "1", *common, "--out",
                   str(out / "refine"))  # a new folder (the run's log is in ``out``)
    if kind == "train":
        return cli("train", "--particles", star, "--epochs", "1", *common, "--out", str(out / "model.pt"))
    return cli("predict", "--model", str(model), "--particles", star, *common, "--out", str(out / "predicted.star"))


def run_memory(work: Path, results: dict, limit_s: float, quick: bool, large_boxes=BOXES,
               complete_limit_s: float = 4 * 3600.0) -> None:
    """Every command at every box for 1k particles (limit ``complete_limit_s``: they normally complete), then the
    10k and 100k runs at ``large_boxes`` (limit ``limit_s``: their peak and RSS trace show whether memory grows)."""
    sizes = SIZES[:1] if quick else SIZES
    order = sorted(sizes, key=lambda n: (n != min(sizes), -n))  # the complete 1k runs first, then 100k, 10k
    plan = [(kind, box, n) for n in order for kind in COMMANDS
            for box in (BOXES if kind in ("assign", "refine") else (128, 256))
            if not (quick and kind in ("train", "predict") and box == 256)
            and (n == min(sizes) or box in large_boxes)]
    for kind, box, n in plan:
        key = f"{kind}:{box}:{n}"
        if key in results.get("memory", {}):
            continue
        out = work / "runs" / f"{kind}{box}_n{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        model = work / "runs" / f"train{box}_n1000" / "model.pt"
        limit = limit_s if n > min(SIZES) else complete_limit_s  # a complete run's peak is end to end
        row = monitored(command_for(kind, work, box, n, out, model), out / "log.txt", limit)
        row.update(kind=kind, box=box, n=n)
        results.setdefault("memory", {})[key] = row
        save(work, results)
        print(f"{key}: peak {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s, progress {row['progress']}, "
              f"{'done' if row['completed'] else 'stopped'}, other load {row['other_cores']:.1f} cores", flush=True)


# ------------------------------------------------------------------------------------------------ speed / parallel
def run_speed(work: Path, results: dict) -> None:
    """The kernel at Nyquist, box 64/128/256, order 2, 128 particles, 2 threads (speed.py's worker)."""
    for box in BOXES:
        key = f"kernel:{box}"
        if key in results.get("speed", {}):
            continue
        cfg = dict(mode="kernel", box=box, order=2, batch=64, threads=2, star=str(star_for(work, box, 1000)),
                   map=str(map_for(work, box)))
        sub = work / "runs" / f"speed{box}.star"
        write_star(sub, read_star(star_for(work, box, 1000)).subset(np.arange(128)))
        cfg["star"] = str(sub)
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--worker", json.dumps(cfg)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.setdefault("speed", {})[key] = row
        save(work, results)
        print(f"{key}: steady {row.get('steady_gflops', float('nan')):.1f} GFLOP/s, matmul square "
              f"{row['square_gflops']:.1f}, same shape {row['gemm_cross_gflops']:.1f}", flush=True)


def run_parallel(work: Path, results: dict, n: int = 1000) -> None:
    """1 x 1 thread, 1 x 2 threads and torchrun 2 x 1 thread on the same ``n`` particles (a star of the data)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
              "bayespose.cli"]
    for kind, box in (("assign", 128), ("refine", 64)):
        for label, prefix, threads in (("1x1", cli(), "1"), ("1x2", cli(), "2"), ("2x1", launch, "1")):
            key = f"{kind}:{box}:{label}"
            if key in results.get("parallel", {}):
                continue
            out = work / "runs" / f"par_{kind}{box}_{label}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = command_for(kind, work, box, n, out)[3:]  # the CLI arguments after "-m bayespose.cli"
            cmd[cmd.index("--threads") + 1] = threads
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            row = monitored(prefix + cmd, out / "log.txt", 1e9, env=env)
            row.update(kind=kind, box=box, label=label, n=n)
            results.setdefault("parallel", {})[key] = row
            save(work, results)
            print(f"{key}: {row['wall_s']:.1f} s, other load {row['other_cores']:.1f} cores", flush=True)


# ------------------------------------------------------------------------------------------------ relion
def run_relion_side_by_side(work: Path, results: dict, n: int = 100) -> None:
    import relion_compare as rc

    if "relion" in results:
        return
    folder = work / "relion128"
    folder.mkdir(parents=True, exist_ok=True)
    particles = read_star(work / "data" / "base128" / "particles.star").subset(np.arange(n))
    write_star(folder / "particles.star", particles)
    star_in = rc.strip_poses(folder / "particles.star", folder / "no_poses.star")
    _, true_rot, true_org = rc.truth(folder / "particles.star")
    map_path = map_for(work, 128)
    diameter = 0.9 * 128 * particles.pixel_size
    rows = []
    with Contention() as busy:
        relion = rc.run_relion(folder, star_in, 2, 2, diameter, 3.0, 1.0, map_path=map_path)
    rows.append(dict(program="RELION 3.1 relion_refine, HEALPix 2 + oversampling 1", wall_s=relion["wall_s"],
                     reconstruct_s=relion["reconstruct_s"], **rc.errors(relion["rotations"], relion["origins_px"],
                                                                        true_rot, true_org),
                     other_cores=busy.other_cores))
    for levels in (1, 2):
        with Contention() as busy:
            ours = rc.run_bayespose(star_in, 2, levels, 2, 3.0, 1.0, map_path=map_path)
        for est in ("mmse", "map"):
            rows.append(dict(program=f"bayespose assign, order 2 + {levels} level(s), {est.upper()}",
                             wall_s=ours["wall_s"], **rc.errors(*ours[est], true_rot, true_org),
                             other_cores=busy.other_cores))
    results["relion"] = dict(rows=rows, n=n, command=relion["command"])
    save(work, results)
    for r in rows:
        print(f"{r['program']}: {r['wall_s']:.1f} s, mean/median {r['mean_deg']:.2f}/{r['median_deg']:.2f} deg")


# ------------------------------------------------------------------------------------------------ report
def save(work: Path, results: dict) -> None:
    (work / "scale.json").write_text(json.dumps(results, indent=1, default=float))


def report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(_without_traces(results), indent=1, default=float))
    (out / "scale.md").write_text(markdown(results))
    figure(results).savefig(out / "scale.png", dpi=110, bbox_inches="tight")
    print((out / "scale.md").read_text())


def _without_traces(results: dict) -> dict:
    slim = json.loads(json.dumps(results, default=float))
    for row in slim.get("memory", {}).values():
        row["trace"] = row["trace"][:: max(1, len(row["trace"]) // 60)]
    for row in slim.get("parallel", {}).values():
        row.pop("trace", None)
    return slim


def steady_rate(row: dict) -> float:
    """Particles per second of the run's last progress phase (from its trace; NaN without progress)."""
    trace = [t for t in row["trace"] if t[2] > 0]
    if len(trace) < 3:
        return float("nan")
    (t1, _, d1, n1), (t2, _, d2, n2) = trace[len(trace) // 3], trace[-1]
    return (d2 - d1) / max(t2 - t1, 1e-9) if n1 == n2 and d2 > d1 else float("nan")


def markdown(results: dict) -> str:
    lines = ["# Scale: memory and time against N and box (issue 13)", ""]
    mem = results.get("memory", {})
    if mem:
        lines += ["## Peak memory and time (CLI runs, 2 threads, CPU)", "",
                  "| command | box | N | peak RSS MB | wall s | processed | completed | other load (cores) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mem.values():
            done, total = r["progress"]
            lines.append(f"| {r['kind']} | {r['box']} | {r['n']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} "
                         f"| {done}/{total} | {'yes' if r['completed'] else 'no (stopped)'} "
                         f"| {r['other_cores']:.1f} |")
    spd = results.get("speed", {})
    if spd:
        lines += ["", "## Scoring kernel vs torch.matmul (same process, 2 threads, order 2 at Nyquist)", "",
                  "| box | M coeffs | steady GFLOP/s | matmul square | matmul same shape | ratio | peak RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in spd.values():
            steady = r.get("steady_gflops", float("nan"))
            lines.append(f"| {r['box']} | {r['m']} | {steady:.1f} | {r['square_gflops']:.1f} "
                         f"| {r['gemm_cross_gflops']:.1f} | {steady / r['square_gflops']:.2f} "
                         f"| {r['max_rss_mb']:.0f} |")
    par = results.get("parallel", {})
    if par:
        n_par = next(iter(par.values())).get("n", 1000)
        lines += ["", f"## Two data-parallel processes (torchrun, gloo) on {n_par} particles", "",
                  "| command | box | 1 process x 1 thread s | 1 x 2 threads s | 2 processes x 1 thread s "
                  "| speed-up 2x1 vs 1x1 | 2x1 vs 1x2 |", "|---|---|---|---|---|---|---|"]
        for kind, box in sorted({(r["kind"], r["box"]) for r in par.values()}):
            w = {lab: par.get(f"{kind}:{box}:{lab}", {}).get("wall_s", float("nan")) for lab in ("1x1", "1x2", "2x1")}
            lines.append(f"| {kind} | {box} | {w['1x1']:.1f} | {w['1x2']:.1f} | {w['2x1']:.1f} "
                         f"| {w['1x1'] / w['2x1']:.2f} | {w['1x2'] / w['2x1']:.2f} |")
    rel = results.get("relion")
    if rel:
        lines += ["", f"## RELION 3.1 side by side, box 128, {rel['n']} particles, SNR {SNR}", "",
                  "| program | wall s | mean / median error deg | < 10° | mean shift error px | other load |",
                  "|---|---|---|---|---|---|"]
        for r in rel["rows"]:
            lines.append(f"| {r['program']} | {r['wall_s']:.1f} | {r['mean_deg']:.2f} / {r['median_deg']:.2f} "
                         f"| {100 * r['frac_within_10deg']:.0f} % | {r['mean_shift_px']:.2f} "
                         f"| {max(r['other_cores'], 0):.1f} |")
    lines += ["", projection(results)]
    return "\n".join(lines) + "\n"


def projection(results: dict) -> str:
    """The time of 100k particles at box 256 on one GPU, projected from the measured work per particle and an
    assumed sustained fraction of the GPU's FP32 rate (stated as a projection)."""
    mem = results.get("memory", {})
    spd = results.get("speed", {}).get("kernel:256")
    row = mem.get("assign:256:1000")
    if not row or not spd:
        return "(GPU projection: needs the memory and speed sections)"
    rate = steady_rate(row)
    cpu_gflops = spd.get("steady_gflops", float("nan"))
    gpu_tflops, efficiency = 60.0, 0.5  # H100 SXM FP32 (non-tensor) ~60 TFLOP/s; half of it sustained, assumed
    speedup = gpu_tflops * 1e3 * efficiency / cpu_gflops
    hours_cpu = 100_000 / rate / 3600
    return (f"**Projection (not a measurement; benchmarks/gpu_check.sh measures it when a GPU is lent).** assign at box "
            f"256 ran at {rate:.1f} particles/s on this CPU (default search, 2 threads), i.e. "
            f"{hours_cpu * 60:.0f} min for 100,000 particles; its kernel ran at {cpu_gflops:.0f} GFLOP/s. One GPU "
            f"sustaining {efficiency:.0%} of {gpu_tflops:.0f} TFLOP/s FP32 would score {speedup:.0f}x faster: about "
            f"{hours_cpu * 3600 / speedup:.0f} s of scoring for 100,000 particles, so the parts that stay on the CPU "
            "(reading 26 GB of images, the coarse-to-fine bookkeeping) would set the time.")


def figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = results.get("memory", {})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"assign": "C0", "refine": "C1", "train": "C2", "predict": "C3"}
    styles = {64: ":", 128: "--", 256: "-"}
    for kind in COMMANDS:
        for box in BOXES:
            rows = sorted((r for r in mem.values() if r["kind"] == kind and r["box"] == box), key=lambda r: r["n"])
            if rows:
                axes[0].plot([r["n"] for r in rows], [r["peak_rss_mb"] / 1e3 for r in rows], styles[box],
                             color=colours[kind], marker="o", label=f"{kind} {box} px")
    axes[0].set(xscale="log", xlabel="particles N", ylabel="peak RSS (GB)", title="peak memory vs N")
    axes[0].legend(fontsize=7, ncol=2)
    for r in mem.values():
        if r["n"] == max(SIZES) and r["box"] == 256:
            trace = np.array([t for t in r["trace"] if t[2] > 0] or [[0, 0, 0, 1]], dtype=float)
            axes[1].plot(trace[:, 2], trace[:, 1] / 1e3, color=colours[r["kind"]], label=f"{r['kind']} 256 px")
    axes[1].set(xlabel="particles processed (progress of the 100k run)", ylabel="RSS (GB)",
                title="100,000 particles at box 256: RSS while running")
    axes[1].legend(fontsize=7)
    for kind in ("assign", "refine"):
        for box in BOXES:
            rows = [r for r in mem.values() if r["kind"] == kind and r["box"] == box and r["completed"]]
            if rows:
                rows.sort(key=lambda r: r["n"])
                axes[2].plot([r["n"] for r in rows], [r["wall_s"] for r in rows], styles[box], marker="o",
                             color=colours[kind], label=f"{kind} {box} px")
    axes[2].set(xscale="log", yscale="log", xlabel="particles N", ylabel="wall time (s)",
                title="time vs N (completed runs; shared machine)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/work/bench/h-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--sections", nargs="+", default=["memory", "speed", "parallel", "relion", "report"],
                        choices=["memory", "speed", "parallel", "relion", "report"])
    parser.add_argument("--limit-s", type=float, default=900.0,
                        help="stop a memory run of 10k or 100k particles after this many seconds (1k runs complete)")
    parser.add_argument("--quick", action="store_true", help="N = 1000 only (no 10k/100k runs)")
    parser.add_argument("--large-boxes", nargs="+", type=int, default=list(BOXES), choices=BOXES,
                        help="boxes of the 10k and 100k memory runs (default all)")
    parser.add_argument("--complete-limit-s", type=float, default=4 * 3600.0,
                        help="limit of the 1k memory runs (meant to complete)")
    parser.add_argument("--parallel-n", type=int, default=1000, choices=(200, 1000),
                        help="particles of the parallel section's runs")
    parser.add_argument("--redo", nargs="*", default=[], metavar="KEY",
                        help="forget these saved results (e.g. memory:assign:256:1000) and run them again")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "scale.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for key in args.redo:
        section, _, rest = key.partition(":")
        results.get(section, {}).pop(rest, None) if rest else results.pop(section, None)
    results.setdefault("environment", {}).update(command="python benchmarks/scale.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), cores=os.cpu_count())
    if set(args.sections) - {"report"}:
        make_data(args.work, sizes=(SIZES[:1] if args.quick else SIZES) + (args.parallel_n,))
    if "memory" in args.sections:
        run_memory(args.work, results, args.limit_s, args.quick, args.large_boxes, args.complete_limit_s)
    if "speed" in args.sections:
        run_speed(args.work, results)
    if "parallel" in args.sections:
        run_parallel(args.work, results, args.parallel_n)
    if "relion" in args.sections and shutil.which("relion_refine"):
        run_relion_side_by_side(args.work, results)
    save(args.work, results)
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
