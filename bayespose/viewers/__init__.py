"""Scipion viewers of bayespose.

Scipion lists the viewers of an object in the alphabetical order of the names they have here and opens the first
on a double click. The pose-distribution viewer also targets every particle set with a 3D alignment, so it is
exported as ``zBayesposePoseViewer`` (low priority, as pwem does with its angular-distribution viewer): it shows up
in "Open with" without replacing the default particle viewer. Import it as
``bayespose.viewers.viewer_poses.BayesposePoseViewer``.
"""

from bayespose.viewers.viewer_assign_poses import BayesposeAssignPosesViewer
from bayespose.viewers.viewer_deep import BayesposePredictPosesViewer, BayesposeTrainingViewer
from bayespose.viewers.viewer_poses import BayesposePoseViewer as zBayesposePoseViewer
from bayespose.viewers.viewer_refine import BayesposeRefineViewer

__all__ = [
    "BayesposeAssignPosesViewer",
    "BayesposePredictPosesViewer",
    "BayesposeTrainingViewer",
    "zBayesposePoseViewer",
    "BayesposeRefineViewer",
]
