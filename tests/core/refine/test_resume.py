"""A refinement stopped and resumed ends exactly like an uninterrupted one, and a resume continues only the same run.

Data: the fragment map Fourier-cropped to a 32 px box (8.8 Å/px), 40 particles with CTF at SNR 0.05, no shifts,
the true map as the start (low-passed to 30 Å by the refinement); HEALPix order 1 refined to 2, at most 6
iterations. Measured on this set: the uninterrupted run converges at iteration 4 (the resolution stops improving
after iteration 1, the pose change falls below the 15° step at iteration 4; iteration 5 before the refinement
scored a ring of finer cells around the most probable ones, iteration 6 before the maps were flattened beyond the
inscribed sphere), so the convergence bookkeeping
(best resolution, iterations without gain, pose change against the previous iteration) decides where it ends.

A run is stopped by an exception from its progress callback in the middle of iteration k + 1 (after the E-step of
half set 2), as a Ctrl-C or a killed job would stop it: iteration k is the last complete one on disk. Before the
fix, the resumed run measured the pose change of its first iteration against the poses it was updating in place
(0.00°), and after k = 2 declared convergence at iteration 3 (map correlation 0.95 with the uninterrupted run).

A resume checks the saved run's fingerprint: other particles, CTF, initial map, mask, half sets or settings (other
than the number of iterations, threads, device, batch size) are refused with one line naming them; before, a
resume silently continued with whatever it was given (only a different particle count was caught). A resume with
no complete iteration starts from the beginning and says so; a fresh start removes an earlier run's files (before,
they stayed, and a later resume continued the old run's last iteration).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map, write_map
from bayespose.core.refine import RefineConfig, refine
from bayespose.data import fragment_map_path
from tests.helpers import fourier_crop

# on the CPU with one thread the runs are reproducible to the last bit (CUDA's index_add_ in the map insertion is
# not deterministic, so a comparison there would measure atomics, not the bookkeeping)
SETTINGS = dict(healpix_order=1, max_healpix_order=2, shift_range_px=0.0, threads=1, device="cpu")


class Stop(Exception):
    """Raised by the progress callback to interrupt a run."""


def stop_in(iteration: int):
    """A progress callback that stops the run in ``iteration`` (after the E-step of half set 2)."""
    def progress(label: str):
        if label == f"iteration {iteration} half 2 M-step":
            raise Stop(label)
        return None

    return progress


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full, pixel_size = read_map(fragment_map_path())
    truth = fourier_crop(full, 32)
    write_map(root / "truth32.mrc", truth, pixel_size * full.shape[0] / 32)
    particles = simulate_dataset(root / "truth32.mrc", SimulationSpec(n_particles=40, snr=0.05, ctf=True, seed=2),
                                 root / "sim")
    return particles, read_images(particles), truth


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    particles, images, truth = data
    return refine(particles, truth, RefineConfig(iterations=6, **SETTINGS), out_dir=tmp_path_factory.mktemp("whole"),
                  images=images, log=None)


def history_without_time(result) -> list[dict]:
    return [{k: v for k, v in vars(entry).items() if k != "seconds"} for entry in result.history]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_stopped_and_resumed_run_ends_like_an_uninterrupted_one(data, whole, tmp_path, k):
    particles, images, truth = data
    assert len(whole.history) == 4 and whole.converged  # the bookkeeping decides the end (see the docstring)
    config = RefineConfig(iterations=6, **SETTINGS)
    with pytest.raises(Stop):
        refine(particles, truth, config, out_dir=tmp_path, images=images, log=None, progress=stop_in(k + 1))
    assert (tmp_path / f"it{k:03d}_state.npz").is_file() and not (tmp_path / f"it{k + 1:03d}_state.npz").exists()
    lines = []
    resumed = refine(particles, truth, config, out_dir=tmp_path, images=images, log=lines.append, resume=True)
    assert lines[0].startswith(f"resuming after iteration {k}")
    # the same history (pose changes, resolutions, convergence flags) and the same end
    assert len(resumed.history) == len(whole.history)
    for mine, theirs in zip(history_without_time(resumed), history_without_time(whole)):
        assert mine == pytest.approx(theirs, nan_ok=True)
    assert resumed.converged == whole.converged
    np.testing.assert_allclose(resumed.map, whole.map, atol=1e-5 * np.abs(whole.map).max())
    for a, b in zip(resumed.half_maps, whole.half_maps):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())
    np.testing.assert_allclose(resumed.particles.rotations, whole.particles.rotations, atol=1e-6)
    np.testing.assert_allclose(resumed.particles.origins_A, whole.particles.origins_A, atol=1e-6)
    np.testing.assert_array_equal(resumed.particles.half_set, whole.particles.half_set)
    assert resumed.resolution_A == pytest.approx(whole.resolution_A)
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert [entry["iteration"] for entry in on_disk] == [1, 2, 3, 4]


def test_resume_refuses_other_particles_maps_or_settings(data, tmp_path):
    """The saved run's fingerprint (particles, image files, CTF, pixel size, box, initial map, mask, half sets and
    settings) must match: otherwise one line names what differs and nothing is computed or written."""
    particles, images, truth = data
    config = RefineConfig(iterations=1, **SETTINGS)
    refine(particles, truth, config, out_dir=tmp_path, images=images, log=None)
    before = sorted(p.name for p in tmp_path.iterdir())

    def resume(message, parts=particles, volume=truth, cfg=config, **kwargs):
        imgs = images if len(parts) == len(particles) else images[:len(parts)]
        with pytest.raises(ValueError, match=message) as error:
            refine(parts, volume, cfg, out_dir=tmp_path, images=imgs, log=None, resume=True, **kwargs)
        assert "\n" not in str(error.value)

    resume(r"different symmetry \(C1, now C2\);", cfg=RefineConfig(iterations=1, symmetry="C2", **SETTINGS))
    resume(r"different mode \(soft, now hard\);", cfg=RefineConfig(iterations=1, mode="hard", **SETTINGS))
    resume(r"different prior_mode \(uniform, now estimate\);",
           cfg=RefineConfig(iterations=1, prior_mode="estimate", **SETTINGS))
    resume(r"different half sets, half_split \(input, now random\);",
           cfg=RefineConfig(iterations=1, half_split="random", **SETTINGS))
    resume(r"different initial map;", volume=2 * truth)
    resume(r"different mask;", mask=np.ones_like(truth))
    shifted = particles.subset(np.arange(len(particles)))  # copies
    shifted.ctf.defocus_u[0] += 100.0
    resume(r"different CTF;", parts=shifted)
    resume(r"different particles \(40, now 36\), image files, CTF, half sets", parts=particles.subset(range(36)))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # what may change: the number of iterations, threads, device, batch size, the final pass
    more = RefineConfig(iterations=2, **dict(SETTINGS, threads=2, batch_size=16, device=None))
    resumed = refine(particles, truth, more, out_dir=tmp_path, images=images, log=None, resume=True)
    assert [entry.iteration for entry in resumed.history] == [1, 2]


def test_resume_without_a_complete_iteration_starts_from_the_beginning(data, tmp_path):
    """A run stopped in iteration 1 leaves no complete iteration (here: a stale temporary and a lone half map):
    resuming it starts from the beginning, says so, and gives the fresh run's result."""
    particles, images, truth = data
    config = RefineConfig(iterations=1, **SETTINGS)
    with pytest.raises(Stop):
        refine(particles, truth, config, out_dir=tmp_path / "a", images=images, log=None, progress=stop_in(1))
    (tmp_path / "a" / ".it001_state.npz.x1y2.part").write_bytes(b"partial")
    write_map(tmp_path / "a" / "it001_half1.mrc", truth, particles.pixel_size)
    lines = []
    resumed = refine(particles, truth, config, out_dir=tmp_path / "a", images=images, log=lines.append, resume=True)
    assert lines[0] == f"no complete iteration in {tmp_path / 'a'}: starting from the beginning", lines
    fresh = refine(particles, truth, config, out_dir=tmp_path / "b", images=images, log=None)
    np.testing.assert_allclose(resumed.map, fresh.map, atol=1e-5 * np.abs(fresh.map).max())
    assert not (tmp_path / "a" / ".it001_state.npz.x1y2.part").exists()


def test_a_fresh_start_replaces_an_earlier_run_in_the_folder(data, tmp_path):
    """Starting anew (resume=False) in a folder that holds an earlier, longer run removes its files: a later resume
    continues the new run, not the old run's last iteration."""
    particles, images, truth = data
    refine(particles, truth, RefineConfig(iterations=3, **SETTINGS), out_dir=tmp_path, images=images, log=None)
    lines = []
    refine(particles, truth, RefineConfig(iterations=1, **SETTINGS), out_dir=tmp_path, images=images,
           log=lines.append)
    assert not (tmp_path / "it003_state.npz").exists() and not (tmp_path / "it002_map.mrc").exists()
    assert lines[0] == f"removed the files of an earlier refinement in {tmp_path}"
    lines = []
    resumed = refine(particles, truth, RefineConfig(iterations=2, **SETTINGS), out_dir=tmp_path, images=images,
                     log=lines.append, resume=True)
    assert lines[0].startswith("resuming after iteration 1")
    assert [entry.iteration for entry in resumed.history] == [1, 2]
