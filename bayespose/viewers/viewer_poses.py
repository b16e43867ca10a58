"""Pose-distribution viewer for the aligned particle sets that bayespose protocols produce.

Shows (and saves as PNG in the protocol's extra folder, so it also works headless) the viewing-direction density
on a Mollweide map and the in-plane angle histogram; the plot itself is
:func:`bayespose.plotting.poses.plot_pose_distribution`.
"""

from __future__ import annotations

from pathlib import Path

from pwem.objects import SetOfParticles
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, MessageView, Viewer

from bayespose.convert import particles_from_scipion
from bayespose.plotting.poses import plot_pose_distribution
from bayespose.protocols import ProtBayesposeImportCryosparc, ProtBayesposeSimulate


def pose_plot_for_set(particle_set: SetOfParticles, png_path: str | Path, title: str = ""):
    """Plot the pose distribution of an aligned (projection) SetOfParticles; saves ``png_path``, returns the figure."""
    particles = particles_from_scipion(particle_set)
    if not particles.has_alignment:
        raise ValueError("the particles have no projection alignment")
    fig = plot_pose_distribution(particles.rotations, None, title=title)
    fig.savefig(png_path, dpi=110)
    return fig


class BayesposePoseViewer(Viewer):
    """Viewing-direction density (Mollweide) and in-plane angle histogram of the output particles."""

    _label = "bayespose pose distribution"
    _environments = [DESKTOP_TKINTER]
    _targets = [ProtBayesposeSimulate, ProtBayesposeImportCryosparc]

    def _visualize(self, obj, **kwargs):
        views = []
        for name, output in obj.iterOutputAttributes(SetOfParticles):
            if not output.hasAlignmentProj():
                continue
            png = obj._getExtraPath(f"{name}_poses.png")
            fig = pose_plot_for_set(output, png, title=f"{obj.getRunName()}: {name}")
            views.append(EmPlotter(figure=fig))
        if not views:
            views.append(MessageView("This protocol has no output particles with projection alignment.",
                                     title="No poses to show"))
        return views
