"""Deep pose prediction: supervised networks that predict a distribution over SO(3) for each particle image, and that
distribution as the prior of MMSE assignment. Built on: Klee, Biza, Platt & Walters (2023), "Image to Sphere:
Learning Equivariant Features for Efficient Pose Prediction", ICLR, doi:10.48550/arXiv.2302.13926 (the so3grid
head); Lian et al. (2022), "End-to-end orientation estimation from 2D cryo-EM images", Acta Cryst. D 78, 174-186,
doi:10.1107/S2059798321011761 (the quaternion baseline); Sanchez-Garcia et al. (2023), "CESPED: a new benchmark for
supervised particle pose estimation in Cryo-EM", doi:10.48550/arXiv.2311.06194 (protocol, metrics, local refinement
from predicted poses); Chheda & Nori (2024), "CryoSphere: SO(3)-equivariant method for cryo-EM pose estimation"
(poster; the equivariance test).

* :class:`TrainConfig`, :func:`train_pose_network` -> :class:`TrainResult` (checkpoint ``.pt`` + resumable state);
* :func:`load_pose_network` -> :class:`PoseNetwork`; :func:`predict_poses` -> :class:`PosePrediction`;
* :func:`deep_prior_assign` (settings :class:`DeepPriorSearch`) -> :class:`DeepPriorAssignment`: MMSE seeded with
  the cells holding 99 % of the predicted mass, prior = the prediction, then a per-particle fit check
  (:func:`fit_zscores`) that sends particles the network got wrong to the global search;
* :func:`pose_error_metrics`, :func:`reprojection_rmse`: MAnE / wMAnE / median / fractions (symmetry-aware),
  reprojection RMSE;
* :mod:`.vocabulary`: the model types, CTF corrections, search methods and tolerances shared with the CLI and the
  protocols.

No pyworkflow here (core rule). Rotations are RELION ``A`` matrices throughout.

The names are loaded on first use (:pep:`562`): ``import bayespose.core.deep.vocabulary`` (the CLI's argument
choices) does not load torch and e3nn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "data": ("inplane_rotation_matrix", "preprocess_images", "rotate_shift_images"),
    "metrics": ("angular_errors_deg", "pose_error_metrics", "reprojection_rmse"),
    "predict": ("PosePrediction", "predict_poses"),
    "prior_refine": ("DeepPriorAssignment", "DeepPriorSearch", "deep_prior_assign", "default_local_range_deg",
                     "fit_zscores", "seed_rotations"),
    "train": ("PoseNetwork", "TrainConfig", "TrainResult", "last_state_path", "load_pose_network",
              "train_pose_network"),
    "vocabulary": ("CTF_CORRECTIONS", "MODEL_TYPES", "NETWORK_PIXEL_RTOL", "CtfCorrection", "ModelType"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["CTF_CORRECTIONS", "CtfCorrection", "DeepPriorAssignment", "DeepPriorSearch", "MODEL_TYPES", "ModelType",
           "NETWORK_PIXEL_RTOL", "PoseNetwork", "PosePrediction", "TrainConfig", "TrainResult", "angular_errors_deg",
           "deep_prior_assign", "default_local_range_deg", "fit_zscores", "inplane_rotation_matrix",
           "last_state_path", "load_pose_network", "pose_error_metrics", "predict_poses", "preprocess_images",
           "reprojection_rmse", "rotate_shift_images", "seed_rotations", "train_pose_network"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from bayespose.core.deep.data import inplane_rotation_matrix, preprocess_images, rotate_shift_images
    from bayespose.core.deep.metrics import angular_errors_deg, pose_error_metrics, reprojection_rmse
    from bayespose.core.deep.predict import PosePrediction, predict_poses
    from bayespose.core.deep.prior_refine import (
        DeepPriorAssignment,
        DeepPriorSearch,
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
    from bayespose.core.deep.vocabulary import (
        CTF_CORRECTIONS,
        MODEL_TYPES,
        NETWORK_PIXEL_RTOL,
        CtfCorrection,
        ModelType,
    )


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
