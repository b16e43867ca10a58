"""Scipion viewers of bayespose."""

from .viewer_poses import BayesposePoseViewer
