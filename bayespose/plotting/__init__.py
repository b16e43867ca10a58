"""Figures of bayespose for the CLI, the demo, the benchmarks and the Scipion viewers.

Every ``plot_*`` function is pure: it builds a :class:`matplotlib.figure.Figure` directly (never through
``matplotlib.pyplot``) and returns it. Nothing here selects or changes matplotlib's backend, so importing bayespose
inside a GUI (Scipion's Tk project window) leaves that GUI's interactive plotting alone; a figure is not registered
with pyplot and is freed when dropped. Save a figure with :func:`save_figure` (atomic PNG); show it in a GUI by
putting it on a canvas (the Scipion viewers do, see :mod:`bayespose.viewers._common`).

Modules: :mod:`.poses` (pose distributions, particle galleries, estimator errors), :mod:`.assign` (posteriors of a
pose assignment), :mod:`.deep` (pose networks), :mod:`.refine` (EM refinement). Angles are in degrees; rotations
are RELION ``A`` matrices (volume -> image) whose viewing direction (third row) is drawn on Mollweide maps with
longitude = rot and latitude = 90° - tilt.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from bayespose.core.io.atomic import atomic_file

__all__ = ["save_figure", "PNG_DPI"]

PNG_DPI = 110


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = PNG_DPI) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG when there is none) complete or not at all (a hidden
    temporary renamed onto ``path``, :func:`bayespose.core.io.atomic.atomic_file`). Returns ``path``. Raises
    ``ValueError`` when the folder does not exist."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return path

