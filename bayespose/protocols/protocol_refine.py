"""Scipion protocol ``bayespose - refine with prior estimation (EM)``: 3D refinement by expectation-maximisation with
gold-standard half sets and, optionally, estimation of the viewing-direction distribution (thin wrapper over
:func:`bayespose.core.refine.engine.refine`, the same function as ``bayespose refine``).

Steps: ``convertInputStep`` (Scipion particles -> ``extra/input_particles.star``; initial volume ->
``extra/initial.mrc``; mask -> ``extra/mask.mrc``), ``refineStep`` (a job, :func:`~bayespose.protocols._common.run_job`,
running ``refineJob`` in the form's processes: one call of the EM engine, per-iteration lines in
the run log; working files in ``extra/iterations/``; the outputs of
:func:`bayespose.core.refine.outputs.write_refine_outputs` in ``extra/``: map, half maps, fsc.csv, particles.star,
prior.npy/.json, history, figures) and ``createOutputStep`` (``outputVolume`` with half maps, ``outputFSC``,
``outputParticles`` with the final MMSE projection alignment and ``_bp`` attributes).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D
from pyworkflow.constants import BETA

from bayespose.convert import HALF_SET_ATTRIBUTES, SCIPION_ID, particles_from_scipion
from bayespose.core import parallel
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.relion_star import read_star, write_star
from bayespose.core.refine import HALF_SPLITS, MODES, PRIOR_MODES, RefineConfig, check_half_set_sizes, refine
from bayespose.core.refine.outputs import (
    HALF_FILES,
    MAP_FILE,
    PRIOR_NPY,
    RefineOutputs,
    read_refine_outputs,
    write_refine_outputs,
)
from bayespose.plotting.refine import FIGURES, refine_figure_writer
from bayespose.protocols._common import (
    BAYES_PAPER,
    add_gpu_params,
    add_parallel_params,
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

# the form's choices, in the order of the engine's MODES / PRIOR_MODES / HALF_SPLITS
_MODE_LABELS = {"soft": "soft (EM, posterior-weighted)", "hard": "hard (best pose only)"}
_PRIOR_LABELS = {"uniform": "uniform", "estimate": "estimate (preferred orientation)"}
_SPLIT_LABELS = {"input": "input half sets (random if none)", "random": "random split"}
MODE_CHOICES = [_MODE_LABELS[m] for m in MODES]
PRIOR_CHOICES = [_PRIOR_LABELS[m] for m in PRIOR_MODES]
SPLIT_CHOICES = [_SPLIT_LABELS[m] for m in HALF_SPLITS]
MAX_HEALPIX_ORDER = 6
_DEFAULTS = RefineConfig()  # the form's defaults are the engine's, except the prior (the protocol's point)
DEFAULT_PRIOR = "estimate"
_ESTIMATE_CONDITION = f"priorMode=={PRIOR_MODES.index('estimate')}"  # form fields of the estimated prior

INPUT_STAR = "input_particles.star"
INITIAL_MAP = "initial.mrc"
MASK_MAP = "mask.mrc"
WORK_DIR = "iterations"


def output_attributes(particles, input_rotations: np.ndarray | None, symmetry: str) -> dict[str, np.ndarray]:
    """The ``_bp`` attributes (names without the prefix) of refined particles read from ``particles.star``:
    MaxProb (rlnMaxValueProbDistribution), NrSignificant (rlnNrOfSignificantSamples, when present), HalfSet (1/2),
    every ``bp<Name>`` column as ``<Name>`` (e.g. ExpectedErrorDeg, degrees) and, when the input was aligned,
    AngleToInputDeg (symmetry-aware angle between the input and the refined pose, degrees)."""
    attrs: dict[str, np.ndarray] = {}
    extra = particles.extra
    if "rlnMaxValueProbDistribution" in extra:
        attrs["MaxProb"] = np.asarray(extra["rlnMaxValueProbDistribution"], dtype=np.float64)
    if "rlnNrOfSignificantSamples" in extra:
        attrs["NrSignificant"] = np.asarray(extra["rlnNrOfSignificantSamples"], dtype=np.int64)
    for key, values in extra.items():
        if key.startswith("bp") and len(key) > 2:
            values = np.asarray(values)
            if np.issubdtype(values.dtype, np.number):
                attrs[key[2:]] = values
    if particles.half_set is not None:
        attrs["HalfSet"] = np.asarray(particles.half_set, dtype=np.int64)
    if input_rotations is not None and particles.rotations is not None:
        attrs["AngleToInputDeg"] = symmetric_geodesic_distance_deg(input_rotations, particles.rotations,
                                                                   symmetry_group(symmetry))
    return attrs


class ProtBayesposeRefine(ProtRefine3D):
    """3D refinement by expectation-maximisation with estimation of the rotational prior.

    Each iteration scores every particle against its half map over a HEALPix x in-plane x shift grid (Gaussian
    noise per resolution shell, per-particle CTF), up to the current resolution. The M-step reconstructs each half
    map from the posterior-weighted particles (Wiener filter from the FSC) and, in 'estimate' mode, updates the
    viewing-direction distribution (the preferred orientation of the particles) that becomes the rotation prior
    of the next iteration. The two half sets never mix (gold standard); the FSC between the half maps gives the
    resolution (0.143). Outputs: the map with its half maps, the FSC, and the particles with their final MMSE poses
    and per-particle attributes (_bpMaxProb, _bpExpectedErrorDeg, _bpHalfSet, _bpAngleToInputDeg); the estimated
    prior is written to the extra folder (prior.npy / prior.json / prior.png).
    """

    _label = "refine with prior estimation (EM)"
    _devStatus = BETA
    _references = ["Xu2026", "Scheres2012a"]  # pyworkflow: _citations() returns _references
    _possibleOutputs = {"outputVolume": Volume, "outputFSC": FSC, "outputParticles": SetOfParticles}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        add_gpu_params(form, "Compute on the GPU when torch sees a CUDA device (else the CPU is used, with a "
                             "warning before the run). The results are the same; the GPU is faster.")

        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with CTF (e.g. imported from RELION or cryoSPARC), MRC stacks. Their "
                           "alignment, if any, is not used (global search) except to report how far the poses "
                           "moved. Their half sets (_rlnRandomSubset) are used or not as set below.")
        form.addParam("halfSets", params.EnumParam, choices=SPLIT_CHOICES,
                      default=HALF_SPLITS.index(_DEFAULTS.half_split), display=params.EnumParam.DISPLAY_HLIST,
                      label="Half sets",
                      help="The two gold-standard half sets, refined independently and compared by the FSC. "
                           "input half sets: the particles' own (_rlnRandomSubset 1/2, e.g. from a RELION "
                           "refinement) when every particle has one, else a random split. random split: a new "
                           "random split (see the random seed), whatever the input has.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Initial volume",
                      help="The starting map, with the particles' box and pixel size (within 1 %). It is low-pass "
                           "filtered to the initial resolution below, so that its fine detail does not bias the "
                           "refinement.")
        form.addParam("initialLowPass", params.FloatParam, default=_DEFAULTS.initial_lowpass_A,
                      label="Initial low-pass filter (Å)",
                      help="Resolution (Å) of the low-pass filter applied to the initial volume. Use a resolution "
                           "the initial map is surely right at (20-60 Å); lower values (coarser) avoid bias.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point group in RELION's notation: c1 (none), cN, dN, t, o, i (= i2), i1..i4. The "
                           "reconstruction inserts every symmetry mate of each pose.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Reference mask (optional)",
                      help="A soft mask (values 0-1, the map's box) applied to the reference half maps before each "
                           "E-step (e.g. to remove solvent noise); it also masks the FSC. Leave empty for the "
                           "automatic solvent mask (see 'Envelope mask').")
        form.addParam("ignoreCtf", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Ignore the CTF?",
                      help="No (default): the particles must have CTF parameters, used by the likelihood and the "
                           "reconstruction. Yes: no CTF at all (only for simulated particles without CTF or "
                           "CTF-corrected images).")

        form.addSection(label="EM")
        form.addParam("numberOfIterations", params.IntParam, default=_DEFAULTS.iterations,
                      label="Maximum iterations",
                      help="Number of EM iterations (each: E-step on both half sets, M-step map/prior/noise, FSC).")
        form.addParam("priorMode", params.EnumParam, choices=PRIOR_CHOICES,
                      default=PRIOR_MODES.index(DEFAULT_PRIOR),
                      display=params.EnumParam.DISPLAY_HLIST, label="Rotation prior",
                      help="uniform: every orientation equally likely, every iteration. estimate: the "
                           "viewing-direction distribution is estimated in each M-step from the posterior mass "
                           "(smoothed over HEALPix neighbours, in-plane uniform) and used as the prior of the next "
                           "E-step; helps with strongly preferred orientations (the estimation of the rotational "
                           f"prior of appendix F2 of {BAYES_PAPER}).")
        form.addParam("priorPseudocount", params.FloatParam, default=_DEFAULTS.prior_pseudocount,
                      expertLevel=params.LEVEL_ADVANCED,
                      condition=_ESTIMATE_CONDITION, label="Prior pseudocount (particles per direction)",
                      help="Added to the posterior mass of every viewing direction before normalising, so that no "
                           "direction gets zero prior probability. Larger = smoother, closer to uniform.")
        form.addParam("priorOrder", params.IntParam, default=_DEFAULTS.prior_order,
                      expertLevel=params.LEVEL_ADVANCED, condition=_ESTIMATE_CONDITION,
                      label="Prior resolution (HEALPix order)",
                      help="HEALPix order of the estimated viewing-direction density: 1 = 48 directions (~30°), "
                           "2 = 192 (~15°), 3 = 768 (~7.5°). Finer needs more particles per direction.")
        form.addParam("assignmentMode", params.EnumParam, choices=MODE_CHOICES, default=0,
                      label="Assignment",
                      help="soft: every pose contributes with its posterior weight (EM; better at low SNR). hard: "
                           "only each particle's best pose (maximum likelihood; the classical baseline).")

        form.addSection(label="Sampling")
        form.addParam("healpixOrder", params.IntParam, default=_DEFAULTS.healpix_order,
                      label="Coarse angular sampling (HEALPix order)",
                      help="Global grid scored exhaustively for every particle: HEALPix viewing directions x "
                           "in-plane angles. Order 0: 60°, 1: 30° (576 rotations), 2: 15° (4608), 3: 7.5° (36864).")
        form.addParam("maxHealpixOrder", params.IntParam, default=_DEFAULTS.max_healpix_order,
                      label="Finest angular sampling (HEALPix order)",
                      help="The significant cells of the coarse grid are refined coarse-to-fine (each order halves "
                           "the step) as far as the current resolution needs at the particle's edge, or finer while "
                           "the step exceeds the particles' median expected pose error, up to this order "
                           "(3: 7.5°, 4: 3.75°, 5: 1.9°, 6: 0.94°).")
        form.addParam("particleDiameter", params.FloatParam, default=0.0, label="Particle diameter (Å)",
                      help="Sets the angular sampling the resolution needs at the particle's edge and the soft "
                           "solvent mask of the references. 0 = the engine's default (from the box size).")
        form.addParam("envelopeMask", params.BooleanParam, default=_DEFAULTS.envelope_mask,
                      label="Envelope mask", expertLevel=params.LEVEL_ADVANCED,
                      help="Without a reference mask (ignored with one), each half map is masked by the soft "
                           "sphere of the particle diameter and, when Yes, by its own envelope (the half map at "
                           "15 Å, above 0.2 of its maximum, extended 6 Å with a soft edge to 14 Å; a dynamic mask "
                           "as cryoSPARC's): the solvent's noise stays out of the references, so the poses improve "
                           "at low SNR (measured mean error 5.8° -> 3.9° at SNR 0.03). The FSC and the output maps "
                           "keep the sphere.")
        form.addParam("shiftRange", params.FloatParam, default=_DEFAULTS.shift_range_px,
                      label="Shift search range (px)",
                      help="Candidate origins lie within this radius (pixels) of the box centre.")
        form.addParam("shiftStep", params.FloatParam, default=_DEFAULTS.shift_step_px,
                      label="Shift step (px)",
                      help="Spacing of the candidate origins (pixels); the output origin is the posterior mean.")
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Seed of the random half-set split (see 'Half sets') and of the noise estimate.")

        add_parallel_params(form)

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.refineStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        """Input particles -> extra/input_particles.star; initial volume -> extra/initial.mrc; mask -> mask.mrc."""
        particles = particles_from_scipion(self.inputParticles.get())
        if self.ignoreCtf.get():
            particles = replace(particles, ctf=None)
        particles = replace(particles, extra={k: v for k, v in particles.extra.items() if not k.startswith("bp")})
        write_star(self._getExtraPath(INPUT_STAR), particles)
        volume = self.inputVolume.get()
        data, _ = read_map(volume_file(volume))
        write_map(self._getExtraPath(INITIAL_MAP), data, volume.getSamplingRate())
        if self.inputMask.get() is not None:
            mask, _ = read_map(volume_file(self.inputMask.get()))
            write_map(self._getExtraPath(MASK_MAP), mask, volume.getSamplingRate())
        self.info(f"{describe_particles(particles)}, RELION half sets: "
                  f"{'yes' if particles.half_set is not None else 'no (random split)'}")

    def refineStep(self):
        """The refinement, as a job (:func:`run_job`: the form's processes, Scipion's queue)."""
        run_job(self, "refineJob")

    def refineJob(self):
        """One call of :func:`bayespose.core.refine.engine.refine` (in each process of the job: its share of the
        particles), then the output files in the extra folder (the main process)."""
        particles = read_star(self._getExtraPath(INPUT_STAR))
        volume, _ = read_map(self._getExtraPath(INITIAL_MAP))
        config = self.refineConfig()
        mask = read_map(self._getExtraPath(MASK_MAP))[0] if os.path.exists(self._getExtraPath(MASK_MAP)) else None
        work = self._getExtraPath(WORK_DIR)
        # the step runs again (Scipion 'continue'); the main process decides for all (the others must not see the
        # files it starts writing)
        resume = parallel.broadcast_object(os.path.isdir(work) and bool(os.listdir(work)))
        if resume:
            self.info(f"continuing the refinement in {work}")
        self.info(f"EM: {config.iterations} iterations, {config.mode} assignment, {config.prior_mode} prior, "
                  f"HEALPix order {config.healpix_order}..{config.max_healpix_order}, shifts "
                  f"±{config.shift_range_px:g} px step {config.shift_step_px:g} px, symmetry {config.symmetry}, "
                  f"initial low-pass {config.initial_lowpass_A:g} Å; device {config.device}, {config.threads} "
                  f"thread(s)")
        result = refine(particles, volume, config, out_dir=work, log=self.info, progress=self._progressLogger,
                        mask=mask, resume=resume)
        if not parallel.is_main():
            return
        write_refine_outputs(result, self._getExtraPath(), pixel_size=particles.pixel_size,
                             particles_template=particles, config=config,
                             figure_writer=refine_figure_writer(self.getRunName()))
        self.info(f"final resolution {result.resolution_A:.2f} Å (FSC 0.143); outputs in {self._getExtraPath()}")

    def createOutputStep(self):
        """outputVolume (with half maps), outputFSC and outputParticles (MMSE poses + ``_bp`` attributes)."""
        out = self.results()
        px = out.pixel_size

        vol = Volume()
        vol.setFileName(self._getExtraPath(MAP_FILE))
        vol.setSamplingRate(px)
        vol.setHalfMaps([self._getExtraPath(name) for name in HALF_FILES])

        fsc = FSC(objLabel=self.getRunName())
        fsc.setData([float(f) for f in out.fsc_frequencies], [float(v) for v in out.fsc])

        particles = out.particles
        if SCIPION_ID not in particles.extra:
            raise ValueError(f"{out.path('particles.star')} has no {SCIPION_ID} column to match the input particles")
        inputs = read_star(self._getExtraPath(INPUT_STAR))
        attrs = output_attributes(particles, inputs.rotations, self.symmetry())
        output = output_particles(self, particles, particles.extra[SCIPION_ID], attrs)

        self._defineOutputs(outputVolume=vol)
        self._defineSourceRelation(self.inputParticles, vol)
        self._defineSourceRelation(self.inputVolume, vol)
        define_output_particles(self, output)
        self._defineOutputs(outputFSC=fsc)
        self._defineSourceRelation(vol, fsc)

    # ---------------------------------------------------------------------------------------------- helpers
    def symmetry(self) -> str:
        """The form's point group in RELION's upper-case notation (``C1``, ``D7``, ``I``...)."""
        return (self.symmetryGroup.get() or "c1").strip().upper()

    def device(self) -> str:
        """``cuda:<first GPU id>`` when the GPU is allowed and torch sees one, else ``cpu``."""
        return gpu_device(self)

    def refineConfig(self) -> RefineConfig:
        """The form as a :class:`RefineConfig` (Å, degrees, px)."""
        diameter = self.particleDiameter.get()
        return RefineConfig(iterations=self.numberOfIterations.get(), healpix_order=self.healpixOrder.get(),
                            max_healpix_order=self.maxHealpixOrder.get(), shift_range_px=self.shiftRange.get(),
                            shift_step_px=self.shiftStep.get(), symmetry=self.symmetry(),
                            mode=MODES[self.assignmentMode.get()], prior_mode=PRIOR_MODES[self.priorMode.get()],
                            half_split=HALF_SPLITS[self.halfSets.get()],
                            prior_pseudocount=self.priorPseudocount.get(), prior_order=self.priorOrder.get(),
                            initial_lowpass_A=self.initialLowPass.get(),
                            particle_diameter_A=diameter if diameter and diameter > 0 else None,
                            envelope_mask=self.envelopeMask.get(), device=self.device(), threads=n_threads(self),
                            seed=self.seed.get())

    def results(self) -> RefineOutputs:
        """The refinement outputs read back from the extra folder."""
        return read_refine_outputs(self._getExtraPath())

    def _progressLogger(self, label: str):
        """Engine progress (one callback per iteration and half set): a log line at completion."""
        def progress(done: int, total: int) -> None:
            if done >= total:
                self.info(f"{label}: {total} particles scored")

        return progress

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        errors = []
        parts, volume = self.inputParticles.get(), self.inputVolume.get()
        if parts is None or volume is None:
            return ["Select the input particles and the initial volume."]
        try:
            check_half_set_sizes(parts.getSize(), self._inputHalfSetCounts(parts), HALF_SPLITS[self.halfSets.get()])
        except ValueError as exc:
            errors.append(f"{str(exc)[0].upper()}{str(exc)[1:]}.")
        errors += self._validateGeometry(parts, volume)
        if not parts.hasCTF() and not self.ignoreCtf.get():
            errors.append("The input particles have no CTF parameters, which the likelihood and the "
                          "reconstruction need. Estimate the CTF (or import particles with CTF), or set 'Ignore the "
                          "CTF?' for simulated / CTF-corrected particles.")
        if parts.hasCTF() and parts.isPhaseFlipped() and not self.ignoreCtf.get():
            errors.append("The input particles are phase-flipped; the model needs the original images.")
        errors += symmetry_errors(self.symmetry())
        errors += self._validateSampling(parts)
        return errors

    @staticmethod
    def _inputHalfSetCounts(parts) -> dict[int, int] | None:
        """``{half set: particles}`` of the input's own half sets (one SQL query), None when it has none."""
        first = parts.getFirstItem()
        attribute = next((a for a in HALF_SET_ATTRIBUTES if first is not None and hasattr(first, a)), None)
        if attribute is None:
            return None
        rows = parts.aggregate(["COUNT"], attribute, [attribute])
        return {int(row[attribute]): int(row["COUNT"]) for row in rows if row[attribute] is not None}

    def _validateGeometry(self, parts, volume) -> list[str]:
        return geometry_errors(parts, volume, "initial volume", mask=self.inputMask.get())

    def _validateSampling(self, parts) -> list[str]:
        errors = []
        first, finest = self.healpixOrder.get(), self.maxHealpixOrder.get()
        if first is None or finest is None or not 0 <= first <= finest <= MAX_HEALPIX_ORDER:
            errors.append(f"Need 0 <= initial HEALPix order <= finest HEALPix order <= {MAX_HEALPIX_ORDER}.")
        if not (self.numberOfIterations.get() or 0) >= 1:
            errors.append("Need at least one iteration.")
        if self.shiftRange.get() is None or self.shiftRange.get() < 0:
            errors.append("The shift search range must be >= 0 pixels.")
        if not (self.shiftStep.get() or 0) > 0:
            errors.append("The shift step must be > 0 pixels.")
        px = parts.getSamplingRate() or 0.0
        lowpass = self.initialLowPass.get() or 0.0
        if not lowpass > 0:
            errors.append("The initial low-pass filter must be > 0 Å.")
        elif lowpass < 2 * px - 1e-6:
            errors.append(f"The initial low-pass filter ({lowpass} Å) is beyond Nyquist ({2 * px:.3f} Å).")
        if PRIOR_MODES[self.priorMode.get()] == "estimate" and (self.priorPseudocount.get() or 0) < 0:
            errors.append("The prior pseudocount must be >= 0.")
        if not errors:
            try:
                self.refineConfig().validate()  # anything else the engine would reject
            except ValueError as exc:
                errors.append(f"Settings: {exc}")
        return errors

    def _warnings(self):
        return no_gpu_warnings(self)

    def _summary(self):
        if not hasattr(self, "outputVolume"):
            return ["Output not ready yet."]
        out = self.results()
        summary = out.summary
        lines = [f"{summary['n_particles']} particles, {summary['iterations']} iteration(s), "
                 f"{MODES[self.assignmentMode.get()]} assignment, {PRIOR_MODES[self.priorMode.get()]} prior, "
                 f"symmetry {self.symmetry()}",
                 f"final resolution {out.resolution_A:.2f} Å (gold-standard FSC 0.143)"]
        if PRIOR_MODES[self.priorMode.get()] == "estimate":
            lines.append(f"estimated viewing-direction density: min {out.direction_prior.min():.2f}, max "
                         f"{out.direction_prior.max():.2f} x uniform (HEALPix order {out.prior_order}; "
                         f"{PRIOR_NPY} in the extra folder)")
        if "bpExpectedErrorDeg" in out.particles.extra:
            lines.append(f"median posterior expected angular error "
                         f"{np.median(out.particles.extra['bpExpectedErrorDeg']):.2f}°")
        return lines

    def _methods(self):
        if not hasattr(self, "outputVolume"):
            return []
        out = self.results()
        config = self.refineConfig()
        prior = ("with the viewing-direction distribution estimated in each M-step and used as the rotation prior"
                 if config.prior_mode == "estimate" else "with a uniform rotation prior")
        masking = ("the references masked by the given mask" if self.inputMask.get() is not None else
                   "the references masked by a soft sphere" + (" and each half map's own envelope"
                                                               if config.envelope_mask else ""))
        return [f"{self.getObjectTag('outputVolume')} was refined from {out.summary['n_particles']} particles of "
                f"{self.getObjectTag('inputParticles')} starting from {self.getObjectTag('inputVolume')} "
                f"(low-pass filtered to {config.initial_lowpass_A:g} Å) by expectation-maximisation in bayespose "
                f"[Xu2026] ({config.mode} assignment, {prior}; HEALPix order {config.healpix_order} to "
                f"{config.max_healpix_order}, symmetry {config.symmetry}, {len(out.history)} iterations; "
                f"{masking}), with independent half sets as in RELION [Scheres2012a]. The gold-standard FSC "
                f"reached 0.143 at {out.resolution_A:.2f} Å."]


__all__ = ["ProtBayesposeRefine", "output_attributes", "FIGURES"]
