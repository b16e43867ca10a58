"""The files of a simulation (:func:`bayespose.core.imaging.synthetic_dataset.simulate_dataset`) replace earlier
ones as a unit: a run killed between the stack and the star leaves the old, matching pair; temporaries of killed
runs are removed; the star refers to the stack at its final path; impossible runs fail before any work."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bayespose.core.imaging import synthetic_dataset
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images
from bayespose.core.io.relion_star import read_star
from bayespose.data import fragment_map_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def old_run(tmp_path) -> Path:
    out = tmp_path / "sim"
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=6, snr=0.5, seed=1), out)
    (out / "notes.txt").write_text("the user's notes")
    return out


def test_a_run_killed_between_stack_and_star_leaves_the_old_outputs(old_run, monkeypatch):
    before = _snapshot(old_run)

    def killed(path, *args, **kwargs):
        assert (Path(path).parent / "particles.mrcs").is_file()  # the new stack is written: now the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_dataset, "write_star", killed)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=9, snr=0.5, seed=2), old_run)
    assert _snapshot(old_run) == before  # the old stack beside its own star, nothing else
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["sim"]  # no temporary left


def test_stale_temporaries_of_killed_runs_are_removed(old_run):
    (old_run.parent / ".sim.k1ll3d.part").mkdir()  # the temporary folder of a run killed with SIGKILL
    (old_run.parent / ".sim.k1ll3d.part" / "particles.mrcs").write_bytes(b"half a stack")
    (old_run / ".particles.mrcs.abcd.part").write_bytes(b"half a stack of an older version")
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=4, snr=0.5, seed=3), old_run)
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["sim"]
    assert sorted(p.name for p in old_run.iterdir()) == ["notes.txt", "particles.mrcs", "particles.star",
                                                          "simulation.json"]


def test_the_star_refers_to_the_stack_at_its_final_path(old_run, tmp_path):
    truth = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=5, snr=None, seed=4), old_run)
    stack = str((old_run / "particles.mrcs").resolve())
    assert set(truth.image_files) == {stack}
    assert "@particles.mrcs" in (old_run / "particles.star").read_text()  # relative: the folder can move
    moved = tmp_path / "moved"
    shutil.move(old_run, moved)
    reread = read_star(moved / "particles.star")
    with mrcfile.open(moved / "particles.mrcs") as mrc:
        np.testing.assert_array_equal(read_images(reread), mrc.data)


def test_impossible_runs_fail_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synthetic_dataset, "simulate_images", lambda *a, **k: calls.append(1))
    with pytest.raises(MemoryError, match="100000000000 particles of 64x64 px"):
        simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=10 ** 11, snr=1.0), tmp_path / "a")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(OSError, match="needs 1.6 MB but only 1.0 KB is free") as info:
        simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=100, snr=1.0), tmp_path / "b")
    assert info.value.errno == errno.ENOSPC
    zero = tmp_path / "zero.mrc"
    with mrcfile.new(zero) as mrc:
        mrc.set_data(np.zeros((16, 16, 16), np.float32))
        mrc.voxel_size = 4.0
    with pytest.raises(ValueError, match="constant"):
        simulate_dataset(zero, SimulationSpec(n_particles=3, snr=1.0), tmp_path / "c")
    assert not calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.mrc"]
