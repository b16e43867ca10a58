"""Training from the map: a map-only network (particles without poses lend their CTFs, noise and shifts to
synthetic projections) predicts particles it never saw far better than chance; pre-training then fine-tuning
resumes exactly and refuses another map; per-particle loss weights; the temperature calibration recovers a known
temperature; the work-box augmentation without a turn is the plain preprocessing."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from bayespose.core.deep import (
    TrainConfig,
    _training,
    last_state_path,
    load_pose_network,
    predict_poses,
    train_pose_network,
)
from bayespose.core.deep.calibration import fit_temperature, mass_within, reliability_table
from bayespose.core.deep.data import augment_inputs, preprocess_images
from bayespose.core.deep.train import _Task
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import geodesic_distance_deg, random_rotations
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.data import fragment_map_path

# measured (seed 0): the map-only network of 600 steps of 16 images reaches a 26° median on the unseen particles
SMALL = dict(grid_order=1, lmax=4, channels=32, s2_channels=32, so3_channels=4, learning_rate=2e-3, batch_size=16,
             threads=1, device="cpu", epochs=2, patience=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_map")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=160, snr=2.0, seed=5,
                                                                     max_shift_px=1.0), out / "sim")
    return particles, read_images(particles), read_map(fragment_map_path())[0], out


def test_map_only_network_predicts_unseen_particles(data):
    particles, images, volume, out = data
    train, test = np.arange(100), np.arange(100, 160)
    unaligned = replace(particles.subset(train), rotations=None)
    result = train_pose_network(unaligned, TrainConfig(pretrain_steps=600, **SMALL), out / "map_only.pt",
                                images=images[train], volume=volume, log=None)
    assert [row["phase"] for row in result.history] == ["pretrain"] * 3
    net = load_pose_network(result.checkpoint, device="cpu")
    assert net.metadata["trained_on"] == "map" and net.metadata["val_idx"] == []
    pred = predict_poses(net, replace(particles.subset(test), origins_A=None), images=images[test])
    errors = geodesic_distance_deg(pred.rotations, particles.rotations[test])
    print("map-only median error on unseen particles", np.median(errors), result.history[-1])
    assert np.median(errors) < 50.0  # uniformly random rotations: ~126°
    with pytest.raises(ValueError, match="poses"):  # no poses and no pre-training: nothing to learn from
        train_pose_network(unaligned, TrainConfig(**SMALL), out / "x.pt", images=images[train], volume=volume)


def test_pretrain_then_finetune_resumes_exactly_and_refuses_another_map(data, tmp_path, monkeypatch):
    particles, images, volume, _ = data
    monkeypatch.setattr(_training, "PRETRAIN_CHUNK_STEPS", 10)
    sub = np.arange(48)
    cfg = dict(SMALL, batch_size=16)
    run = dict(images=images[sub], volume=volume, log=None)
    straight = train_pose_network(particles.subset(sub), TrainConfig(pretrain_steps=20, **dict(cfg, epochs=2)),
                                  tmp_path / "a.pt", **run)
    assert [r["phase"] for r in straight.history] == ["pretrain", "pretrain", "finetune", "finetune"]
    train_pose_network(particles.subset(sub), TrainConfig(pretrain_steps=20, **dict(cfg, epochs=1)),
                       tmp_path / "b.pt", **run)
    with pytest.raises(ValueError, match=r"cannot resume .*\(map\)"):
        train_pose_network(particles.subset(sub), TrainConfig(pretrain_steps=20, **dict(cfg, epochs=2)),
                           tmp_path / "b.pt", images=images[sub], volume=2.0 * volume, log=None, resume=True)
    resumed = train_pose_network(particles.subset(sub), TrainConfig(pretrain_steps=20, **dict(cfg, epochs=2)),
                                 tmp_path / "b.pt", resume=True, **run)
    assert last_state_path(tmp_path / "b.pt").exists()
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_loss_weights_weight_each_particle():
    task = _Task(TrainConfig(grid_order=0))
    out = torch.randn(3, 72)
    target = task.targets(random_rotations(3, 0))
    each = task.per_sample(out, target)
    assert float(task.loss(out, target, torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(float(each[0]))
    assert float(task.loss(out, target, torch.tensor([2.0, 2.0, 2.0]))) == pytest.approx(float(each.mean()))


def test_missing_weight_column_is_refused(data, tmp_path):
    particles, images, volume, _ = data
    with pytest.raises(ValueError, match="rlnMaxValueProbDistribution"):
        train_pose_network(particles, TrainConfig(weight_column="rlnMaxValueProbDistribution", **SMALL),
                           tmp_path / "w.pt", images=images, log=None)


def test_temperature_fit_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = 3.0 * torch.randn(4000, 30, generator=gen)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen)[:, 0]
    targets = torch.nn.functional.one_hot(labels, 30).double()
    assert fit_temperature(2.5 * true_logits, targets) == pytest.approx(2.5, rel=0.08)
    assert fit_temperature(0.5 * true_logits, targets) == pytest.approx(0.5, rel=0.08)


def test_mass_within_and_reliability():
    grid = healpix_grid(1)
    flat = np.zeros((2, len(grid)))
    modes = grid.rotations[:2]
    mass = mass_within(flat, grid.rotations, modes, (1.0, 180.0))
    np.testing.assert_allclose(mass[:, 0], 1.0 / len(grid))  # only the mode's own cell
    np.testing.assert_allclose(mass[:, 1], 1.0)
    peaked = np.full((2, len(grid)), -50.0)
    peaked[0, 0] = peaked[1, 1] = 0.0
    table = reliability_table(mass_within(peaked, grid.rotations, modes, (5.0,)), np.array([1.0, 30.0]), (5.0,))
    assert table[0]["predicted"] == pytest.approx(1.0) and table[0]["observed"] == pytest.approx(0.5)


def test_work_box_inputs_without_a_turn_are_the_plain_inputs(data):
    particles, images, _, _ = data
    plain = preprocess_images(images[:20], particles.subset(np.arange(20)), None, 32)
    work = preprocess_images(images[:20], particles.subset(np.arange(20)), None, 32, work_box=64)
    assert work.shape == (20, 64, 64)
    torch.testing.assert_close(augment_inputs(work, 32), plain, atol=1e-4, rtol=1e-4)
    turned = augment_inputs(work, 32, np.full(20, 90.0))
    assert float((turned - plain).abs().mean()) > 0.1 * float(plain.abs().mean())
