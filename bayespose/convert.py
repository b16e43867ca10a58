"""Scipion objects <-> bayespose core arrays: poses, CTF, acquisition and particle sets.

Pure conversion, no science. Conventions (measured against the relion plugin, see tests/scipion/test_convert.py):

* Core poses are RELION's: rotation ``A`` (3, 3) maps volume -> image coordinates
  (``A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T``), origins are
  ``rlnOriginX/Y`` (positive = the shift that centres the particle).
* Scipion stores a projection pose (``ALIGN_PROJ``) as a 4x4 matrix ``M`` with shifts in **pixels**:
  ``M[:3, :3] = A^T`` and ``M[:3, 3] = A^T @ s`` with ``s = (rlnOriginX_px, rlnOriginY_px, 0)``, i.e.
  ``inv(M) = [[A, -s], [0, 1]]``. This is exactly what the relion plugin's reader builds
  (``matrixFromGeometry(s, angles, inverseTransform=True)``) and what its writer turns back into
  rlnAngle*/rlnOrigin*. ``Transform.getShifts()`` / ``getEulerAngles()`` are NOT RELION's origin/angles.
* Scipion image locations are ``(index, filename)`` with a **1-based** index into a stack (``NO_INDEX = 0`` for a
  single image); core ``image_indices`` are **0-based**.
* CTF: Scipion ``CTFModel`` defocus U/V in Å, angle in degrees (EMX-standardised: U >= V, 0 <= angle < 180,
  which describes the same CTF), phase shift in degrees; voltage (kV), Cs (mm) and amplitude contrast (fraction)
  live on the ``Acquisition``.
* Per-particle results are stored on Scipion particles as ``_bp<Name>`` attributes (``Float`` / ``Integer``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import pwem.constants as emcts
from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, Transform
from pyworkflow.object import Float, Integer

from bayespose.core.geometry.rotations import project_to_so3
from bayespose.core.imaging.particles import CTFParams, ParticleSet

#: Prefix of the per-particle attributes that bayespose adds to Scipion particles.
ATTRIBUTE_PREFIX = "_bp"
#: Scipion attribute (written by the relion plugin's reader) holding the RELION half set (1 or 2).
HALF_SET_ATTRIBUTES = ("_rlnRandomSubset", "_bpHalfSet")
#: Scipion attribute holding the RELION optics group.
OPTICS_GROUP_ATTRIBUTE = "_rlnOpticsGroup"
#: Key of ``ParticleSet.extra`` that keeps the Scipion objId of each particle.
SCIPION_ID = "scipion_id"

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------------------------------------------
def matrix_from_pose(rotation: np.ndarray, origin_px: np.ndarray) -> np.ndarray:
    """RELION pose -> Scipion ALIGN_PROJ 4x4 matrix ``M`` (float64).

    ``rotation``: RELION ``A`` (3, 3) (volume -> image); ``origin_px``: ``(rlnOriginX, rlnOriginY)`` in pixels.
    Returns ``M`` with ``M[:3, :3] = A^T``, ``M[:3, 3] = A^T @ (ox, oy, 0)`` (``inv(M) = [[A, -s], [0, 1]]``).
    """
    a = np.asarray(rotation, dtype=np.float64)
    s = np.asarray(origin_px, dtype=np.float64).reshape(-1)
    if a.shape != (3, 3):
        raise ValueError(f"rotation must be a 3x3 matrix, got shape {a.shape}")
    if s.shape not in ((2,), (3,)):
        raise ValueError(f"origin_px must be (x, y) in pixels, got shape {s.shape}")
    s3 = np.zeros(3)
    s3[: len(s)] = s
    m = np.eye(4)
    m[:3, :3] = a.T
    m[:3, 3] = a.T @ s3
    return m


def pose_from_matrix(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scipion ALIGN_PROJ 4x4 matrix -> (RELION ``A`` (3, 3), origin ``(x, y)`` in pixels).

    Inverse of :func:`matrix_from_pose`: ``inv(M) = [[A, -s], [0, 1]]``. The rotation block is projected onto
    SO(3) so that a scaled or slightly non-orthonormal matrix still gives a rotation; ``s_z`` (a 3D origin, not used
    for particle images) is dropped.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"a Scipion transform matrix must be 4x4, got shape {m.shape}")
    inv = np.linalg.inv(m)
    a = project_to_so3(inv[:3, :3])
    s = -inv[:3, 3]
    return a, s[:2].copy()


def transform_from_pose(rotation: np.ndarray, origin_px: np.ndarray) -> Transform:
    """RELION pose (``A`` (3, 3), ``(rlnOriginX, rlnOriginY)`` in px) -> ``pwem.objects.Transform`` (ALIGN_PROJ)."""
    return Transform(matrix_from_pose(rotation, origin_px))


def pose_from_transform(transform: Transform) -> tuple[np.ndarray, np.ndarray]:
    """``pwem.objects.Transform`` of an ALIGN_PROJ particle -> (RELION ``A`` (3, 3), origin ``(x, y)`` in px)."""
    if transform is None:
        raise ValueError("the particle has no transform (alignment)")
    return pose_from_matrix(transform.getMatrix())


# ----------------------------------------------------------------------------------------------------------------
# CTF and acquisition
# ----------------------------------------------------------------------------------------------------------------
def ctf_model_from_params(ctf: CTFParams, i: int) -> CTFModel:
    """Particle ``i`` of ``ctf`` -> ``CTFModel`` (defocus U/V in Å, angle in degrees, phase shift in degrees).

    The model is EMX-standardised by Scipion (U >= V, angle in [0, 180)), which is the same CTF.
    """
    model = CTFModel()
    model.setStandardDefocus(float(ctf.defocus_u[i]), float(ctf.defocus_v[i]), float(ctf.defocus_angle[i]))
    model.setPhaseShift(float(ctf.phase_shift[i]))
    return model


def acquisition_from_params(ctf: CTFParams, i: int = 0, magnification: float = 10000.0,
                            dose_per_frame: float | None = None) -> Acquisition:
    """Voltage (kV), Cs (mm) and amplitude contrast (fraction) of particle ``i`` -> ``pwem.objects.Acquisition``.

    ``magnification`` is only a nominal value (Scipion needs one; pixel sizes come from the sampling rate).
    """
    acq = Acquisition()
    acq.setVoltage(float(ctf.voltage[i]))
    acq.setSphericalAberration(float(ctf.cs[i]))
    acq.setAmplitudeContrast(float(ctf.amplitude_contrast[i]))
    acq.setMagnification(float(magnification))
    if dose_per_frame is not None:
        acq.setDosePerFrame(float(dose_per_frame))
    return acq


def ctf_params_from_particles(particles: Iterable[Particle], acquisition: Acquisition | None = None) -> CTFParams:
    """CTF of Scipion particles -> ``CTFParams`` (Å, degrees, kV, mm, fraction).

    Defocus/angle/phase shift come from each particle's ``CTFModel`` (missing phase shift = 0). Voltage, Cs and
    amplitude contrast come from each particle's ``Acquisition`` when it carries them, else from ``acquisition``
    (typically the set's).
    """
    rows = []
    for n, part in enumerate(particles):
        model = part.getCTF()
        if model is None or model.getDefocusU() is None:
            raise ValueError(f"particle {n + 1} (id {part.getObjId()}) has no CTF model")
        acq = part.getAcquisition() if part.hasAcquisition() and part.getAcquisition().getVoltage() else acquisition
        if acq is None or acq.getVoltage() is None:
            raise ValueError(f"particle {n + 1} (id {part.getObjId()}) has no acquisition (voltage, Cs, "
                             "amplitude contrast) and none was given")
        rows.append(_ctf_row(model, acq))
    if not rows:
        raise ValueError("no particles to read the CTF from")
    cols = np.asarray(rows, dtype=np.float64).T
    return CTFParams(*cols)


def _ctf_row(model: CTFModel, acq: Acquisition) -> tuple[float, ...]:
    """One particle's CTF values in ``CTFParams.FIELDS`` order."""
    phase = model.getPhaseShift()
    return (model.getDefocusU(), model.getDefocusV(), model.getDefocusAngle(), acq.getVoltage(),
            acq.getSphericalAberration(), acq.getAmplitudeContrast(), 0.0 if phase is None else phase)


# ----------------------------------------------------------------------------------------------------------------
# Sets
# ----------------------------------------------------------------------------------------------------------------
def scipion_filename(filename: str) -> str:
    """Strip a Scipion/Xmipp format suffix (``stack.mrc:mrcs`` -> ``stack.mrc``)."""
    return re.sub(r":(mrcs?|ems?|spi|stk|hdf|tif{1,2}|img|hed)$", "", filename)


def _resolve(filename: str, root: str) -> str:
    fn = scipion_filename(filename)
    return os.path.abspath(fn if os.path.isabs(fn) else os.path.join(root, fn))


def _box_of(set_of_particles: SetOfParticles, first_file: str) -> int:
    """Image side in px: the set's stored first dimension, else the MRC header of the first stack."""
    dim = set_of_particles.getDim()
    if dim is not None and dim[0]:
        return int(dim[0])
    import mrcfile

    with mrcfile.open(first_file, header_only=True, permissive=True) as mrc:
        return int(mrc.header.nx)


def particles_from_scipion(set_of_particles: SetOfParticles, project_path: str | None = None) -> ParticleSet:
    """A Scipion ``SetOfParticles`` -> core ``ParticleSet``.

    * ``image_files``: absolute paths (relative Scipion paths are resolved against ``project_path``, default the
      current directory, which is the project folder inside a running protocol); ``image_indices`` 0-based.
    * ``rotations`` / ``origins_A``: only for ``ALIGN_PROJ`` sets (see the module conventions); ``ALIGN_2D`` and
      ``ALIGN_3D`` sets raise ``ValueError`` (they are not projection poses).
    * ``ctf``: when the set has CTF (each particle's ``CTFModel`` + acquisition).
    * ``half_set``: from ``_rlnRandomSubset`` (or ``_bpHalfSet``) when every particle has it.
    * ``optics_group``: from ``_rlnOpticsGroup`` when present.
    * ``extra["scipion_id"]``: the Scipion objIds, to match outputs back to these particles.
    """
    align = set_of_particles.getAlignment()
    if align in (emcts.ALIGN_2D, emcts.ALIGN_3D):
        raise ValueError(f"the particles have a {align} alignment, which is not a projection pose; bayespose needs "
                         f"'{emcts.ALIGN_PROJ}' alignment (e.g. from a 3D refinement) or no alignment")
    has_align = align == emcts.ALIGN_PROJ
    has_ctf = bool(set_of_particles.hasCTF())
    root = project_path or os.getcwd()
    set_acq = set_of_particles.getAcquisition()

    ids, files, indices, mats, ctf_rows, halves, optics = [], [], [], [], [], [], []
    for part in set_of_particles.iterItems(orderBy="id"):
        index, filename = part.getLocation()
        if not filename:
            raise ValueError(f"particle id {part.getObjId()} has no image file")
        ids.append(part.getObjId())
        files.append(_resolve(filename, root))
        indices.append(max(int(index or 0) - 1, 0))
        if has_align:
            transform = part.getTransform()
            if transform is None:
                raise ValueError(f"particle id {part.getObjId()} has no transform although the set is "
                                 f"{emcts.ALIGN_PROJ}")
            mats.append(np.array(transform.getMatrix(), dtype=np.float64))
        if has_ctf:
            model = part.getCTF()
            if model is None:
                raise ValueError(f"particle id {part.getObjId()} has no CTF although the set has CTF")
            acq = part.getAcquisition() if part.hasAcquisition() and part.getAcquisition().getVoltage() else set_acq
            ctf_rows.append(_ctf_row(model, acq))
        halves.append(_first_attribute(part, HALF_SET_ATTRIBUTES))
        optics.append(_first_attribute(part, (OPTICS_GROUP_ATTRIBUTE,)))

    if not ids:
        raise ValueError("the set of particles is empty")
    pixel_size = set_of_particles.getSamplingRate()
    if not pixel_size:
        raise ValueError("the set of particles has no sampling rate (pixel size)")

    rotations = origins_a = None
    if has_align:
        poses = [pose_from_matrix(m) for m in mats]
        rotations = np.stack([p[0] for p in poses])
        origins_a = np.stack([p[1] for p in poses]) * pixel_size
    ctf = CTFParams(*np.asarray(ctf_rows, dtype=np.float64).T) if has_ctf else None
    half_set = np.asarray(halves, dtype=np.int64) if all(h is not None for h in halves) else None
    optics_group = np.asarray(optics, dtype=np.int64) if all(o is not None for o in optics) else None

    return ParticleSet(
        pixel_size=float(pixel_size),
        box=_box_of(set_of_particles, files[0]),
        image_files=np.asarray(files, dtype=object),
        image_indices=np.asarray(indices, dtype=np.int64),
        rotations=rotations,
        origins_A=origins_a,
        ctf=ctf,
        optics_group=optics_group,
        half_set=half_set,
        extra={SCIPION_ID: np.asarray(ids, dtype=np.int64)},
    )


def _first_attribute(obj, names: Iterable[str]):
    """Value of the first of ``names`` that ``obj`` has (as int), else None."""
    for name in names:
        if obj.hasAttribute(name):
            value = getattr(obj, name).get()
            if value is not None:
                return int(value)
    return None


def attribute_name(name: str) -> str:
    """``"MaxProb"`` -> ``"_bpMaxProb"`` (the Scipion attribute bayespose writes)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"attribute name {name!r} must start with a letter and contain only letters, digits and _")
    return ATTRIBUTE_PREFIX + name


def _scalar_attribute(values: np.ndarray, i: int):
    value = values[i]
    if np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.bool_):
        return Integer(int(value))
    return Float(float(value))


def _check_attributes(attributes: Mapping[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
    out = {}
    for name, values in (attributes or {}).items():
        arr = np.asarray(values)
        if arr.shape != (n,):
            raise ValueError(f"attribute {name!r} has shape {arr.shape}, expected ({n},) (one value per particle)")
        if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
            raise ValueError(f"attribute {name!r} must be numeric, got dtype {arr.dtype}")
        out[attribute_name(name)] = arr
    return out


def fill_set_of_particles(output_set: SetOfParticles, particles: ParticleSet,
                          template_set: SetOfParticles | None = None,
                          attributes: Mapping[str, np.ndarray] | None = None,
                          magnification: float = 10000.0) -> SetOfParticles:
    """Append one Scipion ``Particle`` per core particle to the (empty) ``output_set`` and set its properties.

    Without ``template_set``: the set's acquisition comes from the first particle's CTF (without CTF, whatever
    acquisition the caller set on ``output_set`` beforehand is kept); each particle gets location ``(index + 1,
    file)``, a ``CTFModel`` and ``Acquisition`` (when ``particles.ctf``), an ALIGN_PROJ ``Transform`` (when
    ``particles.rotations``), the objId ``extra["scipion_id"]`` when present, ``_rlnRandomSubset`` from ``half_set``
    and ``_rlnOpticsGroup`` from ``optics_group`` renumbered 1..K (:func:`consecutive_optics_groups`); the set's
    acquisition gets the matching RELION optics table (:func:`optics_group_info`) so that the relion plugin exports
    a consistent star file.

    With ``template_set`` (e.g. the protocol's input set): every template item whose objId is in
    ``particles.extra["scipion_id"]`` is copied with all its metadata and only its alignment is replaced (when
    ``particles.rotations``) and the attributes added; template items not in ``particles`` are left out.

    ``attributes``: ``{"Name": (N,) array}`` stored as ``_bpName`` (``Integer`` for integer/bool arrays, else
    ``Float``), in the order of ``particles``. Sets sampling rate, alignment type and hasCTF on ``output_set``.
    """
    n = len(particles)
    attrs = _check_attributes(attributes, n)
    has_align = particles.rotations is not None
    origins_px = particles.origins_px if has_align else None

    if template_set is not None:
        _fill_from_template(output_set, particles, template_set, attrs, origins_px)
    else:
        _fill_new(output_set, particles, attrs, origins_px, magnification)

    output_set.setSamplingRate(particles.pixel_size)
    output_set.setAlignment(emcts.ALIGN_PROJ if has_align else
                            (template_set.getAlignment() if template_set is not None else emcts.ALIGN_NONE))
    if template_set is None:
        output_set.setHasCTF(particles.ctf is not None)
    return output_set


def consecutive_optics_groups(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optics groups renumbered 1..K in increasing order (RELION numbers its optics table rows 1..K).

    Returns ``(new (N,) int, original group of each new number (K,))``; e.g. cryoSPARC exp_group_id 23 -> 1.
    """
    unique, inverse = np.unique(np.asarray(groups, dtype=np.int64), return_inverse=True)
    return inverse.astype(np.int64) + 1, unique


def optics_group_info(particles: ParticleSet, groups: np.ndarray | None = None,
                      acquisition: Acquisition | None = None) -> str:
    """RELION 3.1 ``data_optics`` table (text) for the particles, as the relion plugin keeps it in
    ``Acquisition.opticsGroupInfo`` and writes it back on export.

    ``groups``: (N,) consecutive 1..K group of each particle (default: all in group 1). Voltage (kV), Cs (mm) and
    amplitude contrast per group come from the first particle of the group; without CTF from ``acquisition``
    when it has a voltage, else 300 / 2.7 / 0.1. Pixel size (Å) and box (px) from the set.
    """
    n = len(particles)
    groups = np.ones(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    labels = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    lines += [f"_{label} #{k + 1}" for k, label in enumerate(labels)]
    for group in range(1, int(groups.max()) + 1 if n else 1):
        first = int(np.flatnonzero(groups == group)[0]) if np.any(groups == group) else 0
        if particles.ctf is not None and n:
            volt, cs, ac = (particles.ctf.voltage[first], particles.ctf.cs[first],
                            particles.ctf.amplitude_contrast[first])
        elif acquisition is not None and acquisition.getVoltage():
            volt, cs, ac = (acquisition.getVoltage(), acquisition.getSphericalAberration() or 2.7,
                            acquisition.getAmplitudeContrast() or 0.1)
        else:
            volt, cs, ac = 300.0, 2.7, 0.1
        lines.append(f"opticsGroup{group} {group} {volt:.6f} {cs:.6f} {ac:.6f} {particles.pixel_size:.6f} "
                     f"{particles.box} 2")
    return "\n".join(lines) + "\n"


def _fill_new(output_set: SetOfParticles, particles: ParticleSet, attrs: dict[str, np.ndarray],
              origins_px: np.ndarray | None, magnification: float) -> None:
    ctf = particles.ctf
    ids = particles.extra.get(SCIPION_ID)
    output_set.setSamplingRate(particles.pixel_size)
    groups = None
    if particles.optics_group is not None:
        groups, _ = consecutive_optics_groups(particles.optics_group)
    if ctf is not None and len(particles):
        output_set.setAcquisition(acquisition_from_params(ctf, 0, magnification))
    acq = output_set.getAcquisition()
    acq.opticsGroupInfo.set(optics_group_info(particles, groups, acq))
    for i in range(len(particles)):
        part = Particle()
        part.setLocation(int(particles.image_indices[i]) + 1, str(particles.image_files[i]))
        if ids is not None:
            part.setObjId(int(ids[i]))
        if ctf is not None:
            part.setCTF(ctf_model_from_params(ctf, i))
            part.setAcquisition(acquisition_from_params(ctf, i, magnification))
        if origins_px is not None:
            part.setTransform(transform_from_pose(particles.rotations[i], origins_px[i]))
        if particles.half_set is not None:
            part._rlnRandomSubset = Integer(int(particles.half_set[i]))
        if groups is not None:
            part._rlnOpticsGroup = Integer(int(groups[i]))
        for name, values in attrs.items():
            setattr(part, name, _scalar_attribute(values, i))
        output_set.append(part)


def _fill_from_template(output_set: SetOfParticles, particles: ParticleSet, template_set: SetOfParticles,
                        attrs: dict[str, np.ndarray], origins_px: np.ndarray | None) -> None:
    ids = particles.extra.get(SCIPION_ID)
    if ids is None:
        raise ValueError(f"particles.extra[{SCIPION_ID!r}] is needed to match the particles to the template set")
    row_of = {int(obj_id): i for i, obj_id in enumerate(ids)}
    if len(row_of) != len(ids):
        raise ValueError("particles.extra['scipion_id'] has duplicated ids")
    output_set.copyInfo(template_set)
    found = 0
    for item in template_set.iterItems(orderBy="id"):
        i = row_of.get(int(item.getObjId()))
        if i is None:
            continue
        new = item.clone()
        if origins_px is not None:
            new.setTransform(transform_from_pose(particles.rotations[i], origins_px[i]))
        for name, values in attrs.items():
            setattr(new, name, _scalar_attribute(values, i))
        output_set.append(new)
        found += 1
    if found != len(row_of):
        raise ValueError(f"{len(row_of) - found} of {len(row_of)} particles have a scipion_id that is not in the "
                         "template set")
