"""Pose plots shared by the CLI, the demo and the Scipion viewers: pose distributions, particle galleries and the
errors of pose estimators against a known truth.

Each function returns a :class:`matplotlib.figure.Figure` (save it with :func:`bayespose.plotting.save_figure`).
Poses are RELION ``A`` matrices: the viewing direction of pose ``A`` is its third row
``(cos rot sin tilt, sin rot sin tilt, cos tilt)``, drawn on a Mollweide map with longitude = rot and
latitude = 90° - tilt; the in-plane angle is psi; angles in degrees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from bayespose.core.geometry.directions import viewing_direction_density
from bayespose.core.geometry.rotations import matrix_to_euler

__all__ = ["plot_pose_distribution", "plot_image_gallery", "plot_estimator_errors"]


def plot_pose_distribution(rotations: np.ndarray, title: str = "", reference: np.ndarray | None = None) -> Figure:
    """Mollweide map of the viewing-direction density (relative to uniform, see
    :func:`bayespose.core.geometry.directions.viewing_direction_density`) and a histogram of the in-plane angles
    psi (degrees).

    ``rotations``: (N, 3, 3) RELION A matrices. ``reference``: optional second set (e.g. ground truth) whose psi
    histogram is overlaid.
    """
    rotations = np.asarray(rotations)
    fig = Figure(figsize=(11, 4.2))
    ax_map = fig.add_subplot(1, 2, 1, projection="mollweide")
    lon_edges, lat_edges, density = viewing_direction_density(rotations)
    mesh = ax_map.pcolormesh(lon_edges, lat_edges, density, cmap="viridis", shading="flat")
    ax_map.grid(True, alpha=0.3)
    ax_map.set_xticklabels([])
    ax_map.set_title(f"viewing directions (N={len(rotations)}; lon = rot, lat = 90° - tilt)", fontsize=9)
    fig.colorbar(mesh, ax=ax_map, orientation="horizontal", fraction=0.05, pad=0.06,
                 label="density relative to uniform")

    ax_psi = fig.add_subplot(1, 2, 2)
    bins = np.linspace(-180, 180, 37)
    psi = matrix_to_euler(rotations)[:, 2] if len(rotations) else np.zeros(0)
    ax_psi.hist(psi, bins=bins, color="tab:blue", alpha=0.7, label="poses")
    if reference is not None:
        ax_psi.hist(matrix_to_euler(np.asarray(reference))[:, 2], bins=bins, histtype="step", color="k",
                    label="reference")
        ax_psi.legend(fontsize=8)
    ax_psi.set_xlabel("in-plane angle psi (degrees)")
    ax_psi.set_ylabel("particles")
    ax_psi.set_title("in-plane angles", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_image_gallery(rows: Sequence[np.ndarray], row_labels: Sequence[str] | None = None, title: str = "",
                       n: int = 8) -> Figure:
    """Rows of particle images (each (M, D, D), e.g. clean above noisy), the first ``n`` of each, in grey."""
    rows = [np.asarray(r)[:n] for r in rows]
    n_cols = max(len(r) for r in rows)
    fig = Figure(figsize=(1.5 * n_cols, 1.6 * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], cmap="gray")
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_estimator_errors(errors: Mapping[str, np.ndarray], expected_error: np.ndarray | None = None,
                          title: str = "") -> Figure:
    """Histograms of angular errors per estimator (degrees), and expected vs actual error of the first one.

    ``errors``: name -> (N,) geodesic errors in degrees against the truth; ``expected_error``: (N,) posterior
    expected angular error of the first estimator (a calibrated uncertainty follows the diagonal on average).
    """
    n_panels = 2 if expected_error is not None else 1
    fig = Figure(figsize=(5.2 * n_panels, 3.8))
    axes = fig.subplots(1, n_panels, squeeze=False)
    ax = axes[0, 0]
    top = max(float(np.percentile(np.concatenate(list(errors.values())), 98)), 1.0)
    bins = np.linspace(0, top, 31)
    for name, err in errors.items():
        ax.hist(np.clip(err, 0, top), bins=bins, histtype="step", linewidth=1.6,
                label=f"{name}: mean {np.mean(err):.1f}°, median {np.median(err):.1f}°")
    ax.set_xlabel("angular error vs truth (degrees)")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    if expected_error is not None:
        first = next(iter(errors))
        ax2 = axes[0, 1]
        ax2.scatter(expected_error, errors[first], s=6, alpha=0.5)
        lim = max(float(np.percentile(expected_error, 99)), float(np.percentile(errors[first], 99)), 1.0)
        ax2.plot([0, lim], [0, lim], "k--", linewidth=1)
        ax2.set_xlim(0, lim)
        ax2.set_ylim(0, lim)
        ax2.set_xlabel(f"posterior expected error of {first} (degrees)")
        ax2.set_ylabel(f"actual error of {first} (degrees)")
        ax2.set_title("uncertainty calibration", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
