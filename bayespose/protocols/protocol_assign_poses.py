"""Scipion protocol ``bayespose - assign poses (MMSE)``: Bayesian pose assignment of particles against a reference
map (thin wrapper over :func:`bayespose.core.assign.assign_poses`, the same function as ``bayespose assign``).

Steps: ``convertInputStep`` (Scipion particles -> ``extra/input_particles.star``; volume, times the mask when one is
given -> ``extra/reference.mrc``), ``assignStep`` (a job, :func:`~bayespose.protocols._common.run_job`: the form's
processes and threads, Scipion's queue; each process runs ``assignJob`` on its share: posterior over rotations and
shifts; writes
``extra/assignment.npz`` (:mod:`bayespose.core.io.assignment`) and ``extra/assigned_particles.star``) and
``createOutputStep`` (the input particles with the chosen estimator's projection alignment and ``_bp...`` attributes:
the result schema's (:func:`bayespose.core.results.scipion_attributes`) and ``_bpAngleToInputDeg``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles
from pwem.protocols import ProtRefine3D
from pyworkflow.constants import BETA

from bayespose.convert import SCIPION_ID, particles_from_scipion
from bayespose.core import parallel
from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.geometry.priors import PriorSpec, prior_from_spec
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.io.assignment import load_assignment, save_assignment
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.relion_star import read_star, write_star
from bayespose.core.results import ESTIMATORS, ParticleResults, scipion_attributes
from bayespose.protocols._common import (
    BAYES_PAPER,
    add_gpu_params,
    add_parallel_params,
    decile_logger,
    define_output_particles,
    describe_particles,
    geometry_errors,
    gpu_device,
    n_threads,
    no_gpu_warnings,
    output_particles,
    run_job,
    symmetry_errors,
)
from bayespose.protocols.protocol_simulate import volume_file

ESTIMATOR_CHOICES = ["MMSE", "MAP", "MLE"]
PRIOR_CHOICES = ["uniform", "isotropic Gaussian (IGSO3)", "preferred orientation", "local around input poses"]
PRIOR_UNIFORM, PRIOR_IGSO3, PRIOR_PREFERRED, PRIOR_LOCAL = range(4)
INPUT_STAR = "input_particles.star"
REFERENCE_MAP = "reference.mrc"
RESULT_NPZ = "assignment.npz"
OUTPUT_STAR = "assigned_particles.star"


class ProtBayesposeAssignPoses(ProtRefine3D):
    """Bayesian pose assignment: for every particle, the posterior over rotations and shifts against a reference
    map, and from it the MMSE pose (or the MAP / MLE pose) with its uncertainty.

    The likelihood is the Gaussian model with each particle's CTF, noise power per resolution shell estimated from
    the particles' background, and the reference scale fitted to the data. The global search scores a HEALPix x
    in-plane grid and refines the significant cells coarse-to-fine; the local mode searches a small grid around
    each particle's input pose with a Gaussian prior centred on it. Output: the input particles with the chosen
    estimator's projection alignment and per-particle attributes (_bpMaxProb, _bpExpectedErrorDeg,
    _bpNrSignificant, _bpConcentration, _bpLogEvidence, the MMSE/MAP/MLE angles, and _bpAngleToInputDeg when the
    input was aligned) that can be used to sort and filter particles.
    """

    _label = "assign poses (MMSE)"
    _devStatus = BETA
    _references = ["Xu2026"]  # pyworkflow: _citations() is a method that returns _references
    _possibleOutputs = {"outputParticles": SetOfParticles}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        add_gpu_params(form, "Score on the GPU when torch sees a CUDA device (else the CPU is used, with a warning "
                             "before the run). The results are the same; the GPU is faster for large grids.")

        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF (e.g. imported from RELION or cryoSPARC). Their alignment, if any, "
                           "is only used by the local prior and to report the change of pose. The image stacks "
                           "must be MRC files (.mrcs / .mrc).")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Reference map",
                      help="The reference map (MRC), with the same box and pixel size as the particles (within "
                           "1 %). Its intensity scale does not matter: it is fitted to the particles.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Mask (optional)",
                      help="A (soft) mask with the map's box. When given, the map is multiplied by it before "
                           "scoring, so only the masked region is compared with the particles (e.g. to drop "
                           "flexible parts or solvent noise). Leave empty to use the whole map.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point group of the map in RELION's notation: c1 (none), cN, dN, t, o, i (= i2), "
                           "i1..i4. With symmetry, each grid rotation is folded to the symmetry mate nearest the MAP "
                           "pose before the MMSE average, so the symmetric copies do not cancel out.")
        form.addParam("ignoreCtf", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Ignore the CTF?",
                      help="No (default): the particles must have CTF parameters, which the likelihood uses. Yes: "
                           "score without any CTF (only for simulated particles without CTF or images that are "
                           "already CTF-corrected); particles without CTF are then accepted.")

        form.addSection(label="Posterior")
        form.addParam("estimator", params.EnumParam, choices=ESTIMATOR_CHOICES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Pose estimator",
                      help="Which pose becomes the particles' alignment. MMSE (default): the posterior mean "
                           "rotation projected onto SO(3) and the posterior mean shift; it minimises the expected "
                           "squared error and is the most accurate at low SNR. MAP: the single most probable pose "
                           "(likelihood x prior). MLE: the best-scoring pose (likelihood only, like a hard "
                           "assignment). The angles of all three are stored as attributes anyway.")
        form.addParam("prior", params.EnumParam, choices=PRIOR_CHOICES, default=PRIOR_UNIFORM,
                      label="Rotation prior",
                      help="uniform: every orientation equally likely (global search). isotropic Gaussian: "
                           "orientations concentrated around the reference's identity pose (rot = tilt = psi = 0), "
                           "scale eta. preferred orientation: a fraction of the views near one viewing direction "
                           "(von Mises-Fisher), uniform in-plane. local: a Gaussian around each particle's input "
                           "pose and a local grid around it (needs aligned particles; like a local refinement).")
        form.addParam("igso3Eta", params.FloatParam, default=0.3, condition=f"prior=={PRIOR_IGSO3}",
                      label="Scale eta (rad)",
                      help="Scale of the isotropic Gaussian on SO(3) in radians (the distribution of appendix F1 "
                           f"of {BAYES_PAPER}): the angle away from the identity has standard deviation ~0.67 eta "
                           "(eta = 0.1 ~ 3.8°).")
        line = form.addLine("Preferred view", condition=f"prior=={PRIOR_PREFERRED}",
                            help="Viewing direction of the peak (RELION rot and tilt, degrees), its concentration "
                                 "kappa (von Mises-Fisher; angular width ~ 1/sqrt(kappa) rad) and the fraction of "
                                 "the views in the peak (the rest uniform).")
        line.addParam("preferredRot", params.FloatParam, default=0.0, label="rot (°)",
                      help="RELION rot angle of the preferred viewing direction, degrees.")
        line.addParam("preferredTilt", params.FloatParam, default=0.0, label="tilt (°)",
                      help="RELION tilt angle of the preferred viewing direction, degrees (0 = top view).")
        line.addParam("preferredKappa", params.FloatParam, default=20.0, label="kappa",
                      help="Concentration of the peak (> 0); kappa = 20 ~ 13° wide.")
        line.addParam("preferredFraction", params.FloatParam, default=0.8, label="fraction",
                      help="Fraction of the views in the peak, in (0, 1].")
        form.addParam("localRange", params.FloatParam, default=10.0, condition=f"prior=={PRIOR_LOCAL}",
                      label="Local search range (°)",
                      help="Rotations within this angle of each particle's input pose are searched; the prior is "
                           "a Gaussian around the input pose with eta = range / 3 (~97 % of its mass inside the "
                           "range). Shifts are searched around the input origins.")
        form.addParam("localStep", params.FloatParam, default=0.0, condition=f"prior=={PRIOR_LOCAL}",
                      expertLevel=params.LEVEL_ADVANCED, label="Local grid step (°)",
                      help="Step of the local grid in degrees; 0 = range / 4.")

        form.addSection(label="Sampling")
        form.addParam("healpixOrder", params.IntParam, default=2, label="Angular sampling (HEALPix order)",
                      help="Global grid: HEALPix viewing directions x in-plane angles. Order 0: 60°, 1: 30°, "
                           "2: 15° (4608 rotations), 3: 7.5° (36864), 4: 3.75° (294912). The refinement levels "
                           "below halve the spacing in the significant regions, so order 2 with 2 levels reaches "
                           "3.75° at a fraction of the cost. Not used by the local prior.")
        form.addParam("refineLevels", params.IntParam, default=PoseSearch.refine_levels, label="Refinement levels",
                      help="Coarse-to-fine: how many times the grid cells holding 99.9 % of each particle's "
                           "posterior are split into 8 (the spacing halves each time; like RELION's "
                           "oversampling), together with a ring of finer cells around the most probable ones "
                           "(the true pose may lie just across a cell's border). 0 = the coarse grid only. Final "
                           "spacing = 60° / 2^(order + levels): 3 levels from order 2 = 1.9°; 4 levels (0.94°) "
                           "are worth their time at SNR >= 0.1.")
        form.addParam("shiftRange", params.FloatParam, default=3.0, label="Shift search range (px)",
                      help="Candidate origins lie within this radius (pixels) of the input origin (local prior) "
                           "or of the box centre (global search).")
        form.addParam("shiftStep", params.FloatParam, default=1.0, label="Shift step (px)",
                      help="Spacing of the candidate origins (pixels). The MMSE shift is the posterior mean, so it "
                           "can fall between grid points.")
        form.addParam("maxResolution", params.FloatParam, default=0.0, label="Maximum resolution (Å)",
                      help="Highest resolution used in the likelihood, in Å. 0 = up to Nyquist (2 x pixel size). "
                           "Each stage of the grid additionally uses only the resolution its spacing can "
                           "resolve; set a limit (e.g. 8 Å) to keep noise or over-fitted high-resolution detail "
                           "of the map out of the posterior.")

        add_parallel_params(form)

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.assignStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        """Input particles -> extra/input_particles.star; map (x mask) -> extra/reference.mrc."""
        particles = particles_from_scipion(self.inputParticles.get())
        if self.ignoreCtf.get():
            particles = replace(particles, ctf=None)
        write_star(self._getExtraPath(INPUT_STAR), particles)
        volume = self.inputVolume.get()
        data, _ = read_map(volume_file(volume))
        if self.inputMask.get() is not None:
            mask, _ = read_map(volume_file(self.inputMask.get()))
            data = data * mask
            self.info(f"map multiplied by the mask {volume_file(self.inputMask.get())}")
        write_map(self._getExtraPath(REFERENCE_MAP), data, volume.getSamplingRate())
        self.info(f"{describe_particles(particles)}, input alignment: "
                  f"{'yes' if particles.has_alignment else 'no'}")

    def assignStep(self):
        """The posterior of every particle, as a job (:func:`run_job`: the form's processes, Scipion's queue)."""
        run_job(self, "assignJob")

    def assignJob(self):
        """One call of :func:`assign_poses` (in each process of the job: its share of the particles; the main
        process writes the results)."""
        particles = read_star(self._getExtraPath(INPUT_STAR))
        volume, _ = read_map(self._getExtraPath(REFERENCE_MAP))
        spec = self._priorSpec(particles.rotations)
        search = self.poseSearch(spec.local_range_deg)
        self.info(f"prior: {spec.prior.describe()}; search: {self._describeSearch(search)}; device "
                  f"{search.device}, {search.threads} thread(s)")
        result = assign_poses(particles, volume, search, spec.prior, distributed=True,
                              progress=self._progressLogger() if parallel.is_main() else None)
        if not parallel.is_main():
            return
        estimator = self.estimatorName()
        save_assignment(self._getExtraPath(RESULT_NPZ), result, estimator, search.symmetry,
                        ids=particles.extra.get(SCIPION_ID), input_rotations=particles.rotations)
        write_star(self._getExtraPath(OUTPUT_STAR), result.to_particle_set(particles, estimator))
        t = result.timings
        self.info(f"{len(particles)} particles: {result.n_rotations} rotations x {result.n_shifts} shifts, "
                  f"{result.n_frequencies} frequencies; median expected error "
                  f"{np.median(result.expected_error_deg):.2f}°, median pmax {np.median(result.pmax):.3f}; "
                  f"{t.get('total_s', 0):.1f} s ({t.get('scoring_gflops', 0):.1f} GFLOP/s scoring)")

    def createOutputStep(self):
        """The input particles with the chosen poses and ``_bp`` attributes."""
        particles = read_star(self._getExtraPath(INPUT_STAR))
        data = load_assignment(self._getExtraPath(RESULT_NPZ))
        poses = ParticleResults.from_arrays(data).to_particle_set(particles, data["estimator"])
        output = output_particles(self, poses, data["scipion_id"], assignment_attributes(data))
        define_output_particles(self, output)
        self._defineSourceRelation(self.inputVolume, output)

    # ---------------------------------------------------------------------------------------------- helpers
    def estimatorName(self) -> str:
        """``mmse``, ``map`` or ``mle``."""
        return ESTIMATORS[self.estimator.get()]

    def priorSpecString(self) -> str:
        """The form's prior as a :func:`bayespose.core.geometry.priors.prior_from_spec` string (same as the CLI)."""
        choice = self.prior.get()
        if choice == PRIOR_IGSO3:
            return f"igso3:{self.igso3Eta.get()}"
        if choice == PRIOR_PREFERRED:
            return (f"preferred:{self.preferredRot.get()},{self.preferredTilt.get()},{self.preferredKappa.get()},"
                    f"{self.preferredFraction.get()}")
        if choice == PRIOR_LOCAL:
            return f"local:{self.localRange.get()}"
        return "uniform"

    def _priorSpec(self, input_rotations: np.ndarray | None) -> PriorSpec:
        return prior_from_spec(self.priorSpecString(), input_rotations)

    def device(self) -> str:
        """``cuda:<first GPU id>`` when the GPU is allowed and torch sees one, else ``cpu``."""
        return gpu_device(self)

    def poseSearch(self, local_range_deg: float | None = None) -> PoseSearch:
        """The form's sampling as a :class:`PoseSearch` (angles °, shifts px, resolution Å)."""
        max_res = self.maxResolution.get()
        step = self.localStep.get()
        return PoseSearch(healpix_order=self.healpixOrder.get(), refine_levels=self.refineLevels.get(),
                          max_resolution_A=max_res if max_res and max_res > 0 else None,
                          shift_range_px=self.shiftRange.get(), shift_step_px=self.shiftStep.get(),
                          symmetry=self.symmetryGroup.get().strip().upper(), local_range_deg=local_range_deg,
                          local_step_deg=step if local_range_deg is not None and step and step > 0 else None,
                          device=self.device(), threads=n_threads(self))

    def _describeSearch(self, search: PoseSearch) -> str:
        if search.local_range_deg is not None:
            angles = f"local ±{search.local_range_deg:g}°"
        else:
            angles = (f"HEALPix order {search.healpix_order} + {search.refine_levels} refinement level(s) "
                      f"(final spacing {60.0 / 2 ** (search.healpix_order + search.refine_levels):g}°)")
        res = f"{search.max_resolution_A:g} Å" if search.max_resolution_A else "Nyquist"
        return (f"{angles}, shifts ±{search.shift_range_px:g} px step {search.shift_step_px:g} px, up to {res}, "
                f"symmetry {search.symmetry}")

    def _progressLogger(self):
        return decile_logger(self, lambda done, total: f"assigned {done}/{total} particles")

    def particlePosterior(self, row: int, coarse: bool = False):
        """Recompute the rotation posterior of the particle in row ``row`` (0-based, order of the input star) with
        this run's settings and noise model: ``(rotations (K, 3, 3), probabilities (K,), PoseAssignment)``.

        ``coarse``: the posterior on the coarse global grid (no refinement: the whole sphere) instead of the final
        refined cells.
        """
        particles = read_star(self._getExtraPath(INPUT_STAR))
        if not 0 <= row < len(particles):
            raise ValueError(f"particle row {row} is out of range (the run has {len(particles)} particles)")
        one = particles.subset([row])
        volume, _ = read_map(self._getExtraPath(REFERENCE_MAP))
        data = load_assignment(self._getExtraPath(RESULT_NPZ))
        spec = self._priorSpec(one.rotations)
        search = self.poseSearch(spec.local_range_deg)
        if coarse:
            search.refine_levels = 0
        result = assign_poses(one, volume, search, spec.prior, noise=data["noise"], keep_marginals=[0])
        rotations, probabilities = result.marginals[0]
        return rotations, probabilities, result

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        errors = []
        parts, volume = self.inputParticles.get(), self.inputVolume.get()
        if parts is None or volume is None:
            return ["Select the input particles and the reference map."]
        if parts.getSize() == 0:
            errors.append("The input particle set is empty.")
        errors += self._validateGeometry(parts, volume)
        if not parts.hasCTF() and not self.ignoreCtf.get():
            errors.append("The input particles have no CTF parameters, which the likelihood needs. Estimate the "
                          "CTF (or import particles with CTF), or set 'Ignore the CTF?' for simulated / "
                          "CTF-corrected particles.")
        if parts.hasCTF() and parts.isPhaseFlipped() and not self.ignoreCtf.get():
            errors.append("The input particles are phase-flipped; the likelihood needs the original images "
                          "(the CTF model assumes unflipped data).")
        if self.prior.get() == PRIOR_LOCAL and not parts.hasAlignmentProj():
            errors.append("The local prior searches around each particle's input pose, but the input particles "
                          "have no projection alignment (3D poses). Use a global prior or aligned particles.")
        errors += symmetry_errors(self.symmetryGroup.get() or "")
        errors += self._validateSampling(parts)
        return errors

    def _validateGeometry(self, parts, volume) -> list[str]:
        return geometry_errors(parts, volume, "reference map", mask=self.inputMask.get())

    def _validateSampling(self, parts) -> list[str]:
        errors = []
        order, levels = self.healpixOrder.get(), self.refineLevels.get()
        if order not in PoseSearch.HEALPIX_ORDERS:
            errors.append(f"The HEALPix order must be in 0..{PoseSearch.MAX_HEALPIX_ORDER}.")
        elif not 0 <= levels <= PoseSearch.max_refine_levels(order):
            errors.append(f"The number of refinement levels must be in 0..{PoseSearch.max_refine_levels(order)} "
                          f"(HEALPix order + levels <= {PoseSearch.MAX_FINEST_ORDER}).")
        if self.shiftRange.get() is None or self.shiftRange.get() < 0:
            errors.append("The shift search range must be >= 0 pixels.")
        if not (self.shiftStep.get() or 0) > 0:
            errors.append("The shift step must be > 0 pixels.")
        max_res, px = self.maxResolution.get() or 0.0, parts.getSamplingRate() or 0.0
        if max_res > 0 and max_res < 2 * px - 1e-6:
            errors.append(f"The maximum resolution ({max_res} Å) is beyond Nyquist ({2 * px:.3f} Å); use 0 for "
                          "Nyquist.")
        choice = self.prior.get()
        if choice == PRIOR_IGSO3 and not (self.igso3Eta.get() or 0) > 0:
            errors.append("The scale eta of the isotropic Gaussian prior must be > 0.")
        if choice == PRIOR_PREFERRED and not ((self.preferredKappa.get() or 0) > 0
                                              and 0 < (self.preferredFraction.get() or 0) <= 1):
            errors.append("The preferred-orientation prior needs kappa > 0 and 0 < fraction <= 1.")
        if choice == PRIOR_LOCAL and not 0 < (self.localRange.get() or 0) <= PoseSearch.MAX_LOCAL_RANGE_DEG:
            errors.append(f"The local search range must be in (0, {PoseSearch.MAX_LOCAL_RANGE_DEG:g}] degrees.")
        return errors

    def _warnings(self):
        return no_gpu_warnings(self)

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output particles not ready yet."]
        data = load_assignment(self._getExtraPath(RESULT_NPZ))
        n = len(data["pmax"])
        lines = [f"{n} particles assigned ({data['estimator'].upper()} poses, {PRIOR_CHOICES[self.prior.get()]} "
                 f"prior, symmetry {data['symmetry']})",
                 f"median posterior expected angular error {np.median(data['expected_error_deg']):.2f}°, "
                 f"median pmax {np.median(data['pmax']):.3f}, median significant poses "
                 f"{np.median(data['n_significant']):.0f}"]
        if data["input_rotations"] is not None:
            change = angle_to_input_deg(data)
            lines.append(f"median change from the input poses {np.median(change):.2f}° (symmetry-aware)")
        timings = data["info"].get("timings", {})
        if timings:
            lines.append(f"{data['info']['n_rotations']} rotations x {data['info']['n_shifts']} shifts on the "
                         f"first grid; {timings.get('total_s', 0):.1f} s")
        return lines

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        search = self.poseSearch(self.localRange.get() if self.prior.get() == PRIOR_LOCAL else None)
        return [f"The poses of {self.outputParticles.getSize()} particles of {self.getObjectTag('inputParticles')} "
                f"were assigned against {self.getObjectTag('inputVolume')} with bayespose's Bayesian pose "
                f"assignment [Xu2026]: the posterior over rotations and shifts under a Gaussian noise model "
                f"{'without CTF (ignored)' if self.ignoreCtf.get() else 'with per-particle CTF'} "
                f"({PRIOR_CHOICES[self.prior.get()]} rotation prior; "
                f"{self._describeSearch(search)}), from which the {self.estimatorName().upper()} pose and the "
                f"posterior expected angular error of each particle were computed, giving "
                f"{self.getObjectTag('outputParticles')}."]


def assignment_attributes(data: dict) -> dict[str, np.ndarray]:
    """The ``_bp`` attributes (names without the prefix) of :func:`load_assignment`'s dict: the result schema's
    (:func:`bayespose.core.results.scipion_attributes`: MaxProb, NrSignificant, ExpectedErrorDeg, Concentration,
    LogEvidence, Mmse/Map/Mle Rot/Tilt/Psi in degrees, ...) and, when the input was aligned, AngleToInputDeg."""
    attrs = scipion_attributes(ParticleResults.from_arrays(data).star_columns(estimator=None))
    if data["input_rotations"] is not None:
        attrs["AngleToInputDeg"] = angle_to_input_deg(data)
    return attrs


def angle_to_input_deg(data: dict) -> np.ndarray:
    """(N,) symmetry-aware angle (degrees) between the input and the output pose of :func:`load_assignment`'s
    dict (which must hold ``input_rotations``)."""
    return symmetric_geodesic_distance_deg(data["input_rotations"], data[f"{data['estimator']}_rotations"],
                                           symmetry_group(data["symmetry"]))
