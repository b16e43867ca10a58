"""Fourier reconstruction building blocks: adjoint insertion, Wiener reconstruction, symmetry, FSC, tau², low-pass.

Independent references: the forward projector (:mod:`bayespose.core.imaging.forward`) for the adjoint identity,
torch-image-interpolation's own splatting, numpy FFTs of the true map, exact 90-degree index rotations for the C4
average, analytic FSC/filter cases, and ``relion_reconstruct`` (RELION 3.1) on the same particles.
"""

import subprocess

import numpy as np
import pytest
import torch
from torch_image_interpolation import insert_into_image_3d

from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.forward import PreparedVolume, prepare_volume, project, project_fourier, slice_coefficients
from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.imaging.reconstruct import (
    FourierAccumulator,
    _splat,
    backproject_coefficients,
    fsc,
    grid_shape,
    lowpass,
    padded_size,
    reconstruct,
    resolution_at,
    tau2_from_fsc,
)
from bayespose.core.io.mrc import read_map, write_map, write_stack
from bayespose.core.io.relion_star import write_star
from bayespose.data import fragment_map_path
from tests.helpers import need_relion

PIXEL = 8.8  # Å/px of the fragment map binned 2x (4.4 Å/px at 64 px)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(np.asarray(a)), np.ravel(np.asarray(b)))[0, 1])


@pytest.fixture(scope="module")
def truth32() -> np.ndarray:
    """The asymmetric 3J9G fragment binned to 32 px (8.8 Å/px), [z, y, x], centre 16."""
    vol, _ = read_map(fragment_map_path())
    return vol.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5)).astype(np.float32)


def nyquist_sphere(vol: np.ndarray, radius: float | None = None) -> np.ndarray:
    """The map with every Fourier component beyond ``radius`` (default D // 2) zeroed (numpy FFT)."""
    d = vol.shape[0]
    r_max = d // 2 if radius is None else radius
    k = np.fft.fftfreq(d, 1.0 / d)
    kr = np.fft.rfftfreq(d, 1.0 / d)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)
    return np.fft.irfftn(np.fft.rfftn(vol) * (r <= r_max), s=vol.shape).astype(np.float32)


def random_ctf(n: int, seed: int) -> CTFParams:
    rng = np.random.default_rng(seed)
    du = rng.uniform(8000.0, 25000.0, n)
    return CTFParams(du, du - rng.uniform(0, 500, n), rng.uniform(0, 180, n), np.full(n, 300.0), np.full(n, 2.7),
                     np.full(n, 0.1), np.zeros(n))


# ------------------------------------------------------------------------------------------------ adjointness
@pytest.mark.parametrize("box", [16, 15])
def test_backproject_is_exact_adjoint_of_slice_coefficients(box):
    g = torch.Generator().manual_seed(box)
    p = padded_size(box)
    shape = grid_shape(p)
    x = torch.randn(shape, dtype=torch.complex64, generator=g)
    prepared = PreparedVolume(x, box, p, "none")
    rots = torch.as_tensor(random_rotations(7, box), dtype=torch.float32)
    kx = (torch.rand(60, generator=g) - 0.5) * box  # any sign, inside the Nyquist square
    ky = (torch.rand(60, generator=g) - 0.5) * box
    y = torch.randn(7, 60, dtype=torch.complex64, generator=g)
    lhs = torch.sum(slice_coefficients(prepared, rots, kx, ky) * y.conj()).real.double()
    rhs = torch.sum(x * backproject_coefficients(y, rots, kx, ky, box, p).conj()).real.double()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-4)
    # the transpose rotation (a classic convention slip) breaks the identity
    wrong = torch.sum(x * backproject_coefficients(y, rots.transpose(1, 2), kx, ky, box, p).conj()).real
    assert abs(float(wrong) - float(lhs)) > 0.1 * abs(float(lhs))


def test_insert_is_adjoint_of_project_fourier_with_symmetry():
    """<Σ_g P_{A L_g} X, Y>_H = <X, insert_sym(Y)>, H the non-redundant half-plane within Nyquist."""
    box = 16
    g = torch.Generator().manual_seed(3)
    p = padded_size(box)
    x = torch.randn(grid_shape(p), dtype=torch.complex64, generator=g)
    prepared = PreparedVolume(x, box, p, "none")
    rots = random_rotations(5, 4)
    y = torch.randn(5, box, box // 2 + 1, dtype=torch.complex64, generator=g)
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    half = torch.as_tensor(((kx > 0) | (ky >= 0)) & (kx ** 2 + ky ** 2 <= (box // 2) ** 2))
    group = np.stack([np.eye(3), np.diag([-1.0, -1.0, 1.0])])  # C2 about z
    forward = sum(project_fourier(prepared, rots @ group[j]) for j in range(2))
    lhs = torch.sum((forward * y.conj())[:, half]).real.double()
    acc = FourierAccumulator.zeros(box)
    acc.insert(y, torch.zeros(1), rots, symmetry="C2")
    rhs = torch.sum(x * acc.numerator.conj()).real.double()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-4)


def test_weights_are_splatted_like_the_numerator():
    """Slices equal to weight · (centring phase) must produce numerator == weight (same splat, phase removed)."""
    box = 16
    rng = np.random.default_rng(5)
    rots = random_rotations(6, 5)
    w = torch.as_tensor(rng.uniform(0.1, 2.0, (6, box, box // 2 + 1)), dtype=torch.float32)
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    phase = torch.as_tensor((-1.0) ** (kx + ky), dtype=torch.float32)  # exp(-2 pi i k (D/2) / D), even D
    acc = FourierAccumulator.zeros(box)
    acc.insert((w * phase).to(torch.complex64), w, rots)
    assert float(acc.weight.sum()) > 0
    torch.testing.assert_close(acc.numerator.real, acc.weight, rtol=1e-5, atol=1e-5)
    assert float(acc.numerator.imag.abs().max()) < 1e-5
    # every inserted sample carries total trilinear weight 1: the weight grid sums to Σ w over the inserted set
    half = torch.as_tensor(((kx > 0) | (ky >= 0)) & (kx ** 2 + ky ** 2 <= (box // 2) ** 2))
    assert float(acc.weight.sum()) == pytest.approx(float(w[:, half].sum()), rel=1e-5)


def test_splat_matches_torch_image_interpolation():
    g = torch.Generator().manual_seed(0)
    shape = (9, 9, 5)
    coords = torch.rand(500, 3, generator=g) * torch.tensor([8.0, 8.0, 4.0])
    coords[:10, 0] = 8.0  # on the last plane
    coords[10:20] = coords[10:20].round()  # exactly on grid points
    values = torch.randn(500, 3, generator=g)
    flat = torch.zeros(9 * 9 * 5, 3)
    _splat(values, coords, flat, shape)
    reference, _ = insert_into_image_3d(values, coords, torch.zeros(3, *shape))
    torch.testing.assert_close(flat.reshape(*shape, 3).permute(3, 0, 1, 2), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ reconstruction
def _accumulate(truth, rots, ctf=None, symmetry=None):
    prepared = prepare_volume(truth)
    slices = project_fourier(prepared, rots)
    d = truth.shape[0]
    if ctf is None:
        weights = torch.ones(1)
    else:
        c = ctf_2d(ctf, PIXEL, d)
        slices = slices * c * c  # data C·(C·P V), weight C²
        weights = c * c
    acc = FourierAccumulator.zeros(d)
    acc.insert(slices, weights, rots, symmetry=symmetry)
    return acc


@pytest.mark.parametrize("with_ctf", [False, True])
def test_reconstruct_noiseless_projections(truth32, with_ctf):
    rots = random_rotations(500, 11)
    ctf = random_ctf(500, 12) if with_ctf else None
    rec = _accumulate(truth32, rots, ctf).reconstruct().numpy()
    freqs, shell_fsc = fsc(rec, truth32, PIXEL)
    two_thirds = int(np.floor(2 / 3 * 16))
    print(f"ctf={with_ctf}: FSC vs truth shells 1..16 {np.round(shell_fsc.numpy()[1:], 4)}")
    assert float(shell_fsc[1:two_thirds + 1].min()) > 0.9
    band_limited = nyquist_sphere(truth32)
    r_full, r_band = corr(rec, truth32), corr(rec, band_limited)
    scale = float((rec * band_limited).sum() / (band_limited ** 2).sum())
    print(f"ctf={with_ctf}: r(truth) {r_full:.4f}, r(truth within Nyquist sphere) {r_band:.4f}, scale {scale:.4f}")
    assert r_full > 0.95 and r_band > 0.99
    assert scale == pytest.approx(1.0, abs=0.03)  # the map comes back on its own intensity scale
    if not with_ctf:  # inserting at the inverse rotations (A^T instead of A) gives a wrong map
        wrong = FourierAccumulator.zeros(32)
        wrong.insert(project_fourier(prepare_volume(truth32), rots), torch.ones(1), rots.transpose(0, 2, 1))
        assert corr(wrong.reconstruct().numpy(), truth32) < 0.8


def test_reconstruct_odd_box_and_accumulator_sum(truth32):
    truth = np.pad(truth32, ((0, 1),) * 3)  # 33 px, same centre voxel 16
    rots = random_rotations(400, 21)
    prepared = prepare_volume(truth)
    slices = project_fourier(prepared, rots)
    half1, half2 = FourierAccumulator.zeros(33), FourierAccumulator.zeros(33)
    half1.insert(slices[:200], torch.ones(1), rots[:200])
    half2.insert(slices[200:], torch.ones(1), rots[200:])
    rec = (half1 + half2).reconstruct().numpy()
    assert corr(rec, nyquist_sphere(truth)) > 0.99
    assert corr(rec, truth) > 0.95


def _rot90_z(vol: np.ndarray, k: int) -> np.ndarray:
    """Exact turn by k·90° about the z axis through voxel D // 2 (even D): ``W(x, y) = V(y, -x)``, k times."""
    d = vol.shape[0]
    minus = (2 * (d // 2) - np.arange(d)) % d  # index of -u for the index of u (u = i - D // 2)
    out = vol
    for _ in range(k % 4):
        out = np.transpose(out, (0, 2, 1))[:, :, minus]  # W[z, i, j] = V[z, minus[j], i]
    return out


def test_symmetric_insertion_gives_the_symmetrised_map(truth32):
    """Asymmetric particles inserted at all C4 mates A @ L_g reconstruct the C4 average of the map."""
    rots = random_rotations(300, 31)
    rec = _accumulate(truth32, rots, symmetry="C4").reconstruct().numpy()
    band = nyquist_sphere(truth32)
    average = np.mean([_rot90_z(band, k) for k in range(4)], axis=0)
    # the index rotation really is a 4-fold: four turns give back the map, one turn changes it
    np.testing.assert_array_equal(_rot90_z(_rot90_z(band, 2), 2), band)
    assert corr(_rot90_z(band, 1), band) < 0.5
    r_avg, r_plain = corr(rec, average), corr(rec, band)
    r_self = corr(rec, _rot90_z(rec, 1))
    print(f"C4 insertion: r(C4 average) {r_avg:.4f}, r(asymmetric truth) {r_plain:.4f}, "
          f"r(rec, rec turned) {r_self:.4f}")
    assert r_avg > 0.99 and r_self > 0.99 and r_plain < 0.8


# ------------------------------------------------------------------------------------------------ Wiener / tau²
def test_tau2_from_fsc_formula():
    mean_w = torch.tensor([4.0, 4.0, 2.0, 0.0])
    tau2 = tau2_from_fsc(torch.tensor([0.5, 0.8, -0.3, 0.5]), mean_w)
    # SSNR = F / (1 - F): 1, 4, 0.001/0.999 (FSC floored at 0.001); tau² = SSNR / mean weight; empty shell -> 0
    np.testing.assert_allclose(tau2.numpy(), [0.25, 1.0, 0.001 / 0.999 / 2.0, 0.0], rtol=1e-5)
    # whole map: the FSC against an equally good map is 2F / (1 + F) (SSNR doubles with the weights: same tau²);
    # RELION's sqrt of it on request
    whole = tau2_from_fsc(torch.tensor([0.5, 1.0, 0.5, 0.5]), 2 * mean_w, whole_map=True)
    np.testing.assert_allclose(whole.numpy()[[0, 1]], [0.25, 0.999 / 0.001 / 8.0], rtol=1e-4)
    f = np.sqrt(2 * 0.5 / 1.5)
    relion = tau2_from_fsc(torch.tensor([0.5, 1.0, 0.5, 0.5]), mean_w, whole_map=True, relion_sqrt=True)
    assert float(relion[0]) == pytest.approx(f / (1 - f) / 4.0, rel=1e-5)


def test_wiener_filter_with_half_map_fsc_beats_plain_inversion(truth32):
    """Noisy particles, two half sets: tau² from the half-map FSC gives a map closer to the truth."""
    n, d = 1200, 32
    rng = np.random.default_rng(41)
    rots = random_rotations(n, 42)
    slices = project_fourier(prepare_volume(truth32), rots)
    sigma = 10.0 * float(slices[:, 1:, 1:].abs().mean())  # Fourier noise std per coefficient: low SNR
    noise = torch.as_tensor(rng.standard_normal(slices.shape) + 1j * rng.standard_normal(slices.shape),
                            dtype=torch.complex64) * (sigma / np.sqrt(2))
    noisy = (slices + noise) / sigma ** 2  # numerator Σ Y / σ², weight Σ 1 / σ²
    halves = []
    for sel in (slice(0, n // 2), slice(n // 2, n)):
        acc = FourierAccumulator.zeros(d)
        acc.insert(noisy[sel], torch.full((1,), 1.0 / sigma ** 2), rots[sel])
        halves.append(acc)
    plain = [h.reconstruct() for h in halves]
    freqs, half_fsc = fsc(plain[0], plain[1], PIXEL)
    res = resolution_at(freqs, half_fsc)
    wiener = [h.reconstruct(tau2=tau2_from_fsc(half_fsc, h.mean_weight_per_shell())) for h in halves]
    r_plain = corr(plain[0].numpy(), truth32)
    r_wiener = corr(wiener[0].numpy(), truth32)
    print(f"half-map resolution {res:.1f} Å; r(truth): plain {r_plain:.3f}, Wiener {r_wiener:.3f}")
    assert 2 * PIXEL < res < 10 * PIXEL  # the test is in the interesting regime: signal at low, noise at high k
    assert r_wiener > r_plain + 0.15
    # the whole map (both halves) with whole_map=True tau² is better still
    both = halves[0] + halves[1]
    r_both = corr(both.reconstruct(tau2=tau2_from_fsc(half_fsc, both.mean_weight_per_shell(), whole_map=True)),
                  truth32)
    assert r_both > r_wiener


def test_tau2_zero_beyond_a_shell_lowpasses_the_reconstruction(truth32):
    rots = random_rotations(300, 51)
    acc = _accumulate(truth32, rots)
    tau2 = torch.full((17,), 1e9)
    tau2[9:] = 0.0
    rec = acc.reconstruct(tau2=tau2).numpy()
    spectrum = np.abs(np.fft.rfftn(rec))
    k = np.fft.fftfreq(32, 1.0 / 32)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.fft.rfftfreq(32, 1.0 / 32)[None, None, :] ** 2)
    # tau² interpolates linearly to 0 between shells 8 and 9; the real-space gridding correction leaks a little
    assert spectrum[r > 10].max() < 0.02 * spectrum.max()
    assert corr(rec, nyquist_sphere(truth32, 8.0)) > 0.98


def test_reconstruct_rejects_bad_input():
    acc = FourierAccumulator.zeros(16)
    with pytest.raises(ValueError, match="shape"):
        acc.insert(torch.zeros(2, 16, 8, dtype=torch.complex64), torch.ones(1), np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="complex"):
        acc.insert(torch.zeros(1, 16, 9), torch.ones(1), np.eye(3)[None])
    with pytest.raises(ValueError, match="grid_correction"):
        reconstruct(acc.numerator, acc.weight, 16, grid_correction="cubic")
    with pytest.raises(ValueError, match="tau2"):
        acc.reconstruct(tau2=[-1.0, 1.0])
    with pytest.raises(ValueError, match="symmetry"):
        acc.insert(torch.zeros(1, 16, 9, dtype=torch.complex64), torch.ones(1), np.eye(3)[None], symmetry="Cs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_accumulator_on_cuda_matches_cpu(truth32):
    rots = random_rotations(50, 81)
    slices = project_fourier(prepare_volume(truth32), rots)
    cpu, gpu = FourierAccumulator.zeros(32), FourierAccumulator.zeros(32, device="cuda")
    cpu.insert(slices, torch.ones(1), rots, symmetry="C2")
    gpu.insert(slices.cuda(), torch.ones(1), rots, symmetry="C2")
    assert gpu.numerator.is_cuda
    torch.testing.assert_close(gpu.reconstruct().cpu(), cpu.reconstruct(), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------ FSC, filters
def test_fsc_identities():
    rng = np.random.default_rng(61)
    a = rng.standard_normal((32, 32, 32)).astype(np.float32)
    b = rng.standard_normal((32, 32, 32)).astype(np.float32)
    freqs, same = fsc(a, a, 2.0)
    np.testing.assert_allclose(freqs.numpy(), np.arange(17) / (32 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(fsc(a, -3.0 * a, 2.0)[1].numpy()[1:], -1.0, atol=1e-5)
    _, independent = fsc(a, b, 2.0)
    # shell s holds ~2 pi s² independent complex voxels (half space): |FSC| ~ 1 / sqrt(that)
    assert np.all(np.abs(independent.numpy()[4:]) < 4.0 / np.sqrt(2 * np.pi * np.arange(4, 17) ** 2))


def test_fsc_and_resolution_of_maps_sharing_a_band():
    """Two maps = common signal within shell 10 + independent noise: FSC ~1 inside, ~0 outside -> ~D px / 10."""
    rng = np.random.default_rng(62)
    d, px = 48, 1.5
    signal = nyquist_sphere(rng.standard_normal((d,) * 3).astype(np.float32), 10.0) * 10.0
    noise = [nyquist_sphere(rng.standard_normal((d,) * 3).astype(np.float32)) * 0.3 for _ in range(2)]
    noise = [n - nyquist_sphere(n, 10.0) for n in noise]  # noise only outside the signal band
    freqs, values = fsc(signal + noise[0], signal + noise[1], px)
    res = resolution_at(freqs, values)
    print(f"FSC band test: resolution {res:.2f} Å (signal band ends at shell 10 = {d * px / 10:.2f} Å)")
    assert values[1:10].min() > 0.99 and np.abs(values.numpy()[12:]).max() < 0.15
    assert d * px / 11.5 < res <= d * px / 10  # the crossing lies between shells 10 and 11.5


def test_resolution_at_synthetic_curve():
    freqs = np.arange(33) / (64 * 1.2)  # 64 px at 1.2 Å/px
    curve = 1.0 - np.arange(33) / 20.0  # crosses 0.143 at shell 20 (1 - 0.143) = 17.14
    expected = 64 * 1.2 / (20 * (1 - 0.143))
    assert resolution_at(freqs, curve) == pytest.approx(expected, rel=1e-6)
    assert resolution_at(freqs, curve, threshold=0.5) == pytest.approx(64 * 1.2 / 10.0, rel=1e-6)
    assert resolution_at(freqs, np.ones(33)) == pytest.approx(2 * 1.2)  # never crosses: Nyquist
    with pytest.raises(ValueError):
        resolution_at(freqs[::-1], curve)


def test_lowpass_keeps_low_and_removes_high_frequencies():
    d, px = 32, 2.0
    z, y, x = np.meshgrid(*(np.arange(d),) * 3, indexing="ij")
    low = np.cos(2 * np.pi * 3 * x / d)  # 3 cycles per box: 21.3 Å
    high = np.cos(2 * np.pi * 10 * y / d)  # 10 cycles: 6.4 Å
    out = lowpass((low + high).astype(np.float32), resolution_A=d * px / 6.0, pixel_size=px).numpy()
    np.testing.assert_allclose(out, low, atol=1e-5)
    # at the cut-off itself the raised cosine is 0.5; a hard edge keeps it whole
    edge = np.cos(2 * np.pi * 6 * z / d).astype(np.float32)
    np.testing.assert_allclose(lowpass(edge, d * px / 6.0, px).numpy(), 0.5 * edge, atol=1e-5)
    np.testing.assert_allclose(lowpass(edge, d * px / 6.0, px, edge_width=0).numpy(), edge, atol=1e-5)


# ------------------------------------------------------------------------------------------------ RELION
@pytest.fixture(scope="module")
def relion_particles(truth32, tmp_path_factory):
    """400 noiseless CTF-modulated particles (32 px, 8.8 Å/px) with shifts, as a stack + RELION 3.1 star."""
    n = 400
    rng = np.random.default_rng(71)
    rots = random_rotations(n, 72)
    origins = rng.uniform(-2.0, 2.0, (n, 2)) * PIXEL
    ctf = random_ctf(n, 73)
    images = project(truth32, rots, origins_A=origins, pixel_size=PIXEL, ctf=ctf).numpy()
    tmp = tmp_path_factory.mktemp("relion_reconstruct")
    stack = tmp / "particles.mrcs"
    write_stack(stack, images, PIXEL)
    particles = ParticleSet(PIXEL, 32, np.array([str(stack)] * n, dtype=object), np.arange(n), rots, origins, ctf)
    write_star(tmp / "particles.star", particles)
    write_map(tmp / "truth.mrc", truth32, PIXEL)
    return dict(dir=tmp, images=images, rots=rots, origins=origins, ctf=ctf)


def _ours_from_images(p, symmetry=None) -> np.ndarray:
    from bayespose.core.imaging.forward import shift_fourier

    ft = torch.fft.rfft2(torch.as_tensor(p["images"]))
    ft = shift_fourier(ft, torch.as_tensor(p["origins"] / PIXEL, dtype=torch.float32))  # centre: +origin / px
    c = ctf_2d(p["ctf"], PIXEL, 32)
    acc = FourierAccumulator.zeros(32)
    acc.insert(ft * c, c * c, p["rots"], symmetry=symmetry)
    return acc.reconstruct().numpy()


def _relion_reconstruct(p, symmetry: str) -> np.ndarray:
    need_relion("relion_reconstruct")
    out = p["dir"] / f"relion_{symmetry}.mrc"
    cmd = ["relion_reconstruct", "--i", "particles.star", "--o", out.name, "--ctf", "--sym", symmetry]
    subprocess.run(cmd, cwd=p["dir"], check=True, capture_output=True, timeout=300)
    return read_map(out)[0]


@pytest.mark.relion
def test_matches_relion_reconstruct_with_ctf(relion_particles, truth32):
    rel = _relion_reconstruct(relion_particles, "C1")
    ours = _ours_from_images(relion_particles)
    r = corr(ours, rel)
    scale = float((ours * rel).sum() / (rel ** 2).sum())
    r_truth_ours, r_truth_rel = corr(ours, truth32), corr(rel, truth32)
    print(f"relion_reconstruct --ctf vs ours: r = {r:.4f}, scale ours/relion = {scale:.3f}; r(truth): ours "
          f"{r_truth_ours:.4f}, relion {r_truth_rel:.4f}")
    assert r > 0.95
    assert r_truth_ours > 0.95


@pytest.mark.relion
def test_symmetry_matches_relion_reconstruct(relion_particles):
    """Same particles reconstructed with C4 by RELION and by our mate insertion (A @ L_g)."""
    rel = _relion_reconstruct(relion_particles, "C4")
    ours = _ours_from_images(relion_particles, symmetry="C4")
    ours_c1 = _ours_from_images(relion_particles)
    r, r_c1 = corr(ours, rel), corr(ours_c1, rel)
    print(f"relion_reconstruct --sym C4 vs ours C4: r = {r:.4f} (ours C1: {r_c1:.4f})")
    assert r > 0.95 and r_c1 < 0.8
