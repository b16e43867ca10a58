"""The E-step references: the envelope mask keeps the solvent's noise out of a noisy half map, each half's mask
comes from that half alone (gold standard), and a refinement with it finds better poses (``-m slow``).

Known truth: the fragment map plus white noise of three times the map's standard deviation, low-passed to 15 Å (a
half map of a few hundred noisy particles, whose noise fills the whole sphere).
"""

import numpy as np
import pytest

from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.reconstruct import fsc, lowpass
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.imaging.volumes import soft_sphere_mask
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.refine import RefineConfig, refine
from bayespose.core.refine._maps import references_from
from bayespose.data import fragment_map_path

RESOLUTION_A = 15.0


@pytest.fixture(scope="module")
def noisy_halves():
    """The truth, two independently noisy 15 Å half maps of it, the solvent sphere and the pixel size."""
    truth, px = read_map(fragment_map_path())
    box = truth.shape[0]
    sphere = soft_sphere_mask(box, 0.45 * box)
    rng = np.random.default_rng(3)
    halves = [lowpass(truth + rng.normal(0, 3 * truth.std(), truth.shape).astype(np.float32), RESOLUTION_A, px).numpy()
              for _ in range(2)]
    return truth, halves, sphere, px


def _fsc_at(a, b, px, shells_A=(40.0, 25.0, 18.0)):
    freq, values = (t.numpy() for t in fsc(a, b, px))
    return np.interp([1 / s for s in shells_A], freq, values)


def test_envelope_references_are_closer_to_the_truth_than_the_sphere(noisy_halves):
    truth, halves, sphere, px = noisy_halves
    with_sphere = references_from(halves, sphere, None, px, join=False)
    with_envelope = references_from(halves, sphere, None, px, join=False, envelope_at_A=RESOLUTION_A)
    for s, e in zip(with_sphere, with_envelope):
        gain = _fsc_at(e, truth, px) - _fsc_at(s, truth, px)  # at 40 / 25 / 18 Å (measured 0.04 / 0.14 / 0.28)
        assert np.all(gain > 0) and gain[-1] > 0.1, gain


def test_each_halfs_envelope_comes_from_that_half_alone(noisy_halves):
    _, halves, sphere, px = noisy_halves
    first = references_from(halves, sphere, None, px, join=False, envelope_at_A=RESOLUTION_A)
    other = references_from([halves[0], np.roll(halves[1], 5, axis=2)], sphere, None, px, join=False,
                            envelope_at_A=RESOLUTION_A)
    np.testing.assert_array_equal(first[0], other[0])
    assert not np.allclose(first[1], other[1])


@pytest.mark.slow
def test_refinement_with_envelope_references_finds_better_poses(tmp_path):
    """Two refinements of the same 300 particles (SNR 0.03, CTF, origins ±2 px) from the truth low-passed to
    30 Å: with the envelope the final poses are better than with the sphere alone (measured mean error 4.75° vs
    6.41°, median 3.33° vs 3.86°; on 500 relion_project particles 3.94° vs 5.80°)."""
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=300, snr=0.03, max_shift_px=2.0,
                                                                     seed=1), tmp_path)
    images = read_images(particles)
    truth, px = read_map(fragment_map_path())
    start = lowpass(truth, 30.0, px).numpy()
    mean_error = {}
    for envelope in (True, False):
        result = refine(particles, start, RefineConfig(threads=2, envelope_mask=envelope), images=images, log=None)
        mean_error[envelope] = float(geodesic_distance_deg(result.particles.rotations, particles.rotations).mean())
    assert mean_error[True] < 0.85 * mean_error[False], mean_error
