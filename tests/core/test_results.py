"""The per-particle result schema: one table maps fields, star columns, Scipion attributes and dtypes; round trips
through star files and npz arrays keep every value; copies never alias."""

import numpy as np
import pytest

from bayespose.core.io.relion_star import read_star, write_star
from bayespose.core.results import COLUMNS, ESTIMATORS, ParticleResults, scipion_attributes
from tests.helpers import relion_matrices


def _results(n=6, seed=0) -> ParticleResults:
    rng = np.random.default_rng(seed)
    out = ParticleResults.zeros(n, statistics=tuple(c.field for c in COLUMNS))
    for est in ESTIMATORS:
        angles = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n)])
        setattr(out, f"{est}_rotations", relion_matrices(angles))
        setattr(out, f"{est}_origins_A", rng.normal(size=(n, 2)))
    for c in COLUMNS:
        values = rng.integers(0, 50, n) if c.dtype is np.int64 else rng.normal(size=n)
        setattr(out, c.field, values.astype(c.dtype))
    return out


def test_table_names_are_unique_and_fields_exist():
    for attr in ("field", "star", "scipion"):
        names = [getattr(c, attr) for c in COLUMNS]
        assert len(set(names)) == len(names), attr
    assert all(hasattr(ParticleResults(), c.field) for c in COLUMNS)


def test_star_round_trip_keeps_poses_and_statistics(tmp_path):
    from bayespose.core.imaging.particles import ParticleSet

    res = _results()
    n = 6
    particles = ParticleSet(pixel_size=2.0, box=64, image_files=[str(tmp_path / "p.mrcs")] * n,
                            image_indices=np.arange(n), extra={"bpStale": np.ones(n)})
    out = res.to_particle_set(particles, "map")
    assert "bpStale" not in out.extra and "bpMAPAngleRot" not in out.extra and "bpMMSEAngleRot" in out.extra
    write_star(tmp_path / "r.star", out)
    back = read_star(tmp_path / "r.star")
    np.testing.assert_allclose(back.rotations, res.map_rotations, atol=1e-6)
    np.testing.assert_allclose(back.origins_A, res.map_origins_A, atol=1e-6)
    stats = ParticleResults.from_star_columns(back.extra)
    for c in COLUMNS:
        np.testing.assert_allclose(getattr(stats, c.field), getattr(res, c.field), rtol=1e-6)
        assert getattr(stats, c.field).dtype == c.dtype
    attrs = scipion_attributes(back.extra, half_set=np.array([1, 2] * 3))
    assert attrs["MaxProb"].dtype == np.float64 and attrs["NrSignificant"].dtype == np.int64
    np.testing.assert_array_equal(attrs["HalfSet"], [1, 2] * 3)
    # the MMSE rotation's angles, written as columns, describe the MMSE rotations
    mmse = relion_matrices(np.column_stack([attrs[f"Mmse{lab}"] for lab in ("Rot", "Tilt", "Psi")]))
    np.testing.assert_allclose(mmse, res.mmse_rotations, atol=1e-6)


def test_arrays_round_trip_and_copies_do_not_alias():
    res = _results()
    back = ParticleResults.from_arrays(res.to_arrays(prefix="x_"), prefix="x_")
    for name in res.result_fields():
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    copy = res.copy_results()
    res.mmse_rotations[0] = 0.0
    res.pmax[:] = -1
    assert not np.allclose(copy.mmse_rotations[0], 0.0) and (copy.pmax != -1).all()


def test_set_rows_and_subset():
    res, part = _results(6, 0), _results(2, 1)
    res.set_rows([1, 4], part)
    np.testing.assert_array_equal(res.pmax[[1, 4]], part.pmax)
    sub = res.subset([1, 4])
    np.testing.assert_array_equal(sub.mle_rotations, part.mle_rotations)
    with pytest.raises(ValueError, match="estimator"):
        res.poses("mean")
