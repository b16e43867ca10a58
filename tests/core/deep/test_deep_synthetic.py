"""Synthetic training images from the map (train from the map): the net-box rendering equals Fourier-cropping
the full simulated particle, the noise has the particles' power spectrum, and the shifts and CTFs come from the
particles."""

import numpy as np
import pytest
import torch

from bayespose.core.deep.data import fourier_resize, preprocess_images
from bayespose.core.deep.synthetic import SyntheticProjections
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.noise import radial_average
from bayespose.core.imaging.simulate import simulate_images
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.data import fragment_map_path


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=300, snr=0.1, seed=3,
                                                                     max_shift_px=2.0), out / "sim")
    return particles, read_images(particles), read_map(fragment_map_path())[0]


@pytest.mark.parametrize("net_box", [32, 24])
def test_render_without_noise_is_the_fourier_crop_of_the_simulated_particle(noisy_set, net_box):
    """Independent path: simulate_images renders the full 64 px particle (projection, shift, CTF), which is
    phase-flipped and Fourier-cropped as preprocess_images does; render computes only the net-box coefficients."""
    particles, _, volume = noisy_set
    src = SyntheticProjections.from_particles(volume, particles, net_box, images=read_images(particles))
    rng = np.random.default_rng(0)
    rotations, ctf_index, shifts = src.draw(6, rng)
    ours = src.render(rotations, ctf_index, shifts, noise=False)
    pool = np.sort(np.random.default_rng(0).choice(len(particles), len(particles), replace=False))
    ctf = particles.ctf.subset(pool[ctf_index])
    full, _ = simulate_images(volume, particles.pixel_size, rotations, -shifts * particles.pixel_size, ctf)
    f = torch.fft.rfft2(torch.as_tensor(full)) * torch.sign(ctf_2d(ctf, particles.pixel_size, particles.box))
    expected = fourier_resize(torch.fft.irfft2(f, s=full.shape[-2:]), net_box) * src.scale
    scale = float(expected.abs().max())
    assert float((ours - expected).abs().max()) < 2e-3 * scale
    assert float((ours - expected).abs().max()) < 0.02 * float(ours.std())
    # without the phase flip, a different image (the flip matters)
    assert float((ours - fourier_resize(torch.as_tensor(full), net_box) * src.scale).abs().max()) > 0.1 * scale


def test_noise_and_signal_match_the_particles_power_spectrum(noisy_set):
    """Synthetic network inputs have the radial power spectrum of the real preprocessed particles (same
    normalisation, noise and signal), within 10 % per shell; pure noise inputs would be off at low
    frequencies, where the signal is."""
    particles, images, volume = noisy_set
    src = SyntheticProjections.from_particles(volume, particles, 32, images=images)
    from dataclasses import replace
    real = preprocess_images(images, replace(particles, origins_A=None), None, 32)  # uncentred, as picked
    syn, _ = src.sample(600, np.random.default_rng(1), torch.Generator().manual_seed(1))
    p_real, p_syn = (radial_average((torch.fft.rfft2(x).abs() ** 2).mean(0).numpy(), 32)[1:16] for x in (real, syn))
    np.testing.assert_allclose(p_syn, p_real, rtol=0.1)
    src.scale = 0.0  # noise only: the low shells lose the signal's power
    noise_only, _ = src.sample(600, np.random.default_rng(1), torch.Generator().manual_seed(1))
    p_noise = radial_average((torch.fft.rfft2(noise_only).abs() ** 2).mean(0).numpy(), 32)[1:16]
    assert p_noise[0] < 0.8 * p_real[0]


def test_shifts_and_ctfs_come_from_the_particles(noisy_set):
    particles, images, volume = noisy_set
    src = SyntheticProjections.from_particles(volume, particles, 32, images=images, max_pool=50)
    assert src.ctfs.shape == (50, 32, 17)
    _, ctf_index, shifts = src.draw(500, np.random.default_rng(2))
    origins = {tuple(np.round(o, 6)) for o in -particles.origins_px}
    assert all(tuple(np.round(s, 6)) in origins for s in shifts)
    assert ctf_index.min() >= 0 and ctf_index.max() < 50
    from dataclasses import replace
    centred = SyntheticProjections.from_particles(volume, replace(particles, origins_A=None), 32, images=images,
                                                  fallback_shift_px=0.5)
    _, _, shifts = centred.draw(500, np.random.default_rng(2))
    assert centred.shifts_px is None and np.abs(shifts).max() <= 0.5 and np.abs(shifts).max() > 0.4



def test_noise_scale_scales_only_the_noise_and_the_schedule_ramps_it_to_the_particles(noisy_set):
    """The pre-training noise curriculum: render(noise_scale=s) = signal + s x the same noise draw; the schedule
    starts at noise_start and reaches 1 (the particles' noise) at NOISE_RAMP_FRACTION of the steps."""
    from bayespose.core.deep._training import NOISE_RAMP_FRACTION, Schedule

    particles, images, volume = noisy_set
    src = SyntheticProjections.from_particles(volume, particles, 32, images=images)
    rotations, ctf_index, shifts = src.draw(4, np.random.default_rng(5))
    signal = src.render(rotations, ctf_index, shifts, noise=False)
    full, half = (src.render(rotations, ctf_index, shifts, torch.Generator().manual_seed(7), noise_scale=s) - signal
                  for s in (1.0, 0.5))
    assert float(full.std()) > 0.1 * float(signal.std())
    torch.testing.assert_close(half, 0.5 * full, atol=1e-4 * float(full.abs().max()), rtol=0)
    schedule = Schedule(1e-3, 1000, 0.3, noise_start=0.5)
    ramp_end = round(NOISE_RAMP_FRACTION * 1000)
    assert schedule.pretrain_noise(0) == 0.5
    assert schedule.pretrain_noise(ramp_end // 2) == pytest.approx(0.75)
    assert schedule.pretrain_noise(ramp_end) == schedule.pretrain_noise(999) == 1.0
    assert Schedule(1e-3, 1000, 0.3).pretrain_noise(0) == 1.0  # default: the particles' noise throughout
