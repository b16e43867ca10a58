"""Scipion viewers of bayespose."""

from .viewer_poses import BayesposePoseViewer
from .viewer_assign_poses import BayesposeAssignPosesViewer
from .viewer_refine import BayesposeRefineViewer
from .viewer_deep import BayesposePredictPosesViewer, BayesposeTrainingViewer
