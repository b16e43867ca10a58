"""Refinement output files (:mod:`bayespose.core.refine.outputs`): written completely, readable by independent parsers
(mrcfile, csv, starfile + scipy, numpy, json), equal to the result they came from, and complete-or-absent.

The result here is built by hand (known maps, FSC curve, poses, prior, history), so the checks do not depend on the
EM engine: every expected value is an input of the test, not something the code under test computed.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import healpy
import mrcfile
import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.refine import IterationLog, RefineResult
from bayespose.core.refine import outputs as ro
from bayespose.plotting.refine import FIGURES, refine_figure_writer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOX, PIXEL_SIZE, N = 16, 3.0, 24


@pytest.fixture()
def result(tmp_path_factory) -> RefineResult:
    rng = np.random.default_rng(7)
    stack = tmp_path_factory.mktemp("stack") / "stack.mrcs"
    stack.write_bytes(b"")  # the star's image stack (only its existence is checked on reading)
    euler = np.column_stack([rng.uniform(-180, 180, N), rng.uniform(0, 180, N), rng.uniform(-180, 180, N)])
    rotations = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix().transpose(0, 2, 1)  # RELION A
    particles = ParticleSet(
        pixel_size=PIXEL_SIZE, box=BOX, image_files=np.array([str(stack)] * N, dtype=object),
        image_indices=np.arange(N), rotations=rotations, origins_A=rng.uniform(-3, 3, (N, 2)),
        ctf=CTFParams.constant(N, 15000.0), half_set=np.where(np.arange(N) % 2 == 0, 1, 2),
        extra={"rlnMaxValueProbDistribution": rng.uniform(0.1, 1, N), "bpExpectedErrorDeg": rng.uniform(1, 9, N)})
    maps = [rng.normal(size=(BOX,) * 3).astype(np.float32) for _ in range(3)]
    freq = np.arange(BOX // 2 + 1) / (BOX * PIXEL_SIZE)
    fsc_values = np.clip(1.0 - freq / freq[-1] * 1.2, -0.05, 1.0)
    order = 1
    prior = rng.uniform(0.2, 3.0, 12 * 4 ** order)
    prior /= prior.mean()
    history = [IterationLog(1, 1, 20.0, 14.0, -50.0, float("nan"), 1.5),
               IterationLog(2, 1, 12.0, 9.5, -40.0, 4.25, 1.2)]
    return RefineResult(maps[0], (maps[1], maps[2]), freq, fsc_values, 9.5, particles, prior, order, history)


def strict_json(path: Path):
    """``json.loads`` that rejects the non-standard NaN / Infinity / -Infinity (as JavaScript and jq do)."""
    def reject(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_outputs_round_trip(result, tmp_path):
    out = tmp_path / "run"
    paths = ro.write_refine_outputs(result, out, figure_writer=refine_figure_writer("test"))
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "particles.star", "prior.npy", "prior.json",
                 "history.json", "history.csv", "summary.json"):
        assert (out / name).is_file(), name
        assert paths[name] == out / name
    for png in FIGURES.values():
        assert _png_ok(out / png), png
        assert paths[png] == out / png  # listed in summary.json
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # maps: data and pixel size (independent reader: mrcfile, z-y-x)
    for name, volume in (("map.mrc", result.map), ("half1.mrc", result.half_maps[0]),
                         ("half2.mrc", result.half_maps[1])):
        with mrcfile.open(out / name) as mrc:
            np.testing.assert_array_equal(mrc.data, volume)
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE)

    # FSC table: the values of the result, resolution = 1 / frequency
    with open(out / "fsc.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["shell", "resolution_A", "frequency_1/A", "fsc"]
    np.testing.assert_allclose([float(r["fsc"]) for r in rows], result.fsc, rtol=1e-12)
    np.testing.assert_allclose([float(r["frequency_1/A"]) for r in rows], result.fsc_frequencies, rtol=1e-12)
    assert math.isinf(float(rows[0]["resolution_A"]))
    assert float(rows[-1]["resolution_A"]) == pytest.approx(2 * PIXEL_SIZE)  # Nyquist shell

    # star: poses, origins, half sets and per-particle columns (independent parse: starfile + scipy)
    table = starfile.read(out / "particles.star", always_dict=True)["particles"]
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float)
    a = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(a, result.particles.rotations, atol=1e-5)
    np.testing.assert_allclose(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=float),
                               result.particles.origins_A, atol=1e-5)
    np.testing.assert_array_equal(table["rlnRandomSubset"], result.particles.half_set)
    np.testing.assert_allclose(table["bpExpectedErrorDeg"], result.particles.extra["bpExpectedErrorDeg"], rtol=1e-5)
    np.testing.assert_allclose(table["rlnMaxValueProbDistribution"],
                               result.particles.extra["rlnMaxValueProbDistribution"], rtol=1e-5)

    # prior: NEST densities of the stated order
    np.testing.assert_array_equal(np.load(out / "prior.npy"), result.direction_prior)
    meta = json.loads((out / "prior.json").read_text())
    assert meta["healpix_order"] == 1 and meta["nside"] == 2 and meta["ordering"] == "NEST"
    np.testing.assert_allclose(meta["density"], result.direction_prior)
    assert "third row" in meta["convention"]

    # history: json and csv rows equal the IterationLog entries; the first pose change (NaN) is JSON's null, and the
    # JSON files are standard JSON (a strict parser rejects NaN / Infinity)
    hist = strict_json(out / "history.json")
    assert [h["resolution_A"] for h in hist] == [14.0, 9.5]
    assert hist[0]["pose_change_deg"] is None and hist[1]["pose_change_deg"] == 4.25
    strict_json(out / "summary.json")
    strict_json(out / "prior.json")
    with open(out / "history.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [float(r["log_likelihood"]) for r in csv_rows] == [-50.0, -40.0]
    assert math.isnan(float(csv_rows[0]["pose_change_deg"]))

    # the reader gives the same back
    back = ro.read_refine_outputs(out)
    np.testing.assert_array_equal(back.map, result.map)
    assert back.pixel_size == pytest.approx(PIXEL_SIZE) and back.resolution_A == 9.5 and back.prior_order == 1
    np.testing.assert_allclose(back.fsc, result.fsc)
    np.testing.assert_allclose(back.particles.rotations, result.particles.rotations, atol=1e-5)
    assert back.summary["n_particles"] == N and back.summary["n_half1"] == N // 2
    assert math.isnan(back.history[0]["pose_change_deg"]) and back.history[1]["pose_change_deg"] == 4.25


def test_prior_convention_matches_healpy_nest_and_relion_angles():
    """A one-hot density at NEST pixel p is read at a pose whose (rot, tilt) = healpy's (phi, theta) of p."""
    order, pixel = 2, 77
    nside = 2 ** order
    density = np.zeros(12 * nside ** 2)
    density[pixel] = 5.0
    theta, phi = healpy.pix2ang(nside, pixel, nest=True)
    psi = np.array([0.0, 70.0, -150.0])  # in-plane angle does not change the viewing direction
    euler = np.column_stack([np.full(3, np.degrees(phi)), np.full(3, np.degrees(theta)), psi])
    a = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_array_equal(ro.prior_density_at(density, order, a), 5.0)
    flipped = Rotation.from_euler("ZYZ", [[np.degrees(phi), 180 - np.degrees(theta), 0.0]],
                                  degrees=True).as_matrix().transpose(0, 2, 1)
    assert ro.prior_density_at(density, order, flipped)[0] == 0.0  # the opposite hemisphere is another pixel
    with pytest.raises(ValueError, match="pixels"):
        ro.prior_density_at(density[:-1], order, a)


def test_failed_write_leaves_no_partial_output(result, tmp_path, monkeypatch):
    from bayespose.plotting import refine as refine_plots

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(refine_plots, "plot_history", broken)
    new = tmp_path / "new"
    with pytest.raises(RuntimeError, match="disk full"):
        ro.write_refine_outputs(result, new, figure_writer=refine_figure_writer())
    assert not new.exists()  # absent, not half-written

    old = tmp_path / "old"
    old.mkdir()
    (old / "map.mrc").write_text("previous map")
    (old / "keep.txt").write_text("input file")
    with pytest.raises(RuntimeError):
        ro.write_refine_outputs(result, old, figure_writer=refine_figure_writer())
    assert (old / "map.mrc").read_text() == "previous map"  # the earlier outputs are untouched
    assert sorted(p.name for p in old.iterdir()) == ["keep.txt", "map.mrc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folders left behind


def test_existing_folder_is_replaced_and_other_files_are_kept(result, tmp_path):
    out = tmp_path / "run"
    (out / "iterations").mkdir(parents=True)
    (out / "iterations" / "it001_half1.mrc").write_text("engine file")
    (out / "map.mrc").write_text("stale map")
    ro.write_refine_outputs(result, out)  # no figure writer: no figures
    assert (out / "iterations" / "it001_half1.mrc").read_text() == "engine file"
    with mrcfile.open(out / "map.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, result.map)
    assert not (out / "fsc.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_results_are_rejected_before_writing(result, tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="pixels"):
        ro.write_refine_outputs(replace(result, direction_prior=np.ones(10)), tmp_path / "a")
    with pytest.raises(ValueError, match="half maps"):
        ro.write_refine_outputs(replace(result, half_maps=(result.map,)), tmp_path / "b")
    with pytest.raises(ValueError, match="FSC"):
        ro.write_refine_outputs(replace(result, fsc=result.fsc[:-1]), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="summary.json"):
        ro.read_refine_outputs(tmp_path)


def test_template_keeps_input_metadata_and_drops_stale_bayespose_columns(result, tmp_path):
    from dataclasses import replace

    template = replace(result.particles, rotations=None, origins_A=None, half_set=None,
                       extra={"scipion_id": np.arange(100, 100 + N), "bpMAPAngleRot": np.zeros(N)})
    ro.write_refine_outputs(result, tmp_path / "run", particles_template=template)
    table = starfile.read(tmp_path / "run" / "particles.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(table["scipion_id"], np.arange(100, 100 + N))
    assert "bpMAPAngleRot" not in table.columns  # an earlier run's column would be stale
    assert "bpExpectedErrorDeg" in table.columns


def test_resolution_from_fsc_interpolates_the_crossing():
    freq = np.linspace(0, 0.25, 11)  # step 0.025 1/Å
    values = 1.0 - 4.0 * freq  # crosses 0.143 at f = 0.857 / 4 = 0.21425 1/Å
    assert ro.resolution_from_fsc(freq, values) == pytest.approx(1 / 0.21425)
    assert ro.resolution_from_fsc(freq, values, threshold=0.5) == pytest.approx(8.0)
    assert ro.resolution_from_fsc(freq, np.ones(11)) == pytest.approx(4.0)  # never crosses: Nyquist


def test_non_finite_numbers_are_written_as_null_and_read_back_as_nan(result, tmp_path):
    """A resolution that never crossed 0.143 (inf) and NaN statistics: summary.json / history.json stay standard
    JSON (null) and the reader gives NaN where a number is expected."""
    result.resolution_A = math.inf
    result.history[1].log_likelihood = float("nan")
    ro.write_refine_outputs(result, tmp_path / "run")
    assert strict_json(tmp_path / "run" / "summary.json")["resolution_A"] is None
    assert strict_json(tmp_path / "run" / "history.json")[1]["log_likelihood"] is None
    back = ro.read_refine_outputs(tmp_path / "run")
    assert math.isnan(back.resolution_A) and math.isnan(back.history[1]["log_likelihood"])
    assert back.history[1]["resolution_A"] == 9.5
