"""Files of an EM refinement (:func:`bayespose.core.refine.engine.refine`): written complete-or-absent, read back.

One output folder holds (units: Å, 1/Å, degrees; poses in RELION's convention)::

    map.mrc, half1.mrc, half2.mrc   final map (both halves, Wiener-filtered) and the two gold-standard half maps,
                                     pixel size in the header
    fsc.csv                          half-map FSC: shell, resolution_A, frequency_1/A, fsc
    particles.star                   RELION 3.1 star: final MMSE poses (rlnAngleRot/Tilt/Psi), origins
                                     (rlnOriginX/YAngst), rlnRandomSubset (half set) and the per-particle
                                     columns of the refinement (rlnMaxValueProbDistribution, bpExpectedErrorDeg, ...)
    prior.npy, prior.json            estimated viewing-direction density (see PRIOR_CONVENTION)
    history.json, history.csv        one row per iteration (IterationLog fields)
    summary.json                     resolution, sizes, the settings used and the list of files
    *.png                            figures, when the caller passes a ``figure_writer`` (the CLI, the Scipion
                                     protocol and the demo pass :func:`bayespose.plotting.refine.refine_figure_writer`;
                                     this module itself never draws)

The JSON files are standard JSON: a NaN or infinite number (e.g. the first iteration's pose change) is written as
null, and :func:`read_history` / :func:`read_refine_outputs` give it back as NaN.

Writing goes to a hidden temporary folder next to the target, renamed onto the target at the end: the outputs
appear all at once or not at all (files of the target folder that are not outputs, e.g. the engine's
``iterations/`` working folder or a protocol's input files, are carried over into the new folder).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import healpy
import numpy as np

from bayespose.core.geometry.rotations import viewing_directions
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.atomic import atomic_folder
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.io.relion_star import read_star, write_star

MAP_FILE = "map.mrc"
HALF_FILES = ("half1.mrc", "half2.mrc")
FSC_FILE = "fsc.csv"
PARTICLES_FILE = "particles.star"
PRIOR_NPY = "prior.npy"
PRIOR_JSON = "prior.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
SUMMARY_JSON = "summary.json"
FSC_COLUMNS = ("shell", "resolution_A", "frequency_1/A", "fsc")

PRIOR_CONVENTION = (
    "Viewing-direction density relative to uniform (mean 1 over the pixels; in-plane angle uniform) on the HEALPix "
    "pixels of order `healpix_order` (nside = 2**order) in NEST numbering. The viewing direction of a RELION pose "
    "A = Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T is its third row "
    "(cos rot sin tilt, sin rot sin tilt, cos tilt); its pixel is healpy.vec2pix(nside, x, y, z, nest=True), "
    "i.e. healpy's theta = tilt and phi = rot. A density of 1 everywhere is the uniform (Haar) prior.")


@dataclass
class RefineOutputs:
    """A refinement read back from its folder (:func:`read_refine_outputs`). Maps are (D, D, D) float32 [z, y, x]."""

    folder: Path
    map: np.ndarray
    half_maps: tuple[np.ndarray, np.ndarray]
    pixel_size: float  # Å/px
    fsc_frequencies: np.ndarray  # 1/Å
    fsc: np.ndarray
    resolution_A: float  # FSC 0.143 resolution reported by the refinement
    particles: ParticleSet
    direction_prior: np.ndarray  # density relative to uniform, NEST pixels of order prior_order
    prior_order: int
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Path of one output file (e.g. ``"map.mrc"``) in the folder."""
        return self.folder / name


# --------------------------------------------------------------------------------------------------- helpers
def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses -> dicts, numpy scalars / arrays -> Python numbers / lists,
    paths -> strings, and NaN / ±inf -> None (standard JSON has no such numbers; :func:`history_records` reads
    them back as NaN)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Standard JSON text of ``value`` (:func:`jsonable`: never ``NaN`` / ``Infinity``, which ``json.dumps``
    would write and strict readers reject)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False)


def history_records(records: list[dict]) -> list[dict]:
    """History records parsed from JSON with null -> NaN (no history field is legitimately None; a NaN, e.g. the
    first iteration's pose change, was written as null)."""
    return [{k: math.nan if v is None else v for k, v in record.items()} for record in records]


def _as_dict(entry: Any) -> dict:
    """An IterationLog (dataclass), a dict or an object with attributes -> plain dict (NaN kept)."""
    if is_dataclass(entry):
        data = asdict(entry)
    elif isinstance(entry, dict):
        data = dict(entry)
    else:
        data = dict(vars(entry))
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in data.items()}


def _float(value: Any) -> float:
    """A float read from JSON (null -> NaN)."""
    return math.nan if value is None else float(value)


def fsc_table(frequencies: np.ndarray, fsc_values: np.ndarray) -> list[dict]:
    """Rows of ``fsc.csv``: shell index, resolution in Å (``inf`` at the origin), frequency in 1/Å, FSC."""
    freq = np.asarray(frequencies, dtype=np.float64).reshape(-1)
    values = np.asarray(fsc_values, dtype=np.float64).reshape(-1)
    if len(freq) != len(values):
        raise ValueError(f"{len(freq)} FSC frequencies but {len(values)} FSC values")
    with np.errstate(divide="ignore"):
        res = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), np.inf)
    return [{"shell": i, "resolution_A": float(res[i]), "frequency_1/A": float(freq[i]), "fsc": float(values[i])}
            for i in range(len(freq))]


def prior_density_at(density: np.ndarray, order: int, rotations: np.ndarray) -> np.ndarray:
    """Value of a NEST viewing-direction density (``prior.npy``) at the viewing directions of RELION poses
    ``rotations`` (N, 3, 3) (their third rows), see :data:`PRIOR_CONVENTION`."""
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    nside = 2 ** int(order)
    if len(density) != 12 * nside * nside:
        raise ValueError(f"a density of HEALPix order {order} has {12 * nside * nside} pixels, got {len(density)}")
    d = viewing_directions(np.asarray(rotations, dtype=np.float64)).reshape(-1, 3)
    return density[healpy.vec2pix(nside, d[:, 0], d[:, 1], d[:, 2], nest=True)]


def _output_particles(result_particles: ParticleSet, template: ParticleSet | None) -> ParticleSet:
    """The particles to write: ``result_particles`` or, with a template (the input particles, same order), the
    template's metadata with the refined poses, half sets and the result's per-particle columns (the template's
    own bayespose ``bp`` columns are dropped; the result's win)."""
    if template is None:
        return result_particles
    if len(template) != len(result_particles):
        raise ValueError(f"the template has {len(template)} particles but the refinement {len(result_particles)}")
    extra = {k: v for k, v in template.extra.items() if not k.startswith("bp")}
    extra.update(result_particles.extra)
    return replace(template, rotations=result_particles.rotations, origins_A=result_particles.origins_A,
                   half_set=result_particles.half_set, extra=extra)


def _write_csv(path: Path, rows: list[dict], columns: Iterable[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


# ------------------------------------------------------------------------------------------------------ write
FigureWriter = Callable[[Path, RefineOutputs], Iterable[str]]


def write_refine_outputs(result, out_dir: str | os.PathLike, pixel_size: float | None = None,
                         particles_template: ParticleSet | None = None, config: Any = None,
                         figure_writer: FigureWriter | None = None) -> dict[str, Path]:
    """Write the outputs of :func:`bayespose.core.refine.engine.refine` into ``out_dir`` (see the module docstring).

    ``result``: a ``RefineResult`` (map, half_maps, fsc_frequencies in 1/Å, fsc, resolution_A, particles,
    direction_prior, prior_order, history). ``pixel_size``: Å/px of the maps (default: the particles').
    ``particles_template``: the input particles (same order); when given, the star keeps their metadata and takes
    poses, origins, half sets and per-particle columns from the result. ``config``: the ``RefineConfig`` used
    (recorded in ``summary.json``). ``figure_writer(folder, outputs)``: called inside the atomic output with the
    temporary folder and the outputs (a :class:`RefineOutputs` of that folder) to write figures there; returns the
    names of the files it wrote (listed in ``summary.json``); an error in it leaves no output. Returns
    ``{name: final path}``.

    Raises ``ValueError`` on inconsistent input (nothing is written then).
    """
    target = Path(os.path.abspath(out_dir))
    pixel_size = float(pixel_size if pixel_size is not None else result.particles.pixel_size)
    if not pixel_size > 0:
        raise ValueError(f"pixel size must be > 0 Å/px, got {pixel_size}")
    volume = np.asarray(result.map, dtype=np.float32)
    halves = [np.asarray(h, dtype=np.float32) for h in result.half_maps]
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"the refined map must be a cubic (D, D, D) array, got shape {volume.shape}")
    if len(halves) != 2 or any(h.shape != volume.shape for h in halves):
        raise ValueError("need two half maps with the shape of the map")
    rows = fsc_table(result.fsc_frequencies, result.fsc)
    density = np.asarray(result.direction_prior, dtype=np.float64).reshape(-1)
    order = int(result.prior_order)
    if len(density) != 12 * 4 ** order:
        raise ValueError(f"direction prior of order {order} must have {12 * 4 ** order} pixels, got {len(density)}")
    particles = _output_particles(result.particles, particles_template)
    history = [_as_dict(entry) for entry in result.history]

    with atomic_folder(target, keep_other_entries=True) as tmp:
        write_map(tmp / MAP_FILE, volume, pixel_size)
        for name, half in zip(HALF_FILES, halves):
            write_map(tmp / name, half, pixel_size)
        _write_csv(tmp / FSC_FILE, rows, FSC_COLUMNS)
        write_star(tmp / PARTICLES_FILE, particles, relative_to=target)
        np.save(tmp / PRIOR_NPY, density)
        prior_meta = {"healpix_order": order, "nside": 2 ** order, "ordering": "NEST", "n_pixels": len(density),
                      "convention": PRIOR_CONVENTION, "file": PRIOR_NPY,
                      "prior_mode": getattr(config, "prior_mode", None), "density": density.tolist()}
        (tmp / PRIOR_JSON).write_text(to_json(prior_meta, indent=1))
        (tmp / HISTORY_JSON).write_text(to_json(history, indent=2))
        columns = list(history[0]) if history else ["iteration"]
        _write_csv(tmp / HISTORY_CSV, history, columns)
        files = [MAP_FILE, *HALF_FILES, FSC_FILE, PARTICLES_FILE, PRIOR_NPY, PRIOR_JSON, HISTORY_JSON, HISTORY_CSV]
        summary = {"resolution_A": float(result.resolution_A), "n_particles": len(particles),
                   "n_half1": int(np.sum(particles.half_set == 1)) if particles.half_set is not None else None,
                   "n_half2": int(np.sum(particles.half_set == 2)) if particles.half_set is not None else None,
                   "box": int(volume.shape[0]), "pixel_size_A": pixel_size, "iterations": len(history),
                   "prior_order": order, "config": jsonable(_as_dict(config)) if config is not None else None}
        if figure_writer is not None:
            outputs = RefineOutputs(folder=tmp, map=volume, half_maps=(halves[0], halves[1]), pixel_size=pixel_size,
                                    fsc_frequencies=np.array([r["frequency_1/A"] for r in rows]),
                                    fsc=np.array([r["fsc"] for r in rows]), resolution_A=float(result.resolution_A),
                                    particles=particles, direction_prior=density, prior_order=order,
                                    history=history, summary=dict(summary))
            files += list(figure_writer(tmp, outputs))
        summary["files"] = files + [SUMMARY_JSON]
        (tmp / SUMMARY_JSON).write_text(to_json(summary, indent=2))
    return {name: target / name for name in summary["files"]}


# ------------------------------------------------------------------------------------------------------- read
def read_fsc_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``fsc.csv`` -> (frequencies in 1/Å, FSC values)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(FSC_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not an FSC table: missing columns {sorted(missing)}")
        rows = list(reader)
    return (np.array([float(r["frequency_1/A"]) for r in rows]), np.array([float(r["fsc"]) for r in rows]))


def read_history(path: str | os.PathLike) -> list[dict]:
    """``history.json`` -> list of per-iteration dicts (null -> NaN, see :func:`history_records`)."""
    return history_records(json.loads(Path(path).read_text()))


def read_refine_outputs(out_dir: str | os.PathLike) -> RefineOutputs:
    """Read a folder written by :func:`write_refine_outputs`. Raises ``FileNotFoundError`` when it is incomplete."""
    folder = Path(out_dir)
    summary_path = folder / SUMMARY_JSON
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder} holds no complete refinement output ({SUMMARY_JSON} missing)")
    summary = json.loads(summary_path.read_text())
    volume, px = read_map(folder / MAP_FILE)
    halves = tuple(read_map(folder / name)[0] for name in HALF_FILES)
    freq, values = read_fsc_csv(folder / FSC_FILE)
    meta = json.loads((folder / PRIOR_JSON).read_text())
    density = np.load(folder / PRIOR_NPY)
    return RefineOutputs(folder=folder, map=volume, half_maps=halves, pixel_size=float(px or summary["pixel_size_A"]),
                         fsc_frequencies=freq, fsc=values, resolution_A=_float(summary["resolution_A"]),
                         particles=read_star(folder / PARTICLES_FILE), direction_prior=density,
                         prior_order=int(meta["healpix_order"]), history=read_history(folder / HISTORY_JSON),
                         summary=summary)


def resolution_from_fsc(frequencies: np.ndarray, fsc_values: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold`` (linear interpolation in frequency); the
    Nyquist resolution 1/f_max when it never does. Independent of the engine (used to cross-check outputs)."""
    freq = np.asarray(frequencies, dtype=np.float64)
    values = np.asarray(fsc_values, dtype=np.float64)
    below = np.flatnonzero((values < threshold) & (freq > 0))
    if len(below) == 0:
        return float(1.0 / freq[-1])
    i = int(below[0])
    if i == 0:
        return math.inf
    f0, f1, v0, v1 = freq[i - 1], freq[i], values[i - 1], values[i]
    f = f0 + (v0 - threshold) / (v0 - v1) * (f1 - f0) if v0 != v1 else f1
    return float(1.0 / f) if f > 0 else math.inf


__all__ = ["RefineOutputs", "write_refine_outputs", "read_refine_outputs", "read_fsc_csv", "read_history",
           "jsonable", "to_json", "history_records",
           "fsc_table", "prior_density_at", "resolution_from_fsc", "PRIOR_CONVENTION", "FigureWriter", "MAP_FILE",
           "HALF_FILES", "FSC_FILE", "PARTICLES_FILE", "PRIOR_NPY", "PRIOR_JSON", "HISTORY_JSON", "HISTORY_CSV",
           "SUMMARY_JSON"]
