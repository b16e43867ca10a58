"""The ``bayespose`` command on plain files: exit codes, one-line errors, and what ``simulate``/``import-cs``/
``plot-poses``/``demo`` write (checked with independent readers: starfile, mrcfile, scipy)."""

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from bayespose.cli import main
from tests.helpers import CRYODRGN, relion_matrices


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bayespose.cli", *map(str, args)], capture_output=True, text=True)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("simulate", "import-cs", "plot-poses", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (["simulate", "--map", "missing.mrc", "--n", "5", "--snr", "1", "--out", "x"], 2, "file not found"),
    (["simulate", "--n", "5", "--snr", "1", "--out", "x"], 2, "--map"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(args, code, fragment):
    result = run_cli(*args)
    assert result.returncode == code
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_values_fail_cleanly_and_write_nothing(tmp_path, demo_map_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--map", str(demo_map_path), "--n", "4", "--snr", "1", "--pose-dist", "banana",
                 "--out", str(out)]) == 2  # a bad argument value, found after parsing
    assert "unknown pose distribution" in capsys.readouterr().err
    assert not (out / "particles.star").exists()
    not_a_map = tmp_path / "not_a_map.mrc"
    not_a_map.write_text("this is not an MRC file")
    assert main(["simulate", "--map", str(not_a_map), "--n", "4", "--snr", "1", "--out", str(out)]) == 1
    assert not (out / "particles.star").exists() and not (out / "particles.mrcs").exists()


def test_simulate_writes_relion_star_and_stack_with_requested_snr(tmp_path, demo_map_path):
    common = ["--map", demo_map_path, "--n", 40, "--ctf", "--max-shift", 3, "--seed", 7]
    assert run_cli("simulate", *common, "--snr", 0, "--out", tmp_path / "clean").returncode == 0
    result = run_cli("simulate", *common, "--snr", 0.2, "--out", tmp_path / "noisy")
    assert result.returncode == 0, result.stderr

    star = starfile.read(tmp_path / "noisy" / "particles.star", always_dict=True)
    optics, table = star["optics"], star["particles"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(4.4)
    assert int(optics["rlnImageSize"].iloc[0]) == 64
    assert len(table) == 40
    for label in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        assert label in table.columns
    assert np.abs(table["rlnOriginXAngst"].to_numpy()).max() <= 3 * 4.4 + 1e-6
    assert np.abs(table["rlnOriginXAngst"].to_numpy()).max() > 0.5 * 4.4  # shifts were applied
    assert table["rlnDefocusU"].between(1e4, 2.5e4).all()

    with mrcfile.open(tmp_path / "noisy" / "particles.mrcs") as noisy_mrc, \
            mrcfile.open(tmp_path / "clean" / "particles.mrcs") as clean_mrc:
        noisy, clean = noisy_mrc.data.astype(np.float64), clean_mrc.data.astype(np.float64)
        assert float(noisy_mrc.voxel_size.x) == pytest.approx(4.4)
    assert noisy.shape == clean.shape == (40, 64, 64)
    # same seed -> same poses and CTF; the difference is the noise, whose variance follows the requested SNR
    clean_table = starfile.read(tmp_path / "clean" / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(clean_table["rlnAngleTilt"], table["rlnAngleTilt"])
    measured_snr = clean.var(axis=(1, 2)).mean() / (noisy - clean).var()
    assert measured_snr == pytest.approx(0.2, rel=0.1)


def test_pose_distributions_have_their_shape(tmp_path, demo_map_path):
    def directions(dist):
        out = tmp_path / dist.replace(":", "_")
        assert main(["simulate", "--map", str(demo_map_path), "--n", "300", "--snr", "0", "--pose-dist", dist,
                     "--out", str(out)]) == 0
        mats = relion_matrices(starfile.read(out / "particles.star", always_dict=True)["particles"])
        return mats

    uniform = directions("uniform")
    preferred = directions("preferred")
    concentrated = directions("igso3:0.3")
    # viewing directions (third rows): uniform has a near-zero mean resultant, preferred a large one
    assert np.linalg.norm(uniform[:, 2, :].mean(0)) < 0.15
    assert np.linalg.norm(preferred[:, 2, :].mean(0)) > 0.4
    # an isotropic Gaussian around the identity: rotation angles far below uniform's (mean ~126 degrees)
    angles = np.degrees(np.arccos(np.clip((np.trace(concentrated, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    uniform_angles = np.degrees(np.arccos(np.clip((np.trace(uniform, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.median(angles) < 60 < np.median(uniform_angles)


def test_import_cs_matches_cryodrgn_parse(tmp_path):
    cs = CRYODRGN / "cryosparc_P12_J24_001_particles.cs"
    ref = np.load(CRYODRGN / "cryodrgn_parsed_pose_from_P12_cs.npz")
    out = tmp_path / "p12.star"
    result = run_cli("import-cs", "--cs", cs, "--out", out)
    assert result.returncode == 0, result.stderr
    table = starfile.read(out, always_dict=True)["particles"]
    assert len(table) == len(ref["rot"]) == 2019
    # cryoDRGN's rot is RELION's A matrix (verified for star files, see shared/data/README.md)
    np.testing.assert_allclose(relion_matrices(table), ref["rot"], atol=1e-4)
    box = 180
    origin_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.95
    # cryoDRGN's trans (fraction of the box) is +origin for star files, and equals +shift for this .cs
    np.testing.assert_allclose(origin_px, ref["trans"] * box, atol=1e-3)


def test_plot_poses_and_demo(tmp_path, demo_map_path):
    from bayespose.demo import run_demo

    # steps 5 (deep) and 6 (EM) at toy sizes: their accuracy is tested in test_deep_cli.py / test_refine_cli.py,
    # here only that the demo wires them up and writes their plots and outputs
    results = run_demo(tmp_path / "demo", n_particles=24, n_assign=24, assign_snr=0.5, n_refine=40,
                       refine_iterations=2, n_deep_train=16, n_deep_test=4, deep_epochs=1)
    assert results["star_max_pose_error_deg"] < 1e-3
    assert results["star_max_origin_error_A"] < 1e-3
    # at SNR 0.5 the assignment is grid-limited: order 2 + 2 halvings = 3.75° spacing
    assert results["mmse_mean_error_deg"] < 6 and results["mle_mean_error_deg"] < 6
    assert (Path(results["refine_dir"]) / "map.mrc").is_file() and results["refine_correlation"] > 0.3
    for key in ("poses_png", "gallery_png", "assign_png", "deep_training_png", "deep_errors_png"):
        assert Path(results[key]).stat().st_size > 5000
    png = tmp_path / "poses.png"
    assert main(["plot-poses", "--particles", str(tmp_path / "demo" / "simulated" / "particles.star"),
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_in_a_log_file_is_one_line_per_tenth(capsys):
    """stderr that is not a terminal (a cluster job's log; pytest's capture is one): plain lines, one per tenth of the
    work and one at the end, no carriage-return redraws (one per call would bloat the log)."""
    from bayespose.cli._common import progress_printer

    report = progress_printer("epoch 1")
    for done in range(251):
        report(done, 250)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 11, lines
    assert lines[0].startswith("epoch 1 [") and lines[-1].split("] ")[1].startswith("250/250")


def test_progress_in_a_log_file_also_comes_every_minute(capsys, monkeypatch):
    """A long run (100,000 particles at box 256: minutes per tenth) still writes a line at least every
    LOG_INTERVAL_S seconds; within the interval and the tenth, none."""
    from bayespose.cli import _common

    clock = {"now": 1000.0}
    monkeypatch.setattr(_common.time, "time", lambda: clock["now"])
    report = _common.progress_printer("assigning")
    report(0, 100000)  # the first call: tenth 0
    for done in (64, 128, 192):  # 61 s apart, all within the first tenth
        clock["now"] += _common.LOG_INTERVAL_S + 1
        report(done, 100000)
    clock["now"] += 1.0
    report(256, 100000)  # a second later: nothing
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[1].split("/")[0] for line in lines] == ["0", "64", "128", "192"], lines


@pytest.mark.parametrize("argv, policy", [
    (["assign", "--particles", "p.star", "--map", "m.mrc", "--out", "o.star"], "PASSIVE"),
    (["refine", "--particles", "p.star", "--map", "m.mrc", "--out", "o.star"], "PASSIVE"),
    (["predict", "--model", "n.pt", "--particles", "p.star", "--refine-map", "m.mrc", "--out", "o.star"], "PASSIVE"),
    (["predict", "--model", "n.pt", "--particles", "p.star", "--out", "o.star"], None),
    (["train", "--particles", "p.star", "--out", "n.pt"], None),
])
def test_openmp_threads_wait_asleep_in_the_search_commands_only(argv, policy, tmp_path, monkeypatch):
    """The commands that run the MMSE search or the refinement make idle OpenMP threads wait asleep before they
    start (numba's and torch's pools took each other's cores: core.openmp), the network alone and training keep
    the runtime's default (spinning waits: training 20 % faster); a user's own OMP_WAIT_POLICY is kept."""
    import importlib

    for name in ("p.star", "m.mrc", "n.pt"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"bayespose.cli.{argv[0]}")
    seen = {}
    monkeypatch.setattr(module, "run", lambda args: seen.setdefault("policy", os.environ.get("OMP_WAIT_POLICY")) and 0)
    for preset, expected in ((None, policy), ("ACTIVE", "ACTIVE")):
        seen.clear()
        if preset is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        main(argv)
        assert seen == {"policy": expected}, (argv, preset, seen)


def test_importing_bayespose_leaves_the_openmp_runtime_alone():
    """Importing the package and the CLI loads neither torch nor numba and sets no wait policy: the CLI decides per
    command, before the command's imports load the runtime (which reads the policy once)."""
    code = ("import os, sys\nimport bayespose, bayespose.cli\n"
            "print('torch' in sys.modules, 'numba' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "None"], out
