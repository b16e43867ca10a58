"""Viewers of the deep pose-prediction protocols: training curves ('train pose network', or a pose-network object),
and for 'predict poses' the pose distribution, the angular errors against the input alignment (e.g. a simulation's
ground truth or a previous refinement) and the predicted distribution of a chosen particle.

Every plot is shown in its own window and also saved as PNG in the protocol's extra folder (``viewer_*.png``), so
the plotting methods also work headless; the figures come from :mod:`bayespose.plotting.deep` and
:mod:`bayespose.plotting.poses`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer, Viewer

from bayespose.core.geometry.symmetry import symmetric_angle_deg
from bayespose.core.io.assignment import load_assignment
from bayespose.core.io.prediction import load_prediction
from bayespose.objects import BayesposePoseNetwork
from bayespose.plotting import save_figure
from bayespose.plotting.deep import plot_angular_errors, plot_predicted_distribution, plot_training_history
from bayespose.plotting.poses import plot_pose_distribution
from bayespose.protocols import ProtBayesposePredictPoses, ProtBayesposeTrainPoseNetwork
from bayespose.protocols.protocol_predict_poses import PREDICTION_NPZ, RESULT_NPZ
from bayespose.viewers._common import (
    ExtraFigureMixin,
    FigureView,
    message,
    particle_row,
    shows_errors,
    tk_parent,
    unknown_particle_text,
)


def training_curves_png(checkpoint: str | Path, png_path: str | Path, title: str = ""):
    """Plot the training / validation curves stored in a checkpoint; saves ``png_path``, returns the figure."""
    from bayespose.core.deep import load_pose_network

    network = load_pose_network(checkpoint, device="cpu")
    history = list(network.history or [])
    best = network.metadata.get("best_epoch") if isinstance(network.metadata, dict) else None
    fig = plot_training_history(history, best_epoch=best, title=title)
    save_figure(fig, png_path)
    return fig


class BayesposeTrainingViewer(Viewer):
    """Training and validation loss and validation angular error per epoch of a pose network."""

    _label = "bayespose training curves"
    _environments = [DESKTOP_TKINTER]
    _targets = [ProtBayesposeTrainPoseNetwork, BayesposePoseNetwork]

    @shows_errors
    def _visualize(self, obj, **kwargs):
        if isinstance(obj, BayesposePoseNetwork):
            model, folder, name = obj, os.path.dirname(obj.getFileName() or "."), "pose network"
        else:
            model = getattr(obj, "outputModel", None)
            folder, name = obj._getExtraPath(), obj.getRunName()
        if model is None or not model.exists():
            return [message(self, "The pose network is not trained yet (no checkpoint).", title="No network")]
        png = os.path.join(folder, "viewer_training.png")
        fig = training_curves_png(model.getFileName(), png, title=f"{name}: {model}")
        return [FigureView(fig, tkParent=tk_parent(self))]


class BayesposePredictPosesViewer(ExtraFigureMixin, ProtocolViewer):
    """Results of a pose prediction: the pose distribution, the errors against the input alignment and the predicted
    distribution of a chosen particle."""

    _label = "bayespose predict poses viewer"
    _environments = [DESKTOP_TKINTER]
    _targets = [ProtBayesposePredictPoses]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayPoses", params.LabelParam, label="Pose distribution",
                      help="Viewing-direction density (Mollweide map) and in-plane angle histogram of the output "
                           "poses (network mode, or MMSE when refined); the input poses, when the input was "
                           "aligned, are overlaid on the psi histogram.")
        form.addParam("displayErrors", params.LabelParam, label="Angular errors vs the input alignment",
                      help="Histogram and cumulative fraction of the (symmetry-aware) angle between the predicted "
                           "poses (network mode, and MMSE when refined) and the input particles' alignment. For "
                           "simulated particles that is the error against the ground truth. Needs aligned input.")
        group = form.addGroup("Predicted distribution of one particle")
        group.addParam("particleId", params.IntParam, default=1, label="Particle id",
                       help="The id of the particle (the 'id' column of the output particles in the Scipion "
                            "particle viewer). Its distribution is recomputed with the network (on the CPU).")
        group.addParam("displayDistribution", params.LabelParam, label="Show the predicted distribution",
                       help="Viewing-direction marginal of the network's predicted distribution over SO(3) (whole "
                            "sphere, log scale; a close-up around the mode) and its in-plane marginal, with the "
                            "network mode, the MMSE pose (when refined) and the input pose marked.")

    def _getVisualizeDict(self):
        return {"displayPoses": self._showPoses, "displayErrors": self._showErrors,
                "displayDistribution": self._showDistribution}

    # ---------------------------------------------------------------------------------------------- helpers
    def _prediction(self) -> dict:
        return load_prediction(self.protocol._getExtraPath(PREDICTION_NPZ))

    def _assignment(self) -> dict | None:
        return load_assignment(self.protocol._getExtraPath(RESULT_NPZ)) if self.protocol.refines() else None

    # ------------------------------------------------------------------------------------------------ views
    @shows_errors
    def _showPoses(self, paramName=None):
        data, refined = self._prediction(), self._assignment()
        rotations = refined["mmse_rotations"] if refined is not None else data["rotations"]
        what = "deep-prior MMSE poses" if refined is not None else "network poses (mode)"
        fig = plot_pose_distribution(rotations, title=self._title(what), reference=data["input_rotations"])
        return self._saveAndView(fig, "poses")

    @shows_errors
    def _showErrors(self, paramName=None):
        data, refined = self._prediction(), self._assignment()
        if data["input_rotations"] is None:
            return self._message("The input particles have no alignment to compare the predictions with.",
                                 title="No reference poses")
        symmetry = data["symmetry"]
        errors = {"network mode": symmetric_angle_deg(data["rotations"], data["input_rotations"], symmetry)}
        if refined is not None:
            errors["deep-prior MMSE"] = symmetric_angle_deg(refined["mmse_rotations"], data["input_rotations"],
                                                            symmetry)
        fig = plot_angular_errors(errors, title=self._title(f"angle to the input poses ({len(data['rotations'])} "
                                                            f"particles, symmetry {symmetry})"))
        return self._saveAndView(fig, "errors")

    @shows_errors
    def _showDistribution(self, paramName=None):
        data, refined = self._prediction(), self._assignment()
        wanted = int(self.particleId.get())
        row = particle_row(data["scipion_id"], wanted)
        if row is None:
            return self._message(unknown_particle_text(data["scipion_id"], wanted), title="Unknown particle")
        rotations, probabilities, order = self.protocol.particleDistribution(row)
        markers = {"network mode": data["rotations"][row]}
        if refined is not None:
            markers["MMSE"] = refined["mmse_rotations"][row]
        if data["input_rotations"] is not None:
            markers["input"] = data["input_rotations"][row]
        nside = 2 ** min(order, 6) if order is not None else 4
        fig = plot_predicted_distribution(rotations, probabilities, nside=nside, markers=markers,
                                          title=self._title(f"predicted distribution of particle {wanted} "
                                                            f"(confidence {data['confidence'][row]:.3f})"))
        return self._saveAndView(fig, f"distribution_{wanted}")
