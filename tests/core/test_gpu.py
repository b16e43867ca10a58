"""The heavy paths on CUDA give the CPU's results on the same data (skipped without a CUDA device; run by
benchmarks/gpu_check.sh on a GPU machine).

Data: 48 particles of the fragment map Fourier-cropped to 32 px (8.8 Å/px), CTF, SNR 0.3, origins within ±1 px.
Everything runs in float32 on both devices; the GPU sums in another order (and ``index_add_`` insertion is not
deterministic), so the bounds are float-rounding bounds, not equality:

* scoring (assign_poses): the same MAP cell for >= 95 % of the particles and MMSE rotations within 0.5° for those
  (a wrong projection, CTF or shift convention on the GPU moves poses by grid steps, 7.5° here);
* insertion, reconstruction and FSC (one refine iteration): half maps correlating > 0.999 with the CPU's;
* training: a CUDA epoch gives a finite loss and a checkpoint that loads on the CPU;
* prediction and deep-prior MMSE: the network's modes within 0.1° of the CPU's, MMSE poses as for scoring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map, write_map
from bayespose.data import fragment_map_path
from tests.helpers import fourier_crop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    volume, px = read_map(fragment_map_path())
    small_map = fourier_crop(volume, 32)
    map_path = out / "map32.mrc"
    write_map(map_path, small_map, px * 2)
    particles = simulate_dataset(map_path, SimulationSpec(n_particles=48, snr=0.3, max_shift_px=1.0, seed=4),
                                 out / "sim")
    return particles, read_images(particles), small_map, out


def _search(device: str) -> PoseSearch:
    return PoseSearch(healpix_order=1, refine_levels=2, shift_range_px=1.0, device=device, batch_size=16)


def test_scoring_on_cuda_matches_cpu(small):
    particles, images, volume, _ = small
    cpu = assign_poses(particles, volume, _search("cpu"), images=images)
    gpu = assign_poses(particles, volume, _search("cuda"), images=images)
    same = geodesic_distance_deg(cpu.map_rotations, gpu.map_rotations) < 1e-3
    assert same.mean() >= 0.95
    assert geodesic_distance_deg(cpu.mmse_rotations, gpu.mmse_rotations)[same].max() < 0.5
    np.testing.assert_allclose(gpu.pmax[same], cpu.pmax[same], atol=0.02)


def test_refine_iteration_on_cuda_matches_cpu(small):
    from bayespose.core.refine import RefineConfig, refine

    particles, images, volume, _ = small
    maps = {}
    for device in ("cpu", "cuda"):
        config = RefineConfig(iterations=1, healpix_order=1, max_healpix_order=2, shift_range_px=1.0, device=device)
        maps[device] = refine(particles, volume, config, images=images, log=None)
    for a, b in zip(maps["cpu"].half_maps, maps["cuda"].half_maps):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(maps["cuda"].fsc, maps["cpu"].fsc, atol=0.02)


@pytest.fixture(scope="module")
def network(small):
    from bayespose.core.deep import TrainConfig, load_pose_network, train_pose_network

    particles, images, _, out = small
    config = TrainConfig(net_box=16, epochs=1, batch_size=16, device="cuda", grid_order=1)
    result = train_pose_network(particles, config, out / "model.pt", images=images, log=None)
    assert np.isfinite(result.history[-1]["train_loss"])
    return load_pose_network(out / "model.pt", device="cpu")


def test_prediction_and_deep_prior_on_cuda_match_cpu(small, network):
    from bayespose.core.deep import deep_prior_assign, predict_poses

    particles, images, volume, _ = small
    pred = {d: predict_poses(network, particles, images=images, device=d) for d in ("cpu", "cuda")}
    assert geodesic_distance_deg(pred["cpu"].rotations, pred["cuda"].rotations).max() < 0.1
    res = {d: deep_prior_assign(particles, pred[d], volume, _search(d), images=images) for d in ("cpu", "cuda")}
    same = geodesic_distance_deg(res["cpu"].map_rotations, res["cuda"].map_rotations) < 1e-3
    assert same.mean() >= 0.95
    assert geodesic_distance_deg(res["cpu"].mmse_rotations, res["cuda"].mmse_rotations)[same].max() < 0.5
