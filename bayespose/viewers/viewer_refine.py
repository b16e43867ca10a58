"""Viewer of ``bayespose - refine with prior estimation (EM)``: FSC curve, per-iteration curves, the estimated prior
next to the particles' angular distribution, central slices, and the maps.

Every plot is shown in its own window and also saved as PNG in the protocol's extra folder (``viewer_*.png``), so
the plotting methods also work headless; the figures are :func:`bayespose.plotting.refine.refine_figure`. The maps
open in ChimeraX when pwem finds it (the chimera plugin or pwem's default ChimeraX folder), otherwise (or on
request) as central slices drawn with matplotlib, which work on a pip-only Scipion; the Xmipp volume viewer is
offered when the xmipp plugin is installed. Opening the maps never raises: what cannot be shown becomes a message.
"""

from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.viewer import DESKTOP_TKINTER

from bayespose.core.io.mrc import read_map
from bayespose.core.refine.outputs import HALF_FILES, MAP_FILE, RefineOutputs
from bayespose.plotting.refine import plot_central_slices, refine_figure
from bayespose.protocols import ProtBayesposeRefine
from bayespose.viewers._common import ExtraFigureMixin, shows_errors

VOLUME_CHOICES = ["ChimeraX (central slices when it is not installed)", "central slices",
                  "Xmipp volume viewer (needs scipion-em-xmipp)"]
VOLUME_CHIMERA, VOLUME_SLICES, VOLUME_XMIPP = range(3)
MAP_CHOICES = ["final map", "half maps", "all three"]
MAP_FINAL, MAP_HALVES, MAP_ALL = range(3)
MAP_LABELS = {MAP_FILE: "map", HALF_FILES[0]: "half 1", HALF_FILES[1]: "half 2"}


def chimerax_program() -> str | None:
    """The ChimeraX executable pwem would launch, when it exists (else None)."""
    try:
        from pwem.viewers.viewer_chimera import Chimera

        program = Chimera.getProgram()
    except Exception:  # noqa: BLE001 - a broken chimera configuration means "not available"
        return None
    return program if program and os.path.isfile(program) and os.access(program, os.X_OK) else None


def xmipp_available() -> bool:
    """Whether the xmipp plugin (which pwem's volume viewer, showj, needs) is installed."""
    from pwem import Domain

    return Domain.importFromPlugin("xmipp3", "Plugin") is not None


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
        group.addParam("volumeViewer", params.EnumParam, choices=VOLUME_CHOICES, default=VOLUME_CHIMERA,
                       label="Open with",
                       help="ChimeraX: needs ChimeraX where pwem looks for it (the chimera plugin, "
                            "scipion-em-chimera, or CHIMERA_HOME); without it the central slices are shown. "
                            "central slices: xy, xz and yz sections drawn with matplotlib (always available). "
                            "Xmipp volume viewer: Scipion's slice and 3D viewer, needs the xmipp plugin.")
        group.addParam("displayVolumes", params.LabelParam, label="Open the maps",
                       help="Open the selected maps with the selected viewer.")

    def _getVisualizeDict(self):
        return {"displayFsc": self._showFsc, "displayHistory": self._showHistory, "displayPrior": self._showPrior,
                "displaySlices": self._showSlices, "displayVolumes": self._showVolumes}

    # ---------------------------------------------------------------------------------------------- helpers
    def _refineOutputs(self) -> RefineOutputs:
        return self.protocol.results()

    @shows_errors
    def _figure(self, name: str):
        return self._saveAndView(refine_figure(self._refineOutputs(), name, self.protocol.getRunName()), name)

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

    @shows_errors
    def _showVolumes(self, paramName=None):
        files = self._mapFiles()
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            return self._message(f"Missing map file(s): {', '.join(missing)}", title="No maps")
        choice = self.volumeViewer.get()
        if choice == VOLUME_CHIMERA:
            script = self._chimeraScript(files)
            if chimerax_program() is not None:
                from pwem.viewers import ChimeraView

                return [ChimeraView(script)]
            note = (f"ChimeraX is not installed where Scipion looks for it (install the chimera plugin, "
                    f"scipion-em-chimera); showing the central slices instead. The ChimeraX script is {script}.")
            return self._message(note, title="No ChimeraX") + self._mapSlices(files)
        if choice == VOLUME_XMIPP:
            if xmipp_available():
                path = self.protocol._getExtraPath("viewer_volumes.sqlite")
                self.createVolumesSqlite([f"{f}:mrc" for f in files], path, self._refineOutputs().pixel_size)
                return [self.objectView(path)]
            return self._message("The Xmipp volume viewer needs the xmipp plugin (scipion-em-xmipp), which is not "
                                 "installed; showing the central slices instead.", title="No Xmipp") + \
                self._mapSlices(files)
        return self._mapSlices(files)

    def _chimeraScript(self, files: list[str]) -> str:
        """``extra/viewer_chimera.cxc`` opening ``files`` with the refinement's voxel size, tiled."""
        script = self.protocol._getExtraPath("viewer_chimera.cxc")
        px = self._refineOutputs().pixel_size
        with open(script, "w") as fh:
            for k, path in enumerate(files, start=1):
                fh.write(f"open {os.path.abspath(path)}\nvolume #{k} voxelSize {px:.4f}\n")
            fh.write("tile\n")
        return script

    def _mapSlices(self, files: list[str]) -> list:
        """Central xy / xz / yz sections of the map files (matplotlib), saved as ``extra/viewer_maps.png``."""
        volumes = [read_map(path)[0] for path in files]
        labels = [MAP_LABELS.get(os.path.basename(path), os.path.basename(path)) for path in files]
        fig = plot_central_slices(volumes, labels=labels, pixel_size=self._refineOutputs().pixel_size,
                                  title=self._title("maps, central slices"))
        return self._saveAndView(fig, "maps")
