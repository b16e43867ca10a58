"""Helpers shared by the bayespose protocol viewers: every plot is saved as ``extra/viewer_<name>.png`` of the
viewed protocol (so the views also work headless) and shown in Scipion's plotter; particles are picked by their
Scipion id (the ``id`` column of the particle viewer)."""

from __future__ import annotations

import numpy as np
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import MessageView

PNG_DPI = 110


class ExtraFigureMixin:
    """For a ProtocolViewer (``self.protocol``): PNG paths in the protocol's extra folder, figure titles prefixed
    with the run name, and 'save then show' of a matplotlib figure."""

    def _png(self, name: str) -> str:
        """``extra/viewer_<name>.png`` of the viewed protocol."""
        return self.protocol._getExtraPath(f"viewer_{name}.png")

    def _title(self, what: str) -> str:
        """``"<run name>: <what>"``."""
        return f"{self.protocol.getRunName()}: {what}"

    @staticmethod
    def _view(fig):
        return [EmPlotter(figure=fig)]

    def _saveAndView(self, fig, name: str):
        """Save ``fig`` as :meth:`_png` (``name``) and return the views that show it."""
        fig.savefig(self._png(name), dpi=PNG_DPI)
        return self._view(fig)


def particle_row(scipion_ids, wanted: int) -> int | None:
    """The (0-based) row of the particle with Scipion id ``wanted`` in ``scipion_ids``, or None when absent."""
    rows = np.flatnonzero(np.asarray(scipion_ids, dtype=np.int64) == wanted)
    return int(rows[0]) if len(rows) else None


def unknown_particle_views(scipion_ids, wanted: int) -> list:
    """The message shown when no particle has the id ``wanted`` (with the range of the run's ids)."""
    ids = np.asarray(scipion_ids, dtype=np.int64)
    return [MessageView(f"No particle with id {wanted} in this run (ids {ids.min()}..{ids.max()}).",
                        title="Unknown particle")]
