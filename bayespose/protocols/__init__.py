"""Scipion protocols of bayespose (thin: validate, convert, call one core function per step, register outputs)."""

from .protocol_import_cryosparc import ProtBayesposeImportCryosparc
from .protocol_simulate import ProtBayesposeSimulate
from .protocol_assign_poses import ProtBayesposeAssignPoses
from .protocol_refine import ProtBayesposeRefine
from .protocol_train_network import ProtBayesposeTrainPoseNetwork
from .protocol_predict_poses import ProtBayesposePredictPoses
