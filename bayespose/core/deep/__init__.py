"""Deep pose prediction (DESIGN.md "Deep pose prediction"; papers 001, 002, 003): supervised networks that predict
a distribution over SO(3) for each particle image, and that distribution as the prior of MMSE assignment.

* :class:`TrainConfig`, :func:`train_pose_network` -> :class:`TrainResult` (checkpoint ``.pt`` + resumable state);
* :func:`load_pose_network` -> :class:`PoseNetwork`; :func:`predict_poses` -> :class:`PosePrediction`;
* :func:`deep_prior_assign` -> :class:`DeepPriorAssignment`: MMSE seeded with the cells holding 99 % of the
  predicted mass, prior = the prediction, then a per-particle fit check (:func:`fit_zscores`) that sends particles
  the network got wrong to the global search;
* :func:`pose_error_metrics`, :func:`reprojection_rmse`: MAnE / wMAnE / median / fractions (symmetry-aware),
  reprojection RMSE.

No pyworkflow here (core rule). Rotations are RELION ``A`` matrices throughout.
"""

from bayespose.core.deep.data import inplane_rotation_matrix, preprocess_images, rotate_shift_images
from bayespose.core.deep.metrics import angular_errors_deg, pose_error_metrics, reprojection_rmse
from bayespose.core.deep.predict import PosePrediction, predict_poses
from bayespose.core.deep.prior_refine import (
           DeepPriorAssignment,
           deep_prior_assign,
           default_local_range_deg,
           fit_zscores,
           seed_rotations,
)
from bayespose.core.deep.train import (
           PoseNetwork,
           TrainConfig,
           TrainResult,
           last_state_path,
           load_pose_network,
           train_pose_network,
)

__all__ = ["TrainConfig", "TrainResult", "PoseNetwork", "PosePrediction", "train_pose_network", "load_pose_network",
           "predict_poses", "deep_prior_assign", "DeepPriorAssignment", "fit_zscores", "seed_rotations",
           "default_local_range_deg", "pose_error_metrics",
           "angular_errors_deg", "reprojection_rmse", "last_state_path", "preprocess_images", "rotate_shift_images",
           "inplane_rotation_matrix"]
