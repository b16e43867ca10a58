"""Plots shared by the CLI and the Scipion viewers (matplotlib, Agg backend: they work headless).

Pose plots use RELION angles: the viewing direction of pose ``A`` is its third row
``(cos rot sin tilt, sin rot sin tilt, cos tilt)``, drawn on a Mollweide map with longitude = rot and
latitude = 90° - tilt; the in-plane angle is psi.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import healpy  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayespose.core.geometry.rotations import matrix_to_euler, viewing_directions  # noqa: E402


def viewing_direction_density(rotations: np.ndarray, nside: int | None = None, n_lon: int = 360,
                              n_lat: int = 180):
    """Density of viewing directions, binned on equal-area HEALPix pixels and sampled on a lon/lat raster.

    ``nside`` defaults to the largest power of two (<= 16) that leaves >= 8 particles per pixel on average, so
    sparse sets still give a readable map. Returns ``(lon_edges_rad, lat_edges_rad, density)`` with the density
    normalised so that uniformly distributed directions read 1 everywhere.
    """
    d = viewing_directions(np.asarray(rotations))
    if nside is None:
        nside = 1
        while nside < 16 and 12 * (2 * nside) ** 2 * 8 <= len(d):
            nside *= 2
    n_pix = healpy.nside2npix(nside)
    counts = np.bincount(healpy.vec2pix(nside, d[:, 0], d[:, 1], d[:, 2]), minlength=n_pix) if len(d) else \
        np.zeros(n_pix)
    density = counts * n_pix / max(len(d), 1)
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    lat_edges = np.linspace(-np.pi / 2, np.pi / 2, n_lat + 1)
    lon_c, lat_c = np.meshgrid((lon_edges[:-1] + lon_edges[1:]) / 2, (lat_edges[:-1] + lat_edges[1:]) / 2)
    pix = healpy.ang2pix(nside, np.pi / 2 - lat_c, lon_c)
    return lon_edges, lat_edges, density[pix]


def plot_pose_distribution(rotations: np.ndarray, path: str | Path | None = None, title: str = "",
                           reference: np.ndarray | None = None):
    """Mollweide map of viewing-direction density plus a histogram of in-plane angles (psi).

    ``rotations``: (N, 3, 3) RELION A matrices. ``reference``: optional second set (e.g. ground truth) whose
    psi histogram is overlaid. Saves a PNG when ``path`` is given; returns the figure.
    """
    rotations = np.asarray(rotations)
    fig = plt.figure(figsize=(11, 4.2))
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
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_image_gallery(rows: list[np.ndarray], path: str | Path, row_labels: list[str] | None = None,
                       title: str = "", n: int = 8):
    """Rows of particle images (e.g. clean above noisy), the first ``n`` of each, saved as PNG."""
    rows = [np.asarray(r)[:n] for r in rows]
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.5 * n_cols, 1.6 * len(rows)), squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_estimator_errors(errors: dict, path: str | Path, expected_error: np.ndarray | None = None, title: str = ""):
    """Histograms of angular errors per estimator (degrees), and expected vs actual error of the first one.

    ``errors``: name -> (N,) geodesic errors in degrees against the truth; ``expected_error``: (N,) posterior
    expected angular error of the first estimator (a calibrated uncertainty follows the diagonal on average).
    """
    n_panels = 2 if expected_error is not None else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.8), squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
