"""cryoSPARC particle ``.cs`` files -> :class:`~bayespose.core.imaging.particles.ParticleSet` (via ``cryosparc-tools``).

Field mapping (cryoSPARC -> RELION / bayespose units):

====================================  =========================================================================
``blob/path``, ``blob/idx``           image stack (leading ``>`` stripped, resolved, see below) and 0-based slice
``blob/psize_A``, ``blob/shape``      pixel size (Å/px) and box (px); one value for the whole set
``ctf/df1_A``, ``ctf/df2_A``          ``rlnDefocusU``, ``rlnDefocusV`` (Å)
``ctf/df_angle_rad``                  ``rlnDefocusAngle`` = degrees(df_angle_rad)
``ctf/accel_kv``, ``ctf/cs_mm``       voltage (kV), Cs (mm)
``ctf/amp_contrast``                  amplitude contrast (fraction)
``ctf/phase_shift_rad``               ``rlnPhaseShift`` = degrees(phase_shift_rad) (0 if absent)
``ctf/exp_group_id``                  optics group = exp_group_id + 1
``alignments3D/pose``                 rotation vector r (radians): RELION ``A = expmap(r)^T``
                                      (``Rotation.from_rotvec(r).as_matrix().T``)
``alignments3D/shift``                pixels at ``alignments3D/psize_A``: ``rlnOriginX/Y`` (px) = ``+shift``, so
                                      ``origins_A = shift * alignments3D/psize_A`` (rescaled if ``pixel_size=``
                                      overrides the blob pixel size)
``alignments3D/split``                half set = split + 1 (rlnRandomSubset)
``uid``                               kept in ``extra["cryosparcUid"]`` (uint64)
====================================  =========================================================================

The pose and shift conventions agree with two independent readers: cryoDRGN's ``parse_pose_csparc`` (its parse
of ``cryosparc_P12_J24_001_particles.cs`` gives ``rot = expmap(pose)^T`` to 4e-7 and ``trans * box = +shift``,
while its star parser gives ``rot = A_relion`` and ``trans * box = rlnOriginX/Y (px)``), and pyem's
``csparc2star`` (``rlnAngle* = rot2euler(expmap(pose))`` where pyem's ``expmap`` returns the transposed Rodrigues
matrix and ``rot2euler`` decomposes RELION's A; ``rlnOriginX/Y = shift``). Tested in
``tests/core/io/test_io_cryosparc.py``.

Passthrough files: cryoSPARC job outputs often keep the blob and CTF fields in a separate
``*_passthrough_*.cs`` file. Fields missing from the main file are taken from the passthrough file(s), matched by
``uid`` (every main uid must be present). When ``passthrough_path`` is None and the main file lacks ``blob/path``
or ``ctf/df1_A``, the ``*passthrough*.cs`` files in the same folder that contain all the main file's uids are used
(``auto_passthrough=False`` turns this off).

Image paths are relative to the cryoSPARC project folder (e.g. ``J2/imported/x.mrc``): each is tried against
``blob_root`` when given, else the ``.cs`` file's folder and then its parents; the first existing file wins.
Stacks found nowhere keep the path joined to the first candidate folder (a warning lists them); the metadata are
read anyway and :func:`~bayespose.core.io.mrc.read_images` reports the missing files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset
from scipy.spatial.transform import Rotation

from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.io.mrc import resolve_relative_paths, stack_shape

__all__ = ["read_cryosparc", "load_cs_fields", "find_passthrough_files"]

_PIXEL_RTOL = 1e-4


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"cryoSPARC file not found: {path}")
    try:
        dataset = Dataset.load(str(path))
    except Exception as exc:  # cryosparc-tools raises assorted errors on bad files
        raise ValueError(f"cannot read cryoSPARC dataset {path}: {exc}") from exc
    return {name: np.asarray(dataset[name]) for name in dataset.fields()}


def _merge(main: dict[str, np.ndarray], other: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    """Add the fields of ``other`` missing from ``main``, rows matched by ``uid``."""
    new = [name for name in other if name not in main]
    if not new:
        return main
    order = np.argsort(other["uid"], kind="stable")
    sorted_uids = other["uid"][order]
    pos = np.searchsorted(sorted_uids, main["uid"])
    pos = np.clip(pos, 0, len(sorted_uids) - 1)
    found = sorted_uids[pos] == main["uid"]
    if not found.all():
        raise ValueError(f"passthrough file {source} lacks {int((~found).sum())} of the {len(found)} particle uids")
    rows = order[pos]
    merged = dict(main)
    for name in new:
        merged[name] = other[name][rows]
    return merged


def find_passthrough_files(cs_path: str | os.PathLike) -> list[Path]:
    """``*passthrough*.cs`` files next to ``cs_path`` (sorted), excluding ``cs_path`` itself."""
    cs_path = Path(cs_path).resolve()
    return sorted(p for p in cs_path.parent.glob("*passthrough*.cs") if p.resolve() != cs_path)


def load_cs_fields(cs_path: str | os.PathLike, passthrough_path=None,
                   auto_passthrough: bool = True) -> dict[str, np.ndarray]:
    """All fields of a ``.cs`` file (name -> array, N rows), merged with its passthrough file(s) by ``uid``.

    ``passthrough_path``: one path or a sequence of paths; None -> auto-detection (see the module docstring).
    """
    cs_path = Path(cs_path)
    fields = _load(cs_path)
    if "uid" not in fields:
        raise ValueError(f"{cs_path}: no uid field; is this a cryoSPARC particle dataset?")
    if passthrough_path is not None:
        paths = [passthrough_path] if isinstance(passthrough_path, (str, os.PathLike)) else list(passthrough_path)
        for p in paths:
            fields = _merge(fields, _load(Path(p)), Path(p))
    elif auto_passthrough and ("blob/path" not in fields or "ctf/df1_A" not in fields):
        for candidate in find_passthrough_files(cs_path):
            other = _load(candidate)
            if "uid" in other and np.isin(fields["uid"], other["uid"]).all():
                fields = _merge(fields, other, candidate)
    return fields


def _single_value(values: np.ndarray, what: str, path: Path) -> float:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = values.min(), values.max()
    if hi - lo > _PIXEL_RTOL * max(abs(hi), 1e-12):
        raise ValueError(f"{path}: particles have different {what} ({np.unique(values)[:5].tolist()} ...); "
                         f"bayespose needs one value per particle set")
    return float(values[0])


def _blob_paths(fields, cs_path: Path, blob_root) -> tuple[np.ndarray, list[str]]:
    names = [str(p.decode() if isinstance(p, bytes) else p).lstrip(">") for p in fields["blob/path"]]
    if blob_root is not None:
        bases = [Path(blob_root)]
    else:
        folder = cs_path.resolve().parent
        bases = [folder, *folder.parents]
    return resolve_relative_paths(names, bases)


def _ctf(fields) -> CTFParams | None:
    if "ctf/df1_A" not in fields:
        return None
    n = len(fields["ctf/df1_A"])
    required = ("ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
    missing = [name for name in required if name not in fields]
    if missing:
        raise ValueError(f"the .cs file has ctf/df1_A but not {', '.join(missing)}")
    phase = fields.get("ctf/phase_shift_rad", np.zeros(n))
    return CTFParams(
        defocus_u=fields["ctf/df1_A"],
        defocus_v=fields["ctf/df2_A"],
        defocus_angle=np.degrees(np.asarray(fields["ctf/df_angle_rad"], dtype=np.float64)),
        voltage=fields["ctf/accel_kv"],
        cs=fields["ctf/cs_mm"],
        amplitude_contrast=fields["ctf/amp_contrast"],
        phase_shift=np.degrees(np.asarray(phase, dtype=np.float64)),
    )


def read_cryosparc(cs_path: str | os.PathLike, passthrough_path: str | os.PathLike | Sequence | None = None,
                   blob_root: str | os.PathLike | None = None, pixel_size: float | None = None,
                   auto_passthrough: bool = True) -> ParticleSet:
    """Read a cryoSPARC particle ``.cs`` file (plus passthrough) into a :class:`ParticleSet`.

    Args:
        cs_path: the particles ``.cs`` file (a job output or an exported dataset).
        passthrough_path: passthrough ``.cs`` file(s) holding fields missing from ``cs_path`` (matched by uid);
            None -> auto-detected next to ``cs_path`` when blob or CTF fields are missing.
        blob_root: the cryoSPARC project folder ``blob/path`` is relative to (default: ``cs_path``'s folder,
            then its parents).
        pixel_size: Å/px, overrides ``blob/psize_A``.
        auto_passthrough: look for ``*passthrough*.cs`` files next to ``cs_path`` when needed.

    Poses (``alignments3D``) are optional: without them ``rotations`` and ``origins_A`` are None. Conventions
    are in the module docstring.
    """
    cs_path = Path(cs_path)
    fields = load_cs_fields(cs_path, passthrough_path, auto_passthrough)
    if "blob/path" not in fields or "blob/idx" not in fields:
        raise ValueError(f"{cs_path}: no blob/path + blob/idx fields (particle images); give the passthrough "
                         f"file with passthrough_path=")
    n = len(fields["uid"])
    if n == 0:
        raise ValueError(f"{cs_path}: no particles")

    files, missing = _blob_paths(fields, cs_path, blob_root)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(f"{cs_path}: {len(missing)} image stack(s) not found ({shown}); metadata read anyway",
                      stacklevel=2)

    blob_psize = _single_value(fields["blob/psize_A"], "blob/psize_A", cs_path) if "blob/psize_A" in fields \
        else None
    if pixel_size is not None:
        px = float(pixel_size)
        if not np.isfinite(px) or px <= 0:
            raise ValueError(f"pixel_size must be a positive number of Å, got {pixel_size}")
    elif blob_psize is not None:
        px = blob_psize
    else:
        raise ValueError(f"{cs_path}: no blob/psize_A field; pass pixel_size= (Å/px)")

    if "blob/shape" in fields:
        shape = np.asarray(fields["blob/shape"]).reshape(n, -1)
        if shape.shape[1] != 2 or not np.all(shape[:, 0] == shape[:, 1]):
            raise ValueError(f"{cs_path}: images must be square, blob/shape has {np.unique(shape, axis=0)[:3]}")
        box = int(_single_value(shape[:, 0], "box sizes (blob/shape)", cs_path))
    else:
        existing = [f for f in dict.fromkeys(files) if os.path.isfile(f)]
        if not existing:
            raise ValueError(f"{cs_path}: no blob/shape field and no image stack found to read the box size from")
        box = int(stack_shape(existing[0])[-1])

    rotations = origins = half_set = None
    if "alignments3D/pose" in fields:
        pose = np.asarray(fields["alignments3D/pose"], dtype=np.float64).reshape(n, 3)
        rotations = Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1)
        shift = np.asarray(fields.get("alignments3D/shift", np.zeros((n, 2))), dtype=np.float64).reshape(n, 2)
        if "alignments3D/psize_A" in fields:
            align_psize = np.asarray(fields["alignments3D/psize_A"], dtype=np.float64)
            scale = align_psize * (px / blob_psize) if blob_psize else align_psize
        else:
            scale = np.full(n, px)
        origins = shift * scale[:, None]
        if "alignments3D/split" in fields:
            half_set = np.asarray(fields["alignments3D/split"], dtype=np.int64) + 1

    optics_group = None
    if "ctf/exp_group_id" in fields:
        optics_group = np.asarray(fields["ctf/exp_group_id"], dtype=np.int64) + 1

    return ParticleSet(
        pixel_size=px, box=box, image_files=files,
        image_indices=np.asarray(fields["blob/idx"], dtype=np.int64),
        rotations=rotations, origins_A=origins, ctf=_ctf(fields), optics_group=optics_group, half_set=half_set,
        extra={"cryosparcUid": np.asarray(fields["uid"], dtype=np.uint64)},
    )
