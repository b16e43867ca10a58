"""``bayespose refine``: a short EM refinement from the command line writes every output, the refined poses and map
agree with the simulated truth, and bad input ends with one line and exit code 1 (2 for usage errors).

Data: the asymmetric fragment of the 3J9G map Fourier-cropped to a 32 px box (8.8 Å/px, Nyquist 17.6 Å), 60
particles with CTF at SNR 1, no shifts; the initial map is the true map, low-passed to 30 Å by the refinement (so
poses are in the frame of the truth and can be compared directly). Settings: 2 iterations, HEALPix order 1 (30°)
refined to order 2 (15°), --prior estimate.

Measured: with these settings (seed 1) correlation of the refined map with the true 32 px map 0.88, median angular
error of the final MMSE poses 11.6° (the order-2 step is 15°); with 3 iterations, seeds 1-3: 0.86-0.88 and 11-13°
(the 30 Å low-pass of the truth itself correlates 0.93). Bounds: correlation > 0.7, median error < 25°. --resume
adds one iteration to the saved ones.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import starfile

from bayespose.cli import main
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_map, write_map
from bayespose.data import fragment_map_path
from tests.helpers import fourier_crop
from tests.helpers import star_rotations as _rotations

BOX = 32
RUN_ARGS = ["--iters", "2", "--healpix-order", "1", "--max-healpix-order", "2", "--shift-range", "0",
            "--prior", "estimate", "--threads", "2", "--device", "cpu"]


def strict_json(path):
    """``json.loads`` that rejects the non-standard NaN / Infinity (as JavaScript and jq do)."""
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_cli")
    full, pixel_size = read_map(fragment_map_path())
    truth = fourier_crop(full, BOX)
    map_path = root / "truth32.mrc"
    write_map(map_path, truth, pixel_size * full.shape[0] / BOX)
    simulate_dataset(map_path, SimulationSpec(n_particles=60, snr=1.0, ctf=True, seed=1), root / "sim")
    return {"root": root, "map": map_path, "truth": truth, "star": root / "sim" / "particles.star"}


@pytest.fixture(scope="module")
def refined(data):
    out = data["root"] / "run"
    rc = main(["refine", "--particles", str(data["star"]), "--map", str(data["map"]), *RUN_ARGS, "--out", str(out)])
    assert rc == 0
    return out


def test_refine_writes_all_outputs(data, refined):
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "particles.star", "prior.npy", "prior.json",
                 "history.json", "history.csv", "summary.json", "fsc.png", "history.png", "slices.png", "prior.png"):
        assert (refined / name).is_file(), name
    assert any((refined / "iterations").iterdir())  # the engine's working files, for --resume
    # standard JSON (NaN, e.g. the first iteration's pose change, is null): a strict parser reads every file
    summary, history, work_history = (strict_json(refined / name) for name in
                                      ("summary.json", "history.json", "iterations/history.json"))
    assert history[0]["pose_change_deg"] is None and work_history == history
    assert summary["n_particles"] == 60 and summary["iterations"] == len(history) == 2
    assert summary["config"]["prior_mode"] == "estimate" and summary["config"]["healpix_order"] == 1
    assert summary["config"]["envelope_mask"] is True  # the default solvent mask: sphere and envelope
    # the reported resolution is where the written FSC crosses 0.143 (independent csv parse), within one shell
    with open(refined / "fsc.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    freq = np.array([float(r["frequency_1/A"]) for r in rows])
    values = np.array([float(r["fsc"]) for r in rows])
    first_below = int(np.flatnonzero((values < 0.143) & (freq > 0))[0]) if np.any(values < 0.143) else len(freq) - 1
    assert freq[first_below - 1] - 1e-9 <= 1 / summary["resolution_A"] <= freq[first_below] + 1e-9
    # the reported resolution is the final full-resolution pass's (inserted to Nyquist), not the last iteration's:
    # the same data and poses, so within a few per cent of it
    assert history[-1]["resolution_A"] == pytest.approx(summary["resolution_A"], rel=0.1)
    prior = np.load(refined / "prior.npy")
    assert prior.mean() == pytest.approx(1.0) and np.all(prior > 0)


def test_refined_map_and_poses_match_the_truth(data, refined):
    refined_map, pixel_size = read_map(refined / "map.mrc")
    assert refined_map.shape == (BOX,) * 3 and pixel_size == pytest.approx(8.8, rel=1e-4)
    corr = float(np.corrcoef(refined_map.ravel(), data["truth"].ravel())[0, 1])
    truth = starfile.read(data["star"], always_dict=True)["particles"]
    table = starfile.read(refined / "particles.star", always_dict=True)["particles"]
    assert len(table) == 60
    np.testing.assert_allclose(table["rlnDefocusU"], truth["rlnDefocusU"], rtol=1e-6)  # CTF passed through
    err = np.degrees((_rotations(table).inv() * _rotations(truth)).magnitude())
    print(f"\nrefined map vs truth: correlation {corr:.3f}; pose error median {np.median(err):.1f}°, "
          f"90 % {np.percentile(err, 90):.1f}°")
    assert corr > 0.7
    assert np.median(err) < 25.0, np.sort(err)
    halves = table["rlnRandomSubset"].to_numpy()
    assert set(halves) == {1, 2} and abs((halves == 1).sum() - (halves == 2).sum()) <= 1
    assert np.all((table["rlnMaxValueProbDistribution"] > 0) & (table["rlnMaxValueProbDistribution"] <= 1 + 1e-6))
    assert np.all(table["bpExpectedErrorDeg"] >= 0)


def _fails(capsys, argv, code=1) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err  # one readable line, no traceback
    return lines[0]


def test_bad_input_gives_one_line_errors(data, refined, tmp_path, capsys):
    star, map_path = str(data["star"]), str(data["map"])
    base = ["refine", "--particles", star, "--map", map_path, "--iters", "1"]

    small = tmp_path / "box24.mrc"
    write_map(small, data["truth"][4:28, 4:28, 4:28], 8.8)
    assert "box of 24 px" in _fails(capsys, ["refine", "--particles", star, "--map", str(small), "--out",
                                             str(tmp_path / "a")])
    wrong_px = tmp_path / "px.mrc"
    write_map(wrong_px, data["truth"], 4.4)
    assert "Å/px" in _fails(capsys, ["refine", "--particles", star, "--map", str(wrong_px), "--out",
                                     str(tmp_path / "b")])
    assert "symmetry" in _fails(capsys, [*base, "--sym", "X7", "--out", str(tmp_path / "c")], code=2).lower()
    assert "not empty" in _fails(capsys, [*base, "--out", str(refined)])
    assert "no earlier refinement" in _fails(capsys, [*base, "--resume", "--out", str(tmp_path / "d")])
    bad_mask = tmp_path / "mask.mrc"
    write_map(bad_mask, np.ones((24, 24, 24), np.float32), 8.8)
    assert "mask" in _fails(capsys, [*base, "--mask", str(bad_mask), "--out", str(tmp_path / "e")])
    assert "finer than" in _fails(capsys, [*base, "--healpix-order", "3", "--max-healpix-order", "2", "--out",
                                           str(tmp_path / "f")], code=2)

    # too few particles for two half sets of 10
    table = starfile.read(data["star"], always_dict=True)
    few = data["star"].parent / "few.star"  # next to the stack
    starfile.write({"optics": table["optics"], "particles": table["particles"].iloc[:15]}, few)
    assert "at least 10 per half set" in _fails(capsys, ["refine", "--particles", str(few), "--map", map_path,
                                                         "--out", str(tmp_path / "g")])
    # no CTF columns: an error unless --no-ctf
    no_ctf = data["star"].parent / "no_ctf.star"
    particles = table["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    starfile.write({"optics": table["optics"], "particles": particles}, no_ctf)
    assert "--no-ctf" in _fails(capsys, ["refine", "--particles", str(no_ctf), "--map", map_path, "--out",
                                         str(tmp_path / "h")])
    # usage errors (argparse): exit code 2
    assert "file not found" in _fails(capsys, ["refine", "--particles", str(tmp_path / "missing.star"), "--map",
                                               map_path, "--out", str(tmp_path / "i")], code=2)
    assert "--prior" in _fails(capsys, [*base, "--prior", "igso3:0.1", "--out", str(tmp_path / "j")], code=2)
    for name in "abcdefghij":
        assert not (tmp_path / name).exists(), name  # nothing written on error


def test_resume_continues_the_saved_iterations(data, refined, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(refined, run)
    before = json.loads((run / "history.json").read_text())
    args = list(RUN_ARGS)
    args[args.index("--iters") + 1] = "3"
    rc = main(["refine", "--particles", str(data["star"]), "--map", str(data["map"]), *args, "--resume", "--out",
               str(run)])
    assert rc == 0
    after = json.loads((run / "history.json").read_text())
    assert [h["iteration"] for h in after] == [1, 2, 3]  # one more iteration, the first two kept
    assert [h["resolution_A"] for h in after[:2]] == [h["resolution_A"] for h in before]
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3


def test_resume_refuses_other_settings(data, refined, tmp_path, capsys):
    """--resume continues only the same run: other particles, --sym or --mode give one line naming what differs."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(refined, run)
    base = ["refine", "--particles", str(data["star"]), "--map", str(data["map"]), *RUN_ARGS, "--resume", "--out",
            str(run)]
    line = _fails(capsys, [*base, "--sym", "C2", "--mode", "hard", "--no-envelope-mask"])
    assert "symmetry (C1, now C2)" in line and "mode (soft, now hard)" in line, line
    assert "envelope_mask (True, now False)" in line, line
    table = starfile.read(data["star"], always_dict=True)
    fewer = data["star"].parent / "fewer.star"
    starfile.write({"optics": table["optics"], "particles": table["particles"].iloc[:50]}, fewer)
    base[base.index("--particles") + 1] = str(fewer)
    assert "particles (60, now 50)" in _fails(capsys, base)
    assert json.loads((run / "history.json").read_text()) == json.loads((refined / "history.json").read_text())


def test_an_unfinished_run_can_be_resumed_or_replaced(data, tmp_path, capsys):
    """A run interrupted in iteration 1 (or failed) leaves DIR/iterations/ without a complete iteration: --resume
    starts it from the beginning, and a new run without --resume replaces it (saying so); a finished run or a
    folder with other files still needs --resume or a new folder."""
    base = ["refine", "--particles", str(data["star"]), "--map", str(data["map"]), *RUN_ARGS, "--out"]
    base[base.index("--iters") + 1] = "1"
    for name in ("resumed", "replaced"):
        (tmp_path / name / "iterations").mkdir(parents=True)  # what an interrupted first iteration leaves
        (tmp_path / name / "iterations" / ".it001_half1.mrc.abc.part").write_bytes(b"partial")
    assert main([*base, str(tmp_path / "resumed"), "--resume"]) == 0
    assert "starting from the beginning" in capsys.readouterr().out
    assert main([*base, str(tmp_path / "replaced")]) == 0
    assert "holds an unfinished refinement (no final outputs): replacing it" in capsys.readouterr().out
    for name in ("resumed", "replaced"):
        history = json.loads((tmp_path / name / "history.json").read_text())
        assert [h["iteration"] for h in history] == [1] and (tmp_path / name / "summary.json").is_file()
    # a finished run, or a folder with other files, is not replaced
    assert "not empty" in _fails(capsys, [*base, str(tmp_path / "resumed")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not empty" in _fails(capsys, [*base, str(tmp_path / "other")])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
