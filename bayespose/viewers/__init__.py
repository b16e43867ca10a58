"""Scipion viewers of bayespose."""

from .viewer_poses import BayesposePoseViewer
from .viewer_assign_poses import BayesposeAssignPosesViewer
