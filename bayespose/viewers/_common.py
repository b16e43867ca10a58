"""Helpers shared by the bayespose viewers.

* :class:`FigureView`: a pyworkflow ``View`` that shows a matplotlib :class:`~matplotlib.figure.Figure` in its own
  Tk window (a ``Toplevel`` of the Scipion window that opened the viewer, with matplotlib's navigation toolbar).
  It puts the figure on a ``FigureCanvasTkAgg`` directly, so it works whatever backend pyplot has (bayespose never
  sets one; another plugin may have switched pyplot to Agg).
* :class:`ExtraFigureMixin`: every plot of a protocol viewer is also saved as ``extra/viewer_<name>.png`` of the
  viewed protocol (the views also work headless), then shown with :class:`FigureView`.
* Messages are pyworkflow ``MessageView`` objects built with the viewer's Tk window as parent (:func:`message`):
  without a parent pyworkflow's dialog makes a second ``tk.Tk()`` whose icons fail with ``TclError: image
  "pyimage.." doesn't exist`` and the user sees nothing.
* :func:`shows_errors`: a view method that fails returns an error message (logged with its traceback) instead of
  raising into Tk's event loop, where the user would see nothing.
* Particles are picked by their Scipion id (the ``id`` column of the particle viewer).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
from pyworkflow.viewer import MSG_ERROR, MSG_INFO, MessageView, View

from bayespose.plotting import save_figure


class FigureView(View):
    """Show ``figure`` (a matplotlib Figure) in a new Tk window titled ``title``, child of ``tkParent`` (the viewer's
    Tk window; the default Tk root when None)."""

    def __init__(self, figure, title: str = "", tkParent=None):
        View.__init__(self)
        self._figure = figure
        self._title = title or (figure.get_suptitle() if hasattr(figure, "get_suptitle") else "") or "bayespose"
        self._tkParent = tkParent
        self.window = None  # the Toplevel, once shown

    def getFigure(self):
        return self._figure

    def show(self):
        import tkinter as tk

        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg, NavigationToolbar2Tk

        master = self._tkParent if self._tkParent is not None else tk._get_default_root("show a figure")
        window = tk.Toplevel(master)
        window.title(self._title)
        canvas = FigureCanvasTkAgg(self._figure, master=window)
        toolbar = NavigationToolbar2Tk(canvas, window, pack_toolbar=False)
        toolbar.update()
        toolbar.pack(side=tk.BOTTOM, fill=tk.X)
        canvas.get_tk_widget().pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        canvas.draw()
        self.window = window


def tk_parent(viewer):
    """The Tk window a viewer's dialogs and figure windows belong to (None outside a GUI)."""
    return viewer.getTkRoot() if hasattr(viewer, "getTkRoot") else None


def message(viewer, text: str, title: str = "", error: bool = False) -> MessageView:
    """An information (or error) message shown as a dialog of the viewer's window."""
    return MessageView(text, title=title, msgType=MSG_ERROR if error else MSG_INFO, tkParent=tk_parent(viewer))


def shows_errors(method):
    """Decorate a viewer method returning views: an exception becomes an error message of the viewer's window (the
    traceback goes to the log)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the user as a message
            logging.getLogger(type(self).__module__).exception("bayespose viewer: %s failed", method.__name__)
            return [message(self, f"{type(exc).__name__}: {exc}", title="bayespose viewer error", error=True)]

    return wrapper


class ExtraFigureMixin:
    """For a ProtocolViewer (``self.protocol``): PNG paths in the protocol's extra folder, figure titles prefixed
    with the run name, and 'save then show' of a matplotlib figure."""

    def _png(self, name: str) -> str:
        """``extra/viewer_<name>.png`` of the viewed protocol."""
        return self.protocol._getExtraPath(f"viewer_{name}.png")

    def _title(self, what: str) -> str:
        """``"<run name>: <what>"``."""
        return f"{self.protocol.getRunName()}: {what}"

    def _saveAndView(self, fig, name: str) -> list:
        """Save ``fig`` as :meth:`_png` (``name``) and return the view that shows it."""
        save_figure(fig, self._png(name))
        return [FigureView(fig, title=fig.get_suptitle() or self._title(name), tkParent=tk_parent(self))]

    def _message(self, text: str, title: str = "", error: bool = False) -> list:
        return [message(self, text, title, error)]


def particle_row(scipion_ids, wanted: int) -> int | None:
    """The (0-based) row of the particle with Scipion id ``wanted`` in ``scipion_ids``, or None when absent."""
    rows = np.flatnonzero(np.asarray(scipion_ids, dtype=np.int64) == wanted)
    return int(rows[0]) if len(rows) else None


def unknown_particle_text(scipion_ids, wanted: int) -> str:
    """The message shown when no particle has the id ``wanted`` (with the range of the run's ids)."""
    ids = np.asarray(scipion_ids, dtype=np.int64)
    return f"No particle with id {wanted} in this run (ids {ids.min()}..{ids.max()})."
