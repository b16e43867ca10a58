"""GPU throughput of the scoring kernel next to torch.matmul in the same run, and its agreement with the CPU, at box
128 and 256 (issue 13; run by benchmarks/gpu_check.sh on a GPU machine, never in CI).

Per box (the fragment map Fourier-padded to the box, particles simulated on the GPU: CTF, SNR 0.03, origins ±2 px):

* ``torch.matmul`` float32 GFLOP/s on the GPU: a 4096² square product and the kernel's own cross-term shape, with
  TF32 off (true FP32, what the kernel uses) and, for reference, on;
* the kernel (global HEALPix order 2 at Nyquist, shifts ±3 px step 1, the engine's flop count): a first call
  (projection table built) and a second call on the same particles (steady state), wall time with
  ``torch.cuda.synchronize``; GFLOP/s and its ratio to matmul's;
* the default coarse-to-fine search (order 2 + 2 levels): particles/s, and the projected time of 100,000 particles;
* agreement: the same kernel on the CPU for the first 32 particles: the fraction with the same MAP cell and the
  largest MMSE difference (degrees) among them.

Usage: ``python benchmarks/gpu_speed.py [--out DIR] [--n 512]``; writes ``gpu_speed.json`` and ``gpu_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speed import fourier_pad_map  # noqa: E402  (benchmarks/ is the script's folder)

from bayespose.core.assign import PoseSearch, assign_poses  # noqa: E402
from bayespose.core.geometry.rotations import geodesic_distance_deg  # noqa: E402
from bayespose.core.imaging.particles import ParticleSet  # noqa: E402
from bayespose.core.imaging.simulate import simulate_images  # noqa: E402
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, sample_ctf, sample_poses  # noqa: E402
from bayespose.core.io.mrc import read_map  # noqa: E402
from bayespose.data import fragment_map_path  # noqa: E402

DEVICE = "cuda"  # --dry-run: "cpu" (checks the script on a machine without a GPU; numbers meaningless)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(m: int, k: int, n: int, tf32: bool, repeats: int = 10) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
    torch.matmul(a, b)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    sync()
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2.0 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9


def dataset(box: int, n: int):
    """(particles, images (n, D, D) float32, map) simulated on the GPU."""
    volume, px = read_map(fragment_map_path())
    volume = fourier_pad_map(volume, box) if box != volume.shape[0] else volume
    px = px * 64 / box
    rng = np.random.default_rng(3)
    spec = SimulationSpec(n_particles=n, snr=0.03, max_shift_px=2.0)
    rotations = sample_poses(n, "uniform", rng)
    origins = rng.uniform(-2, 2, (n, 2)) * px
    ctf = sample_ctf(spec, rng)
    images, _ = simulate_images(volume, px, rotations, origins, ctf, 0.03, seed=3, device=DEVICE)
    particles = ParticleSet(pixel_size=px, box=box, image_files=["memory"] * n, image_indices=np.arange(n),
                            rotations=rotations, origins_A=origins, ctf=ctf)
    return particles, images, volume


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def run_box(box: int, n: int) -> dict:
    particles, images, volume = dataset(box, n)
    kernel = dict(healpix_order=2, refine_levels=0, smoothness_nats=float("inf"), shift_range_px=3.0)
    first, t_first = timed(lambda: assign_poses(particles, volume, PoseSearch(device=DEVICE, **kernel),
                                                images=images))
    second, t_second = timed(lambda: assign_poses(particles, volume, PoseSearch(device=DEVICE, **kernel),
                                                  images=images, noise=first.noise))
    flops = first.timings["scoring_gflops"] * first.timings["scoring_s"] * 1e9
    call = first.scoring_calls[0]
    same_shape = matmul_gflops(call.particles * call.shifts, 2 * call.frequencies, call.chunk, tf32=False)
    c2f, t_c2f = timed(lambda: assign_poses(particles, volume, PoseSearch(device=DEVICE, shift_range_px=3.0),
                                            images=images, noise=first.noise))
    sub = np.arange(min(32, n))
    cpu = assign_poses(particles.subset(sub), volume, PoseSearch(device="cpu", **kernel), images=images[sub],
                       noise=first.noise)
    same = geodesic_distance_deg(cpu.map_rotations, second.map_rotations[sub]) < 1e-3
    errors = geodesic_distance_deg(c2f.mmse_rotations, particles.rotations)
    return dict(box=box, n=n, rotations=first.n_rotations, shifts=first.n_shifts, frequencies=call.frequencies,
                kernel_first_s=t_first, kernel_second_s=t_second, kernel_gflop=flops / 1e9,
                kernel_gflops_end_to_end=flops / t_second / 1e9,
                matmul_square_fp32=matmul_gflops(4096, 4096, 4096, tf32=False),
                matmul_square_tf32=matmul_gflops(4096, 4096, 4096, tf32=True), matmul_same_shape_fp32=same_shape,
                c2f_particles_per_s=n / t_c2f, c2f_median_error_deg=float(np.median(errors)),
                projected_100k_c2f_min=100_000 / (n / t_c2f) / 60,
                cpu_same_map_fraction=float(same.mean()),
                cpu_max_mmse_diff_deg=float(geodesic_distance_deg(cpu.mmse_rotations,
                                                                  second.mmse_rotations[sub])[same].max()),
                peak_gpu_mb=torch.cuda.max_memory_allocated() / 1e6 if DEVICE == "cuda" else float("nan"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: checks the script, numbers meaningless")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.dry_run else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for box in args.boxes:
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(run_box(box, args.n))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (dry run)", torch=torch.__version__,
               cuda=torch.version.cuda)
    (args.out / "gpu_speed.json").write_text(json.dumps(dict(environment=env, results=rows), indent=1))
    lines = [f"# GPU kernel ({env['gpu']}, torch {env['torch']}, CUDA {env['cuda']})", "",
             "| box | M | kernel GFLOP/s | matmul FP32 square | same shape | ratio | matmul TF32 | c2f particles/s "
             "| 100k c2f (min) | same MAP as CPU | max MMSE diff ° | peak GPU MB |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['box']} | {r['frequencies']} | {r['kernel_gflops_end_to_end']:.0f} "
                     f"| {r['matmul_square_fp32']:.0f} | {r['matmul_same_shape_fp32']:.0f} "
                     f"| {r['kernel_gflops_end_to_end'] / r['matmul_square_fp32']:.2f} "
                     f"| {r['matmul_square_tf32']:.0f} | {r['c2f_particles_per_s']:.1f} "
                     f"| {r['projected_100k_c2f_min']:.1f} | {r['cpu_same_map_fraction']:.2f} "
                     f"| {r['cpu_max_mmse_diff_deg']:.3f} | {r['peak_gpu_mb']:.0f} |")
    (args.out / "gpu_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
