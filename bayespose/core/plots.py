"""Plots shared by the CLI and the Scipion viewers (matplotlib, Agg backend: they work headless).

Pose plots use RELION angles: the viewing direction of pose ``A`` is its third row
``(cos rot sin tilt, sin rot sin tilt, cos tilt)``, drawn on a Mollweide map with longitude = rot and
latitude = 90° - tilt; the in-plane angle is psi.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .rotations import matrix_to_euler, viewing_directions  # noqa: E402


def viewing_direction_density(rotations: np.ndarray, n_lon: int = 72, n_lat: int = 36):
    """Density of viewing directions on equal-area (longitude x sin(latitude)) bins.

    Returns ``(lon_edges_rad, lat_edges_rad, density)`` with density normalised so that a uniform distribution
    of directions reads 1 everywhere (density = count / expected count under uniformity).
    """
    d = viewing_directions(np.asarray(rotations))
    lon = np.arctan2(d[:, 1], d[:, 0])
    sin_lat = np.clip(d[:, 2], -1.0, 1.0)
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    sin_lat_edges = np.linspace(-1.0, 1.0, n_lat + 1)
    counts, _, _ = np.histogram2d(lon, sin_lat, bins=[lon_edges, sin_lat_edges])
    expected = max(len(d), 1) / (n_lon * n_lat)
    return lon_edges, np.arcsin(sin_lat_edges), counts.T / expected


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


def plot_image_gallery(images: np.ndarray, path: str | Path, title: str = "", n: int = 8):
    """A row of the first ``n`` images (e.g. simulated particles), saved as PNG."""
    images = np.asarray(images)[:n]
    fig, axes = plt.subplots(1, max(len(images), 1), figsize=(1.6 * max(len(images), 1), 1.9))
    for ax, image in zip(np.atleast_1d(axes), images):
        ax.imshow(image, cmap="gray")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
