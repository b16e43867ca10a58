"""Plots are pure: every ``plot_*`` function returns a matplotlib Figure built without pyplot (nothing registered with
pyplot, the backend untouched) that :func:`bayespose.plotting.save_figure` writes atomically as PNG; the refinement's
figures are written by the front ends' figure writer."""

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from bayespose.core.geometry.rotations import random_rotations
from bayespose.plotting import save_figure
from bayespose.plotting.assign import plot_direction_posterior, plot_estimator_difference, plot_uncertainty_histograms
from bayespose.plotting.deep import plot_angular_errors, plot_predicted_distribution, plot_training_history
from bayespose.plotting.poses import plot_estimator_errors, plot_image_gallery, plot_pose_distribution
from bayespose.plotting.refine import plot_central_slices, plot_fsc, plot_history, plot_prior_and_poses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figures():
    rots = random_rotations(60, 2)
    rng = np.random.default_rng(0)
    history = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_mean_error_deg": 40.0, "val_median_error_deg": 30},
               {"epoch": 2, "train_loss": 1.5, "val_loss": 1.7, "val_mean_error_deg": 30.0, "val_median_error_deg": 20}]
    freq = np.linspace(0, 0.1, 9)
    return {
        "poses": plot_pose_distribution(rots, title="t", reference=random_rotations(60, 3)),
        "gallery": plot_image_gallery([rng.normal(size=(3, 8, 8))] * 2, row_labels=["a", "b"]),
        "estimators": plot_estimator_errors({"MMSE": rng.uniform(0, 9, 60)}, expected_error=rng.uniform(0, 9, 60)),
        "posterior": plot_direction_posterior(rots, rng.uniform(size=60), nside=4, markers={"MAP": rots[0]}),
        "uncertainty": plot_uncertainty_histograms(rng.uniform(0, 9, 60), rng.uniform(size=60)),
        "difference": plot_estimator_difference(rots, random_rotations(60, 5), symmetry="C2"),
        "training": plot_training_history(history, best_epoch=2),
        "errors": plot_angular_errors({"net": rng.uniform(0, 90, 60)}),
        "predicted": plot_predicted_distribution(rots, rng.uniform(size=60), nside=2),
        "fsc": plot_fsc(freq, np.linspace(1, -0.05, 9), resolution_A=15.0),
        "history": plot_history([{"iteration": 1, "resolution_A": 20.0, "log_likelihood": -5.0,
                                  "pose_change_deg": 3.0}]),
        "slices": plot_central_slices([rng.normal(size=(8, 8, 8))] * 2, labels=["a", "b"], pixel_size=2.0),
        "prior": plot_prior_and_poses(np.ones(48), 1, rots),
    }


def test_every_plot_is_a_pyplot_free_figure_saved_as_png(tmp_path):
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend(), plt.get_fignums()
    for name, fig in _figures().items():
        assert isinstance(fig, Figure), name
        assert fig.axes, name
        path = save_figure(fig, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC, name
    assert (matplotlib.get_backend(), plt.get_fignums()) == before  # nothing registered with pyplot
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in _figures())  # no temporaries


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    fig = plot_pose_distribution(random_rotations(20, 1))
    target = tmp_path / "poses.png"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, target)
    assert target.read_bytes() == b"old"  # the earlier file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["poses.png"]
    with pytest.raises(ValueError, match="does not exist"):
        save_figure(fig, tmp_path / "missing" / "x.png")
