"""The ``bayespose`` command never costs the user data or time: no output overwrites an input, every error is one
line with the documented exit code (2: a bad argument, also when found after parsing; 1: a bad input or failed
work; 130: Ctrl-C), outputs are complete or absent, and files / folders get the usual permissions.

Data: particles simulated from the shipped fragment map (64 px, 4.4 Å/px), as a tester would with
``bayespose simulate``; inputs are compared byte for byte before and after a refused command.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bayespose.cli import main
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.data import fragment_map_path

FAST_ASSIGN = ["--healpix-order", "0", "--refine-levels", "0", "--shift-range", "0", "--threads", "1", "--device",
               "cpu"]
REPO_ROOT = Path(__file__).resolve().parents[2]


PROGRESS_BAR = re.compile(r"\[[#.]{30}\] \d+/\d+")


def _one_line_error(argv, capsys, code: int) -> str:
    """Run ``main(argv)``; check the exit code and that stderr holds one line besides progress bars (no
    traceback); return that line."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "sim"
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=60, snr=0.1, ctf=True, seed=3), folder)
    return folder


@pytest.fixture
def sim(simulated, tmp_path) -> Path:
    """A fresh copy of a folder with 60 simulated particles (particles.star referring to particles.mrcs next to
    it, simulation.json), a copy of the map and a stand-in model file."""
    folder = tmp_path / "sim"
    shutil.copytree(simulated, folder)
    (folder / "map.mrc").write_bytes(fragment_map_path().read_bytes())
    (folder / "model.pt").write_bytes(b"not read: the output check comes first")
    return folder


# ------------------------------------------------------------------------------------------- outputs vs inputs


@pytest.mark.parametrize("command, out", [
    (["assign", "--particles", "{d}/particles.star", "--map", "{d}/map.mrc", *FAST_ASSIGN], "{d}/particles.star"),
    (["assign", "--particles", "{d}/particles.star", "--map", "{d}/map.mrc", *FAST_ASSIGN], "{d}/particles.mrcs"),
    (["assign", "--particles", "{d}/particles.star", "--map", "{d}/map.mrc", *FAST_ASSIGN], "{d}/map.mrc"),
    (["predict", "--model", "{d}/model.pt", "--particles", "{d}/particles.star"], "{d}/model.pt"),
    (["predict", "--model", "{d}/model.pt", "--particles", "{d}/particles.star"], "{d}/particles.star"),
    (["train", "--particles", "{d}/particles.star", "--epochs", "1", "--net-box", "8"], "{d}/particles.star"),
    (["train", "--particles", "{d}/particles.star", "--epochs", "1", "--net-box", "8"], "{d}/particles.mrcs"),
    (["simulate", "--map", "{d}/map.mrc", "--n", "5", "--snr", "1"], "{d}"),
    (["refine", "--particles", "{d}/particles.star", "--map", "{d}/map.mrc", "--iters", "1"], "{d}"),
])
def test_an_output_that_would_overwrite_an_input_is_refused(sim, capsys, command, out):
    argv = [a.format(d=sim) for a in command]
    before = _snapshot(sim)
    err = _one_line_error([*argv, "--out", out.format(d=sim)], capsys, code=2)
    assert "would overwrite the input" in err, err
    assert _snapshot(sim) == before  # nothing changed, nothing added


@pytest.mark.parametrize("input_name, command", [
    ("x_poses.png", ["predict", "--model", "{d}/model.pt", "--out", "{d}/x.star"]),  # writes x_poses.png
    ("m_training.png", ["train", "--epochs", "1", "--out", "{d}/m.pt"]),  # writes m_training.png
    ("p.png", ["plot-poses", "--out", "{d}/p"]),  # writes p.png
])
def test_a_figure_written_next_to_the_output_may_not_be_an_input(sim, capsys, input_name, command):
    star = sim / input_name  # a star file under a figure's name (same folder as the stack it refers to)
    star.write_bytes((sim / "particles.star").read_bytes())
    before = _snapshot(sim)
    err = _one_line_error([*(a.format(d=sim) for a in command), "--particles", star], capsys, code=2)
    assert "would overwrite the input" in err and input_name in err
    assert _snapshot(sim) == before


def test_a_link_to_an_input_is_an_input(sim, capsys):
    link = sim.parent / "link.star"
    link.symlink_to(sim / "particles.star")
    before = _snapshot(sim)
    _one_line_error(["assign", "--particles", sim / "particles.star", "--map", sim / "map.mrc", *FAST_ASSIGN,
                     "--out", link], capsys, code=2)
    assert _snapshot(sim) == before


def test_the_working_folder_is_never_replaced(sim, capsys, monkeypatch):
    monkeypatch.chdir(sim)
    before = _snapshot(sim)
    err = _one_line_error(["simulate", "--map", fragment_map_path(), "--n", "3", "--snr", "1", "--out", "."],
                          capsys, code=2)
    assert "working folder" in err
    assert _snapshot(sim) == before


# ------------------------------------------------------------------------------------- one line, right exit code


def _edit_star(src: Path, dst: Path, row: int, column: int, value: str | None) -> None:
    """Copy star ``src`` to ``dst`` with field ``column`` (0-based) of data row ``row`` (1-based) replaced, or,
    with ``value=None``, the file cut in the middle of that (last) row."""
    lines = src.read_text().splitlines(keepends=True)
    header = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    index = header + row
    fields = lines[index].split()
    if value is None:
        dst.write_text("".join(lines[:index]) + "\t".join(fields[:4]))
        return
    fields[column] = value
    lines[index] = "\t".join(fields) + "\n"
    dst.write_text("".join(lines))


def _columns(star: Path) -> list[str]:
    labels = [line.split()[0] for line in star.read_text().splitlines() if line.startswith("_rln")]
    return labels[labels.index("_rlnImageName"):]


def test_bad_star_values_name_file_row_and_column(sim, capsys):
    star = sim / "particles.star"
    columns = _columns(star)
    base = ["assign", "--map", sim / "map.mrc", *FAST_ASSIGN, "--out", sim / "out.star"]

    nan_defocus = sim / "nan_defocus.star"
    _edit_star(star, nan_defocus, 7, columns.index("_rlnDefocusU"), "nan")
    err = _one_line_error([*base, "--particles", nan_defocus], capsys, code=1)
    assert "nan_defocus.star" in err and "row 7" in err and "rlnDefocusU" in err

    text_angle = sim / "text_angle.star"
    _edit_star(star, text_angle, 12, columns.index("_rlnAngleTilt"), "ninety")
    err = _one_line_error([*base, "--particles", text_angle], capsys, code=1)
    assert "text_angle.star" in err and "row 12" in err and "rlnAngleTilt" in err and "'ninety'" in err

    truncated = sim / "truncated.star"
    _edit_star(star, truncated, 60, 0, None)
    err = _one_line_error([*base, "--particles", truncated], capsys, code=1)
    assert "truncated.star" in err and "cut short" in err

    beyond = sim / "beyond.star"
    _edit_star(star, beyond, 5, 0, "000099@particles.mrcs")
    err = _one_line_error([*base, "--particles", beyond], capsys, code=1)
    assert "beyond.star" in err and "row 5" in err and "particles.mrcs has 60 image(s)" in err and "99" in err
    assert not (sim / "out.star").exists()


def test_nan_pixels_name_file_and_image(sim, capsys):
    with mrcfile.open(sim / "particles.mrcs", mode="r+") as mrc:
        mrc.data[41, 10, 10] = np.inf
    err = _one_line_error(["assign", "--particles", sim / "particles.star", "--map", sim / "map.mrc", *FAST_ASSIGN,
                           "--out", sim / "out.star"], capsys, code=1)
    assert "particles.mrcs" in err and "image(s) 42 " in err and "NaN or infinite" in err


def test_simulate_errors_are_one_line(tmp_path, capsys):
    huge = _one_line_error(["simulate", "--map", fragment_map_path(), "--n", "1e11", "--snr", "1", "--out",
                            tmp_path / "huge"], capsys, code=1)
    assert "memory" in huge and "100000000000" in huge
    zero = tmp_path / "zero.mrc"
    with mrcfile.new(zero) as mrc:
        mrc.set_data(np.zeros((16, 16, 16), np.float32))
        mrc.voxel_size = 4.0
    err = _one_line_error(["simulate", "--map", zero, "--n", "3", "--snr", "1", "--out", tmp_path / "z"], capsys,
                          code=1)
    assert "zero.mrc" in err and "constant" in err
    assert "whole number" in _one_line_error(["simulate", "--map", zero, "--n", "2.5", "--snr", "1", "--out",
                                              tmp_path / "z"], capsys, code=2)
    # values rejected after parsing are usage errors too (exit 2)
    assert "banana" in _one_line_error(["simulate", "--map", fragment_map_path(), "--n", "3", "--snr", "1",
                                        "--pose-dist", "banana", "--out", tmp_path / "z"], capsys, code=2)
    assert not (tmp_path / "huge").exists() and not (tmp_path / "z").exists()
    # scientific notation of a whole number is a number of particles
    assert main(["simulate", "--map", str(fragment_map_path()), "--n", "1.2e1", "--snr", "1", "--out",
                 str(tmp_path / "twelve")]) == 0
    with mrcfile.open(tmp_path / "twelve" / "particles.mrcs") as mrc:
        assert mrc.data.shape[0] == 12


def test_usage_errors_found_after_parsing_exit_2(sim, capsys):
    base = ["assign", "--particles", sim / "particles.star", "--map", sim / "map.mrc", "--out", sim / "o.star"]
    assert "X7" in _one_line_error([*base, "--sym", "X7"], capsys, code=2)
    assert "banana" in _one_line_error([*base, "--prior", "banana:3"], capsys, code=2)
    assert "val-fraction" in _one_line_error(["train", "--particles", sim / "particles.star", "--val-fraction", "2",
                                              "--out", sim / "m.pt"], capsys, code=2)
    assert not (sim / "o.star").exists() and not (sim / "m.pt").exists()


def test_disk_full_while_training_is_one_line(sim, capsys, monkeypatch):
    """torch.save on a full disk raises RuntimeError ("unexpected pos ..."), not OSError: still one line."""
    import torch

    from bayespose.core.io import atomic

    def full_disk_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5888 vs 5782")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(atomic, "_disk_full", lambda folder: True)
    err = _one_line_error(["train", "--particles", sim / "particles.star", "--epochs", "1", "--net-box", "8",
                           "--threads", "1", "--device", "cpu", "--out", sim / "m.pt"], capsys, code=1)
    assert "no space left" in err and "m.pt" in err
    assert not [p for p in sim.iterdir() if p.name.startswith(("m.", ".m."))]


def test_disk_full_on_any_write_is_one_line(sim, capsys, monkeypatch):
    import starfile

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(starfile, "write", no_space)
    out = sim / "out.star"
    err = _one_line_error(["assign", "--particles", sim / "particles.star", "--map", sim / "map.mrc", *FAST_ASSIGN,
                           "--out", out], capsys, code=1)
    assert "no space left" in err and "out.star" in err
    assert not out.exists() and not list(sim.glob(".out.star.*"))


def test_plot_poses_reports_the_file_it_wrote(sim, tmp_path, capsys):
    rc = main(["plot-poses", "--particles", str(sim / "particles.star"), "--out", str(tmp_path / "o" / "p3")])
    out = capsys.readouterr().out
    assert rc == 0
    written = tmp_path / "o" / "p3.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.strip() == f"wrote {written}"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["p3.png"]


def test_outputs_get_the_usual_permissions(sim, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["simulate", "--map", str(fragment_map_path()), "--n", "3", "--snr", "1", "--out",
                     str(tmp_path / "new")]) == 0
        assert main(["assign", "--particles", str(sim / "particles.star"), "--map", str(sim / "map.mrc"),
                     *FAST_ASSIGN, "--out", str(tmp_path / "deep" / "a.star")]) == 0
        assert main(["plot-poses", "--particles", str(sim / "particles.star"), "--out",
                     str(tmp_path / "poses.png")]) == 0
    finally:
        os.umask(previous)
    for folder in (tmp_path / "new", tmp_path / "deep"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in [*(tmp_path / "new").iterdir(), tmp_path / "deep" / "a.star", tmp_path / "poses.png"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


# ------------------------------------------------------------------------------------------------------ Ctrl-C


def _interrupt_when_working(argv: list, marker: str, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``bayespose ARGV`` and send SIGINT once ``marker`` (a progress bar) appears on its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # Ctrl-C's default action in the child even when this test runs where SIGINT is ignored (a job started with
    # '&' or nohup, as CI may be): an ignored SIGINT is inherited, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "bayespose.cli", *map(str, argv)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = b""
    deadline = time.time() + timeout
    os.set_blocking(proc.stderr.fileno(), False)
    while marker.encode() not in err and proc.poll() is None and time.time() < deadline:
        err += proc.stderr.read() or b""
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be interrupted: {err!r}"
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stderr.fileno(), True)
    err += proc.stderr.read()
    return proc.wait(timeout=timeout), err.decode()


def _interrupted_cleanly(rc: int, err: str, command: str) -> None:
    assert rc == 130, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == f"bayespose {command}: interrupted", err


def test_ctrl_c_while_simulating_leaves_the_old_outputs(tmp_path):
    old = tmp_path / "old"
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=5, snr=1.0, seed=1), old)
    before = _snapshot(old)
    rc, err = _interrupt_when_working(["simulate", "--map", fragment_map_path(), "--n", "4000", "--snr", "1",
                                       "--out", old], "simulating [")
    _interrupted_cleanly(rc, err, "simulate")
    assert _snapshot(old) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    rc, err = _interrupt_when_working(["simulate", "--map", fragment_map_path(), "--n", "4000", "--snr", "1",
                                       "--out", tmp_path / "new"], "simulating [")
    _interrupted_cleanly(rc, err, "simulate")
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_assigning_writes_nothing(tmp_path):
    folder = tmp_path / "many"
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=200, snr=0.1, ctf=True, seed=4), folder)
    out = tmp_path / "assigned.star"
    out.write_text("an earlier result\n")
    rc, err = _interrupt_when_working(["assign", "--particles", folder / "particles.star", "--map",
                                       fragment_map_path(), "--threads", "1", "--device", "cpu", "--out", out],
                                      "assigning [")
    _interrupted_cleanly(rc, err, "assign")
    assert out.read_text() == "an earlier result\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
