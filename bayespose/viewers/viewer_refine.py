"""Viewer of ``bayespose - refine with prior estimation (EM)``: FSC curve, per-iteration curves, the estimated prior
next to the particles' angular distribution, central slices, and the maps in Scipion's volume viewers.

Every plot is also saved as PNG in the protocol's extra folder (``viewer_*.png``), so the plotting methods work
headless; :func:`save_refine_figures` writes them all without a viewer object. The figures come from
:mod:`bayespose.plotting.refine`.
"""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers import ChimeraView, EmProtocolViewer
from pyworkflow.viewer import DESKTOP_TKINTER, MessageView

from bayespose.core.refine.outputs import HALF_FILES, MAP_FILE, RefineOutputs
from bayespose.plotting import refine as refine_plots
from bayespose.protocols import ProtBayesposeRefine
from bayespose.viewers._common import ExtraFigureMixin

VOLUME_CHOICES = ["slices (Scipion volume viewer)", "ChimeraX"]
VOLUME_SLICES, VOLUME_CHIMERA = range(2)
MAP_CHOICES = ["final map", "half maps", "all three"]
MAP_FINAL, MAP_HALVES, MAP_ALL = range(3)


# ------------------------------------------------------------------------------------------- figure functions
def fsc_figure(outputs: RefineOutputs, path: str | None = None, title: str = ""):
    """Half-map FSC with the 0.143 / 0.5 lines and the reported resolution; PNG at ``path`` when given."""
    return refine_plots.plot_fsc(outputs.fsc_frequencies, outputs.fsc, path, resolution_A=outputs.resolution_A,
                                 title=title or f"half-map FSC: {outputs.resolution_A:.2f} Å at 0.143")


def history_figure(outputs: RefineOutputs, path: str | None = None, title: str = ""):
    """Per-iteration resolution, log-likelihood and pose change; PNG at ``path`` when given."""
    return refine_plots.plot_history(outputs.history, path, title=title or "EM iterations")


def prior_figure(outputs: RefineOutputs, path: str | None = None, title: str = ""):
    """Estimated viewing-direction prior next to the final viewing directions; PNG at ``path`` when given."""
    if outputs.particles.rotations is None:
        raise ValueError("the refined particles have no poses")
    return refine_plots.plot_prior_and_poses(outputs.direction_prior, outputs.prior_order,
                                             outputs.particles.rotations, path,
                                             title=title or "estimated prior and final poses")


def slices_figure(outputs: RefineOutputs, path: str | None = None, title: str = ""):
    """Central xy / xz / yz sections of the map and the two half maps; PNG at ``path`` when given."""
    return refine_plots.plot_central_slices([outputs.map, *outputs.half_maps], path,
                                            labels=["map", "half 1", "half 2"], pixel_size=outputs.pixel_size,
                                            title=title or "central slices")


FIGURE_FUNCTIONS = {"fsc": fsc_figure, "history": history_figure, "prior": prior_figure, "slices": slices_figure}


def save_refine_figures(protocol, prefix: str = "viewer_") -> dict[str, str]:
    """Write every figure of a finished refinement protocol as ``extra/<prefix><name>.png``; returns name -> path."""
    import matplotlib.pyplot as plt

    outputs = protocol.results()
    paths = {}
    for name, function in FIGURE_FUNCTIONS.items():
        path = protocol._getExtraPath(f"{prefix}{name}.png")
        function(outputs, path, title=f"{protocol.getRunName()}: {name}")
        plt.close("all")
        paths[name] = path
    return paths


class BayesposeRefineViewer(ExtraFigureMixin, EmProtocolViewer):
    """Results of an EM refinement: resolution (FSC), convergence, estimated prior vs final poses, the maps."""

    _label = "bayespose refine viewer"
    _environments = [DESKTOP_TKINTER]
    _targets = [ProtBayesposeRefine]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayFsc", params.LabelParam, label="FSC curve",
                      help="Gold-standard FSC between the two half maps against spatial frequency (1/Å), with the "
                           "0.143 and 0.5 thresholds and the reported resolution.")
        form.addParam("displayHistory", params.LabelParam, label="Iterations",
                      help="Per iteration: resolution (FSC 0.143) and the resolution scored in the E-step, the "
                           "mean log-likelihood per particle, and the mean change of the particles' poses.")
        form.addParam("displayPrior", params.LabelParam, label="Estimated prior vs final poses",
                      help="Mollweide maps of the estimated viewing-direction density (relative to uniform; "
                           "uniform when the prior was not estimated) next to the density of the particles' "
                           "final viewing directions.")
        form.addParam("displaySlices", params.LabelParam, label="Central slices",
                      help="Central xy, xz and yz sections of the final map and the two half maps.")
        group = form.addGroup("Maps")
        group.addParam("whichMaps", params.EnumParam, choices=MAP_CHOICES, default=MAP_FINAL,
                       display=params.EnumParam.DISPLAY_HLIST, label="Maps",
                       help="Which maps to open: the final map, the two half maps, or all three.")
        group.addParam("volumeViewer", params.EnumParam, choices=VOLUME_CHOICES, default=VOLUME_SLICES,
                       display=params.EnumParam.DISPLAY_HLIST, label="Open with",
                       help="slices: Scipion's volume viewer (slices and 3D). ChimeraX: needs the chimera plugin "
                            "(scipion-em-chimera) or ChimeraX installed.")
        group.addParam("displayVolumes", params.LabelParam, label="Open the maps",
                       help="Open the selected maps with the selected viewer.")

    def _getVisualizeDict(self):
        return {"displayFsc": self._showFsc, "displayHistory": self._showHistory, "displayPrior": self._showPrior,
                "displaySlices": self._showSlices, "displayVolumes": self._showVolumes}

    # ---------------------------------------------------------------------------------------------- helpers
    def _refineOutputs(self) -> RefineOutputs:
        return self.protocol.results()

    def _figure(self, name: str):
        return self._saveAndView(FIGURE_FUNCTIONS[name](self._refineOutputs(), None, title=self._title(name)), name)

    def _mapFiles(self) -> list[str]:
        choice = self.whichMaps.get()
        names = {MAP_FINAL: [MAP_FILE], MAP_HALVES: list(HALF_FILES), MAP_ALL: [MAP_FILE, *HALF_FILES]}[choice]
        return [self.protocol._getExtraPath(name) for name in names]

    # ------------------------------------------------------------------------------------------------ views
    def _showFsc(self, paramName=None):
        return self._figure("fsc")

    def _showHistory(self, paramName=None):
        return self._figure("history")

    def _showPrior(self, paramName=None):
        return self._figure("prior")

    def _showSlices(self, paramName=None):
        return self._figure("slices")

    def _showVolumes(self, paramName=None):
        files = self._mapFiles()
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            return [MessageView(f"Missing map file(s): {', '.join(missing)}", title="No maps")]
        if self.volumeViewer.get() == VOLUME_CHIMERA:
            script = self.protocol._getExtraPath("viewer_chimera.cxc")
            px = self._refineOutputs().pixel_size
            with open(script, "w") as fh:
                for k, path in enumerate(files, start=1):
                    fh.write(f"open {os.path.abspath(path)}\nvolume #{k} voxelSize {px:.4f}\n")
                fh.write("tile\n")
            return [ChimeraView(script)]
        path = self.protocol._getExtraPath("viewer_volumes.sqlite")
        self.createVolumesSqlite([f"{f}:mrc" for f in files], path, self._refineOutputs().pixel_size)
        return [self.objectView(path)]
