"""The assignment result file (core I/O of the 'assign poses' and 'predict poses' protocols): a round trip keeps
every per-particle array, the noise model and the metadata; a failed write leaves an existing file as it was."""

import numpy as np
import pytest

from bayespose.core.assign import NoiseModel, PoseAssignment
from bayespose.core.io.assignment import load_assignment, save_assignment
from bayespose.core.results import ESTIMATORS, ParticleResults
from tests.helpers import relion_matrices


def _assignment(n: int = 5, seed: int = 0, ctf2: bool = True) -> PoseAssignment:
    rng = np.random.default_rng(seed)
    results = ParticleResults.zeros(n)
    for est in ESTIMATORS:
        angles = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n)])
        setattr(results, f"{est}_rotations", relion_matrices(angles))
        setattr(results, f"{est}_origins_A", rng.normal(size=(n, 2)))
    results.pmax, results.n_significant = rng.uniform(size=n), rng.integers(1, 50, n)
    results.expected_error_deg, results.concentration = rng.uniform(0, 10, n), rng.uniform(size=n)
    results.log_evidence = rng.normal(size=n)
    noise = NoiseModel(noise_power=rng.uniform(1, 2, 33), scale=3.5, ctf2=rng.uniform(size=33) if ctf2 else None)
    return PoseAssignment(**vars(results), noise=noise, n_rotations=4608, n_shifts=29, n_frequencies=700,
                          timings={"total_s": 1.5, "radii_px": [10.0, 16.5]})


def test_round_trip_keeps_results_noise_and_metadata(tmp_path):
    result = _assignment()
    path = tmp_path / "assignment.npz"
    input_rotations = relion_matrices(np.zeros((5, 3)))
    save_assignment(path, result, "map", "C2", ids=np.array([7, 3, 9, 1, 2]), input_rotations=input_rotations)
    data = load_assignment(path)
    for name, value in result.to_arrays().items():
        assert data[name].dtype == value.dtype, name
        np.testing.assert_array_equal(data[name], value, err_msg=name)
    loaded = ParticleResults.from_arrays(data)
    assert loaded.result_fields() == result.result_fields()
    np.testing.assert_array_equal(data["noise"].noise_power, result.noise.noise_power)
    np.testing.assert_array_equal(data["noise"].ctf2, result.noise.ctf2)
    assert data["noise"].scale == 3.5
    assert (data["estimator"], data["symmetry"]) == ("map", "C2")
    assert data["info"] == {"n_rotations": 4608, "n_shifts": 29, "n_frequencies": 700,
                            "timings": {"total_s": 1.5, "radii_px": [10.0, 16.5]}}
    np.testing.assert_array_equal(data["scipion_id"], [7, 3, 9, 1, 2])
    np.testing.assert_array_equal(data["input_rotations"], input_rotations)

    save_assignment(path, _assignment(ctf2=False), "mmse", "C1")  # defaults: ids 1..N, no input alignment
    data = load_assignment(path)
    np.testing.assert_array_equal(data["scipion_id"], np.arange(1, 6))
    assert data["input_rotations"] is None and data["noise"].ctf2 is None


def test_a_failed_write_leaves_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "assignment.npz"
    save_assignment(path, _assignment(), "mmse", "C1")
    before = path.read_bytes()

    def fail_midway(file, **arrays):
        file.write(b"PK half an archive")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez", fail_midway)
    with pytest.raises(OSError, match="no space"):
        save_assignment(path, _assignment(seed=1), "map", "C1")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["assignment.npz"]  # no temporary left behind
