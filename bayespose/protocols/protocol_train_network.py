"""Scipion protocol ``bayespose - train pose network``: supervised training of a pose-prediction network on aligned
particles (thin wrapper over :func:`bayespose.core.deep.train_pose_network`, the same function as
``bayespose train``).

Steps: ``convertInputStep`` (Scipion particles -> ``extra/train_particles.star``; the optional reference map ->
``extra/reference_map.mrc``), ``trainStep`` (a job, :func:`~bayespose.protocols._common.run_job`, running
``trainJob`` in the form's processes; writes the best-validation checkpoint ``extra/pose_network.pt`` and a
resumable last state next to it; a continued run resumes from it) and ``createOutputStep`` (a
:class:`bayespose.objects.BayesposePoseNetwork` pointing at the checkpoint).
"""

from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.protocols import EMProtocol
from pyworkflow.constants import BETA

from bayespose.convert import particles_from_scipion
from bayespose.core.deep.vocabulary import CTF_CORRECTIONS, DEFAULT_PRETRAIN_STEPS, MODEL_TYPES, TRAINING_DEFAULTS
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.relion_star import read_star, write_star
from bayespose.objects import BayesposePoseNetwork
from bayespose.protocols._common import (
    add_gpu_params,
    add_parallel_params,
    decile_logger,
    describe_particles,
    geometry_errors,
    gpu_device,
    n_threads,
    no_gpu_warnings,
    run_job,
    symmetry_errors,
)

# the engine's codes (bayespose.core.deep.vocabulary) in a fixed order, and the words the form shows for them
MODEL_CODES = tuple(MODEL_TYPES)  # TrainConfig.model, in the order of MODEL_CHOICES
_MODEL_WORDS = {"so3grid": "distribution over rotations (SO(3) grid)", "quaternion": "single pose (quaternion)"}
MODEL_CHOICES = [_MODEL_WORDS[c] for c in MODEL_CODES]
MODEL_SO3GRID, MODEL_QUATERNION = MODEL_CODES.index("so3grid"), MODEL_CODES.index("quaternion")
CTF_CODES = tuple(CTF_CORRECTIONS)  # TrainConfig.ctf_correction, in the order of CTF_CHOICES
CTF_CHOICES = [{"phase_flip": "phase flip", "none": "none"}[c] for c in CTF_CODES]
CTF_PHASE_FLIP, CTF_NONE = CTF_CODES.index("phase_flip"), CTF_CODES.index("none")
MAX_GRID_ORDER = 3

TRAIN_STAR = "train_particles.star"
REFERENCE_MAP = "reference_map.mrc"
CHECKPOINT = "pose_network.pt"
GPU_HELP = ("Run the network (and the MMSE scoring) on the GPU when torch sees a CUDA device; else on the CPU, with "
            "a warning before the run. The results are the same up to float rounding.")


def network_log(protocol):
    """A ``log(message)`` callable writing to the protocol's log."""
    return lambda message: protocol.info(str(message))


def progress_logger(protocol, what: str):
    """``progress(label) -> callback(done, total)`` that logs every 10 % to the protocol's log."""

    def factory(label: str):
        return decile_logger(protocol, lambda done, total: f"{label or what}: {done}/{total}")

    return factory


class ProtBayesposeTrainPoseNetwork(EMProtocol):
    """Train a network that predicts each particle's pose from its image, on particles whose poses are known (a
    3D refinement, or a simulation).

    The default model (Image2Sphere-style) encodes the image, projects its features onto a hemisphere and outputs
    a probability distribution over SO(3) on a HEALPix x in-plane grid through spherical and SO(3) convolutions
    (e3nn); it is trained with cross-entropy on the nearest grid rotation, symmetry mates sharing the target. The
    baseline regresses one unit quaternion. Images are Fourier-cropped to the network box and, by default,
    phase-flipped with their CTF. A fraction of the particles is held out: training stops when their loss no longer
    improves, and the weights of the best validation epoch are kept.

    Output: a pose network (outputModel) for 'predict poses' on new particles with the same box and pixel size,
    e.g. the other half set or a new dataset of the same sample.
    """

    _label = "train pose network"
    _devStatus = BETA
    _references = ["Klee2023", "Chheda2024", "SanchezGarcia2023", "Lian2022"]
    _possibleOutputs = {"outputModel": BayesposePoseNetwork}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        add_gpu_params(form, GPU_HELP)
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      important=True, label="Particles",
                      help="Particles with a 3D projection alignment (e.g. from a RELION / cryoSPARC refinement "
                           "or a simulation): their poses are the training targets. Without an alignment, a "
                           "consensus map is needed (map-only training). The images must be MRC stacks. "
                           "Predictions later need particles with the same box and pixel size.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", allowsNull=True,
                      label="Consensus map (optional)",
                      help="The particles' consensus map (same box, pixel size within 1 %), e.g. the refinement "
                           "that gave their poses. The network is then first trained on unlimited synthetic "
                           "projections of this map, made with the particles' own CTFs, noise spectrum (from their "
                           "background), shifts and normalisation, and fine-tuned on the particles: useful "
                           "networks from hundreds of particles. With a map, the particles need no alignment: a "
                           "map-only network (a fast first guess for new data).")
        form.addParam("pretrainSteps", params.IntParam, default=DEFAULT_PRETRAIN_STEPS,
                      condition="inputVolume", expertLevel=params.LEVEL_ADVANCED,
                      label="Steps on synthetic projections",
                      help="Optimisation steps of the pre-training on projections of the map (0: none).")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point group of the particles in RELION's notation: c1 (none), cN, dN, t, o, i (= i2), "
                           "i1..i4. Symmetry-equivalent poses share the training target and the errors are measured "
                           "to the nearest symmetry mate.")
        form.addParam("modelType", params.EnumParam, choices=MODEL_CHOICES, default=MODEL_SO3GRID,
                      display=params.EnumParam.DISPLAY_HLIST, label="Model",
                      help="distribution over rotations: predicts a full probability distribution over SO(3) on a "
                           "HEALPix x in-plane grid (an Image2Sphere-style head: Klee, Biza, Platt & Walters "
                           "(2023), \"Image to Sphere: learning equivariant features for efficient pose "
                           "prediction\", ICLR, https://doi.org/10.48550/arXiv.2302.13926); its distribution can "
                           "serve as the prior of the MMSE refinement in 'predict poses'. single pose: regression "
                           "of one unit quaternion (the baseline of Lian et al. (2022), \"End-to-end orientation "
                           "estimation from 2D cryo-EM images\", Acta Cryst. D 78, "
                           "https://doi.org/10.1107/S2059798321011761; its 'confidence' is a stand-in, not a "
                           "probability).")
        form.addParam("netBox", params.IntParam, default=32, validators=[params.Positive], label="Network box (px)",
                      help="The images are Fourier-cropped to this box before the network (a multiple of 4, at "
                           "most the particle box): smaller is faster, and the network only needs low resolution to "
                           "find the pose. The effective pixel size is pixel size x particle box / network box.")
        form.addParam("gridOrder", params.IntParam, default=TRAINING_DEFAULTS["grid_order"],
                      expertLevel=params.LEVEL_ADVANCED,
                      label="Output grid (HEALPix order)", condition=f"modelType=={MODEL_SO3GRID}",
                      help="Resolution of the predicted distribution: HEALPix order 0-3 (spacing 60°, 30°, 15°, "
                           "7.5°; 72 x 8^order rotations). The MMSE refinement recovers finer poses from it.")

        form.addSection(label="Training")
        form.addParam("epochs", params.IntParam, default=TRAINING_DEFAULTS["epochs"], validators=[params.Positive],
                      label="Maximum epochs",
                      help="Epochs on the particles, each at least 2048 samples (small sets are passed several "
                           "times per epoch); training may stop earlier, see patience.")
        form.addParam("batchSize", params.IntParam, default=0, label="Batch size",
                      help="Particles per optimisation step; 0 = from the data size (32 below 1000 training "
                           "particles, 64 below 10000, else 128). Larger batches use more (GPU) memory.")
        form.addParam("learningRate", params.FloatParam, default=TRAINING_DEFAULTS["learning_rate"],
                      validators=[params.Positive], label="Learning rate",
                      help="Step size of the AdamW optimiser (fine-tuning after pre-training on the map uses "
                           f"{TRAINING_DEFAULTS['finetune_lr_factor']:g} of it); halved when the validation loss "
                           "stalls for two epochs.")
        form.addParam("valFraction", params.FloatParam, default=0.1, label="Validation fraction",
                      help="Fraction of the particles held out (random, fixed by the seed) to measure the "
                           "validation loss and angular error each epoch, in (0, 1).")
        form.addParam("patience", params.IntParam, default=5, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Early-stopping patience (epochs)",
                      help="Stop when the validation loss has not improved for this many epochs; the weights of "
                           "the best epoch are kept.")
        form.addParam("augment", params.BooleanParam, default=True, expertLevel=params.LEVEL_ADVANCED,
                      label="In-plane augmentation?",
                      help="Rotate the training images in-plane by random angles (and the target poses with "
                           "them), which teaches the network that in-plane rotation only changes psi.")
        form.addParam("ctfCorrection", params.EnumParam, choices=CTF_CHOICES, default=CTF_PHASE_FLIP,
                      expertLevel=params.LEVEL_ADVANCED, label="CTF correction",
                      help="phase flip: flip the phases of the images with their CTF before the network (needs "
                           "particles with CTF; particles without CTF are used as they are). none: raw images.")
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the validation split, the initialisation and the batch order.")

        add_parallel_params(form)

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.trainStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        """Input particles -> extra/train_particles.star; the consensus map -> extra/reference_map.mrc."""
        from bayespose.protocols.protocol_simulate import volume_file

        particles = particles_from_scipion(self.inputParticles.get())
        write_star(self._getExtraPath(TRAIN_STAR), particles)
        self.info(describe_particles(particles, "training particles"))
        if self.hasMap():
            volume = self.inputVolume.get()
            data, _ = read_map(volume_file(volume))
            write_map(self._getExtraPath(REFERENCE_MAP), data, volume.getSamplingRate())

    def trainStep(self):
        """The training, as a job (:func:`run_job`: the form's processes, Scipion's queue)."""
        run_job(self, "trainJob")

    def trainJob(self):
        """Train the network (one call of :func:`train_pose_network`; several processes: DistributedDataParallel,
        the main one writes); a continued run resumes from the last saved epoch."""
        from bayespose.core.deep import last_state_path, train_pose_network

        particles = read_star(self._getExtraPath(TRAIN_STAR))
        volume = read_map(self._getExtraPath(REFERENCE_MAP))[0] if self.hasMap() else None
        config = self.trainConfig(has_ctf=particles.has_ctf)
        checkpoint = self.checkpointPath()
        resume = last_state_path(checkpoint).exists()  # left by an interrupted run that is continued
        self.info(f"training {config.model} on {len(particles)} particles"
                  f"{f' and {config.pretrain_steps} steps on projections of the map' if volume is not None else ''}"
                  f": net box {config.net_box} px, {config.epochs} epochs max, batch "
                  f"{config.batch_size or 'auto'}, lr {config.learning_rate:g}, device {config.device}, "
                  f"{config.threads} thread(s){', resuming' if resume else ''}")
        result = train_pose_network(particles, config, checkpoint, log=network_log(self),
                                    progress=progress_logger(self, "training"), resume=resume, volume=volume)
        self.info(f"best epoch {result.best_epoch} of {len(result.history)}, calibration temperature "
                  f"{result.temperature:.3g}; checkpoint {result.checkpoint}")

    def createOutputStep(self):
        """A BayesposePoseNetwork pointing at the checkpoint, with its metadata."""
        from bayespose.core.deep import load_pose_network

        network = load_pose_network(self.checkpointPath(), device="cpu")
        output = BayesposePoseNetwork(filename=self.checkpointPath())
        output.setInfo(**network_info(network, self.inputParticles.get().getSize()))
        self._defineOutputs(outputModel=output)
        self._defineSourceRelation(self.inputParticles, output)

    # ---------------------------------------------------------------------------------------------- helpers
    def hasMap(self) -> bool:
        """A consensus map was given (train from the map)."""
        return self.inputVolume.get() is not None

    def checkpointPath(self) -> str:
        """extra/pose_network.pt."""
        return self._getExtraPath(CHECKPOINT)

    def trainConfig(self, has_ctf: bool = True):
        """The form as a :class:`bayespose.core.deep.TrainConfig` (same fields as ``bayespose train``)."""
        from bayespose.core.deep import TrainConfig

        ctf = CTF_CODES[self.ctfCorrection.get()] if has_ctf else "none"
        return TrainConfig(model=MODEL_CODES[self.modelType.get()], net_box=self.netBox.get(),
                           epochs=self.epochs.get(), batch_size=self.batchSize.get() or None,
                           pretrain_steps=int(self.pretrainSteps.get() or 0) if self.hasMap() else 0,
                           learning_rate=self.learningRate.get(), val_fraction=self.valFraction.get(),
                           patience=self.patience.get(), symmetry=self.symmetryGroup.get().strip().upper(),
                           grid_order=self.gridOrder.get(), augment=bool(self.augment.get()), ctf_correction=ctf,
                           seed=self.seed.get(), device=gpu_device(self),
                           threads=n_threads(self))

    def history(self) -> list[dict]:
        """The training history stored in the checkpoint (rows: epoch, train_loss, val_loss, val_mean_error_deg,
        val_median_error_deg, seconds)."""
        from bayespose.core.deep import load_pose_network

        return list(load_pose_network(self.checkpointPath(), device="cpu").history)

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        errors = []
        parts = self.inputParticles.get()
        if parts is None:
            return ["Select the input particles."]
        if parts.getSize() == 0:
            errors.append("The input particle set is empty.")
        if not parts.hasAlignmentProj() and not (self.hasMap() and (self.pretrainSteps.get() or 0) > 0):
            errors.append("The input particles have no 3D projection alignment: the network learns from known "
                          "poses. Use particles from a 3D refinement (or a simulation), or give their consensus "
                          "map to train from the map only.")
        if self.hasMap():
            errors += geometry_errors(parts, self.inputVolume.get(), "consensus map", require_pixel_size=False)
            if self.modelType.get() != MODEL_SO3GRID:
                errors.append("Training from the map needs the 'distribution over rotations' model.")
            if (self.pretrainSteps.get() or 0) < 0:
                errors.append("The number of steps on synthetic projections must be >= 0.")
        if (self.batchSize.get() or 0) < 0 or self.batchSize.get() == 1:
            errors.append("The batch size must be 0 (automatic) or at least 2.")
        errors += symmetry_errors(self.symmetryGroup.get() or "")
        dim = parts.getDim()
        if dim is not None and dim[0] and self.netBox.get() and self.netBox.get() > dim[0]:
            errors.append(f"The network box ({self.netBox.get()} px) is larger than the particle box ({dim[0]} px); "
                          "images are only cropped, not padded.")
        if self.netBox.get() is None or self.netBox.get() < 8 or self.netBox.get() % 4:
            errors.append("The network box must be a multiple of 4 and at least 8 px.")
        if not 0 < (self.valFraction.get() or 0) < 1:
            errors.append("The validation fraction must be in (0, 1).")
        if parts.getSize() and parts.getSize() < 4 and parts.hasAlignmentProj():
            errors.append("At least 4 particles are needed (a training and a validation set).")
        if self.modelType.get() == MODEL_SO3GRID and not 0 <= (self.gridOrder.get() or 0) <= MAX_GRID_ORDER:
            errors.append(f"The output grid order must be in 0..{MAX_GRID_ORDER}.")
        return errors

    def _warnings(self):
        warnings = no_gpu_warnings(self, "training will use the CPU (slow for large sets).")
        parts = self.inputParticles.get()
        if parts is not None and self.ctfCorrection.get() == CTF_PHASE_FLIP and not parts.hasCTF():
            warnings.append("The particles have no CTF: they are used without CTF correction.")
        return warnings

    def _summary(self):
        if not hasattr(self, "outputModel"):
            return ["Pose network not ready yet."]
        model = self.outputModel
        kind = dict(zip(MODEL_CODES, MODEL_CHOICES)).get(model.getModelType(), model.getModelType())
        lines = [f"{kind} network trained on {model.getNumberOfParticles()} particles "
                 f"({model.getBox()} px, {model.getSamplingRate():.3f} Å/px, network box {model.getNetBox()} px, "
                 f"symmetry {model.getSymmetry()})"]
        if model.getBestEpoch() is not None:
            error = model.getValMedianErrorDeg()
            lines.append(f"best epoch {model.getBestEpoch()}"
                         + (f": validation median angular error {error:.2f}°" if error is not None else ""))
        return lines

    def _methods(self):
        if not hasattr(self, "outputModel"):
            return []
        model = self.outputModel
        head = ("an Image2Sphere-style SO(3) grid head [Klee2023] (HEALPix order "
                f"{model.getGridOrder()}) trained with cross-entropy" if model.getModelType() == "so3grid"
                else "a unit-quaternion regression head [Lian2022]")
        data = (f"the {model.getNumberOfParticles()} aligned particles of {self.getObjectTag('inputParticles')}"
                f" (images Fourier-cropped to {model.getNetBox()} px, {100 * self.valFraction.get():g} % held out "
                "for validation, early stopping and the calibration of its confidence)")
        if self.hasMap():
            data = (f"{self.pretrainSteps.get()} steps of synthetic projections of "
                    f"{self.getObjectTag('inputVolume')} made with the CTFs, noise spectrum and shifts of the "
                    f"particles, then fine-tuned on {data}" if self.inputParticles.get().hasAlignmentProj() else
                    f"synthetic projections of {self.getObjectTag('inputVolume')} made with the CTFs, noise "
                    f"spectrum and shifts of the particles of {self.getObjectTag('inputParticles')} (map only)")
        return [f"A pose-prediction network with {head} was trained with bayespose on {data}, giving "
                f"{self.getObjectTag('outputModel')}."]


def network_info(network, n_particles: int | None = None) -> dict:
    """The :class:`BayesposePoseNetwork` attributes of a loaded :class:`bayespose.core.deep.PoseNetwork`."""
    history = list(network.history or [])
    best_epoch = network.metadata.get("best_epoch") if isinstance(network.metadata, dict) else None
    if best_epoch is None and history:
        valid = [row for row in history if row.get("val_loss") is not None]
        best_epoch = min(valid, key=lambda row: row["val_loss"])["epoch"] if valid else history[-1]["epoch"]
    best = next((row for row in history if row.get("epoch") == best_epoch), None)
    median = best.get("val_median_error_deg") if best else None
    info = dict(modelType=str(network.config.model), box=int(network.box), pixelSize=float(network.pixel_size),
                netBox=int(network.config.net_box), symmetry=str(network.symmetry).upper(),
                gridOrder=int(network.grid_order) if network.grid_order is not None else None,
                bestEpoch=int(best_epoch) if best_epoch is not None else None,
                valMedianErrorDeg=float(median) if median is not None else None)
    if n_particles is not None:
        info["nParticles"] = int(n_particles)
    return info
