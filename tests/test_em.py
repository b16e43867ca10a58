"""EM refinement on small data: the map improves on its low-passed start and approaches the truth, hard mode runs,
and prior estimation finds a preferred viewing direction."""

import numpy as np
import pytest

from bayespose.core.em import RefineConfig, _direction_density, refine
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.reconstruct import lowpass
from bayespose.core.simulate_dataset import SimulationSpec, simulate_dataset
from bayespose.data import fragment_map_path


def correlation(a, b):
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def band_fsc(a, b, pixel_size, low_A, high_A):
    """Mean FSC of two maps over the shells between low_A and high_A (Å)."""
    from bayespose.core.reconstruct import fsc

    freq, values = fsc(a, b, pixel_size)
    freq, values = np.asarray(freq), np.asarray(values)
    band = (freq > 1 / low_A) & (freq <= 1 / high_A)
    return float(values[band].mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("em")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=120, snr=0.3, ctf=True, seed=5),
                                 out)
    truth, pixel_size = read_map(fragment_map_path())
    return particles, read_images(particles), truth, pixel_size


def test_soft_em_improves_the_map_and_writes_iterations(dataset, tmp_path):
    particles, images, truth, pixel_size = dataset
    config = RefineConfig(iterations=3, healpix_order=1, max_healpix_order=2, shift_range_px=0.0,
                          initial_lowpass_A=30.0, threads=2)
    result = refine(particles, truth, config, out_dir=tmp_path, images=images, log=None)
    start = lowpass(truth, 30.0, pixel_size).numpy()
    # the start holds nothing beyond 30 Å; EM recovers the 30-18 Å band from the particles
    assert band_fsc(result.map, truth, pixel_size, 30.0, 18.0) > band_fsc(start, truth, pixel_size, 30.0, 18.0) + 0.1
    assert correlation(result.map, truth) > 0.6
    assert result.resolution_A < 30.0
    assert len(result.history) == 3 and (tmp_path / "it003_half2.mrc").exists()
    half = result.particles.half_set
    assert set(np.unique(half)) == {1, 2} and abs((half == 1).sum() - (half == 2).sum()) <= 1


def test_hard_mode_runs_and_prior_estimation_finds_the_preferred_view(tmp_path):
    truth, pixel_size = read_map(fragment_map_path())
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=120, snr=0.5, ctf=True, seed=6,
                                                                     pose_distribution="preferred"), tmp_path)
    images = read_images(particles)
    config = RefineConfig(iterations=2, healpix_order=1, max_healpix_order=1, shift_range_px=0.0, mode="hard",
                          prior_mode="estimate", threads=2)
    result = refine(particles, truth, config, images=images, log=None)
    import healpy

    # the simulator's preferred view is +z: the estimated density is highest near the pole
    density = result.direction_prior
    theta, _ = healpy.pix2ang(2 ** result.prior_order, np.arange(len(density)), nest=True)
    assert density[theta < np.radians(35)].mean() > 2 * density[theta > np.radians(60)].mean()
    assert correlation(result.map, truth) > 0.6


def test_direction_density_is_normalised_and_smooth():
    mass = np.zeros(48)
    mass[5] = 100.0
    density = _direction_density(mass, 1, pseudocount=0.5)
    assert density.mean() == pytest.approx(1.0)
    assert density.argmax() == 5 and (density > 1).sum() > 1  # spread to the neighbours


def test_refine_rejects_bad_input(dataset):
    particles, images, truth, _ = dataset
    with pytest.raises(ValueError, match="does not match"):
        refine(particles, truth[:32, :32, :32], images=images, log=None)
    with pytest.raises(ValueError, match="at least 10"):
        refine(particles.subset(np.arange(5)), truth, images=images[:5], log=None)
    with pytest.raises(ValueError, match="mode"):
        refine(particles, truth, RefineConfig(mode="fuzzy"), images=images, log=None)
