"""Scipion viewers of bayespose."""

from bayespose.viewers.viewer_assign_poses import BayesposeAssignPosesViewer
from bayespose.viewers.viewer_deep import BayesposePredictPosesViewer, BayesposeTrainingViewer
from bayespose.viewers.viewer_poses import BayesposePoseViewer
from bayespose.viewers.viewer_refine import BayesposeRefineViewer

__all__ = [
    "BayesposeAssignPosesViewer",
    "BayesposePredictPosesViewer",
    "BayesposeTrainingViewer",
    "BayesposePoseViewer",
    "BayesposeRefineViewer",
]
