"""Plots of the deep pose-prediction models (:mod:`bayespose.core.deep`) for the CLI, the demo and the Scipion
viewers.

Each function returns a :class:`matplotlib.figure.Figure` (save it with :func:`bayespose.plotting.save_figure`).
Rotations are RELION ``A`` matrices (volume -> image); angles in degrees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bayespose.plotting.assign import plot_direction_posterior

__all__ = ["plot_training_history", "plot_angular_errors", "plot_predicted_distribution", "plot_reliability",
           "ERROR_THRESHOLDS_DEG"]

#: Angular thresholds (degrees) of the "fraction of particles below" metrics (Sanchez-Garcia et al. 2023, "CESPED:
#: a new benchmark for supervised particle pose estimation in cryo-EM", arXiv:2311.06194, eq. 6).
ERROR_THRESHOLDS_DEG = (5.0, 10.0, 15.0)


def _column(history: Sequence[Mapping], key: str) -> np.ndarray:
    """Values of ``key`` over the history rows (NaN where a row lacks it or holds None)."""
    out = []
    for row in history:
        value = row.get(key)
        out.append(np.nan if value is None else float(value))
    return np.asarray(out, dtype=np.float64)


def plot_training_history(history: Sequence[Mapping], best_epoch: int | None = None, title: str = "") -> Figure:
    """Training curves of :func:`bayespose.core.deep.train_pose_network`: training and validation loss per epoch
    (left) and the validation mean / median angular error in degrees (right), with the best (saved) epoch marked.

    ``history``: rows with ``epoch``, ``train_loss``, ``val_loss``, ``val_mean_error_deg``,
    ``val_median_error_deg`` (the checkpoint's ``history``) and optionally ``phase`` (epochs of ``pretrain`` on
    projections of the map are shaded). Raises ``ValueError`` on an empty history.
    """
    if not history:
        raise ValueError("the training history is empty: nothing to plot")
    epochs = _column(history, "epoch")
    fig = Figure(figsize=(10.5, 3.9))
    ax_loss, ax_err = fig.subplots(1, 2)
    ax_loss.plot(epochs, _column(history, "train_loss"), "o-", markersize=3, label="training")
    ax_loss.plot(epochs, _column(history, "val_loss"), "s-", markersize=3, label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss", fontsize=9)
    ax_err.plot(epochs, _column(history, "val_mean_error_deg"), "o-", markersize=3, label="mean")
    ax_err.plot(epochs, _column(history, "val_median_error_deg"), "s-", markersize=3, label="median")
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("angular error (degrees)")
    ax_err.set_title("validation angular error (symmetry-aware)", fontsize=9)
    ax_err.set_ylim(bottom=0)
    pre = [row.get("epoch") for row in history if row.get("phase") == "pretrain"]
    if pre:  # epochs of pre-training on projections of the map
        for ax in (ax_loss, ax_err):
            ax.axvspan(min(pre) - 0.5, max(pre) + 0.5, color="0.9", zorder=0, label="on projections of the map")
    if best_epoch is not None:
        for ax in (ax_loss, ax_err):
            ax.axvline(best_epoch, color="k", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    for ax in (ax_loss, ax_err):
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_angular_errors(errors: Mapping[str, np.ndarray], title: str = "",
                        thresholds: Sequence[float] = ERROR_THRESHOLDS_DEG) -> Figure:
    """Angular errors against known poses (e.g. simulated ground truth or a previous refinement), one curve per
    method: histogram (left, degrees, 0-180) and cumulative fraction of particles below an error (right) with the
    fractions below ``thresholds`` in the legend.

    ``errors``: ``{"label": (N,) geodesic errors in degrees}`` (symmetry-aware where needed). Raises
    ``ValueError`` when no method or an empty array is given.
    """
    if not errors:
        raise ValueError("no angular errors to plot")
    arrays = {label: np.asarray(err, dtype=np.float64).reshape(-1) for label, err in errors.items()}
    for label, err in arrays.items():
        if not len(err):
            raise ValueError(f"no angular errors for {label!r}")
    fig = Figure(figsize=(10.5, 3.9))
    ax_hist, ax_cum = fig.subplots(1, 2)
    bins = np.linspace(0.0, 180.0, 73)
    for label, err in arrays.items():
        ax_hist.hist(np.clip(err, 0, 180), bins=bins, histtype="step", linewidth=1.6,
                     label=f"{label}: median {np.median(err):.1f}°, mean {np.mean(err):.1f}°")
        x = np.sort(err)
        below = ", ".join(f"<{t:g}°: {np.mean(err < t):.0%}" for t in thresholds)
        ax_cum.plot(x, np.arange(1, len(x) + 1) / len(x), linewidth=1.6, label=f"{label} ({below})")
    ax_hist.set_xlabel("angular error (degrees)")
    ax_hist.set_ylabel("particles")
    ax_hist.set_xlim(0, 180)
    ax_hist.legend(fontsize=8)
    for t in thresholds:
        ax_cum.axvline(t, color="0.6", linestyle=":", linewidth=1)
    ax_cum.set_xscale("symlog", linthresh=1.0)
    ax_cum.set_xlim(0, 180)
    ax_cum.set_ylim(0, 1)
    ax_cum.set_xlabel("angular error (degrees, log scale above 1°)")
    ax_cum.set_ylabel("fraction of particles below")
    ax_cum.grid(True, alpha=0.3)
    ax_cum.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_predicted_distribution(rotations: np.ndarray, probabilities: np.ndarray, nside: int = 4,
                                markers: Mapping[str, np.ndarray] | None = None, title: str = "") -> Figure:
    """The network's predicted distribution over SO(3) for one particle: viewing-direction mass on the whole sphere
    (Mollweide, log10 per HEALPix pixel of ``nside``; use the grid's nside, 2**grid_order), a close-up around the
    most probable direction and the in-plane marginal; ``markers`` (``{"label": A (3, 3)}``, e.g. the mode, the
    deep-prior MMSE pose and the input pose) drawn on every panel.

    ``rotations`` (K, 3, 3) and ``probabilities`` (K,): see :func:`bayespose.core.deep.predict.distribution_on_grid`.
    The panels are those of :func:`bayespose.plotting.assign.plot_direction_posterior` (same layout as the MMSE
    posterior viewer).
    """
    return plot_direction_posterior(rotations, probabilities, nside=int(nside), markers=markers, title=title,
                                    min_relative=1e-4)


def plot_reliability(tables: Mapping[str, Sequence[Mapping]], title: str = "") -> Figure:
    """Reliability diagram of predicted pose distributions: for radii X (degrees), the mean predicted probability
    mass within X of the predicted mode (x) against the observed fraction of particles whose mode is within X of
    the true pose (y); a calibrated network lies on the diagonal. ``tables``: ``{"label": rows}`` with rows
    ``radius_deg``, ``predicted``, ``observed`` (:func:`bayespose.core.deep.calibration.reliability_table`)."""
    if not tables:
        raise ValueError("no reliability tables to plot")
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="calibrated")
    for label, rows in tables.items():
        x = [float(r["predicted"]) for r in rows]
        y = [float(r["observed"]) for r in rows]
        ax.plot(x, y, "o-", markersize=4, label=label)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{float(r['radius_deg']):g}°", (xi, yi), fontsize=6, textcoords="offset points",
                        xytext=(3, -8))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability mass within X° of the mode")
    ax.set_ylabel("observed fraction with error <= X°")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
