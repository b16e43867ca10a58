"""Viewer of ``bayespose - assign poses (MMSE)``: pose distribution, uncertainty histograms, MMSE-vs-MAP angle and the
posterior of one particle on the sphere.

Every plot is shown in its own window and also saved as PNG in the protocol's extra folder (``viewer_*.png``), so
the plotting methods also work headless; the figures come from :mod:`bayespose.plotting.poses` and
:mod:`bayespose.plotting.assign`.
"""

from __future__ import annotations

import numpy as np
import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from bayespose.core.io.assignment import load_assignment
from bayespose.plotting.assign import plot_direction_posterior, plot_estimator_difference, plot_uncertainty_histograms
from bayespose.plotting.poses import plot_pose_distribution
from bayespose.protocols import ProtBayesposeAssignPoses
from bayespose.protocols.protocol_assign_poses import PRIOR_LOCAL, RESULT_NPZ
from bayespose.viewers._common import ExtraFigureMixin, particle_row, shows_errors, unknown_particle_text

STAGE_CHOICES = ["final (refined) cells", "coarse global grid (whole sphere)"]
STAGE_FINAL, STAGE_COARSE = range(2)


class BayesposeAssignPosesViewer(ExtraFigureMixin, ProtocolViewer):
    """Results of a pose assignment: where the poses are, how certain they are, how MMSE and MAP differ, and the
    posterior of a chosen particle."""

    _label = "bayespose assign poses viewer"
    _environments = [DESKTOP_TKINTER]
    _targets = [ProtBayesposeAssignPoses]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayPoses", params.LabelParam, label="Pose distribution",
                      help="Viewing-direction density (Mollweide map) and in-plane angle histogram of the output "
                           "poses; the input poses (when the input was aligned) are overlaid on the psi histogram.")
        form.addParam("displayUncertainty", params.LabelParam, label="Uncertainty histograms",
                      help="Histograms over particles of the posterior expected angular error (degrees) and of "
                           "the maximum posterior probability (pmax).")
        form.addParam("displayDifference", params.LabelParam, label="MMSE vs MAP angle",
                      help="Histogram of the (symmetry-aware) angle between each particle's MMSE and MAP "
                           "rotations: large values mark broad or multi-modal posteriors.")
        group = form.addGroup("Posterior of one particle")
        group.addParam("particleId", params.IntParam, default=1, label="Particle id",
                       help="The id of the particle (the 'id' column of the output particles in the Scipion "
                            "particle viewer). Its posterior is recomputed with this run's settings and noise model.")
        group.addParam("posteriorStage", params.EnumParam, choices=STAGE_CHOICES, default=STAGE_FINAL,
                       label="Grid",
                       help="final: the posterior on the finest (refined) cells, around the chosen pose. coarse: "
                            "the posterior on the whole coarse global grid, which shows alternative poses far "
                            "from the chosen one.")
        group.addParam("displayPosterior", params.LabelParam, label="Show the posterior on the sphere",
                       help="Viewing-direction marginal of the particle's rotation posterior (Mollweide, log scale) "
                            "and its in-plane marginal, with the MMSE, MAP and input poses marked.")

    def _getVisualizeDict(self):
        return {"displayPoses": self._showPoses, "displayUncertainty": self._showUncertainty,
                "displayDifference": self._showDifference, "displayPosterior": self._showPosterior}

    # ---------------------------------------------------------------------------------------------- helpers
    def _results(self) -> dict:
        return load_assignment(self.protocol._getExtraPath(RESULT_NPZ))

    def _nside(self, coarse: bool) -> int:
        """HEALPix nside matching the angular spacing of the plotted grid (spacing ~ 60° / nside)."""
        prot = self.protocol
        if prot.prior.get() == PRIOR_LOCAL:
            spacing = prot.localStep.get() or prot.localRange.get() / 4.0
            return int(2 ** min(max(np.ceil(np.log2(60.0 / spacing)), 0), 6))
        order = prot.healpixOrder.get() + (0 if coarse else prot.refineLevels.get())
        return 2 ** min(order, 6)

    # ------------------------------------------------------------------------------------------------ views
    @shows_errors
    def _showPoses(self, paramName=None):
        data = self._results()
        estimator = data["estimator"]
        fig = plot_pose_distribution(data[f"{estimator}_rotations"], title=self._title(f"{estimator.upper()} poses"),
                                     reference=data["input_rotations"])
        return self._saveAndView(fig, "poses")

    @shows_errors
    def _showUncertainty(self, paramName=None):
        data = self._results()
        fig = plot_uncertainty_histograms(data["expected_error_deg"], data["pmax"],
                                          title=self._title(f"uncertainty of {len(data['pmax'])} particles"))
        return self._saveAndView(fig, "uncertainty")

    @shows_errors
    def _showDifference(self, paramName=None):
        data = self._results()
        fig = plot_estimator_difference(data["mmse_rotations"], data["map_rotations"], symmetry=data["symmetry"],
                                        title=self._title("MMSE vs MAP rotation"))
        return self._saveAndView(fig, "mmse_vs_map")

    @shows_errors
    def _showPosterior(self, paramName=None):
        data = self._results()
        wanted = int(self.particleId.get())
        row = particle_row(data["scipion_id"], wanted)
        if row is None:
            return self._message(unknown_particle_text(data["scipion_id"], wanted), title="Unknown particle")
        coarse = self.posteriorStage.get() == STAGE_COARSE
        rotations, probabilities, result = self.protocol.particlePosterior(row, coarse=coarse)
        markers = {"MMSE": data["mmse_rotations"][row], "MAP": data["map_rotations"][row]}
        if data["input_rotations"] is not None:
            markers["input"] = data["input_rotations"][row]
        stage = "coarse grid" if coarse else "final cells"
        fig = plot_direction_posterior(rotations, probabilities, nside=self._nside(coarse), markers=markers,
                                       title=self._title(f"posterior of particle {wanted} ({stage}; pmax "
                                                         f"{data['pmax'][row]:.3f}, expected error "
                                                         f"{data['expected_error_deg'][row]:.2f}°)"))
        return self._saveAndView(fig, f"posterior_{wanted}{'_coarse' if coarse else ''}")
