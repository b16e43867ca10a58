"""``bayespose assign``: a RELION 3.1 star with poses close to the simulated truth, and one-line errors for bad input.

Data: 30 particles simulated from the asymmetric fragment map (64 px, 4.4 Å/px) with CTF, SNR 0.1 and origins
uniform in ±1.5 px; search: HEALPix order 2 (15°) + 2 refinement levels (final spacing s = 3.75°), shifts ±2 px
step 1 px. The output star is parsed with ``starfile`` and the angles turned into rotations with scipy, independently
of bayespose's readers.

Bounds, from the grid: a random rotation lies on average 0.46 s (max 0.74 s) from the nearest rotation of the final
grid (measured on the order-4 grid: 1.7° / 2.8°), and SNR 0.1 adds about as much again, so the median error must
stay below 2 s = 7.5° (measured 2.7°); a particle whose coarse cell was right cannot end further than about one
coarse spacing (15°) away, so 90 % of the particles must be within 15° (measured 90th percentile 6.4°) and none
beyond 30° (no flipped / wrong-view assignment; measured max 8.3°). Origins: the lattice step is 1 px, so every MMSE
origin must be within 1 px of the truth and the mean within 0.6 px (nearest-lattice-point mean 0.38 px; measured
0.40 px).
"""

from __future__ import annotations

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from bayespose.cli import main
from bayespose.core.assign import PoseSearch
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_map, write_map
from bayespose.data import fragment_map_path
from tests.helpers import star_rotations as _rotations

FINAL_SPACING_DEG = 60.0 / 2 ** 4
COARSE_SPACING_DEG = 60.0 / 2 ** 2
SEARCH_ARGS = ["--healpix-order", "2", "--refine-levels", "2", "--shift-range", "2", "--shift-step", "1",
               "--threads", "2", "--device", "cpu"]


def _table(path) -> starfile.pd.DataFrame:
    return starfile.read(path, always_dict=True)["particles"]



def _angle_deg(a: Rotation, b: Rotation) -> np.ndarray:
    return np.degrees((a.inv() * b).magnitude())


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("assign_sim")
    simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=30, snr=0.1, ctf=True, max_shift_px=1.5,
                                                         seed=1), out)
    return out / "particles.star"


@pytest.fixture(scope="module")
def assigned(simulated, tmp_path_factory):
    out = tmp_path_factory.mktemp("assign_out") / "assigned.star"
    rc = main(["assign", "--particles", str(simulated), "--map", str(fragment_map_path()), *SEARCH_ARGS,
               "--out", str(out)])
    assert rc == 0
    return out


def test_assign_writes_relion_star_close_to_the_truth(simulated, assigned):
    truth, out = _table(simulated), _table(assigned)
    assert len(out) == len(truth) == 30
    # same particles, same order (the output lies elsewhere, so its stack path is absolute)
    stack = str(simulated.parent / "particles.mrcs")
    assert list(out["rlnImageName"]) == [n.replace("@particles.mrcs", f"@{stack}") for n in truth["rlnImageName"]]
    np.testing.assert_allclose(out["rlnDefocusU"], truth["rlnDefocusU"], rtol=1e-6)  # CTF passed through
    optics = starfile.read(assigned, always_dict=True)["optics"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(4.4, rel=1e-5)

    err = _angle_deg(_rotations(out), _rotations(truth))
    assert np.median(err) < 2 * FINAL_SPACING_DEG, np.sort(err)
    assert np.percentile(err, 90) < COARSE_SPACING_DEG, np.sort(err)
    assert err.max() < 2 * COARSE_SPACING_DEG, np.sort(err)

    shift_cols = ["rlnOriginXAngst", "rlnOriginYAngst"]
    shift_err_px = np.linalg.norm(out[shift_cols].to_numpy() - truth[shift_cols].to_numpy(), axis=1) / 4.4
    assert shift_err_px.max() < 1.0, shift_err_px
    assert shift_err_px.mean() < 0.6, shift_err_px

    pmax = out["rlnMaxValueProbDistribution"].to_numpy()
    assert np.all((pmax > 0) & (pmax <= 1 + 1e-6))
    assert np.all(out["rlnNrOfSignificantSamples"].to_numpy() >= 1)
    assert np.all(out["bpExpectedErrorDeg"].to_numpy() >= 0)
    for label in ("bpMAPAngleRot", "bpMLEAngleTilt", "bpConcentration", "bpLogEvidence"):
        assert label in out.columns, label


def test_estimator_option_writes_that_estimators_pose(simulated, assigned, tmp_path):
    """``--estimator map`` on the same input writes, as its pose, the MAP angles the MMSE run stored aside."""
    out = tmp_path / "map.star"
    assert main(["assign", "--particles", str(simulated), "--map", str(fragment_map_path()), *SEARCH_ARGS,
                 "--estimator", "map", "--out", str(out)]) == 0
    map_run, mmse_run = _table(out), _table(assigned)
    stored = Rotation.from_euler("ZYZ", mmse_run[["bpMAPAngleRot", "bpMAPAngleTilt", "bpMAPAnglePsi"]].to_numpy(),
                                 degrees=True)
    assert np.all(_angle_deg(_rotations(map_run), stored) < 1e-3)
    assert "bpMMSEAngleRot" in map_run.columns
    # MMSE and MAP differ by less than a final grid cell here (sharp posteriors), but they are not the same column
    assert np.all(_angle_deg(_rotations(map_run), _rotations(mmse_run)) < FINAL_SPACING_DEG)


def _run_expecting_error(argv, capsys, code: int = 1) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err and "\n" not in err, err
    return err


def test_bad_inputs_and_arguments_exit_with_one_line(simulated, tmp_path, capsys):
    """Bad inputs exit 1, arguments rejected after parsing (a local prior without input poses, an unknown
    symmetry) exit 2."""
    volume, px = read_map(fragment_map_path())
    small = tmp_path / "box48.mrc"
    write_map(small, volume[8:56, 8:56, 8:56], px)
    other_px = tmp_path / "px5.mrc"
    write_map(other_px, volume, 5.0)
    no_angles = tmp_path / "no_angles.star"
    tables = starfile.read(simulated, always_dict=True)
    tables["particles"] = tables["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(tables, no_angles)
    # the stack path in the star is relative to the star's folder: keep it next to the original
    no_angles_star = simulated.parent / "no_angles.star"
    no_angles_star.write_text(no_angles.read_text())
    out = tmp_path / "never.star"

    base = ["assign", "--particles", str(simulated), *SEARCH_ARGS, "--out", str(out)]
    msg = _run_expecting_error([*base, "--map", str(small)], capsys)
    assert "48" in msg and "64" in msg
    msg = _run_expecting_error([*base, "--map", str(other_px)], capsys)
    assert "5.0000" in msg and "4.4000" in msg
    msg = _run_expecting_error(["assign", "--particles", str(no_angles_star), "--map", str(fragment_map_path()),
                                "--prior", "local:10", "--out", str(out)], capsys, code=2)
    assert "rlnAngleRot" in msg
    msg = _run_expecting_error([*base, "--map", str(fragment_map_path()), "--sym", "X7"], capsys, code=2)
    assert "X7" in msg
    assert not out.exists()


def test_search_limits_are_the_engines(simulated, tmp_path, capsys):
    """The grid options take the ranges of :class:`PoseSearch`: an order above its maximum is a usage error (exit 2),
    levels beyond the finest grid too, found after parsing (exit 2, one line); nothing is written."""
    top, out = PoseSearch.MAX_HEALPIX_ORDER, tmp_path / "never.star"
    base = ["assign", "--particles", str(simulated), "--map", str(fragment_map_path()), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--healpix-order", str(top + 1)])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    msg = _run_expecting_error([*base, "--healpix-order", str(top), "--refine-levels",
                                str(PoseSearch.MAX_FINEST_ORDER - top + 1)], capsys, code=2)
    assert "refinement levels" in msg
    assert not out.exists()
