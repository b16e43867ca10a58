"""RELION particle STAR files <-> :class:`~bayespose.core.imaging.particles.ParticleSet` (via the ``starfile`` package).

Reading (:func:`read_star`) accepts

* RELION 3.1+ files (``data_optics`` + ``data_particles``; RELION 4 and 5 use the same layout): per-particle
  defocus from the particle table, voltage / Cs / amplitude contrast / pixel size / box from the particle's optics
  group (a value in the particle table, if present, takes precedence over the optics table);
* RELION 3.0 style files (one table, no optics block, any block name): everything per particle.

Decisions (documented here because the file formats leave them open):

* **Pixel size** (Å/px), first found of: the ``pixel_size=`` argument; ``rlnImagePixelSize``; ``rlnPixelSize``;
  ``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification`` (RELION 3.0's definition). All particles must share
  one pixel size (relative tolerance 1e-4), otherwise ``ValueError`` (e.g. optics groups at 1.24 and 1.25 Å);
  the ``pixel_size=`` override bypasses that check (use it only when you know the images share it).
  With no pixel size anywhere, ``ValueError`` asks for ``pixel_size=``.
* **Box** (px): the ``box=`` argument; else ``rlnImageSize``; else the header of the first image stack found.
* **Origins**: ``rlnOriginXAngst/YAngst`` (Å) are kept; RELION 3.0 ``rlnOriginX/Y`` (px) are multiplied by the
  pixel size. RELION's sign convention is kept unchanged (see :mod:`bayespose.core.imaging.particles`).
* **Angles**: ``rlnAngleRot/Tilt/Psi`` (all three needed) -> RELION matrices ``A`` (:mod:`..rotations`); else
  ``rotations = None`` (a lone ``rlnAnglePsi`` of a 2D classification stays in ``extra``).
* **CTF**: present when ``rlnDefocusU`` is. Absent labels take RELION's own defaults (``CTF::read``):
  ``rlnDefocusV`` = U, angle and phase shift 0, voltage 200 kV, Cs 0 mm, amplitude contrast 0 — the last three
  with a ``UserWarning`` (a real RELION 3.0 refinement star in the test data has no rlnAmplitudeContrast).
* **Image names** ``"k@path"`` (1-based ``k``; a name without ``@`` is slice 0). RELION resolves relative paths
  against its project folder (the working directory of the job), usually the star file's folder or one of its
  parents: each path is tried against ``project_dir`` when given, else the star file's folder and then its parent
  folders, and the first existing file wins. Paths found nowhere are joined to the first candidate folder and
  listed in a warning; metadata are read anyway and :func:`~bayespose.core.io.mrc.read_images` fails with the
  list of missing stacks.
* **Other columns**: every particle column not mapped to a ParticleSet field goes to ``extra`` under its label
  without the leading underscore (``"rlnClassNumber"``, ``"rlnMicrographName"``, ``"dummyVariable"``); numeric
  columns as numeric arrays, text columns (micrograph names, ...) as object arrays of ``str``. ``write_star``
  writes them back, so a round trip keeps them. Optics-table columns other than the CTF constants, pixel size and
  box (beam tilt, Zernike terms, MTF, ...) are not carried over.

Values are checked when read: a particle or optics column that must be numeric (angles, origins, CTF, pixel size,
box, optics group, half set) with a value that is not a finite number, a CTF with a voltage <= 0, a last line with
fewer values than its table has columns (a file cut short) and a particle that refers to an image beyond the end of
an existing stack raise ``ValueError`` naming the file, the table row (1-based) and the column.

Writing (:func:`write_star`) produces a RELION 3.1 file (``data_optics`` + ``data_particles``), atomically.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from bayespose.core.geometry.rotations import euler_to_matrix, matrix_to_euler
from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.io.atomic import atomic_file
from bayespose.core.io.mrc import resolve_relative_paths, stack_index_error, stack_length, stack_shape

__all__ = ["read_star", "write_star", "split_image_names"]

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_STRING_LABELS = ["rlnImageName", "rlnMicrographName", "rlnImageOriginalName", "rlnOpticsGroupName",
                  "rlnMtfFileName", "rlnReferenceImage", "rlnCtfImage"]
_PIXEL_LABELS = ("rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification")
_CTF_CONSTANT_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_WRITE_FLOAT_FORMAT = "%.10g"
_PIXEL_RTOL = 1e-4
# RELION's CTF::read defaults when a label is absent (ctf.cpp): 200 kV, Cs 0 mm, Q0 0
_RELION_DEFAULTS = {"rlnVoltage": 200.0, "rlnSphericalAberration": 0.0, "rlnAmplitudeContrast": 0.0}
# columns read as numbers: a value there that is not a finite number is an error naming the row and column
_NUMERIC_LABELS = (*_ANGLES, "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY", "rlnDefocusU",
                   "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", *_CTF_CONSTANT_LABELS, *_PIXEL_LABELS,
                   "rlnImageSize", "rlnOpticsGroup", "rlnRandomSubset")
_TAIL_BYTES = 1 << 16


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------


def split_image_names(names) -> tuple[np.ndarray, np.ndarray]:
    """RELION image names ``"k@path"`` -> (paths as given, 0-based slice indices). No ``@`` means slice 0."""
    paths, indices = [], []
    for name in names:
        name = str(name).strip()
        if "@" in name:
            head, path = name.split("@", 1)
            try:
                k = int(head)
            except ValueError as exc:
                raise ValueError(f"bad RELION image name {name!r}: the part before '@' is not an integer") from exc
            if k < 1:
                raise ValueError(f"bad RELION image name {name!r}: slice numbers are 1-based")
            indices.append(k - 1)
        else:
            path = name
            indices.append(0)
        if not path:
            raise ValueError(f"bad RELION image name {name!r}: no file name")
        paths.append(path)
    return np.array(paths, dtype=object), np.array(indices, dtype=np.int64)


def _tables(path: Path) -> dict[str, pd.DataFrame]:
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_LABELS)
    except Exception as exc:  # starfile raises assorted errors on malformed files
        raise ValueError(f"cannot parse STAR file {path}: {exc}") from exc
    if blocks:
        last_name, last = next(reversed(blocks.items()))
        if isinstance(last, pd.DataFrame):
            _check_last_line(path, last_name, len(last.columns))
    return {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}


def _check_last_line(path: Path, block: str, n_columns: int) -> None:
    """ValueError when the file's last line, a row of the table ``block``, has fewer than ``n_columns`` values (a
    file cut short: pandas would fill the missing values with NaN)."""
    with open(path, "rb") as fh:
        fh.seek(max(fh.seek(0, os.SEEK_END) - _TAIL_BYTES, 0))
        lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
    if not lines or lines[-1].startswith((b"_", b"#", b"loop_", b"data_")):
        return
    n_values = len(lines[-1].split())
    if n_values < n_columns:
        raise ValueError(f"{path}: the last line has {n_values} of the {n_columns} values of a data_{block} row: "
                         "the file is cut short (truncated during a copy or a write?)")


def _shown(value) -> str:
    return "NaN (or no value)" if value is None or (isinstance(value, float) and np.isnan(value)) else repr(value)


def _check_numbers(table: pd.DataFrame, path: Path, block: str) -> pd.DataFrame:
    """``table`` with its :data:`_NUMERIC_LABELS` columns as float64; ``ValueError`` naming the file, row (1-based)
    and column of the first value that is not a finite number."""
    table = table.copy()
    for label in _NUMERIC_LABELS:
        if label not in table.columns:
            continue
        raw = table[label]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            more = f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""
            raise ValueError(f"{path}: data_{block} row {bad[0] + 1}, column {label}: expected a finite number, got "
                             f"{_shown(raw.iloc[bad[0]])}{more}")
        table[label] = values
    return table


def _particle_table(tables: dict[str, pd.DataFrame], path: Path) -> pd.DataFrame:
    with_images = {name: df for name, df in tables.items() if "rlnImageName" in df.columns}
    if not with_images:
        raise ValueError(f"{path}: no table with an rlnImageName column (found blocks: {list(tables)})")
    name = "particles" if "particles" in with_images else next(iter(with_images))
    return _check_numbers(with_images[name].reset_index(drop=True), path, name)


def _optics_rows(particles: pd.DataFrame, tables: dict[str, pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """The optics-table row of every particle (a frame aligned with ``particles``), or None without optics."""
    optics = tables.get("optics")
    if optics is None or "rlnOpticsGroup" not in optics.columns:
        return None
    optics = _check_numbers(optics.reset_index(drop=True), path, "optics")
    if "rlnOpticsGroup" in particles.columns:
        groups = particles["rlnOpticsGroup"].to_numpy().astype(np.int64)
    elif len(optics) == 1:
        groups = np.full(len(particles), int(optics["rlnOpticsGroup"].iloc[0]))
    else:
        raise ValueError(f"{path}: {len(optics)} optics groups but the particles have no rlnOpticsGroup column")
    table_groups = optics["rlnOpticsGroup"].to_numpy().astype(np.int64)
    position = {g: i for i, g in enumerate(table_groups)}
    unknown = sorted(set(groups.tolist()) - set(position))
    if unknown:
        raise ValueError(f"{path}: particles refer to optics group(s) {unknown} missing from data_optics "
                         f"(groups there: {table_groups.tolist()})")
    return optics.iloc[[position[g] for g in groups]].reset_index(drop=True)


def _column(label: str, particles: pd.DataFrame, optics: pd.DataFrame | None) -> np.ndarray | None:
    """Per-particle values of ``label``: the particle table first, then the particle's optics group."""
    if label in particles.columns:
        return particles[label].to_numpy()
    if optics is not None and label in optics.columns:
        return optics[label].to_numpy()
    return None


def _pixel_size(particles, optics, override, path: Path) -> float:
    if override is not None:
        value = float(override)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"pixel_size must be a positive number of Å, got {override}")
        return value
    values = None
    for label in ("rlnImagePixelSize", "rlnPixelSize"):
        values = _column(label, particles, optics)
        if values is not None:
            break
    if values is None:
        det, mag = _column("rlnDetectorPixelSize", particles, optics), _column("rlnMagnification", particles, optics)
        if det is not None and mag is not None:
            values = det.astype(np.float64) * 1e4 / mag.astype(np.float64)
    if values is None:
        raise ValueError(f"{path}: no pixel size in the file (rlnImagePixelSize, rlnPixelSize or "
                         f"rlnDetectorPixelSize + rlnMagnification); pass pixel_size= (Å/px)")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{path}: invalid pixel size values {np.unique(values)[:5]}")
    unique = np.unique(values)
    if unique.max() - unique.min() > _PIXEL_RTOL * unique.max():
        raise ValueError(f"{path}: particles have different pixel sizes {unique.tolist()} Å (several optics "
                         f"groups?); bayespose needs one pixel size per particle set — split the set, or pass "
                         f"pixel_size= if the images really share one")
    return float(unique[0])


def _box(particles, optics, override, files, path: Path) -> int:
    if override is not None:
        return int(override)
    sizes = _column("rlnImageSize", particles, optics)
    if sizes is not None:
        unique = np.unique(sizes.astype(np.int64))
        if len(unique) > 1:
            raise ValueError(f"{path}: particles have different image sizes {unique.tolist()} px")
        return int(unique[0])
    for name in dict.fromkeys(files):
        if os.path.isfile(name):
            return int(stack_shape(name)[-1])
    raise ValueError(f"{path}: no rlnImageSize and no image stack found to read the box size from; pass box=")


def _check_stack_indices(files: np.ndarray, indices: np.ndarray, path: Path) -> None:
    """ValueError naming the row of the first particle that refers to an image beyond the end of its stack; stacks
    are measured from their headers only (missing or unreadable ones are left to ``read_images`` to report)."""
    unique, inverse = np.unique(files.astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    for k, name in enumerate(unique):
        try:
            n_images = stack_length(name)
        except (ValueError, OSError):
            continue
        rows = np.flatnonzero((inverse == k) & (indices >= n_images))
        if len(rows):
            raise ValueError(f"{path}: particle row {rows[0] + 1}: "
                             + stack_index_error(name, sorted(set((indices[rows] + 1).tolist())), n_images))


def _candidate_bases(star_path: Path, project_dir) -> list[Path]:
    if project_dir is not None:
        return [Path(project_dir)]
    folder = star_path.resolve().parent
    return [folder, *folder.parents]


def _ctf(particles, optics, path: Path) -> CTFParams | None:
    """Per-particle CTF, or None without rlnDefocusU. Missing labels get RELION's own defaults (ctf.cpp)."""
    if "rlnDefocusU" not in particles.columns:
        return None
    n = len(particles)
    defocus_u = particles["rlnDefocusU"].to_numpy(dtype=np.float64)
    defaulted = []

    def value(label, default):
        values = _column(label, particles, optics)
        if values is None:
            defaulted.append(f"{label}={default}")
            return np.full(n, float(default)) if default is not None else defocus_u.copy()
        return values.astype(np.float64)

    ctf = CTFParams(
        defocus_u=defocus_u,
        defocus_v=value("rlnDefocusV", None),
        defocus_angle=value("rlnDefocusAngle", 0.0),
        voltage=value("rlnVoltage", _RELION_DEFAULTS["rlnVoltage"]),
        cs=value("rlnSphericalAberration", _RELION_DEFAULTS["rlnSphericalAberration"]),
        amplitude_contrast=value("rlnAmplitudeContrast", _RELION_DEFAULTS["rlnAmplitudeContrast"]),
        phase_shift=value("rlnPhaseShift", 0.0),
    )
    bad = np.flatnonzero(ctf.voltage <= 0)
    if len(bad):
        raise ValueError(f"{path}: particle row {bad[0] + 1} has a voltage of {ctf.voltage[bad[0]]:g} kV "
                         "(rlnVoltage must be > 0)")
    important = [d for d in defaulted if d.split("=")[0] in _CTF_CONSTANT_LABELS]
    if important:
        warnings.warn(f"{path}: no {', '.join(d.split('=')[0] for d in important)} in the file; using RELION's "
                      f"defaults ({', '.join(important)})", stacklevel=3)
    return ctf


def _extra_value(series: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy()
    return np.array([str(v) for v in series.to_numpy()], dtype=object)


def read_star(path: str | os.PathLike, pixel_size: float | None = None, box: int | None = None,
              project_dir: str | os.PathLike | None = None) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 or 3.1+ layout) into a :class:`ParticleSet`.

    Args:
        path: the ``.star`` file.
        pixel_size: Å/px; overrides (and skips the consistency check of) the file's pixel size.
        box: image side in px; overrides ``rlnImageSize`` / the stack header.
        project_dir: the RELION project folder relative image paths refer to (default: the star file's folder,
            then its parents, first match per file).

    See the module docstring for how each field is found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STAR file not found: {path}")
    tables = _tables(path)
    particles = _particle_table(tables, path)
    if len(particles) == 0:
        raise ValueError(f"{path}: the particle table is empty")
    optics = _optics_rows(particles, tables, path)
    consumed = {"rlnImageName", "rlnOpticsGroup", "rlnRandomSubset", "rlnImageSize", "rlnImageDimensionality",
                *_PIXEL_LABELS}

    names, indices = split_image_names(particles["rlnImageName"])
    files, missing = resolve_relative_paths(names, _candidate_bases(path, project_dir))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(f"{path}: {len(missing)} image stack(s) not found ({shown}); metadata read anyway",
                      stacklevel=2)
    _check_stack_indices(files, indices, path)
    px = _pixel_size(particles, optics, pixel_size, path)
    side = _box(particles, optics, box, files, path)

    rotations = None
    if all(label in particles.columns for label in _ANGLES):
        rotations = euler_to_matrix(particles[list(_ANGLES)].to_numpy(dtype=np.float64))
        consumed.update(_ANGLES)

    origins = None
    if "rlnOriginXAngst" in particles.columns or "rlnOriginYAngst" in particles.columns:
        origins = np.stack([particles.get(c, pd.Series(np.zeros(len(particles)))).to_numpy(dtype=np.float64)
                            for c in ("rlnOriginXAngst", "rlnOriginYAngst")], axis=1)
    elif "rlnOriginX" in particles.columns or "rlnOriginY" in particles.columns:
        origins = px * np.stack([particles.get(c, pd.Series(np.zeros(len(particles)))).to_numpy(dtype=np.float64)
                                 for c in ("rlnOriginX", "rlnOriginY")], axis=1)
    consumed.update(("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY"))

    ctf = _ctf(particles, optics, path)
    if ctf is not None:
        consumed.update(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", *_CTF_CONSTANT_LABELS))

    optics_group = particles["rlnOpticsGroup"].to_numpy().astype(np.int64) if "rlnOpticsGroup" in particles \
        else (None if optics is None else optics["rlnOpticsGroup"].to_numpy().astype(np.int64))
    half_set = particles["rlnRandomSubset"].to_numpy().astype(np.int64) if "rlnRandomSubset" in particles else None

    extra = {label: _extra_value(particles[label]) for label in particles.columns if label not in consumed}
    return ParticleSet(pixel_size=px, box=side, image_files=files, image_indices=indices, rotations=rotations,
                       origins_A=origins, ctf=ctf, optics_group=optics_group, half_set=half_set, extra=extra)


# --------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------


def _relative_name(file: str, base: Path) -> str:
    """``file`` relative to ``base`` when it lies under ``base``, else its absolute path.

    Paths that would need ``..`` are written absolute: they keep working when the star file is moved.
    """
    absolute = Path(os.path.abspath(file))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def _optics_groups(particles: ParticleSet) -> np.ndarray:
    """Optics group per particle such that each group has one voltage / Cs / amplitude contrast."""
    n = len(particles)
    groups = np.ones(n, dtype=np.int64) if particles.optics_group is None else \
        np.asarray(particles.optics_group, dtype=np.int64).copy()
    if particles.ctf is None:
        return groups
    ctf = particles.ctf
    keys = np.stack([groups.astype(np.float64), ctf.voltage, ctf.cs, ctf.amplitude_contrast], axis=1)
    unique_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    if len(unique_keys) == len(np.unique(groups)):
        return groups
    warnings.warn("particles of one optics group have different voltage / Cs / amplitude contrast; "
                  "writing one optics group per distinct combination (renumbered from 1)", stacklevel=3)
    return inverse.reshape(-1).astype(np.int64) + 1


def _label(name: str) -> str:
    label = str(name).lstrip("_")
    if not label or re.search(r"\s", label):
        raise ValueError(f"invalid STAR column name {name!r}")
    return label


def write_star(path: str | os.PathLike, particles: ParticleSet, extra_columns: dict | None = None,
               relative_to: str | os.PathLike | None = None) -> None:
    """Write ``particles`` as a RELION 3.1 particle STAR file (``data_optics`` + ``data_particles``), atomically.

    Columns: ``rlnImageName`` (``%06d@path``, 1-based), ``rlnAngleRot/Tilt/Psi`` (from the matrices, degrees),
    ``rlnOriginXAngst/YAngst``, ``rlnDefocusU/V/Angle``, ``rlnPhaseShift``, ``rlnOpticsGroup``,
    ``rlnRandomSubset``, then ``particles.extra`` and ``extra_columns`` (label -> (N,) values; a leading ``_`` is
    optional). The optics table has ``rlnOpticsGroup``, ``rlnOpticsGroupName``, ``rlnVoltage``,
    ``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnImagePixelSize``, ``rlnImageSize`` and
    ``rlnImageDimensionality``. Without CTF, voltage / Cs / amplitude contrast are written as 300 kV / 2.7 mm /
    0.1 because RELION 3.1 requires them in the optics table; no defocus columns are written then.

    Image paths are written relative to ``relative_to`` (default: the star file's folder; give the RELION project
    folder for RELION's convention) when the stack lies under it, else absolute.

    Raises ``ValueError`` when an ``extra_columns`` entry has the wrong length or would replace a standard column.
    """
    path = Path(path)
    n = len(particles)
    if n == 0:
        raise ValueError("write_star: the particle set is empty")
    base = Path(os.path.abspath(relative_to if relative_to is not None else (path.parent if str(path.parent)
                                                                              else ".")))
    groups = _optics_groups(particles)

    unique_files, inverse = np.unique(particles.image_files.astype(str), return_inverse=True)
    written = [_relative_name(f, base) for f in unique_files]
    names = [f"{int(k) + 1:06d}@{written[j]}" for j, k in zip(inverse.reshape(-1), particles.image_indices)]
    columns: dict[str, np.ndarray] = {"rlnImageName": np.array(names, dtype=object)}
    if particles.rotations is not None:
        angles = matrix_to_euler(particles.rotations)
        for j, label in enumerate(_ANGLES):
            columns[label] = angles[:, j]
    if particles.origins_A is not None:
        columns["rlnOriginXAngst"] = particles.origins_A[:, 0]
        columns["rlnOriginYAngst"] = particles.origins_A[:, 1]
    if particles.ctf is not None:
        columns["rlnDefocusU"] = particles.ctf.defocus_u
        columns["rlnDefocusV"] = particles.ctf.defocus_v
        columns["rlnDefocusAngle"] = particles.ctf.defocus_angle
        columns["rlnPhaseShift"] = particles.ctf.phase_shift
    columns["rlnOpticsGroup"] = groups
    if particles.half_set is not None:
        columns["rlnRandomSubset"] = np.asarray(particles.half_set, dtype=np.int64)
    standard = set(columns) | {"rlnOriginX", "rlnOriginY", *_CTF_CONSTANT_LABELS, *_PIXEL_LABELS, "rlnImageSize"}

    for name, values in particles.extra.items():
        label = _label(name)
        if label not in standard:  # a stale copy of a standard field: the ParticleSet field wins
            columns[label] = np.asarray(values)
    for name, values in (extra_columns or {}).items():
        label = _label(name)
        values = np.asarray(values)
        if label in standard:
            raise ValueError(f"extra column {label} would replace a standard column of the particle set")
        if values.shape != (n,):
            raise ValueError(f"extra column {label} has shape {values.shape}, expected ({n},)")
        columns[label] = values

    particle_table = pd.DataFrame(columns)
    optics_table = _optics_table(particles, groups)
    with atomic_file(path) as tmp:
        starfile.write({"optics": optics_table, "particles": particle_table}, tmp,
                       float_format=_WRITE_FLOAT_FORMAT, sep="\t")


def _optics_table(particles: ParticleSet, groups: np.ndarray) -> pd.DataFrame:
    rows = []
    for g in np.unique(groups):
        first = int(np.flatnonzero(groups == g)[0])
        ctf = particles.ctf
        rows.append({
            "rlnOpticsGroup": int(g),
            "rlnOpticsGroupName": f"opticsGroup{int(g)}",
            "rlnVoltage": 300.0 if ctf is None else float(ctf.voltage[first]),
            "rlnSphericalAberration": 2.7 if ctf is None else float(ctf.cs[first]),
            "rlnAmplitudeContrast": 0.1 if ctf is None else float(ctf.amplitude_contrast[first]),
            "rlnImagePixelSize": float(particles.pixel_size),
            "rlnImageSize": int(particles.box),
            "rlnImageDimensionality": 2,
        })
    return pd.DataFrame(rows)
