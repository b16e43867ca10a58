"""Central-slice sampling speed: the compiled CPU loop (numba) against the torch path, and what it does to the
MMSE search.

Prints ns per sampled coefficient of :func:`~bayespose.core.imaging.forward.slice_coefficients` for both paths
(the same rotations, frequencies and prepared volume, measured in the same run; best of ``--repeats``) at boxes
64 / 128 / 256 (the 3J9G fragment shipped with the package, Fourier-padded to the larger boxes), their largest
difference relative to the largest coefficient, and, with ``--search``, a global :func:`assign_poses` (default
search, 200 simulated particles at box 64) with each path.

    .venv/bin/python benchmarks/projection_speed.py --threads 2 --search
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np
import torch
from speed import fourier_pad_map  # benchmarks/ is the script's folder

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.imaging.forward import prepare_volume, slice_coefficients
from bayespose.core.imaging.noise import scoring_frequencies
from bayespose.core.io.mrc import read_map
from bayespose.data import fragment_map_path


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (and the compiled loop's first-call compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def search_with_each_path(volume: np.ndarray, threads: int, n: int = 200) -> None:
    """A global :func:`assign_poses` (default search) of ``n`` simulated particles (random poses, SNR 0.1, no
    CTF, box 64) with the torch path (``BAYESPOSE_NUMBA=0``) and with the compiled loop."""
    from scipy.spatial.transform import Rotation

    from bayespose.core.imaging.particles import ParticleSet
    from bayespose.core.imaging.simulate import simulate_images

    truth = Rotation.random(n, random_state=1).as_matrix()
    images, _ = simulate_images(volume, 5.0, truth, snr=0.1, seed=1)
    particles = ParticleSet(pixel_size=5.0, box=volume.shape[0], image_files=np.array(["in memory"] * n),
                            image_indices=np.arange(n))
    for setting in ("0", "1"):
        os.environ["BAYESPOSE_NUMBA"] = setting
        t0 = time.perf_counter()
        result = assign_poses(particles, volume, PoseSearch(threads=threads, device="cpu"), images=images)
        print(f"global assign_poses, {n} particles, box {volume.shape[0]}, "
              f"{'compiled' if setting == '1' else 'torch'} slices: {time.perf_counter() - t0:.1f} s "
              f"(scoring {result.timings['scoring_s']:.1f} s)")
    os.environ.pop("BAYESPOSE_NUMBA")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--boxes", default="64,128,256")
    parser.add_argument("--rotations", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--search", action="store_true", help="also time a global assign_poses with each path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from scipy.spatial.transform import Rotation

    volume, _ = read_map(fragment_map_path())
    rotations = Rotation.random(args.rotations, random_state=0).as_matrix().astype(np.float32)
    print(f"threads {args.threads}, {args.rotations} rotations, all coefficients up to Nyquist")
    for box in (int(b) for b in args.boxes.split(",")):
        prepared = prepare_volume(fourier_pad_map(volume, box))
        freqs = scoring_frequencies(box, box / 2)
        n_samples = args.rotations * len(freqs)
        seconds = {compiled: best_of(partial(slice_coefficients, prepared, rotations, freqs.kx, freqs.ky,
                                             compiled=compiled), args.repeats) for compiled in (False, True)}
        a = slice_coefficients(prepared, rotations, freqs.kx, freqs.ky, compiled=False)
        b = slice_coefficients(prepared, rotations, freqs.kx, freqs.ky, compiled=True)
        rel = float((a - b).abs().max() / a.abs().max())
        print(f"box {box}: {len(freqs)} coefficients; torch {seconds[False] / n_samples * 1e9:.1f} ns/sample, "
              f"compiled {seconds[True] / n_samples * 1e9:.1f} ns/sample, speed-up "
              f"{seconds[False] / seconds[True]:.1f}x; max difference {rel:.1e} of the largest coefficient")
    if args.search:
        search_with_each_path(volume, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
