"""The prediction file of 'predict poses' (bayespose.core.io.prediction): round trip with the schema's deep
statistics, files of the earlier format, atomic writes."""

import numpy as np
import pytest

from bayespose.core.deep.predict import PosePrediction
from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.prediction import load_prediction, save_prediction
from bayespose.core.results import ParticleResults


def _prediction(n: int = 5, k: int = 3, grid_order: int | None = 1) -> PosePrediction:
    rng = np.random.default_rng(0)
    probs = np.sort(rng.dirichlet(np.ones(k), size=n), axis=1)[:, ::-1]
    return PosePrediction(rotations=random_rotations(n, rng=1), confidence=rng.uniform(0, 1, n),
                          top_rotations=random_rotations(n * k, rng=2).reshape(n, k, 3, 3),
                          top_probabilities=probs, grid_order=grid_order, symmetry="C2",
                          model="so3grid" if grid_order is not None else "quaternion")


def _particles(n: int = 5, aligned: bool = True) -> ParticleSet:
    return ParticleSet(pixel_size=2.0, box=32, image_files=np.array(["stack.mrcs"] * n),
                       image_indices=np.arange(n), rotations=random_rotations(n, rng=3) if aligned else None)


def test_round_trip_with_the_schema_fields(tmp_path):
    pred, particles = _prediction(), _particles()
    path = tmp_path / "prediction.npz"
    save_prediction(path, pred, particles, "C2", ids=np.array([7, 3, 9, 1, 4]))
    data = load_prediction(path)
    np.testing.assert_array_equal(data["rotations"], pred.rotations)
    np.testing.assert_array_equal(data["top_rotations"], pred.top_rotations)
    np.testing.assert_array_equal(data["top_probabilities"], pred.top_probabilities)
    np.testing.assert_array_equal(data["input_rotations"], particles.rotations)
    np.testing.assert_array_equal(data["scipion_id"], [7, 3, 9, 1, 4])
    assert (data["symmetry"], data["grid_order"]) == ("C2", 1)
    assert isinstance(data["results"], ParticleResults)
    np.testing.assert_array_equal(data["results"].deep_confidence, pred.confidence)
    np.testing.assert_array_equal(data["results"].deep_top_probability, pred.top_probabilities[:, 0])
    np.testing.assert_array_equal(data["confidence"], pred.confidence)
    with np.load(path) as raw:  # the statistics are stored under their schema names
        assert {"deep_confidence", "deep_top_probability"} <= set(raw.files)
    assert [p.name for p in tmp_path.iterdir()] == ["prediction.npz"]  # no temporary left


def test_defaults_and_the_quaternion_model(tmp_path):
    path = tmp_path / "q.npz"
    save_prediction(path, _prediction(grid_order=None), _particles(aligned=False), "C1")
    data = load_prediction(path)
    assert data["grid_order"] is None and data["input_rotations"] is None
    np.testing.assert_array_equal(data["scipion_id"], np.arange(1, 6))


def test_bad_ids_leave_an_existing_file_untouched(tmp_path):
    path = tmp_path / "prediction.npz"
    save_prediction(path, _prediction(), _particles(), "C1")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="id"):
        save_prediction(path, _prediction(), _particles(), "C1", ids=np.arange(3))
    with pytest.raises(ValueError, match="particles"):
        save_prediction(path, _prediction(), _particles(4), "C1")
    assert path.read_bytes() == before


def test_files_of_the_earlier_format_are_read(tmp_path):
    """Before the schema the file held ``confidence`` and the star columns as ``col_bpDeep*``."""
    pred, particles = _prediction(), _particles()
    path = tmp_path / "old.npz"
    np.savez(path, rotations=pred.rotations, confidence=pred.confidence, top_rotations=pred.top_rotations,
             top_probabilities=pred.top_probabilities, scipion_id=np.arange(1, 6),
             input_rotations=particles.rotations, grid_order=np.int64(1), symmetry=np.str_("C1"),
             col_bpDeepConfidence=pred.confidence, col_bpDeepTopProbability=pred.top_probabilities[:, 0],
             col_bpDeepTop2AngleRot=np.zeros(5))
    data = load_prediction(path)
    np.testing.assert_array_equal(data["results"].deep_confidence, pred.confidence)
    np.testing.assert_array_equal(data["results"].deep_top_probability, pred.top_probabilities[:, 0])
    assert not any(key.startswith("col_") for key in data)
