"""Data-parallel runs: ``torchrun --nproc-per-node 2 bayespose assign|refine`` (2 CPU processes, gloo) write what one
process writes.

Data: 160 particles simulated from the fragment map Fourier-cropped to 32 px (8.8 Å/px), CTF, SNR 0.1, origins within
±1 px: small enough that a torchrun launch costs seconds. The one-process reference runs in this process with the
same command line (1 thread each, so that every process multiplies matrices of the same shapes the same way).

* assign: the 2 processes score alternate batches (:func:`bayespose.core.parallel.my_batches`) of the same
  composition as one process (batches of 64: the main process scores particles 0-63 and 128-159, its progress
  bar counts 96), so every pose and statistic must be equal to float rounding (1e-6 relative).
* refine (1 iteration + the final pass to Nyquist): each process inserts its own particles and the accumulators are
  summed, so the maps differ only by the order of float additions (measured: 2e-7 of the map's maximum); the
  bound 1e-4 of the maximum (and poses within 0.05°) would fail for a missing all-reduce (half the particles: map
  difference ~50 %) or a process that scored other particles' batches twice.
* train (DistributedDataParallel): every process draws the same batches and trains on its half of each, the
  gradients averaged; the history's loss and sample counts are those of whole batches (summed over the processes:
  a missing reduction halves the samples), one checkpoint is written, and the run is an equally good training
  (first-epoch loss within 10 % of one process's: CPU BatchNorm normalises each half with its own statistics).
* predict: the processes predict alternate blocks of particles and the main one writes all rows: the same poses
  and confidences as one process, to float rounding.
* Other commands refuse to run under torchrun (they would write their outputs once per process): exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bayespose.cli import main
from bayespose.core import parallel
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.relion_star import read_star
from bayespose.data import fragment_map_path
from tests.helpers import fourier_crop

ROOT = Path(__file__).resolve().parents[2]
ASSIGN_ARGS = ["--healpix-order", "1", "--refine-levels", "2", "--shift-range", "1", "--threads", "1",
               "--device", "cpu"]
REFINE_ARGS = ["--iters", "1", "--healpix-order", "1", "--max-healpix-order", "2", "--shift-range", "1",
               "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(star, map) of 160 particles at box 32."""
    out = tmp_path_factory.mktemp("dp")
    volume, px = read_map(fragment_map_path())
    map_path = out / "map32.mrc"
    write_map(map_path, fourier_crop(volume, 32), px * volume.shape[0] / 32)
    simulate_dataset(map_path, SimulationSpec(n_particles=160, snr=0.1, ctf=True, max_shift_px=1.0, seed=7),
                     out / "sim")
    return out / "sim" / "particles.star", map_path


def _torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", "-m", "bayespose.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_assign_two_processes_write_what_one_writes(small, tmp_path):
    star, map_path = small
    common = ["assign", "--particles", str(star), "--map", str(map_path), *ASSIGN_ARGS]
    assert main([*common, "--out", str(tmp_path / "one.star")]) == 0
    done = _torchrun([*common, "--out", str(tmp_path / "two.star")])
    assert done.stdout.count("assigned 160 particles on 2 processes") == 1  # only the main process prints
    assert "96/96" in done.stderr and "160/160" not in done.stderr  # its share: 96 of the 160 particles
    one, two = read_star(tmp_path / "one.star"), read_star(tmp_path / "two.star")
    assert geodesic_distance_deg(one.rotations, two.rotations).max() < 1e-3
    np.testing.assert_allclose(two.origins_A, one.origins_A, atol=1e-6)
    assert set(one.extra) == set(two.extra)
    for name, values in one.extra.items():
        if np.issubdtype(np.asarray(values).dtype, np.number):
            np.testing.assert_allclose(two.extra[name], values, rtol=1e-6, atol=1e-6, err_msg=name)


def test_refine_two_processes_give_the_one_process_result(small, tmp_path):
    star, map_path = small
    common = ["refine", "--particles", str(star), "--map", str(map_path), *REFINE_ARGS]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.stdout.count("refined 160 particles on 2 processes") == 1
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        a, _ = read_map(tmp_path / "one" / name)
        b, _ = read_map(tmp_path / "two" / name)
        assert np.abs(a - b).max() < 1e-4 * np.abs(a).max(), name
    one, two = read_star(tmp_path / "one" / "particles.star"), read_star(tmp_path / "two" / "particles.star")
    assert geodesic_distance_deg(one.rotations, two.rotations).max() < 0.05
    np.testing.assert_array_equal(one.half_set, two.half_set)
    a = np.loadtxt(tmp_path / "one" / "fsc.csv", delimiter=",", skiprows=1)
    b = np.loadtxt(tmp_path / "two" / "fsc.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(b, a, atol=1e-4)


def test_train_and_predict_two_processes(small, tmp_path):
    import torch

    star, _ = small
    train = ["train", "--particles", str(star), "--net-box", "16", "--grid-order", "1", "--epochs", "1",
             "--batch-size", "32", "--threads", "1", "--device", "cpu"]
    assert main([*train, "--out", str(tmp_path / "one.pt")]) == 0
    done = _torchrun([*train, "--out", str(tmp_path / "two.pt")])
    assert done.stdout.count("on 2 processes") == 1, done.stdout
    one = torch.load(tmp_path / "one.pt", map_location="cpu", weights_only=False)["history"]
    two = torch.load(tmp_path / "two.pt", map_location="cpu", weights_only=False)["history"]
    assert [row["epoch"] for row in two] == [row["epoch"] for row in one] == [1]
    assert two[0]["samples"] == one[0]["samples"] >= 2048
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=0.1)
    assert np.isfinite(two[0]["val_loss"])
    predict = ["predict", "--model", str(tmp_path / "one.pt"), "--particles", str(star), "--top-k", "2",
               "--batch-size", "32", "--threads", "1", "--device", "cpu"]
    assert main([*predict, "--out", str(tmp_path / "one.star")]) == 0
    _torchrun([*predict, "--out", str(tmp_path / "two.star")])
    a, b = read_star(tmp_path / "one.star"), read_star(tmp_path / "two.star")
    assert len(b) == len(a) == 160
    assert geodesic_distance_deg(a.rotations, b.rotations).max() < 1e-3
    np.testing.assert_allclose(b.extra["bpDeepConfidence"], a.extra["bpDeepConfidence"], rtol=1e-5)


def test_commands_that_write_once_refuse_torchrun(small, tmp_path, monkeypatch, capsys):
    _, map_path = small
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["simulate", "--map", str(map_path), "--n", "4", "--snr", "1", "--out", str(tmp_path / "sim")])
    assert rc == 2
    assert "does not run under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


def test_plain_run_helpers_are_identities():
    """Without torchrun: one process, every batch, results unchanged."""
    assert not parallel.is_distributed() and parallel.world_size() == 1 and parallel.is_main()
    batches = parallel.my_batches(10, 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    a = np.arange(6.0).reshape(3, 2)
    assert parallel.all_reduce_sum(a) is a
    assert parallel.combine_rows([a], np.array([0]))[0] is a
    assert parallel.main_first(lambda: 5) == 5
