"""Scipion protocol ``bayespose - predict poses``: the poses of particles from a trained pose network, optionally
refined by MMSE with the network's predicted distribution as the prior (thin wrapper over
:func:`bayespose.core.deep.blocks.predict_in_blocks`, the function of ``bayespose predict``: the network runs once
per particle, block by block, and each block's distribution seeds its deep-prior MMSE at once, so memory stays flat
in the number of particles).

Steps: ``convertInputStep`` (Scipion particles -> ``extra/input_particles.star``; the reference volume ->
``extra/reference.mrc`` when refining), ``predictStep`` (writes ``extra/prediction.npz`` and
``extra/predicted_particles.star``; with a reference also the deep-prior MMSE: ``extra/assignment.npz`` in the
format of 'assign poses (MMSE)' and ``extra/refined_particles.star``) and ``createOutputStep`` (the input particles
with the predicted or refined projection alignment and ``_bp...`` attributes).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles
from pwem.protocols import EMProtocol
from pyworkflow.constants import BETA

from bayespose.convert import SCIPION_ID, particles_from_scipion
from bayespose.core.deep.vocabulary import (
    AUTO_FALLBACK_DEFICIT,
    AUTO_FALLBACK_Z,
    DEFAULT_MAX_SEED_CELLS,
    DEFAULT_SEED_MASS,
    NETWORK_PIXEL_RTOL,
    PRIOR_INPLANE_TURNS,
)
from bayespose.core.geometry.rotations import matrix_to_euler
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.io.assignment import load_assignment, save_assignment
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.prediction import load_prediction, save_prediction
from bayespose.core.io.relion_star import read_star, write_star
from bayespose.core.results import ANGLE_LABELS, ParticleResults, scipion_attributes
from bayespose.protocols._common import (
    add_gpu_params,
    define_output_particles,
    describe_particles,
    geometry_errors,
    gpu_device,
    n_threads,
    no_gpu_warnings,
    output_particles,
)
from bayespose.protocols.protocol_assign_poses import angle_to_input_deg, assignment_attributes
from bayespose.protocols.protocol_simulate import volume_file
from bayespose.protocols.protocol_train_network import GPU_HELP, progress_logger

INPUT_STAR = "input_particles.star"
REFERENCE_MAP = "reference.mrc"
PREDICTION_NPZ = "prediction.npz"
PREDICTED_STAR = "predicted_particles.star"
RESULT_NPZ = "assignment.npz"
REFINED_STAR = "refined_particles.star"


def prediction_attributes(data: dict) -> dict[str, np.ndarray]:
    """The ``_bp`` attributes (names without the prefix) of a prediction (:func:`load_prediction`'s dict): the
    schema's deep statistics (DeepConfidence, DeepTopProbability; :func:`scipion_attributes`), DeepRot/Tilt/Psi
    (the mode) and DeepTop2AngleRot/Tilt/Psi (the second most probable cell; RELION degrees) and, when the input
    was aligned, DeepAngleToInputDeg (symmetry-aware angle between the mode and the input pose, degrees)."""
    attrs = scipion_attributes(data["results"].statistic_columns())
    poses = {"Deep": data["rotations"]}
    if data["top_rotations"].shape[1] > 1:
        poses["DeepTop2Angle"] = data["top_rotations"][:, 1]
    for prefix, rotations in poses.items():
        angles = matrix_to_euler(rotations)
        for col, label in enumerate(ANGLE_LABELS):
            attrs[f"{prefix}{label}"] = angles[:, col]
    if data["input_rotations"] is not None:
        attrs["DeepAngleToInputDeg"] = symmetric_geodesic_distance_deg(
            data["rotations"], data["input_rotations"], symmetry_group(data["symmetry"]))
    return attrs


class ProtBayesposePredictPoses(EMProtocol):
    """Predict the poses of particles with a trained pose network ('train pose network'), and optionally refine them
    by Bayesian (MMSE) assignment against a reference map with the network's predicted distribution as the prior.

    Without a reference the output alignment is the most probable pose of the predicted distribution, with its
    confidence (the probability mass near it). With a reference, every particle's posterior is computed on a local
    grid around its top-K predicted poses, with the predicted distribution as the rotation prior, and the MMSE pose
    becomes the alignment: network speed, Bayesian accuracy and uncertainty. The particles need the network's box
    and pixel size (within 0.1 %, ``NETWORK_PIXEL_RTOL``).
    """

    _label = "predict poses"
    _devStatus = BETA
    _references = ["Klee2023", "Lian2022", "Xu2026", "SanchezGarcia2023"]
    _possibleOutputs = {"outputParticles": SetOfParticles}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        add_gpu_params(form, GPU_HELP)
        form.addSection(label="Input")
        form.addParam("inputModel", params.PointerParam, pointerClass="BayesposePoseNetwork", important=True,
                      label="Pose network",
                      help="A network from 'bayespose - train pose network'. Its box, pixel size and symmetry "
                           "are shown in the summary of that protocol.")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Particles",
                      help=f"Particles to predict, with the network's box and pixel size (within "
                           f"{100 * NETWORK_PIXEL_RTOL:g} %). Their "
                           "alignment, if any, is only used to report the angle between the predicted and the "
                           "input poses (e.g. against a refinement or a simulation's ground truth).")
        form.addParam("topK", params.IntParam, default=8, validators=[params.Positive], label="Top-K poses",
                      help="Number of most probable poses of each particle's predicted distribution that are kept "
                           "(and searched around by the MMSE refinement). More = safer against multi-modal "
                           "predictions, slower refinement.")

        form.addSection(label="MMSE refinement")
        form.addParam("doRefine", params.BooleanParam, default=False, label="Refine with a reference map?",
                      help="Yes: deep-prior MMSE: the MMSE engine searches, coarse to fine, only where the network "
                           "puts its probability (the cells holding the seed mass), with the predicted distribution "
                           "as the prior, and checks each particle's fit (those that fit badly get the global "
                           "search); the output poses are the MMSE poses with their uncertainty "
                           "(_bpExpectedErrorDeg, _bpMaxProb, ...). The network then averages "
                           f"{PRIOR_INPLANE_TURNS} in-plane turns of each image instead of 8 (the search decides "
                           "the pose: the same accuracy at a third of the network's time), once per particle, block "
                           "by block. No: the network's most probable pose.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", condition="doRefine",
                      allowsNull=True, label="Reference map",
                      help="Map with the particles' box and pixel size (within 1 %); its intensity scale is "
                           "fitted to the particles.")
        form.addParam("localRange", params.FloatParam, default=0.0, condition="doRefine",
                      expertLevel=params.LEVEL_ADVANCED, label="Local range (°)",
                      help="Half-width of the local grid around each top-K pose, degrees; 0 = the engine's "
                           "default (about the spacing of the network's output grid).")
        form.addParam("shiftRange", params.FloatParam, default=3.0, condition="doRefine",
                      expertLevel=params.LEVEL_ADVANCED, label="Shift search range (px)",
                      help="Candidate origins within this radius (pixels) of the input origin.")
        form.addParam("shiftStep", params.FloatParam, default=1.0, condition="doRefine",
                      expertLevel=params.LEVEL_ADVANCED, label="Shift step (px)",
                      help="Spacing of the candidate origins (pixels); the MMSE shift is the posterior mean.")
        form.addParam("maxResolution", params.FloatParam, default=0.0, condition="doRefine",
                      expertLevel=params.LEVEL_ADVANCED, label="Maximum resolution (Å)",
                      help="Highest resolution used in the likelihood, in Å; 0 = Nyquist.")
        form.addParam("seedMass", params.FloatParam, default=DEFAULT_SEED_MASS, condition="doRefine",
                      expertLevel=params.LEVEL_ADVANCED, label="Searched fraction of the predicted probability",
                      help="The MMSE search starts from the most probable cells of the network's prediction that "
                           f"together hold this fraction of its probability (at most {DEFAULT_MAX_SEED_CELLS} "
                           "cells), so uncertain "
                           "particles get wider searches; 0 = only the top-K predicted poses.")
        form.addParam("doFallback", params.BooleanParam, default=True, condition="doRefine",
                      label="Global search for poorly fitting particles?",
                      help="Yes: after the deep-prior MMSE, each particle's best searched pose is checked against "
                           "the data (fit z-score: the log-likelihood gain of that pose minus what the true pose "
                           "would give, in standard deviations; ~N(0, 1) at the true pose). Particles below the "
                           "threshold — typically a network that was confidently wrong, e.g. a view turned by "
                           "180° — are re-assigned by the global search (uniform prior). No: keep every "
                           "deep-prior result (faster, but the network's mistakes stay).")
        form.addParam("fallbackZ", params.FloatParam, default=AUTO_FALLBACK_Z, condition="doRefine and doFallback",
                      expertLevel=params.LEVEL_ADVANCED, label="Fallback threshold (fit z-score)",
                      help="Particles whose fit z-score is below this value are re-assigned by the global "
                           "search (the z-score is credited with the loss of a pose half a grid step off). "
                           f"{AUTO_FALLBACK_Z:g} (the default) was measured on simulated data to reach the global "
                           "search's accuracy with about a quarter of its scored rotations; higher = more particles "
                           "fall back (safer, slower).")
        form.addParam("fallbackDeficit", params.FloatParam, default=AUTO_FALLBACK_DEFICIT,
                      condition="doRefine and doFallback", expertLevel=params.LEVEL_ADVANCED,
                      label="Fallback deficit (fraction of the signal)",
                      help="A particle below the z threshold is re-assigned only if its best pose also leaves more "
                           "than this fraction of its expected signal energy unexplained. At high SNR a small "
                           "mismatch between the map and the data (scale, interpolation) alone makes the z-score "
                           "significant for right poses, while a wrong pose (e.g. a 180° flip) leaves about half "
                           "of the signal or more unexplained; measured on relion_project particles, right poses "
                           f"stayed below 0.46 and wrong ones above 0.69. {AUTO_FALLBACK_DEFICIT:g} (default); "
                           "0 = the z-score alone.")

        form.addParallelSection(threads=2, mpi=0)

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.predictStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        """Input particles -> extra/input_particles.star; reference -> extra/reference.mrc (when refining)."""
        particles = particles_from_scipion(self.inputParticles.get())
        write_star(self._getExtraPath(INPUT_STAR), particles)
        if self.refines():
            volume = self.inputVolume.get()
            data, _ = read_map(volume_file(volume))
            write_map(self._getExtraPath(REFERENCE_MAP), data, volume.getSamplingRate())
        self.info(f"{describe_particles(particles)}, input alignment: "
                  f"{'yes' if particles.has_alignment else 'no'}")

    def predictStep(self):
        """The network's prediction of every particle and, with a reference, the deep-prior MMSE, block by block
        (one call of :func:`predict_in_blocks`; with a reference the network makes the prior's
        PRIOR_INPLANE_TURNS in-plane turns: the MMSE search decides the pose)."""
        from bayespose.core.deep import DeepPriorSearch
        from bayespose.core.deep.blocks import concatenate_assignments, concatenate_predictions, predict_in_blocks

        self._setThreads()
        particles = read_star(self._getExtraPath(INPUT_STAR))
        network = self.loadNetwork()
        symmetry = str(network.symmetry).upper()
        volume = search = config = None
        if self.refines():
            volume, _ = read_map(self._getExtraPath(REFERENCE_MAP))
            search = self.poseSearch(symmetry)
            local, seed_mass = self.localRange.get(), self.seedMass.get()
            config = DeepPriorSearch(seed_mass=seed_mass if seed_mass and seed_mass > 0 else None,
                                     local_range_deg=local if local and local > 0 else None,
                                     fallback_z=self.fallbackZ.get() if self.doFallback.get() else None,
                                     fallback_deficit=self.fallbackDeficit.get())
        label = "refining" if volume is not None else "predicting"
        blocks = list(predict_in_blocks(network, particles, volume, search, config, top_k=self.topK.get(),
                                        device=gpu_device(self), progress=progress_logger(self, label)(label)))
        prediction = concatenate_predictions([block.prediction for block in blocks])
        ids = particles.extra.get(SCIPION_ID)
        save_prediction(self._getExtraPath(PREDICTION_NPZ), prediction, particles, symmetry, ids=ids)
        write_star(self._getExtraPath(PREDICTED_STAR), prediction.to_particle_set(particles))
        self.info(f"predicted {len(particles)} particles; median confidence {np.median(prediction.confidence):.3f}")
        if volume is None:
            return
        result = concatenate_assignments([block.assignment for block in blocks])
        save_assignment(self._getExtraPath(RESULT_NPZ), result, "mmse", search.symmetry, ids=ids,
                        input_rotations=particles.rotations)
        write_star(self._getExtraPath(REFINED_STAR), result.to_particle_set(particles, "mmse"))
        self.info(f"deep-prior MMSE: {result.n_rotations} rotations x {result.n_shifts} shifts per particle on the "
                  f"first grid; median expected error {np.median(result.expected_error_deg):.2f}°; "
                  f"{result.timings.get('fallback_particles', 0)} particles re-assigned by the global search; "
                  f"{result.timings.get('scored_rotations_per_particle', 0.0):.0f} rotations scored per particle; "
                  f"{result.timings.get('total_s', 0.0):.1f} s")

    def createOutputStep(self):
        """The input particles with the predicted (or MMSE) poses and ``_bp`` attributes."""
        particles = read_star(self._getExtraPath(INPUT_STAR))
        prediction = load_prediction(self._getExtraPath(PREDICTION_NPZ))
        attributes = prediction_attributes(prediction)
        rotations, origins = prediction["rotations"], particles.origins_A
        if self.refines():
            data = load_assignment(self._getExtraPath(RESULT_NPZ))
            attributes.update(assignment_attributes(data))
            # the fit check of deep_prior_assign (DeepFitZ, DeepFallback)
            refined = ParticleResults.from_star_columns(read_star(self._getExtraPath(REFINED_STAR)).extra)
            check = ParticleResults(deep_fit_z=refined.deep_fit_z, deep_fallback=refined.deep_fallback)
            attributes.update(scipion_attributes(check.statistic_columns()))
            rotations, origins = data["mmse_rotations"], data["mmse_origins_A"]
            attributes["DeepToMmseDeg"] = symmetric_geodesic_distance_deg(
                prediction["rotations"], rotations, symmetry_group(prediction["symmetry"]))
        poses = replace(particles, rotations=rotations, origins_A=origins)
        output = output_particles(self, poses, prediction["scipion_id"], attributes)
        define_output_particles(self, output)
        self._defineSourceRelation(self.inputModel, output)
        if self.refines():
            self._defineSourceRelation(self.inputVolume, output)

    # ---------------------------------------------------------------------------------------------- helpers
    def refines(self) -> bool:
        """True when the deep-prior MMSE refinement runs (a reference map is selected)."""
        return bool(self.doRefine.get()) and self.inputVolume.get() is not None

    def loadNetwork(self, device: str | None = None):
        """The input model's :class:`bayespose.core.deep.PoseNetwork` (on ``device``, default the protocol's)."""
        from bayespose.core.deep import load_pose_network

        return load_pose_network(self.inputModel.get().getFileName(), device=device or gpu_device(self))

    def poseSearch(self, symmetry: str):
        """The form's refinement settings as a :class:`PoseSearch` (shifts px, resolution Å)."""
        from bayespose.core.assign import PoseSearch

        max_res = self.maxResolution.get()
        return PoseSearch(max_resolution_A=max_res if max_res and max_res > 0 else None,
                          shift_range_px=self.shiftRange.get(), shift_step_px=self.shiftStep.get(),
                          symmetry=symmetry, device=gpu_device(self), threads=self._threads())

    def _threads(self) -> int:
        return n_threads(self)

    def _setThreads(self) -> None:
        import torch

        torch.set_num_threads(self._threads())

    def particleDistribution(self, row: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Recompute the predicted distribution of the particle in row ``row`` (0-based, order of the input star):
        ``(rotations (K, 3, 3), probabilities (K,), grid order or None)`` — the whole output grid for the so3grid
        model, the top-K poses for the quaternion model; with the in-plane turns of the stored prediction (the
        prior's PRIOR_INPLANE_TURNS when the run refined)."""
        from bayespose.core.deep import predict_poses
        from bayespose.core.deep.predict import distribution_on_grid
        from bayespose.core.geometry.grids import healpix_grid

        particles = read_star(self._getExtraPath(INPUT_STAR))
        if not 0 <= row < len(particles):
            raise ValueError(f"particle row {row} is out of range (the run has {len(particles)} particles)")
        prediction = predict_poses(self.loadNetwork("cpu"), particles.subset([row]), top_k=self.topK.get(),
                                   device="cpu", turns=PRIOR_INPLANE_TURNS if self.refines() else None)
        logp = None if prediction.log_probabilities is None else prediction.log_probabilities[0]
        grid = healpix_grid(prediction.grid_order).rotations if logp is not None else None
        rotations, probabilities = distribution_on_grid(logp, grid, prediction.top_rotations[0],
                                                        prediction.top_probabilities[0])
        return rotations, probabilities, prediction.grid_order

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        errors = []
        model, parts = self.inputModel.get(), self.inputParticles.get()
        if model is None or parts is None:
            return ["Select the pose network and the particles."]
        if not model.getFileName() or not os.path.isfile(model.getFileName()):
            errors.append(f"The network checkpoint {model.getFileName()} does not exist.")
        if parts.getSize() == 0:
            errors.append("The input particle set is empty.")
        pdim, p_px = parts.getDim(), parts.getSamplingRate()
        if model.getBox() and pdim is not None and pdim[0] != model.getBox():
            errors.append(f"The network was trained on {model.getBox()} px particles but these have {pdim[0]} px; "
                          "re-extract or resize them.")
        if model.getSamplingRate() and p_px and abs(model.getSamplingRate() - p_px) > (
                NETWORK_PIXEL_RTOL * model.getSamplingRate()):
            errors.append(f"The network was trained at {model.getSamplingRate():.4f} Å/px but the particles have "
                          f"{p_px:.4f} Å/px (more than {100 * NETWORK_PIXEL_RTOL:g} % apart): the network would "
                          "see the molecule at another "
                          "magnification. Rescale the particles.")
        if self.doRefine.get():
            errors += self._validateVolume(parts)
        return errors

    def _validateVolume(self, parts) -> list[str]:
        volume = self.inputVolume.get()
        if volume is None:
            return ["Select the reference map for the MMSE refinement (or set 'Refine with a reference map?' to "
                    "No)."]
        errors = geometry_errors(parts, volume, "reference map", require_pixel_size=False)
        if not (self.shiftStep.get() or 0) > 0:
            errors.append("The shift step must be > 0 pixels.")
        if (self.shiftRange.get() or 0) < 0:
            errors.append("The shift search range must be >= 0 pixels.")
        if not 0 <= (self.seedMass.get() or 0) <= 1:
            errors.append("The searched fraction of the predicted probability must be in [0, 1] (0 = top-K).")
        if self.doFallback.get() and not 0 <= (self.fallbackDeficit.get() or 0) < 2:
            errors.append("The fallback deficit is a fraction of the signal energy in [0, 2) (0 = the z-score "
                          "alone).")
        return errors

    def _warnings(self):
        warnings = no_gpu_warnings(self)
        parts = self.inputParticles.get()
        if self.doRefine.get() and parts is not None and not parts.hasCTF():
            warnings.append("The particles have no CTF: the MMSE refinement scores them without CTF.")
        return warnings

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output particles not ready yet."]
        data = load_prediction(self._getExtraPath(PREDICTION_NPZ))
        n = len(data["confidence"])
        lines = [f"{n} particles predicted by {self.getObjectTag('inputModel')} (top {self.topK.get()}); median "
                 f"confidence {np.median(data['confidence']):.3f}"]
        attrs = prediction_attributes(data)
        if "DeepAngleToInputDeg" in attrs:
            lines.append(f"network vs input poses: median angle {np.median(attrs['DeepAngleToInputDeg']):.2f}° "
                         f"(symmetry {data['symmetry']})")
        if self.refines():
            result = load_assignment(self._getExtraPath(RESULT_NPZ))
            lines.append(f"deep-prior MMSE: median expected error {np.median(result['expected_error_deg']):.2f}°, "
                         f"median pmax {np.median(result['pmax']):.3f}")
            if result["input_rotations"] is not None:
                lines.append(f"MMSE vs input poses: median angle "
                             f"{np.median(angle_to_input_deg(result)):.2f}°")
        return lines

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        model = self.inputModel.get()
        cite = "[Lian2022]" if model is not None and model.getModelType() == "quaternion" else "[Klee2023]"
        text = (f"The poses of {self.outputParticles.getSize()} particles of {self.getObjectTag('inputParticles')} "
                f"were predicted with the pose network {self.getObjectTag('inputModel')} of bayespose {cite}")
        if self.refines():
            text += (f" and refined against {self.getObjectTag('inputVolume')} by Bayesian MMSE assignment "
                     "[Xu2026] on a local grid around the top "
                     f"{self.topK.get()} predicted poses, with the predicted distribution as the rotation prior")
        return [text + f", giving {self.getObjectTag('outputParticles')}."]
