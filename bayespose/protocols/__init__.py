"""Scipion protocols of bayespose (thin: validate, convert, call one core function per step, register outputs)."""

from bayespose.protocols.protocol_assign_poses import ProtBayesposeAssignPoses
from bayespose.protocols.protocol_import_cryosparc import ProtBayesposeImportCryosparc
from bayespose.protocols.protocol_predict_poses import ProtBayesposePredictPoses
from bayespose.protocols.protocol_refine import ProtBayesposeRefine
from bayespose.protocols.protocol_simulate import ProtBayesposeSimulate
from bayespose.protocols.protocol_train_network import ProtBayesposeTrainPoseNetwork

__all__ = [
    "ProtBayesposeAssignPoses",
    "ProtBayesposeImportCryosparc",
    "ProtBayesposePredictPoses",
    "ProtBayesposeRefine",
    "ProtBayesposeSimulate",
    "ProtBayesposeTrainPoseNetwork",
]
