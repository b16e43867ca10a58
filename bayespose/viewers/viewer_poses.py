"""Pose-distribution viewer for any set of particles with a 3D (projection) alignment: the outputs of bayespose's
simulate and cryoSPARC-import protocols, pwem's RELION import, the relion and cryoSPARC plugins' refinements...

Shows, each in its own window, the viewing-direction density on a Mollweide map and the in-plane angle histogram
(:func:`bayespose.plotting.poses.plot_pose_distribution`), and saves them as PNG: in the protocol's extra folder
for bayespose protocols (``<output>_poses.png``), in the project's Tmp folder for anything else (bayespose does
not write into other plugins' runs). A set without 3D alignment gives a message, not an error; Scipion offers this
viewer ("Open with" on a particle set) only for sets with a 3D alignment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pwem.objects import SetOfParticles
from pyworkflow.viewer import DESKTOP_TKINTER, Viewer

from bayespose.convert import particles_from_scipion
from bayespose.plotting import save_figure
from bayespose.plotting.poses import plot_pose_distribution
from bayespose.protocols import ProtBayesposeImportCryosparc, ProtBayesposeSimulate
from bayespose.viewers._common import FigureView, message, shows_errors, tk_parent

NO_ALIGNMENT = ("{what} has no 3D alignment (no projection poses), so there is no pose distribution to show. "
                "Use particles from a 3D refinement, a simulation or an import with angles.")


def pose_plot_for_set(particle_set: SetOfParticles, png_path: str | Path, title: str = ""):
    """Plot the pose distribution of an aligned (projection) SetOfParticles; saves ``png_path``, returns the figure.
    Raises ``ValueError`` when the set has no projection alignment."""
    particles = particles_from_scipion(particle_set)
    if not particles.has_alignment:
        raise ValueError("the particles have no projection alignment")
    fig = plot_pose_distribution(particles.rotations, title=title)
    save_figure(fig, png_path)
    return fig


def _is_bayespose(protocol) -> bool:
    return protocol is not None and type(protocol).__module__.startswith("bayespose.")


class BayesposePoseViewer(Viewer):
    """Viewing-direction density (Mollweide) and in-plane angle histogram of particles with a 3D alignment."""

    _label = "bayespose pose distribution"
    _environments = [DESKTOP_TKINTER]
    _targets = [SetOfParticles, ProtBayesposeSimulate, ProtBayesposeImportCryosparc]

    @classmethod
    def can_handle_this_instance(cls, instance) -> bool:
        """Offered for particle sets with a projection alignment (and for the targeted protocols)."""
        return not isinstance(instance, SetOfParticles) or bool(instance.hasAlignmentProj())

    @shows_errors
    def _visualize(self, obj, **kwargs):
        if isinstance(obj, SetOfParticles):
            return self._setViews(obj)
        views = []
        for name, output in obj.iterOutputAttributes(SetOfParticles):
            if output.hasAlignmentProj():
                fig = pose_plot_for_set(output, obj._getExtraPath(f"{name}_poses.png"),
                                        title=f"{obj.getRunName()}: {name}")
                views.append(FigureView(fig, tkParent=tk_parent(self)))
        if not views:
            views.append(message(self, NO_ALIGNMENT.format(what=f"No output of {obj.getRunName()}"),
                                 title="No poses to show"))
        return views

    def _setViews(self, particle_set: SetOfParticles) -> list:
        """The views of one particle set (a message when it has no projection alignment)."""
        name = particle_set.getLastName() or f"set{particle_set.getObjId()}"
        label = f"{self.protocol.getRunName()}: {name}" if self.protocol is not None else name
        if not particle_set.hasAlignmentProj():
            return [message(self, NO_ALIGNMENT.format(what=f"The particle set {label}"), title="No poses to show")]
        if _is_bayespose(self.protocol):
            png = self.protocol._getExtraPath(f"{name}_poses.png")
        else:
            folder = self.getProject().getTmpPath()
            os.makedirs(folder, exist_ok=True)
            png = os.path.join(folder, f"bayespose_poses_{particle_set.getObjId() or name}.png")
        fig = pose_plot_for_set(particle_set, png, title=label)
        return [FigureView(fig, tkParent=tk_parent(self))]
