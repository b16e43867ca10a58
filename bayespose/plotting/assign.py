"""Plots of a pose assignment (:func:`bayespose.core.assign.assign_poses`) for the CLI and the Scipion viewer.

Each function returns a :class:`matplotlib.figure.Figure` (save it with :func:`bayespose.plotting.save_figure`).
Conventions as in :mod:`bayespose.plotting.poses`: rotations are RELION ``A`` matrices (volume -> image), the
viewing direction of ``A`` is its third row, drawn on a Mollweide map with longitude = rot and latitude =
90° - tilt; angles are in degrees.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from bayespose.core.geometry.directions import direction_marginal, healpix_raster
from bayespose.core.geometry.rotations import matrix_to_euler, viewing_directions
from bayespose.core.geometry.symmetry import symmetric_angle_deg

__all__ = ["plot_direction_posterior", "plot_uncertainty_histograms", "plot_estimator_difference"]

_MARKERS = ("o", "x", "+", "s", "^")
_COLOURS = ("red", "deepskyblue", "limegreen", "orange", "magenta")


def _lon_lat_deg(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (..., 3) -> (longitude, latitude) in radians for a Mollweide axis (lon = rot, lat = 90° - tilt)."""
    d = np.asarray(directions, dtype=np.float64)
    lon = np.arctan2(d[..., 1], d[..., 0])
    lat = np.arcsin(np.clip(d[..., 2], -1.0, 1.0))
    return lon, lat


def _tangent_coordinates(directions: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Azimuthal-equidistant coordinates (degrees) of unit vectors (K, 3) around the unit vector ``centre``:
    distance from the centre = the angle between them, direction = the azimuth in a fixed basis orthogonal to it."""
    c = np.asarray(centre, dtype=np.float64) / np.linalg.norm(centre)
    helper = np.array([1.0, 0.0, 0.0]) if abs(c[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(c, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(c, e1)
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    angle = np.degrees(np.arccos(np.clip(d @ c, -1.0, 1.0)))
    a, b = d @ e1, d @ e2
    norm = np.hypot(a, b)
    norm = np.where(norm > 0, norm, 1.0)
    return np.stack([angle * a / norm, angle * b / norm], axis=1)


def _wrap_deg(angle: np.ndarray) -> np.ndarray:
    return (np.asarray(angle) + 180.0) % 360.0 - 180.0


def plot_direction_posterior(rotations: np.ndarray, probabilities: np.ndarray, nside: int = 16, title: str = "",
                             markers: Mapping[str, np.ndarray] | None = None, min_relative: float = 1e-6) -> Figure:
    """Posterior of one particle: viewing directions on the whole sphere (Mollweide, log10 of the mass per HEALPix
    pixel of ``nside``), a close-up around the most probable direction (azimuthal-equidistant, degrees from it,
    colour = log10 mass of each grid direction), and the in-plane marginal (psi minus the psi of the most probable
    pose, degrees).

    ``rotations`` (K, 3, 3) RELION A and ``probabilities`` (K,) (e.g. ``PoseAssignment.marginals[i]``);
    ``markers``: ``{"label": A (3, 3)}`` poses drawn on every panel (e.g. MMSE, MAP, input pose). Poses with less
    than ``min_relative`` x the largest probability are left out of the close-up.
    """
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(rotations) != len(probabilities) or not len(rotations):
        raise ValueError(f"need as many probabilities as rotations (> 0), got {len(probabilities)} and "
                         f"{len(rotations)}")
    markers = {k: np.asarray(v, dtype=np.float64).reshape(3, 3) for k, v in (markers or {}).items()}
    styles = {label: dict(marker=_MARKERS[n % len(_MARKERS)], color=_COLOURS[n % len(_COLOURS)])
              for n, label in enumerate(markers)}
    best = rotations[int(np.argmax(probabilities))]
    fig = Figure(figsize=(15, 4.6))

    # whole sphere
    mass = direction_marginal(rotations, probabilities, nside)
    lon_edges, lat_edges, raster = healpix_raster(mass)
    top = max(float(mass.max()), 1e-300)
    floor = top * min_relative
    ax_map = fig.add_subplot(1, 3, 1, projection="mollweide")
    mesh = ax_map.pcolormesh(lon_edges, lat_edges, np.log10(np.maximum(raster, floor)), cmap="magma",
                             shading="flat", vmin=np.log10(floor), vmax=np.log10(top))
    ax_map.grid(True, alpha=0.3)
    ax_map.set_xticklabels([])
    ax_map.set_title(f"viewing directions, whole sphere ({len(rotations)} poses)", fontsize=9)
    fig.colorbar(mesh, ax=ax_map, orientation="horizontal", fraction=0.05, pad=0.06,
                 label=f"log10 mass per HEALPix pixel (nside {nside})")
    for label, pose in markers.items():
        lon, lat = _lon_lat_deg(viewing_directions(pose))
        ax_map.plot([lon], [lat], linestyle="none", markersize=9, markerfacecolor="none", label=label,
                    **styles[label])

    # close-up around the most probable viewing direction
    ax_zoom = fig.add_subplot(1, 3, 2)
    keep = probabilities >= probabilities.max() * min_relative
    dirs = viewing_directions(rotations[keep])
    unique_dirs, inverse = np.unique(np.round(dirs, 9), axis=0, return_inverse=True)
    dir_mass = np.bincount(inverse.reshape(-1), weights=probabilities[keep], minlength=len(unique_dirs))
    xy = _tangent_coordinates(unique_dirs, viewing_directions(best))
    order = np.argsort(dir_mass)
    sc = ax_zoom.scatter(xy[order, 0], xy[order, 1], c=np.log10(np.maximum(dir_mass[order], floor)), cmap="magma",
                         vmin=np.log10(floor), vmax=np.log10(top), s=40, edgecolors="0.5", linewidths=0.3)
    marker_xy = {label: _tangent_coordinates(viewing_directions(pose)[None], viewing_directions(best))[0]
                 for label, pose in markers.items()}
    for label, (x, y) in marker_xy.items():
        ax_zoom.plot([x], [y], linestyle="none", markersize=11, markerfacecolor="none", label=label,
                     **styles[label])
    extent = max(np.abs(np.concatenate([xy.reshape(-1), np.ravel(list(marker_xy.values()) or [0.0])])).max(), 1.0)
    ax_zoom.set_xlim(-1.15 * extent, 1.15 * extent)
    ax_zoom.set_ylim(-1.15 * extent, 1.15 * extent)
    ax_zoom.set_aspect("equal")
    ax_zoom.set_xlabel("degrees from the most probable direction")
    ax_zoom.set_title("close-up of the viewing directions", fontsize=9)
    fig.colorbar(sc, ax=ax_zoom, fraction=0.046, pad=0.04, label="log10 mass per direction")

    # in-plane marginal relative to the most probable pose
    ax_psi = fig.add_subplot(1, 3, 3)
    psi_ref = matrix_to_euler(best)[2]
    dpsi = _wrap_deg(matrix_to_euler(rotations)[:, 2] - psi_ref)
    marker_dpsi = {label: float(_wrap_deg(matrix_to_euler(pose)[2] - psi_ref)) for label, pose in markers.items()}
    span = max(np.abs(np.concatenate([dpsi[keep], list(marker_dpsi.values()) or [0.0]])).max(), 1.0)
    lim = min(1.15 * span, 180.0)
    ax_psi.hist(dpsi, bins=np.linspace(-lim, lim, 61), weights=probabilities, color="tab:blue", alpha=0.8)
    for label, value in marker_dpsi.items():
        ax_psi.axvline(value, color=styles[label]["color"], linestyle="--", label=label)
    ax_psi.set_xlim(-lim, lim)
    ax_psi.set_xlabel("psi minus the most probable pose's psi (degrees)")
    ax_psi.set_ylabel("posterior mass")
    ax_psi.set_title(f"in-plane marginal (most probable psi {psi_ref:.1f}°)", fontsize=9)
    if markers:
        for ax in (ax_map, ax_zoom, ax_psi):
            ax.legend(fontsize=7, loc="lower right" if ax is ax_map else "best", framealpha=0.6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_uncertainty_histograms(expected_error_deg: np.ndarray, pmax: np.ndarray, title: str = "") -> Figure:
    """Histograms of the posterior expected angular error (degrees) and of the maximum posterior probability
    (pmax, RELION's rlnMaxValueProbDistribution) over particles, with their medians."""
    err = np.asarray(expected_error_deg, dtype=np.float64)
    pm = np.asarray(pmax, dtype=np.float64)
    fig = Figure(figsize=(10, 3.8))
    ax_err, ax_p = fig.subplots(1, 2)
    ax_err.hist(err, bins=30, color="tab:orange", alpha=0.8)
    ax_err.axvline(np.median(err), color="k", linestyle="--", label=f"median {np.median(err):.3g}°")
    ax_err.set_xlabel("posterior expected angular error (degrees)")
    ax_err.set_ylabel("particles")
    ax_err.legend(fontsize=8)
    ax_p.hist(pm, bins=np.linspace(0, 1, 26), color="tab:green", alpha=0.8)
    ax_p.axvline(np.median(pm), color="k", linestyle="--", label=f"median {np.median(pm):.3g}")
    ax_p.set_xlabel("max posterior probability (pmax)")
    ax_p.set_ylabel("particles")
    ax_p.legend(fontsize=8)
    fig.suptitle(title or f"uncertainty of {len(err)} particles", fontsize=10)
    fig.tight_layout()
    return fig


def plot_estimator_difference(a: np.ndarray, b: np.ndarray, labels: tuple[str, str] = ("MMSE", "MAP"),
                              symmetry: str = "C1", title: str = "") -> Figure:
    """Histogram of the symmetry-aware angle (:func:`bayespose.core.geometry.symmetry.symmetric_angle_deg`, degrees)
    between two estimators' rotations (N, 3, 3) per particle."""
    diff = symmetric_angle_deg(a, b, symmetry)
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    top = max(float(diff.max()) if len(diff) else 1.0, 1e-3)
    ax.hist(diff, bins=np.linspace(0, top * 1.05, 31), color="tab:purple", alpha=0.8)
    ax.axvline(np.median(diff), color="k", linestyle="--", label=f"median {np.median(diff):.3g}°")
    ax.set_xlabel(f"angle between {labels[0]} and {labels[1]} rotations (degrees, symmetry {symmetry.upper()})")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    ax.set_title(title or f"{labels[0]} vs {labels[1]} ({len(diff)} particles)", fontsize=10)
    fig.tight_layout()
    return fig
