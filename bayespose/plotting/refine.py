"""Figures of an EM refinement (:func:`bayespose.core.refine.engine.refine`) for the CLI outputs and the Scipion viewer.

matplotlib with the Agg backend (headless). Every function returns the figure and, when ``path`` is given, saves
it as PNG and closes it. Units: frequencies in 1/Å, resolutions in Å, angles in degrees; maps are [z, y, x]
arrays; rotations are RELION ``A`` matrices whose viewing direction is the third row, drawn on Mollweide maps with
longitude = rot and latitude = 90° - tilt (as in :mod:`bayespose.plotting.poses`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import healpy  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayespose.plotting.poses import viewing_direction_density  # noqa: E402

FSC_THRESHOLDS = (0.143, 0.5)


def _finish(fig, path: str | Path | None):
    fig.tight_layout(rect=(0, 0, 1, 0.95) if fig._suptitle is not None else (0, 0, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _crossing(freq: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """First frequency (1/Å, linear interpolation) where the FSC falls below ``threshold``; None if it never does."""
    below = np.flatnonzero((values < threshold) & (freq > 0))
    if len(below) == 0 or below[0] == 0:
        return None
    i = int(below[0])
    f0, f1, v0, v1 = freq[i - 1], freq[i], values[i - 1], values[i]
    return float(f0 + (v0 - threshold) / (v0 - v1) * (f1 - f0)) if v0 != v1 else float(f1)


def plot_fsc(frequencies: np.ndarray, fsc_values: np.ndarray, path: str | Path | None = None,
             resolution_A: float | None = None, title: str = "", curves: dict | None = None):
    """Half-map FSC against spatial frequency (1/Å) with the 0.143 and 0.5 thresholds and their resolutions.

    ``resolution_A``: the refinement's reported resolution (marked). ``curves``: optional further curves
    ``{label: (frequencies, values)}`` (e.g. the FSC against a known map). The top axis reads in Å.
    """
    freq = np.asarray(frequencies, dtype=np.float64)
    values = np.asarray(fsc_values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(freq, values, "-", color="tab:blue", linewidth=1.8, label="half maps")
    for label, (f, v) in (curves or {}).items():
        ax.plot(np.asarray(f), np.asarray(v), "--", linewidth=1.4, label=label)
    for threshold, colour in zip(FSC_THRESHOLDS, ("tab:red", "tab:gray")):
        ax.axhline(threshold, color=colour, linestyle=":", linewidth=1)
        f = _crossing(freq, values, threshold)
        text = f"FSC {threshold}: {1 / f:.1f} Å" if f else f"FSC {threshold}: not crossed"
        ax.text(0.98, threshold + 0.02, text, transform=ax.get_yaxis_transform(), ha="right", fontsize=8,
                color=colour)
    if resolution_A and math.isfinite(resolution_A) and resolution_A > 0:
        ax.axvline(1.0 / resolution_A, color="tab:red", linewidth=1, alpha=0.6,
                   label=f"reported {resolution_A:.1f} Å")
    ax.set_xlim(0, float(freq.max()) if len(freq) else 1.0)
    ax.set_ylim(min(-0.1, float(values.min()) - 0.05) if len(values) else -0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.legend(fontsize=8, loc="lower left")
    top = ax.secondary_xaxis("top", functions=(lambda f: 1.0 / np.maximum(f, 1e-6),
                                               lambda r: 1.0 / np.maximum(r, 1e-6)))
    top.set_xlabel("resolution (Å)", fontsize=8)
    top.tick_params(labelsize=7)
    ticks = ax.get_xticks()
    top.set_xticks([1.0 / t for t in ticks if t > 0])
    top.set_xticklabels([f"{1.0 / t:.0f}" for t in ticks if t > 0])
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)


def _column(history: Sequence[Any], name: str) -> np.ndarray:
    values = []
    for entry in history:
        value = entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)
        values.append(np.nan if value is None else float(value))
    return np.asarray(values, dtype=np.float64)


def plot_history(history: Sequence[Any], path: str | Path | None = None, title: str = ""):
    """Per-iteration curves: resolution (FSC 0.143, and the resolution scored in the E-step) in Å, mean
    log-likelihood per particle, mean pose change (degrees) and the HEALPix order. ``history``: IterationLog
    objects or dicts with those fields."""
    it = _column(history, "iteration")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    ax = axes[0]
    ax.plot(it, _column(history, "resolution_A"), "o-", label="FSC 0.143")
    scored = _column(history, "scored_resolution_A")
    if np.isfinite(scored).any():
        ax.plot(it, scored, "s--", markersize=4, label="scored to")
    ax.invert_yaxis()
    ax.set_ylabel("resolution (Å)")
    ax.legend(fontsize=8)
    order = _column(history, "healpix_order")
    if np.isfinite(order).any():
        twin = ax.twinx()
        twin.step(it, order, where="mid", color="tab:gray", alpha=0.5)
        twin.set_ylabel("HEALPix order", fontsize=8, color="tab:gray")
        twin.set_yticks(sorted({int(o) for o in order[np.isfinite(order)]}))
    axes[1].plot(it, _column(history, "log_likelihood"), "o-", color="tab:green")
    axes[1].set_ylabel("mean log-likelihood per particle")
    axes[2].plot(it, _column(history, "pose_change_deg"), "o-", color="tab:orange")
    axes[2].set_ylabel("mean pose change (degrees)")
    axes[2].set_ylim(bottom=0)
    for a in axes:
        a.set_xlabel("iteration")
        if len(it):
            a.set_xticks(it)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three central sections of a [z, y, x] map: (xy at z = D/2, xz at y = D/2, yz at x = D/2)."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"need a 3D map, got shape {v.shape}")
    cz, cy, cx = (s // 2 for s in v.shape)
    return v[cz], v[:, cy, :], v[:, :, cx]


def plot_central_slices(volumes: np.ndarray | Sequence[np.ndarray], path: str | Path | None = None,
                        labels: Sequence[str] | None = None, pixel_size: float | None = None, title: str = ""):
    """One row per map of its central xy / xz / yz sections (grey scale per map). ``pixel_size`` (Å/px) only
    labels the box size."""
    vols = [np.asarray(volumes)] if np.asarray(volumes[0]).ndim == 2 else [np.asarray(v) for v in volumes]
    labels = list(labels) if labels is not None else [f"map {i + 1}" for i in range(len(vols))]
    fig, axes = plt.subplots(len(vols), 3, figsize=(7.5, 2.6 * len(vols)), squeeze=False)
    for row, (vol, label) in enumerate(zip(vols, labels)):
        sections = central_slices(vol)
        lo, hi = float(np.min(sections[0])), float(np.max(sections[0]))
        for col, (section, name) in enumerate(zip(sections, ("xy (z = D/2)", "xz (y = D/2)", "yz (x = D/2)"))):
            ax = axes[row, col]
            ax.imshow(section, cmap="gray", origin="lower", vmin=min(lo, float(section.min())),
                      vmax=max(hi, float(section.max())))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                size = f"\n{vol.shape[0]} px" + (f" x {pixel_size:.2f} Å" if pixel_size else "")
                ax.set_ylabel(label + size, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def nest_density_raster(density: np.ndarray, n_lon: int = 360, n_lat: int = 180):
    """A NEST HEALPix density (12 nside² values) sampled on a lon/lat raster for Mollweide plots.
    Returns ``(lon_edges_rad, lat_edges_rad, values (n_lat, n_lon))`` with lon = rot, lat = 90° - tilt."""
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    nside = healpy.npix2nside(len(density))
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    lat_edges = np.linspace(-np.pi / 2, np.pi / 2, n_lat + 1)
    lon_c, lat_c = np.meshgrid((lon_edges[:-1] + lon_edges[1:]) / 2, (lat_edges[:-1] + lat_edges[1:]) / 2)
    pix = healpy.ang2pix(nside, np.pi / 2 - lat_c, lon_c, nest=True)
    return lon_edges, lat_edges, density[pix]


def plot_prior_and_poses(density: np.ndarray, order: int, rotations: np.ndarray, path: str | Path | None = None,
                         title: str = ""):
    """Mollweide maps side by side: the estimated viewing-direction prior (NEST density of HEALPix ``order``,
    relative to uniform) and the density of the particles' final viewing directions (HEALPix binned, relative to
    uniform) binned on the HEALPix pixels of the same order. Both use one colour scale."""
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if len(density) != 12 * 4 ** int(order):
        raise ValueError(f"a density of HEALPix order {order} has {12 * 4 ** int(order)} pixels, got {len(density)}")
    lon_p, lat_p, prior = nest_density_raster(density)
    lon_d, lat_d, data = viewing_direction_density(np.asarray(rotations), nside=2 ** int(order))  # same pixels
    vmax = max(float(prior.max()), float(np.percentile(data, 99.5)), 1.0)
    fig = plt.figure(figsize=(12, 4.0))
    for k, (lon, lat, values, name) in enumerate(
            ((lon_p, lat_p, prior, f"estimated prior (HEALPix order {order})"),
             (lon_d, lat_d, data, f"final viewing directions (N = {len(rotations)})"))):
        ax = fig.add_subplot(1, 2, k + 1, projection="mollweide")
        mesh = ax.pcolormesh(lon, lat, values, cmap="viridis", shading="flat", vmin=0.0, vmax=vmax)
        ax.grid(True, alpha=0.3)
        ax.set_xticklabels([])
        ax.set_title(f"{name}\nlon = rot, lat = 90° - tilt", fontsize=9)
        fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.06,
                     label="density relative to uniform")
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


__all__ = ["plot_fsc", "plot_history", "plot_central_slices", "plot_prior_and_poses", "central_slices",
           "nest_density_raster", "FSC_THRESHOLDS"]
