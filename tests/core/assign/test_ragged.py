"""Scoring per-particle rotation sets of different sizes in groups (:mod:`bayespose.core.assign._ragged`): the same
scores as one padded call, in the same layout, and groups that bound the padding."""

import numpy as np
import pytest
import torch

from bayespose.core.assign import NoiseModel, shift_lattice
from bayespose.core.assign._ragged import row_groups, score_ragged
from bayespose.core.assign._scoring import _Batch, _Scorer
from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.imaging.forward import prepare_volume

from .test_engine import BOX, make_particles, small_map  # noqa: F401 (fixture)


def test_row_groups_bound_the_padding_and_cover_every_row():
    widths = np.array([8, 64, 16, 8, 64, 24, 8, 40, 8, 8, 16, 8, 8, 8, 8, 8, 8, 48, 8, 8])
    groups = row_groups(widths, min_rows=4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(widths)))
    for g in groups[:-1]:
        assert len(g) >= 4
    padded = sum(len(g) * widths[g].max() for g in groups)
    assert padded < 0.6 * len(widths) * widths.max()  # one padded block: every row as wide as the widest
    assert len(row_groups(np.full(5, 8), min_rows=2)) == 1


@pytest.mark.parametrize("lattice", [True, False])
def test_grouped_scores_equal_one_padded_call(small_map, lattice):  # noqa: F811
    volume, pixel_size = small_map
    b, k = 12, 40
    particles, images, _ = make_particles(volume, pixel_size, b, 0.3, seed=4)
    rng = np.random.default_rng(0)
    widths = rng.integers(1, k + 1, b)
    widths[:3] = [k, 2, 3]
    rotations = random_rotations(b * k, rng).reshape(b, k, 3, 3)
    ids = rng.integers(0, 200, (b, k))
    rotations = random_rotations(200, 1)[ids] if lattice else rotations
    rotations = rotations.copy()
    pad = np.arange(k)[None] >= widths[:, None]
    log_q = np.where(pad, -np.inf, np.log(rng.uniform(0.5, 1.5, (b, k))))
    log_pi = rng.normal(0.0, 1.0, (b, k))
    # the engine pads a row with copies of one of its valid rotations (same id and prior)
    rows = np.nonzero(pad)[0]
    rotations[pad], ids[pad], log_pi[pad] = rotations[rows, 0], ids[rows, 0], log_pi[rows, 0]
    noise = NoiseModel(noise_power=np.full(BOX // 2 + 1, 50.0), scale=1.0)
    deltas = shift_lattice(1.0, 1.0)

    def scorer():
        return _Scorer(prepare_volume(volume), noise, deltas, BOX, 8_000_000, torch.device("cpu"))

    batch = _Batch.load(particles, np.arange(b), images, np.zeros((b, 2)), torch.device("cpu"))
    one = scorer()
    ref = one.score(batch, 10.0, rotations, log_q, log_pi, lattice_ids=ids if lattice else None)
    grouped = scorer()
    got = score_ragged(grouped, batch, 10.0, rotations, log_q, log_pi, ids if lattice else None, min_rows=2)
    assert len(grouped.calls) > 1 and len(one.calls) == 1
    valid = torch.as_tensor(np.isfinite(log_q))
    torch.testing.assert_close(got.log_rot[valid], ref.log_rot[valid], rtol=1e-5, atol=1e-3)
    assert torch.isinf(got.log_rot[~valid]).all()
    torch.testing.assert_close(got.log_shift, ref.log_shift, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.const, ref.const)
    for name in ("map", "mle", "post"):
        torch.testing.assert_close(got.best[name][0], ref.best[name][0], rtol=1e-5, atol=1e-3)
        assert torch.equal(got.best[name][1], ref.best[name][1]), name
    # less work: the grouped calls scored fewer (particle, rotation) pairs than the padded block
    assert sum(c.particles * c.rotations for c in grouped.calls) < b * k
