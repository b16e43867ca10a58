"""Scipion protocol ``bayespose - simulate particles``: particles with known poses from a map (thin wrapper over
:func:`bayespose.core.imaging.synthetic_dataset.simulate_dataset`, the same function as ``bayespose simulate``)."""

from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles
from pwem.protocols import EMProtocol
from pyworkflow.constants import BETA

from bayespose.convert import fill_set_of_particles
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.relion_star import read_star
from bayespose.protocols._common import BAYES_PAPER, number

POSE_CHOICES = ["uniform", "isotropic Gaussian (IGSO3)", "preferred orientation"]
POSE_UNIFORM, POSE_IGSO3, POSE_PREFERRED = range(3)


def volume_file(volume) -> str:
    """The file of a Scipion Volume without pwem's ``:mrc`` format suffix."""
    return volume.getFileName().split(":")[0]


class ProtBayesposeSimulate(EMProtocol):
    """Simulate cryo-EM particles from a map with known (ground-truth) poses.

    Each particle is a projection of the map at a pose drawn from the chosen distribution, shifted by a random
    origin, multiplied by a CTF (optional) and corrupted by white Gaussian noise at the requested SNR (signal
    variance / noise variance over the box). The output particles carry the ground truth as their projection
    alignment and CTF, so pose-estimation protocols can be scored against it.
    """

    _label = "simulate particles"
    _devStatus = BETA
    _references = ["Xu2026"]
    _possibleOutputs = {"outputParticles": SetOfParticles}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", label="Input map",
                      help="Map to project (cubic box). The particles get its box and sampling rate.")
        form.addParam("nParticles", params.IntParam, default=1000, validators=[params.Positive],
                      label="Number of particles", help="How many particles to simulate.")
        form.addParam("snr", params.FloatParam, default=0.1, label="Signal-to-noise ratio",
                      help="Variance of the clean (CTF-modulated) projection over the whole box divided by the "
                           "variance of the white noise. 0 gives noiseless particles. Real data: ~0.01-0.1.")
        form.addParam("poseDistribution", params.EnumParam, choices=POSE_CHOICES, default=POSE_UNIFORM,
                      label="Pose distribution",
                      help="uniform: Haar measure on SO(3). isotropic Gaussian: concentrated around the identity "
                           "pose with scale eta (small eta = concentrated; the distribution of appendix F1 of "
                           f"{BAYES_PAPER}). preferred orientation: a fraction of the views near one viewing "
                           "direction (von Mises-Fisher peak), the rest uniform; uniform in-plane rotation.")
        form.addParam("igso3Eta", params.FloatParam, default=0.3, condition=f"poseDistribution=={POSE_IGSO3}",
                      label="Scale eta (rad)",
                      help="Scale of the isotropic Gaussian on SO(3) in radians: the rotation angle away from the "
                           "identity is ~Maxwell distributed with scale eta (std ~0.67 eta; eta=0.1 ~ 3.8°).")
        line = form.addLine("Preferred view", condition=f"poseDistribution=={POSE_PREFERRED}",
                            help="Viewing direction of the peak (RELION rot and tilt, degrees), its concentration "
                                 "kappa (von Mises-Fisher; angular width ~ 1/sqrt(kappa) rad) and the fraction of "
                                 "the views in the peak (the rest uniform). The defaults (rot 0, tilt 0, kappa 40, "
                                 "fraction 0.75) put ~69 % of the views within 20° of the top view.")
        line.addParam("preferredRot", params.FloatParam, default=0.0, label="rot (°)",
                      help="RELION rot angle of the preferred viewing direction, degrees.")
        line.addParam("preferredTilt", params.FloatParam, default=0.0, label="tilt (°)",
                      help="RELION tilt angle of the preferred viewing direction, degrees (0 = top view).")
        line.addParam("preferredKappa", params.FloatParam, default=40.0, label="kappa",
                      help="Concentration of the peak (>= 0; 0 = uniform); kappa = 40 ~ 9° wide.")
        line.addParam("preferredFraction", params.FloatParam, default=0.75, label="fraction",
                      help="Fraction of the views in the peak, in [0, 1].")
        form.addParam("maxShift", params.FloatParam, default=0.0, label="Maximum shift (px)",
                      help="Origins drawn uniformly in [-max, max] pixels along x and y.")
        form.addParam("seed", params.IntParam, default=0, label="Random seed",
                      help="Same seed and inputs give the same particles.")

        form.addSection(label="CTF")
        form.addParam("doCtf", params.BooleanParam, default=True, label="Apply a CTF?",
                      help="Multiply each projection by a CTF with a random defocus in the range below.")
        form.addParam("defocusMin", params.FloatParam, default=1.0, condition="doCtf",
                      label="Minimum defocus (µm)", help="Underfocus positive, in micrometres.")
        form.addParam("defocusMax", params.FloatParam, default=2.5, condition="doCtf",
                      label="Maximum defocus (µm)", help="Underfocus positive, in micrometres.")
        form.addParam("astigmatismMax", params.FloatParam, default=200.0, condition="doCtf",
                      label="Maximum astigmatism (Å)",
                      help="Defocus V = defocus U minus a value drawn uniformly in [0, max]; random angle.")
        form.addParam("voltage", params.FloatParam, default=300.0, label="Voltage (kV)",
                      help="Acceleration voltage of the microscope.")
        form.addParam("sphericalAberration", params.FloatParam, default=2.7, label="Spherical aberration (mm)",
                      help="Cs of the objective lens.")
        form.addParam("amplitudeContrast", params.FloatParam, default=0.1, label="Amplitude contrast",
                      help="Fraction of amplitude contrast (0.07-0.1 for cryo-EM).")

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.simulateStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _spec(self) -> SimulationSpec:
        pose = {POSE_UNIFORM: "uniform", POSE_IGSO3: f"igso3:{self.igso3Eta.get()}",
                POSE_PREFERRED: "preferred"}[self.poseDistribution.get()]
        snr = self.snr.get()
        return SimulationSpec(n_particles=self.nParticles.get(), snr=None if snr == 0 else snr,
                              pose_distribution=pose, ctf=self.doCtf.get(), defocus_min_um=self.defocusMin.get(),
                              defocus_max_um=self.defocusMax.get(), astigmatism_max_A=self.astigmatismMax.get(),
                              voltage_kV=self.voltage.get(), cs_mm=self.sphericalAberration.get(),
                              amplitude_contrast=self.amplitudeContrast.get(), max_shift_px=self.maxShift.get(),
                              seed=self.seed.get(), preferred_rot_deg=self.preferredRot.get(),
                              preferred_tilt_deg=self.preferredTilt.get(), preferred_kappa=self.preferredKappa.get(),
                              preferred_fraction=self.preferredFraction.get())

    def simulateStep(self):
        volume = self.inputVolume.get()
        total = self.nParticles.get()
        reported = set()

        def progress(done, n):
            decile = 10 * done // max(n, 1)
            if decile not in reported:
                reported.add(decile)
                self.info(f"simulated {done}/{n} particles")

        simulate_dataset(volume_file(volume), self._spec(), self._getExtraPath(), progress=progress,
                         pixel_size=volume.getSamplingRate())
        self.info(f"wrote {total} particles to {self._getExtraPath('particles.star')}")

    def createOutputStep(self):
        particles = read_star(self._getExtraPath("particles.star"))
        output = self._createSetOfParticles()
        fill_set_of_particles(output, particles)
        self._defineOutputs(outputParticles=output)
        self._defineSourceRelation(self.inputVolume, output)

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        errors = []
        volume = self.inputVolume.get()
        if volume is not None:
            dims = volume.getDim()
            if dims is None or len(set(dims)) != 1:
                errors.append(f"The input map must be a cubic box, got dimensions {dims}.")
            if not volume.getSamplingRate() or volume.getSamplingRate() <= 0:
                errors.append("The input map has no sampling rate; set it when importing the volume.")
        if self.snr.get() is None or self.snr.get() < 0:
            errors.append("The signal-to-noise ratio must be >= 0 (0 = noiseless).")
        if self.doCtf.get() and not 0 < self.defocusMin.get() <= self.defocusMax.get():
            errors.append("Need 0 < minimum defocus <= maximum defocus (µm).")
        if self.poseDistribution.get() == POSE_IGSO3 and not self.igso3Eta.get() > 0:
            errors.append("The scale eta must be > 0.")
        if self.poseDistribution.get() == POSE_PREFERRED and not ((self.preferredKappa.get() or 0) >= 0 and
                                                                    0 <= (self.preferredFraction.get() or 0) <= 1):
            errors.append("The preferred orientation needs kappa >= 0 and 0 <= fraction <= 1.")
        if self.maxShift.get() < 0:
            errors.append("The maximum shift must be >= 0 pixels.")
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output not ready yet."]
        spec = self._spec()
        ctf = (f"CTF with defocus {number(spec.defocus_min_um)}-{number(spec.defocus_max_um)} µm, Cs "
               f"{number(spec.cs_mm)} mm, {number(spec.voltage_kV)} kV" if spec.ctf else "no CTF")
        snr = "noiseless" if spec.snr is None else f"SNR {number(spec.snr)}"
        return [f"{self.outputParticles.getSize()} particles simulated from {self.getObjectTag('inputVolume')}: "
                f"{self._poseText()} poses, {ctf}, {snr}, shifts up to ±{number(spec.max_shift_px)} px."]

    def _poseText(self) -> str:
        """The pose distribution in words, with its parameters."""
        choice = self.poseDistribution.get()
        if choice == POSE_IGSO3:
            return f"isotropic Gaussian (eta {number(self.igso3Eta.get())} rad)"
        if choice == POSE_PREFERRED:
            return (f"preferred-orientation ({number(100 * self.preferredFraction.get())} % near rot "
                    f"{number(self.preferredRot.get())}°, tilt {number(self.preferredTilt.get())}°, kappa "
                    f"{number(self.preferredKappa.get())})")
        return "uniform"

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        spec = self._spec()
        return [f"We simulated {spec.n_particles} particles from {self.getObjectTag('inputVolume')} with "
                f"bayespose (Fourier-slice projection{', CTF' if spec.ctf else ''}, white noise at SNR "
                f"{number(spec.snr) if spec.snr is not None else 'infinite'}), with {self._poseText()} poses."]
