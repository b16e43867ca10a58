"""Deep pose prediction end to end on simulated fragment particles (CPU, net box 32): short trainings of both
models reach validation errors far below random (~126° median for uniform rotations), checkpoint round trip,
resume = uninterrupted training, equivariance of the trained so3grid network under in-plane turns, and deep-prior
MMSE against a global search."""

from pathlib import Path

import numpy as np
import pytest

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.deep import (
    DeepPriorSearch,
    TrainConfig,
    deep_prior_assign,
    last_state_path,
    load_pose_network,
    pose_error_metrics,
    predict_poses,
    train_pose_network,
)
from bayespose.core.deep.data import inplane_rotation_matrix, rotate_shift_images
from bayespose.core.deep.predict import network_inputs, predict_from_inputs
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.data import fragment_map_path

# an epoch is at least 2048 samples (_training.MIN_EPOCH_SAMPLES): 6 epochs of the 320 training particles are
# about 40 passes. Uniformly random rotations give ~126°
SO3GRID = dict(model="so3grid", grid_order=1, lmax=4, channels=32, so3_channels=4, epochs=6, learning_rate=2e-3,
               batch_size=16, patience=6, val_fraction=0.2, threads=1, device="cpu")
QUATERNION = dict(model="quaternion", channels=32, epochs=6, learning_rate=1e-3, batch_size=32, patience=6,
                  val_fraction=0.2, threads=1, device="cpu")


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep_train")
    particles = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=400, snr=3.0, seed=1), out / "sim")
    return particles, read_images(particles), out


@pytest.fixture(scope="module")
def so3grid_run(training_set):
    particles, images, out = training_set
    lines = []
    result = train_pose_network(particles, TrainConfig(**SO3GRID), out / "so3grid.pt", images=images,
                                log=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def quaternion_run(training_set):
    particles, images, out = training_set
    result = train_pose_network(particles, TrainConfig(**QUATERNION), out / "quaternion.pt", images=images,
                                log=None)
    return result


def _best(result):
    return result.history[result.best_epoch - 1]


def test_so3grid_learns_poses(so3grid_run):
    result, lines = so3grid_run
    best = _best(result)
    print("so3grid best validation epoch", best)
    assert best["val_median_error_deg"] < 40.0, best
    assert result.history[0]["val_median_error_deg"] > best["val_median_error_deg"] + 5  # it kept learning
    assert len(lines) >= len(result.history) and "val error" in lines[1]
    assert set(best) >= {"epoch", "train_loss", "val_loss", "val_mean_error_deg", "val_median_error_deg",
                         "seconds"}


def test_quaternion_learns_poses(quaternion_run):
    best = _best(quaternion_run)
    print("quaternion best validation epoch", best)
    assert best["val_median_error_deg"] < 70.0, best


def test_checkpoint_round_trip(so3grid_run, training_set):
    """The loaded checkpoint reproduces the validation errors logged at its best epoch, and carries its
    metadata; its predictions are normalised distributions on the grid."""
    particles, images, _ = training_set
    result, _ = so3grid_run
    net = load_pose_network(result.checkpoint, device="cpu")
    assert (net.box, net.symmetry, net.grid_order, net.config.model) == (64, "C1", 1, "so3grid")
    assert net.pixel_size == pytest.approx(particles.pixel_size)
    assert len(net.history) == len(result.history)
    assert net.temperature == pytest.approx(result.temperature) and net.temperature != 1.0
    val = np.asarray(net.metadata["val_idx"])
    # the validation during training is one pass (no test-time turns), uncalibrated
    calibrated = predict_poses(net, particles.subset(val), images=images[val], top_k=5, turns=1)
    turned = predict_poses(net, particles.subset(val), images=images[val], top_k=5)  # default: with turns
    net.temperature = 1.0
    pred = predict_poses(net, particles.subset(val), images=images[val], top_k=5, turns=1)
    errors = geodesic_distance_deg(pred.rotations, particles.rotations[val])
    assert np.median(errors) == pytest.approx(_best(result)["val_median_error_deg"], abs=1e-3)
    # the turned-back average of 4 in-plane turns (order 1: 12 psi angles) is better (a wrong turn-back would
    # scatter the modes by tens of degrees; measured: 11.1 -> 9.7° with this small network, 3 final blocks)
    turned_errors = geodesic_distance_deg(turned.rotations, particles.rotations[val])
    assert np.median(turned_errors) < np.median(errors) - 1.0 and turned_errors.mean() < errors.mean()
    # the temperature changes the probabilities, not the ranking of the cells
    np.testing.assert_array_equal(np.argmax(calibrated.log_probabilities, 1), np.argmax(pred.log_probabilities, 1))
    np.testing.assert_allclose(np.logaddexp.reduce(pred.log_probabilities.astype(np.float64), axis=1), 0.0,
                               atol=1e-4)
    assert pred.top_rotations.shape == (len(val), 5, 3, 3)
    assert (np.diff(pred.top_probabilities, axis=1) <= 1e-7).all()
    assert ((pred.confidence >= 0) & (pred.confidence <= 1)).all()
    out = pred.to_particle_set(particles.subset(val))
    np.testing.assert_allclose(out.rotations, pred.rotations)
    assert "bpDeepConfidence" in out.extra and "bpDeepTopProbability" in out.extra



def test_a_checkpoint_from_before_the_encoder_and_noise_settings_loads_as_trained(so3grid_run, training_set, tmp_path):
    """Checkpoints written before ``encoder_final_blocks`` / ``pretrain_noise_start`` / ``activation_alpha``
    existed (one final encoder block, no noise curriculum, e3nn's activation grid; no key saved) and before the
    factorised grid read-out (the dense matrix saved as a buffer) load with those values and predict what they
    predicted."""
    import torch

    particles, images, _ = training_set
    result, _ = so3grid_run
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["model_options"]["final_blocks"] == 3 and ckpt["config"]["encoder_final_blocks"] == 3
    assert ckpt["model_options"]["activation_alpha"] == 12 and ckpt["config"]["activation_alpha"] is None
    old_model = TrainConfig(**dict(SO3GRID, encoder_final_blocks=1, activation_alpha=0))
    from bayespose.core.deep.models import build_model
    model = build_model("so3grid", 32, 1, **old_model.model_options())
    torch.manual_seed(3)
    state = {k: (torch.randn_like(v) * 0.1 if v.is_floating_point() and "running_var" not in k else v)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    # saved before GridReadout: the dense read-out matrix (grid values = harmonics @ it) was a buffer of the network
    from bayespose.core.deep.models import flat_wigner_of, relion_to_e3nn
    dense = flat_wigner_of(relion_to_e3nn(healpix_grid(1).rotations), old_model.lmax).T.contiguous()
    state["output_wigner"] = dense
    options = {k: v for k, v in old_model.model_options().items() if k not in ("final_blocks", "activation_alpha")}
    config = {k: v for k, v in vars(old_model).items()
              if k not in ("encoder_final_blocks", "pretrain_noise_start", "activation_alpha")}
    old = dict(ckpt, state_dict=state, model_options=options, config=config)
    torch.save(old, tmp_path / "old.pt")
    net = load_pose_network(tmp_path / "old.pt", device="cpu")
    old_settings = (net.config.encoder_final_blocks, net.config.pretrain_noise_start, net.config.activation_alpha)
    assert old_settings == (1, 1.0, 0)
    assert net.model.activation.D.shape[0] == 20 * 20 * 10  # e3nn's activation grid at lmax 4
    model.eval()
    x = torch.randn(3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.model(x), model.harmonics(x) @ dense, rtol=1e-5, atol=1e-4)


def test_resume_equals_uninterrupted_training(training_set, tmp_path):
    particles, images, _ = training_set
    sub = np.arange(96)
    cfg = dict(QUATERNION, channels=16, batch_size=16)
    straight = train_pose_network(particles.subset(sub), TrainConfig(**dict(cfg, epochs=4)), tmp_path / "a.pt",
                                  images=images[sub], log=None)
    train_pose_network(particles.subset(sub), TrainConfig(**dict(cfg, epochs=2)), tmp_path / "b.pt",
                       images=images[sub], log=None)
    assert last_state_path(tmp_path / "b.pt").exists()
    resumed = train_pose_network(particles.subset(sub), TrainConfig(**dict(cfg, epochs=4)), tmp_path / "b.pt",
                                 images=images[sub], log=None, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="resume"):
        train_pose_network(particles.subset(sub), TrainConfig(**dict(cfg, epochs=5, channels=8)),
                           tmp_path / "b.pt", images=images[sub], log=None, resume=True)


def test_large_sets_train_from_a_scratch_file_identically(training_set, tmp_path, monkeypatch):
    """Work-box images beyond IN_MEMORY_WORK_BYTES go to a scratch file read row by row (training memory flat in N):
    the same training, to the last bit of the losses; the file is gone afterwards, also after a failure, and a stale
    one left by a killed run is replaced."""
    import bayespose.core.deep._training as training_module
    import bayespose.core.deep.train as train_module

    particles, images, _ = training_set
    sub = np.arange(64)
    cfg = TrainConfig(**dict(QUATERNION, channels=16, batch_size=16, epochs=2))
    in_ram = train_pose_network(particles.subset(sub), cfg, tmp_path / "ram.pt", images=images[sub], log=None)
    monkeypatch.setattr(train_module, "IN_MEMORY_WORK_BYTES", 0)
    scratch = tmp_path / ".mapped.inputs.0.f32"
    scratch.write_bytes(b"stale")
    reads = []
    real_getitem = training_module.DiskRows.__getitem__
    monkeypatch.setattr(training_module.DiskRows, "__getitem__",
                        lambda self, index: reads.append(Path(self.path)) or real_getitem(self, index))
    mapped = train_pose_network(particles.subset(sub), cfg, tmp_path / "mapped.pt", images=images[sub], log=None)
    assert reads and set(reads) == {scratch} and not scratch.exists()
    assert [r["train_loss"] for r in mapped.history] == [r["train_loss"] for r in in_ram.history]
    assert [r["val_loss"] for r in mapped.history] == [r["val_loss"] for r in in_ram.history]
    with pytest.raises(ValueError):  # a failure after the scratch file was written still removes it
        train_pose_network(particles.subset(sub), TrainConfig(**dict(QUATERNION, channels=16, batch_size=16,
                                                                     epochs=2, weight_column="rlnNope")),
                           tmp_path / "mapped.pt", images=images[sub], log=None)
    assert not scratch.exists()


def test_resume_refuses_other_particles_or_settings_before_writing_anything(training_set, tmp_path):
    """A resume must continue the same training: other particles (even as many), other poses of the same images
    or other settings are refused with one line naming what differs, and the checkpoint and the saved state are
    left as they were; the same particles and settings with more epochs resume."""
    from dataclasses import replace

    particles, images, _ = training_set
    cfg = dict(QUATERNION, channels=8, batch_size=16, epochs=1)
    first, other = np.arange(48), np.arange(48, 96)
    out = tmp_path / "net.pt"
    train_pose_network(particles.subset(first), TrainConfig(**cfg), out, images=images[first], log=None)
    written = {path: path.read_bytes() for path in (out, last_state_path(out))}
    more = TrainConfig(**dict(cfg, epochs=2))
    with pytest.raises(ValueError, match=r"cannot resume .*\(image files or indices; poses; CTF parameters\)"):
        train_pose_network(particles.subset(other), more, out, images=images[other], log=None, resume=True)
    turned = replace(particles.subset(first), rotations=inplane_rotation_matrix(90.0) @ particles.rotations[first])
    with pytest.raises(ValueError, match=r"cannot resume .*\(poses\)"):
        train_pose_network(turned, more, out, images=images[first], log=None, resume=True)
    with pytest.raises(ValueError, match=r"\(learning_rate 0.001 -> 0.002; augment True -> False\)"):
        train_pose_network(particles.subset(first), TrainConfig(**dict(cfg, epochs=2, learning_rate=2e-3,
                                                                            augment=False)),
                           out, images=images[first], log=None, resume=True)
    assert sorted(tmp_path.iterdir()) == sorted(written)  # no temporaries left
    assert all(path.read_bytes() == data for path, data in written.items())
    resumed = train_pose_network(particles.subset(first), more, out, images=images[first], log=None, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_training_needs_poses(training_set, tmp_path):
    from dataclasses import replace

    particles, images, _ = training_set
    with pytest.raises(ValueError, match="poses"):
        train_pose_network(replace(particles, rotations=None), TrainConfig(**QUATERNION), tmp_path / "x.pt",
                           images=images)


def test_trained_network_is_nearly_equivariant(so3grid_run, training_set):
    """Turning the input in-plane by a turns the predicted mode: R(turned) ~ Rz(a) R. The CNN encoder is not
    exactly equivariant (the head is, see test_deep_models), so the bound is loose; the measured value is
    reported by the benchmark."""
    particles, images, _ = training_set
    result, _ = so3grid_run
    net = load_pose_network(result.checkpoint, device="cpu")
    val = np.asarray(net.metadata["val_idx"])
    inputs = network_inputs(net, particles.subset(val), images[val])
    base = predict_from_inputs(net, inputs).rotations
    angles = np.random.default_rng(0).uniform(0, 360, len(val))
    turned = predict_from_inputs(net, rotate_shift_images(inputs, angles)).rotations
    err = geodesic_distance_deg(turned, inplane_rotation_matrix(angles) @ base)
    wrong = geodesic_distance_deg(turned, inplane_rotation_matrix(-angles) @ base)
    assert np.median(err) < 30.0, np.median(err)
    assert np.median(wrong) > 2 * np.median(err)


def test_deep_prior_mmse_close_to_global_at_a_fraction_of_the_rotations(so3grid_run, tmp_path):
    """Deep-prior MMSE (seeded coarse-to-fine search from the cells near the top-8 predicted rotations, prior =
    the predicted distribution) is as accurate as the global search where the network's regions hold the truth,
    much better than the network's own modes, and scores a fraction of the rotations; the "balls" variant (local
    lattices around the predictions) too."""
    result, _ = so3grid_run
    net = load_pose_network(result.checkpoint, device="cpu")
    test = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=40, snr=3.0, seed=11), tmp_path)
    images = read_images(test)
    volume, _ = read_map(fragment_map_path())
    search = PoseSearch(shift_range_px=0.0, threads=1, device="cpu")
    glob = assign_poses(test, volume, search, images=images)
    pred = predict_poses(net, test, images=images, top_k=8)
    # "balls" around the top-8 rotations of one pass: the turns' average puts all 8 next to the mode, whose ball
    # lattice (step 7.5° on this order-1 network) then covers less than the cells' search
    single = predict_poses(net, test, images=images, top_k=8, turns=1)
    e_glob = pose_error_metrics(glob.mmse_rotations, test.rotations)
    e_net = pose_error_metrics(pred.rotations, test.rotations)
    # the balls' lattice (step 3.75° here) leaves near misses, whose deficit at this SNR (3) is small: only the
    # z-score alone sends them to the global search (the default deficit rule keeps them: right region); its
    # median stays within 3° of the global one (measured 3.6-3.7° vs 1.1°, for networks of 2 and 3 final blocks)
    for config, slack, prediction in ((DeepPriorSearch(), 1.0, pred),
                                      (DeepPriorSearch(method="balls", seed_mass=None, fallback_deficit=0.0), 3.0,
                                       single)):
        method = config.method
        deep = deep_prior_assign(test, prediction, volume, search, config, images=images)
        e_deep = pose_error_metrics(deep.mmse_rotations, test.rotations)
        print(method, "net", e_net, "\nglobal", e_glob, glob.timings, "\ndeep", e_deep, deep.timings)
        assert e_deep["median_deg"] < e_glob["median_deg"] + slack, (method, e_deep, e_glob)
        assert e_deep["median_deg"] < 0.5 * e_net["median_deg"]
        assert e_deep["frac_below_10"] > e_net["frac_below_10"]
        ratio = deep.timings["scored_rotations_per_particle"] / glob.timings["scored_rotations_per_particle"]
        assert ratio < 0.5, (method, ratio)


def test_blockwise_prediction_and_deep_prior_equal_one_call_over_the_set(so3grid_run, tmp_path):
    """predict_in_blocks (what `bayespose predict` and the Scipion protocol run: the network once per particle,
    each block's distribution seeding its deep-prior search, then dropped) gives every particle what one
    predict_poses + deep_prior_assign call over the whole set gives with the same noise model and the prior's
    in-plane turns; the joined blocks hold every particle's results in order, and the progress reaches the end."""
    from bayespose.core.deep.blocks import (
        concatenate_assignments,
        concatenate_predictions,
        predict_in_blocks,
        prior_noise_model,
    )
    from bayespose.core.deep.vocabulary import PRIOR_INPLANE_TURNS

    result, _ = so3grid_run
    net = load_pose_network(result.checkpoint, device="cpu")
    test = simulate_dataset(fragment_map_path(), SimulationSpec(n_particles=30, snr=0.3, seed=12), tmp_path)
    volume, _ = read_map(fragment_map_path())
    search = PoseSearch(shift_range_px=1.0, threads=1, device="cpu")
    noise = prior_noise_model(test, volume, search)
    whole_prediction = predict_poses(net, test, top_k=8, turns=PRIOR_INPLANE_TURNS)
    whole = deep_prior_assign(test, whole_prediction, volume, search, DeepPriorSearch(), noise=noise)
    ticks = []
    blocks = list(predict_in_blocks(net, test, volume, search, DeepPriorSearch(), top_k=8,
                                    blocks=[np.arange(0, 11), np.arange(11, 30)],
                                    progress=lambda done, total: ticks.append((done, total))))
    assert [len(b.index) for b in blocks] == [11, 19] and all(b.prediction.log_probabilities is None for b in blocks)
    prediction = concatenate_predictions([b.prediction for b in blocks])
    joined = concatenate_assignments([b.assignment for b in blocks])
    np.testing.assert_allclose(prediction.rotations, whole_prediction.rotations, atol=1e-5)
    np.testing.assert_allclose(prediction.top_probabilities, whole_prediction.top_probabilities, rtol=1e-4, atol=1e-7)
    assert np.max(geodesic_distance_deg(joined.mmse_rotations, whole.mmse_rotations)) < 1e-3
    np.testing.assert_allclose(joined.pmax, whole.pmax, rtol=1e-4)
    np.testing.assert_allclose(joined.deep_fit_z, whole.deep_fit_z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(joined.deep_fallback, whole.deep_fallback)
    assert joined.timings["fallback_particles"] == whole.timings["fallback_particles"]
    assert joined.timings["scored_rotations_per_particle"] == pytest.approx(
        whole.timings["scored_rotations_per_particle"], rel=1e-9)
    assert len(joined.scoring_calls) == sum(len(b.assignment.scoring_calls) for b in blocks)
    assert ticks[-1] == (30, 30) and all(a[0] <= b[0] for a, b in zip(ticks, ticks[1:])) and (11, 30) in ticks
    # without a map: the network alone, with its own default turns
    alone = list(predict_in_blocks(net, test, blocks=[np.arange(0, 30)]))
    assert alone[0].assignment is None
    np.testing.assert_allclose(alone[0].prediction.rotations, predict_poses(net, test, top_k=8).rotations, atol=1e-5)
