"""Figures of an EM refinement (:func:`bayespose.core.refine.engine.refine`) for the CLI, the demo and the Scipion
viewer, and the writer of the refinement's PNG files.

Each ``plot_*`` function returns a :class:`matplotlib.figure.Figure` (save it with
:func:`bayespose.plotting.save_figure`). :func:`refine_figure` draws one of :data:`FIGURES` from a
:class:`bayespose.core.refine.outputs.RefineOutputs`; :func:`refine_figure_writer` gives the ``figure_writer`` of
:func:`bayespose.core.refine.outputs.write_refine_outputs`, which writes them inside the refinement's atomic output
folder. Units: frequencies in 1/Å, resolutions in Å, angles in degrees; maps are [z, y, x] arrays; rotations are
RELION ``A`` matrices whose viewing direction is the third row, drawn on Mollweide maps with longitude = rot and
latitude = 90° - tilt (as in :mod:`bayespose.plotting.poses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bayespose.core.geometry.directions import nest_density_raster, viewing_direction_density
from bayespose.core.imaging.reconstruct import resolution_at
from bayespose.core.imaging.volumes import central_slices
from bayespose.core.refine.outputs import RefineOutputs
from bayespose.plotting import save_figure

__all__ = ["plot_fsc", "plot_history", "plot_central_slices", "plot_prior_and_poses", "refine_figure",
           "write_refine_figures", "refine_figure_writer", "FIGURES", "FSC_THRESHOLDS"]

FSC_THRESHOLDS = (0.143, 0.5)
#: The refinement's figures: name -> PNG file in the output folder.
FIGURES = {"fsc": "fsc.png", "history": "history.png", "slices": "slices.png", "prior": "prior.png"}


def _layout(fig: Figure) -> Figure:
    """Tight layout below the suptitle (tight_layout alone lets a suptitle overlap two-line Mollweide titles)."""
    fig.tight_layout(rect=(0, 0, 1, 0.95) if fig.get_suptitle() else (0, 0, 1, 1))
    return fig


def plot_fsc(frequencies: np.ndarray, fsc_values: np.ndarray, resolution_A: float | None = None, title: str = "",
             curves: dict | None = None) -> Figure:
    """Half-map FSC against spatial frequency (1/Å) with the 0.143 and 0.5 thresholds and their resolutions.

    ``resolution_A``: the refinement's reported resolution (marked). ``curves``: optional further curves
    ``{label: (frequencies, values)}`` (e.g. the FSC against a known map). The top axis reads in Å.
    """
    freq = np.asarray(frequencies, dtype=np.float64)
    values = np.asarray(fsc_values, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(freq, values, "-", color="tab:blue", linewidth=1.8, label="half maps")
    for label, (f, v) in (curves or {}).items():
        ax.plot(np.asarray(f), np.asarray(v), "--", linewidth=1.4, label=label)
    for threshold, colour in zip(FSC_THRESHOLDS, ("tab:red", "tab:gray")):
        ax.axhline(threshold, color=colour, linestyle=":", linewidth=1)
        crossed = len(values) > 1 and bool(np.any(values[1:] < threshold))
        text = (f"FSC {threshold}: {resolution_at(freq, values, threshold):.1f} Å" if crossed
                else f"FSC {threshold}: not crossed")
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
    return _layout(fig)


def _column(history: Sequence[Any], name: str) -> np.ndarray:
    values = []
    for entry in history:
        value = entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)
        values.append(np.nan if value is None else float(value))
    return np.asarray(values, dtype=np.float64)


def plot_history(history: Sequence[Any], title: str = "") -> Figure:
    """Per-iteration curves: resolution (FSC 0.143, and the resolution scored in the E-step) in Å, mean
    log-likelihood per particle, mean pose change (degrees) and the HEALPix order. ``history``: IterationLog
    objects or dicts with those fields."""
    it = _column(history, "iteration")
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
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
    return _layout(fig)


def plot_central_slices(volumes: np.ndarray | Sequence[np.ndarray], labels: Sequence[str] | None = None,
                        pixel_size: float | None = None, title: str = "") -> Figure:
    """One row per map (D, D, D) of its central xy / xz / yz sections
    (:func:`bayespose.core.imaging.volumes.central_slices`, grey scale per map). ``pixel_size`` (Å/px) only labels
    the box size."""
    vols = [np.asarray(volumes)] if np.asarray(volumes[0]).ndim == 2 else [np.asarray(v) for v in volumes]
    labels = list(labels) if labels is not None else [f"map {i + 1}" for i in range(len(vols))]
    fig = Figure(figsize=(7.5, 2.6 * len(vols)))
    axes = fig.subplots(len(vols), 3, squeeze=False)
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
    return _layout(fig)


def plot_prior_and_poses(density: np.ndarray, order: int, rotations: np.ndarray, title: str = "") -> Figure:
    """Mollweide maps side by side: the estimated viewing-direction prior (NEST density of HEALPix ``order``,
    relative to uniform) and the density of the particles' final viewing directions (HEALPix binned, relative to
    uniform) binned on the HEALPix pixels of the same order. Both use one colour scale."""
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if len(density) != 12 * 4 ** int(order):
        raise ValueError(f"a density of HEALPix order {order} has {12 * 4 ** int(order)} pixels, got {len(density)}")
    lon_p, lat_p, prior = nest_density_raster(density)
    lon_d, lat_d, data = viewing_direction_density(np.asarray(rotations), nside=2 ** int(order))  # same pixels
    vmax = max(float(prior.max()), float(np.percentile(data, 99.5)), 1.0)
    fig = Figure(figsize=(12, 4.0))
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
    return _layout(fig)



_TITLES = {"fsc": "half-map FSC", "history": "iterations", "slices": "central slices",
           "prior": "estimated prior and final poses"}


def refine_figure(outputs: RefineOutputs, name: str, title: str = "") -> Figure:
    """One figure of a refinement: ``name`` in :data:`FIGURES` (``fsc``: half-map FSC with the reported resolution;
    ``history``: per-iteration curves; ``slices``: central sections of the map and the half maps; ``prior``: the
    estimated viewing-direction prior next to the final viewing directions). ``title`` prefixes the figure's own
    title (e.g. the run name). Raises ``ValueError`` for ``prior`` when the particles have no poses and for an
    unknown name."""
    label = f"{title}: {_TITLES.get(name, name)}" if title else _TITLES.get(name, name)
    if name == "fsc":
        return plot_fsc(outputs.fsc_frequencies, outputs.fsc, resolution_A=outputs.resolution_A, title=label)
    if name == "history":
        return plot_history(outputs.history, title=label)
    if name == "slices":
        return plot_central_slices([outputs.map, *outputs.half_maps], labels=["map", "half 1", "half 2"],
                                   pixel_size=outputs.pixel_size, title=label)
    if name == "prior":
        if outputs.particles.rotations is None:
            raise ValueError("the refined particles have no poses")
        return plot_prior_and_poses(outputs.direction_prior, outputs.prior_order, outputs.particles.rotations,
                                    title=label)
    raise ValueError(f"unknown refinement figure {name!r}; choose one of {', '.join(FIGURES)}")


def write_refine_figures(folder: str | Path, outputs: RefineOutputs, title: str = "") -> list[str]:
    """Save the figures of :data:`FIGURES` as PNGs in ``folder`` (``prior`` only when the particles have poses);
    returns the file names written."""
    written = []
    for name, file_name in FIGURES.items():
        if name == "prior" and outputs.particles.rotations is None:
            continue
        save_figure(refine_figure(outputs, name, title), Path(folder) / file_name)
        written.append(file_name)
    return written


def refine_figure_writer(title: str = "") -> Callable[[Path, RefineOutputs], list[str]]:
    """The ``figure_writer`` of :func:`bayespose.core.refine.outputs.write_refine_outputs`: writes the PNGs of
    :func:`write_refine_figures`, titled with ``title``, into the (temporary) output folder."""

    def write(folder: Path, outputs: RefineOutputs) -> list[str]:
        return write_refine_figures(folder, outputs, title)

    return write
