"""Scipion protocol ``bayespose - import particles from cryoSPARC (.cs)``.

pwem's own cryoSPARC import shells out to a ``pyem`` conda environment; this one reads the ``.cs`` file in-process
with :func:`bayespose.core.io.cryosparc.read_cryosparc` (cryosparc-tools), links (or copies) the image stacks into
the protocol's ``extra`` folder with the ``.mrcs`` extension (Scipion and RELION read ``.mrc`` files as volumes and
``.mrcs`` as image stacks) and registers a ``SetOfParticles`` with CTF and, when the file has ``alignments3D``,
a projection alignment (ALIGN_PROJ) in the conventions of :mod:`bayespose.convert`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pwem.objects import SetOfParticles
from pwem.protocols import ProtImport
from pyworkflow.constants import BETA

from bayespose.convert import fill_set_of_particles
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.cryosparc import load_cs_fields, read_cryosparc
from bayespose.protocols._common import number


def stack_link_names(files: list[str]) -> dict[str, str]:
    """Unique ``.mrcs`` file names (no folder) for image stacks: the basename with ``.mrc`` -> ``.mrcs``; stacks
    whose names collide get their parent folder names prepended (``J19_extract_x.mrcs``), then a counter."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for fn in files:
        path = Path(fn)
        stem = path.stem if path.suffix in (".mrc", ".mrcs") else path.name
        candidates = [stem, "_".join([*path.parent.parts[-2:], stem]).lstrip("_/")]
        name = next((f"{c}.mrcs" for c in candidates if f"{c}.mrcs" not in used), None)
        counter = 1
        while name is None or name in used:
            counter += 1
            name = f"{stem}_{counter:05d}.mrcs"
        used.add(name)
        names[fn] = name
    return names


class ProtBayesposeImportCryosparc(ProtImport):
    """Import particles from a cryoSPARC particle file (.cs), with CTF and, when present, 3D alignment.

    Reads the cryoSPARC dataset with cryosparc-tools (no cryoSPARC installation or pyem needed). Blob and CTF
    fields missing from the main file are taken from the passthrough file (matched by uid). Poses
    (alignments3D/pose, rotation vectors) and shifts (alignments3D/shift, px) become a projection alignment with
    RELION's conventions, so the particles can go to RELION, bayespose or any other Scipion protocol. The image
    stacks are linked (or copied) into the protocol folder as .mrcs stacks.
    """

    _label = "import particles from cryoSPARC (.cs)"
    _devStatus = BETA
    _references = ["Punjani2017"]
    _possibleOutputs = {"outputParticles": SetOfParticles}

    # ------------------------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        form.addSection(label="Import")
        form.addParam("csFile", params.FileParam, label="cryoSPARC particles (.cs)",
                      help="The particles .cs file of a cryoSPARC job (e.g. J24/cryosparc_P12_J24_001_particles.cs "
                           "from a homogeneous refinement, or an exported particles .cs). It must have blob "
                           "fields (blob/path, blob/idx) itself or through its passthrough file.")
        form.addParam("passthroughFile", params.FileParam, allowsNull=True, label="Passthrough .cs (optional)",
                      help="The job's *_passthrough_particles.cs file, which often holds the blob (image) and CTF "
                           "fields that the main file lacks. Rows are matched by uid. Leave empty to use the "
                           "*passthrough*.cs files found next to the main file when fields are missing.")
        form.addParam("blobRoot", params.PathParam, allowsNull=True,
                      label="cryoSPARC project folder (optional)",
                      help="The folder that the .cs blob/path entries are relative to: the cryoSPARC project "
                           "directory (the one containing the J1, J2, ... job folders). Leave empty to try the "
                           ".cs file's folder and then each of its parent folders.")
        form.addParam("pixelSize", params.FloatParam, allowsNull=True, label="Pixel size override (Å/px)",
                      help="Leave empty to use blob/psize_A from the file. Set it only when the file's pixel size "
                           "is wrong or missing; shifts are rescaled accordingly.")
        form.addParam("copyFiles", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Copy images into the project?",
                      help="No (default): the image stacks are symbolic links in the protocol's extra folder "
                           "(no extra disk space, the cryoSPARC files must stay where they are). Yes: the stacks "
                           "are copied, so the Scipion project is independent of the cryoSPARC project.")

        group = form.addGroup("Acquisition (used only when the file has no CTF fields)")
        group.addParam("voltage", params.FloatParam, default=300.0, label="Voltage (kV)",
                       help="Microscope acceleration voltage. Used only when the .cs file has no ctf/accel_kv; "
                            "otherwise the file's value is kept.")
        group.addParam("sphericalAberration", params.FloatParam, default=2.7, label="Spherical aberration (mm)",
                       help="Cs of the objective lens. Used only when the .cs file has no ctf/cs_mm.")
        group.addParam("amplitudeContrast", params.FloatParam, default=0.1, label="Amplitude contrast",
                       help="Fraction of amplitude contrast (0.07-0.1 in cryo-EM). Used only when the .cs file "
                            "has no ctf/amp_contrast.")

    # ------------------------------------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.importParticlesStep, needsGPU=False)

    def _csPath(self) -> str:
        return os.path.abspath(self.csFile.get("").strip()) if self.csFile.get() else ""

    def _optionalPath(self, param) -> str | None:
        value = (param.get() or "").strip()
        return os.path.abspath(value) if value else None

    def _pixelSizeOverride(self) -> float | None:
        value = self.pixelSize.get()
        return None if value is None or value <= 0 else float(value)

    def readParticles(self) -> ParticleSet:
        """The .cs file (+ passthrough) as a core ParticleSet, image paths pointing to the cryoSPARC stacks."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # missing stacks are reported by _validate
            return read_cryosparc(self._csPath(), passthrough_path=self._optionalPath(self.passthroughFile),
                                  blob_root=self._optionalPath(self.blobRoot), pixel_size=self._pixelSizeOverride())

    def importParticlesStep(self):
        particles = self.readParticles()
        self.info(f"read {len(particles)} particles ({particles.box} px, {particles.pixel_size:.4f} Å/px) from "
                  f"{self._csPath()}; alignment: {'3D' if particles.has_alignment else 'none'}, "
                  f"CTF: {'yes' if particles.has_ctf else 'no'}")
        particles = self._linkStacks(particles)
        output = self._createSetOfParticles()
        output.setIsPhaseFlipped(False)
        output.setObjComment(f"Particles imported from cryoSPARC file:\n{self._csPath()}")
        if not particles.has_ctf:  # the form's values; with CTF the file's values are used
            acq = output.getAcquisition()
            acq.setVoltage(self.voltage.get())
            acq.setSphericalAberration(self.sphericalAberration.get())
            acq.setAmplitudeContrast(self.amplitudeContrast.get())
            acq.setMagnification(10000.0)
        fill_set_of_particles(output, particles)
        self._defineOutputs(outputParticles=output)

    def _linkStacks(self, particles: ParticleSet) -> ParticleSet:
        """Link (or copy) each stack into extra/ as ``<name>.mrcs``; the particles then point to those files
        (paths relative to the project, as Scipion stores them)."""
        copy_or_link = pwutils.copyFile if self.copyFiles.get() else pwutils.createAbsLink
        files = list(dict.fromkeys(str(f) for f in particles.image_files))
        names = stack_link_names(files)
        new_path = {}
        for fn in files:
            dst = self._getExtraPath(names[fn])
            copy_or_link(fn, dst)
            new_path[fn] = dst
        self.info(f"{'copied' if self.copyFiles.get() else 'linked'} {len(files)} image stack(s) into "
                  f"{self._getExtraPath()}")
        out = particles.subset(np.arange(len(particles)))
        out.image_files = np.asarray([new_path[str(f)] for f in particles.image_files], dtype=object)
        return out

    # ------------------------------------------------------------------------------------------------ infos
    def _validate(self):
        cs = self._csPath()
        if not cs:
            return ["Select the cryoSPARC particles .cs file."]
        if not os.path.isfile(cs):
            return [f"The .cs file does not exist: {cs}"]
        passthrough = self._optionalPath(self.passthroughFile)
        if passthrough is not None and not os.path.isfile(passthrough):
            return [f"The passthrough .cs file does not exist: {passthrough}"]
        blob_root = self._optionalPath(self.blobRoot)
        if blob_root is not None and not os.path.isdir(blob_root):
            return [f"The cryoSPARC project folder does not exist: {blob_root}"]
        try:
            fields = load_cs_fields(cs, passthrough)
        except (ValueError, FileNotFoundError) as exc:
            return [f"Cannot read {cs} as a cryoSPARC dataset: {exc}"]
        missing = [name for name in ("blob/path", "blob/idx") if name not in fields]
        if missing:
            return [f"{os.path.basename(cs)} has no blob fields ({', '.join(missing)} missing): it does not say "
                    "where the particle images are. Give the job's passthrough particles .cs file."]
        if "blob/psize_A" not in fields and self._pixelSizeOverride() is None:
            return ["The .cs file has no pixel size (blob/psize_A): set the pixel size override."]
        try:
            particles = self.readParticles()
        except (ValueError, FileNotFoundError) as exc:
            return [f"Cannot import {os.path.basename(cs)}: {exc}"]
        absent = [f for f in dict.fromkeys(str(f) for f in particles.image_files) if not os.path.isfile(f)]
        if absent:
            roots = blob_root if blob_root is not None else (f"{os.path.dirname(cs)} and its parent folders")
            return [f"{len(absent)} image stack(s) not found, e.g. {absent[0]} (blob/path "
                    f"{fields['blob/path'][0]!s} tried under {roots}). Set the cryoSPARC project folder."]
        return []

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output particles not ready yet."]
        out = self.outputParticles
        align = "with 3D alignment (poses and shifts)" if out.hasAlignmentProj() else "without alignment"
        ctf = "with CTF" if out.hasCTF() else "without CTF"
        acq = out.getAcquisition()
        return [f"{out.getSize()} particles imported from {self._csPath()}",
                f"{align}, {ctf}; box {out.getXDim()} px, {out.getSamplingRate():.4f} Å/px",
                f"voltage {number(acq.getVoltage())} kV, Cs {number(acq.getSphericalAberration())} mm, amplitude "
                f"contrast {number(acq.getAmplitudeContrast())}",
                f"image stacks {'copied' if self.copyFiles.get() else 'linked'} into the protocol folder"]

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        out = self.outputParticles
        what = "projection poses, shifts and CTF" if out.hasAlignmentProj() else (
            "CTF parameters" if out.hasCTF() else "image locations")
        return [f"{out.getSize()} particles ({out.getXDim()} px, {out.getSamplingRate():.3f} Å/px) and their "
                f"{what} were imported from the cryoSPARC file {os.path.basename(self._csPath())} with bayespose "
                f"(cryosparc-tools reader; poses converted to RELION's convention), giving "
                f"{self.getObjectTag('outputParticles')}."]

