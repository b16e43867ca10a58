"""The state of an EM refinement between iterations (:class:`EMState`), its files, and the check that a resumed run
continues the same refinement.

An iteration (:func:`bayespose.core.refine.engine.run_iteration`) takes an :class:`EMState` and returns the next
one; nothing else is carried from one iteration to the next. :meth:`EMState.save` / :meth:`EMState.load` write and
read every stored field, as declared on the field itself (``_stored``), so no list of keys is repeated. Files in
the working folder, each written atomically (:func:`bayespose.core.io.atomic.atomic_file`)::

    it###_half1.mrc, it###_half2.mrc   the Wiener-filtered half maps of iteration ### (unmasked; Å/px in the header)
    it###_map.mrc                      both halves combined (the final map of a run stopped there)
    it###_state.npz                    the rest of the state; written after the maps, so it marks the iteration
                                       complete
    history.json                       one record per iteration (:class:`IterationLog`; non-finite values as null)
    final_half1.mrc, final_half2.mrc, final_map.mrc, final_state.npz
                                       the final full-resolution pass (:class:`FinalState`), final_state.npz last

A saved state records a fingerprint of the run (:func:`run_fingerprint`: the particles, their images, CTF, pixel
size and box, the initial map, the mask, the half sets and every setting a resumed run may not change);
:func:`check_same_run` refuses to resume with different ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bayespose.core.assign import NoiseModel
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.atomic import atomic_file
from bayespose.core.io.mrc import read_map, write_map
from bayespose.core.refine._maps import Maps
from bayespose.core.refine.config import RESUMABLE_SETTINGS, RefineConfig
from bayespose.core.refine.outputs import history_records, jsonable, to_json
from bayespose.core.results import ParticleResults

__all__ = ["EMState", "FinalState", "IterationLog", "STATE_VERSION", "HISTORY_FILE", "iteration_logs",
           "run_fingerprint", "check_same_run", "last_complete_iteration",
           "engine_files", "remove_engine_files"]

STATE_VERSION = 2  # 2: fingerprint, ParticleResults fields (origins in Å), maps record
HISTORY_FILE = "history.json"
_DIGEST = "sha256:"


@dataclass
class IterationLog:
    """One EM iteration: sampling, resolutions (Å), fit, pose change (degrees) and time (s)."""

    iteration: int
    healpix_order: int  # finest HEALPix order of the search (coarse order + refinement levels)
    scored_resolution_A: float
    resolution_A: float  # FSC 0.143 between the half maps
    log_likelihood: float  # mean per particle of log p(Y_i) over the scored band (up to a constant)
    pose_change_deg: float  # mean angle between this and the previous iteration's MMSE (hard: MAP) poses
    seconds: float
    search: str = "global"  # "global" or "local"
    angular_step_deg: float = float("nan")  # finest angular step of the search
    mean_candidates: float = float("nan")  # rotations per particle given to the M-step
    broad_particles: int = 0  # particles that took the shared-grid path
    converged: bool = False


def iteration_logs(records: list[dict]) -> list[IterationLog]:
    """:class:`IterationLog` entries from JSON history records (null -> NaN)."""
    return [IterationLog(**record) for record in history_records(records)]


# ------------------------------------------------------------------------------------------------ stored fields
def _stored(kind: str, cls: type | None = None, decode=None, **kwargs):
    """A dataclass field stored as ``kind``: ``"value"`` (an array or scalar in the npz), ``"record"`` (a
    dataclass ``cls``: its fields as ``name.field`` arrays), ``"json"`` (JSON text; ``decode`` turns the parsed
    data back), ``"maps"`` (a :class:`Maps`: half maps and combined map as MRC files, its other fields as arrays
    of the record itself, e.g. ``resolution``) or ``"memory"`` (not stored)."""
    return field(metadata={"stored": kind, "cls": cls, "decode": decode}, **kwargs)


_MAP_FIELDS = {"half_maps": ("half1", "half2"), "combined": ("map",)}  # Maps fields stored as MRC files


def _encode(record: Any, prefix: str = "", skip=()) -> dict[str, np.ndarray]:
    """The npz arrays of a dataclass's stored fields (None values and ``skip`` names are left out)."""
    arrays = {}
    for f in fields(record):
        kind, value, key = f.metadata.get("stored", "value"), getattr(record, f.name), prefix + f.name
        if value is None or kind == "memory" or f.name in skip:
            continue
        if kind == "record":
            arrays.update(_encode(value, key + "."))
        elif kind == "maps":  # flat: the maps' FSC, resolution and τ² are top-level keys of the npz
            arrays.update(_encode(value, prefix, skip=_MAP_FIELDS))
        elif kind == "json":
            arrays[key] = np.asarray(to_json(value))
        else:
            arrays[key] = np.asarray(value)
    return arrays


def _decode(cls: type, data: dict, prefix: str = "", files: tuple[Path, str] | None = None, skip=()) -> dict:
    """The stored field values of a dataclass ``cls`` from npz arrays ``data`` (0-d arrays -> Python scalars;
    absent -> None; ``skip`` names left out) and, for ``"maps"`` fields, the MRC files ``files = (folder, file
    prefix)``."""
    values = {}
    for f in fields(cls):
        kind, key = f.metadata.get("stored", "value"), prefix + f.name
        if kind == "memory" or f.name in skip:
            continue
        if kind == "record":
            values[f.name] = f.metadata["cls"](**_decode(f.metadata["cls"], data, key + "."))
        elif kind == "maps":
            folder, file_prefix = files
            volumes = {name: [read_map(folder / f"{file_prefix}_{suffix}.mrc")[0] for suffix in suffixes]
                       for name, suffixes in _MAP_FIELDS.items()}
            values[f.name] = Maps(half_maps=volumes["half_maps"], combined=volumes["combined"][0],
                                  **_decode(Maps, data, prefix, skip=_MAP_FIELDS))
        elif key not in data:
            values[f.name] = None
        elif kind == "json":
            parsed = json.loads(str(data[key]))
            values[f.name] = f.metadata["decode"](parsed) if f.metadata["decode"] else parsed
        else:
            values[f.name] = data[key].item() if data[key].ndim == 0 else data[key]
    return values


def _write(record: Any, folder: Path, file_prefix: str, pixel_size: float) -> None:
    """The MRC files of the record's maps, then ``{file_prefix}_state.npz`` (last: marks the files complete)."""
    for f in fields(record):
        if f.metadata.get("stored") == "maps":
            maps = getattr(record, f.name)
            for name, suffixes in _MAP_FIELDS.items():
                volumes = getattr(maps, name)
                for suffix, volume in zip(suffixes, volumes if isinstance(volumes, list) else [volumes]):
                    write_map(folder / f"{file_prefix}_{suffix}.mrc", volume, pixel_size)
    arrays = {"version": np.asarray(STATE_VERSION), **_encode(record)}
    with atomic_file(folder / f"{file_prefix}_state.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _read(cls: type, folder: Path, file_prefix: str) -> Any:
    path = folder / f"{file_prefix}_state.npz"
    with np.load(path, allow_pickle=False) as npz:
        data = dict(npz)
    version = int(data.pop("version", 0))
    if version != STATE_VERSION:
        raise ValueError(f"cannot resume from {path}: it was written by another version of bayespose (state "
                         f"version {version}, this one reads {STATE_VERSION}); start anew in another folder")
    return cls(**_decode(cls, data, files=(folder, file_prefix)))


# ------------------------------------------------------------------------------------------------ the state
@dataclass
class EMState:
    """Everything one EM iteration needs from the previous one and gives to the next.

    ``iteration``: iterations done (0: the start). ``halves`` (N,) int: each particle's half set (1 or 2).
    ``maps``: the current half maps, combined map, FSC, resolution (Å; at the start the initial low-pass) and τ²
    (None at the start). ``best_resolution`` (Å) and ``no_gain`` (iterations without a 1 % gain): convergence
    bookkeeping. ``noise``: noise power per shell, reference scale, mean CTF² per shell. ``prior_density``:
    viewing-direction density (mean 1) on the HEALPix NEST pixels of ``config.prior_order``. ``results``: every
    particle's poses of each estimator (RELION ``A``, origins in Å) and statistics of the last iteration (None at
    the start); the next iteration's pose change is measured against them. ``local``: the search has turned
    local. ``converged``: no resolution gain for 2 iterations and pose change below the angular step.
    ``history``: one :class:`IterationLog` per iteration. ``fingerprint``: :func:`run_fingerprint` of the run.
    ``supports``: the last E-step's joint-weight supports of both halves (memory only, for the final pass).
    """

    iteration: int
    halves: np.ndarray
    maps: Maps = _stored("maps", Maps)
    best_resolution: float = math.inf
    no_gain: int = 0
    noise: NoiseModel = _stored("record", NoiseModel, default=None)
    prior_density: np.ndarray | None = None
    results: ParticleResults | None = _stored("record", ParticleResults, default=None)
    local: bool = False
    converged: bool = False
    history: list = _stored("json", decode=iteration_logs, default_factory=list)
    fingerprint: dict = _stored("json", default_factory=dict)
    supports: list | None = _stored("memory", default=None, repr=False, compare=False)

    @property
    def resolution(self) -> float:
        """The current resolution in Å (FSC 0.143 of the last iteration; at the start the initial low-pass)."""
        return self.maps.resolution

    def save(self, folder: str | Path, pixel_size: float) -> None:
        """Write this state as iteration ``iteration``'s files in ``folder`` (see the module docstring), then
        ``history.json``. ``pixel_size``: Å/px of the maps."""
        folder = Path(folder)
        _write(self, folder, f"it{self.iteration:03d}", pixel_size)
        with atomic_file(folder / HISTORY_FILE) as tmp:
            tmp.write_text(to_json(self.history, indent=2))

    @classmethod
    def load(cls, folder: str | Path, iteration: int) -> EMState:
        """The state saved after ``iteration`` in ``folder``; ``ValueError`` if another version wrote it."""
        return _read(cls, Path(folder), f"it{iteration:03d}")


@dataclass
class FinalState:
    """The final full-resolution pass after iteration ``iteration`` (files ``final_*``)."""

    iteration: int
    maps: Maps = _stored("maps", Maps)

    def save(self, folder: str | Path, pixel_size: float) -> None:
        _write(self, Path(folder), "final", pixel_size)

    @classmethod
    def load(cls, folder: str | Path, iteration: int) -> FinalState | None:
        """The final pass saved in ``folder`` after ``iteration``, or None if it is absent, incomplete or stale."""
        folder = Path(folder)
        names = [f"final_{suffix}.mrc" for suffixes in _MAP_FIELDS.values() for suffix in suffixes]
        if not (folder / "final_state.npz").is_file() or not all((folder / name).is_file() for name in names):
            return None
        final = _read(cls, folder, "final")
        return final if final.iteration == iteration else None


# ------------------------------------------------------------------------------------------------ the folder
_ENGINE_FILE = re.compile(r"(it\d{3,}_(half1|half2|map)\.mrc|it\d{3,}_state\.npz|final_(half1|half2|map)\.mrc|"
                          r"final_state\.npz|history\.json|\..+\.part)")


def engine_files(folder: str | Path) -> list[Path]:
    """The files of the refinement engine in ``folder`` (its per-iteration and final files, ``history.json`` and
    hidden temporaries of interrupted writes)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _ENGINE_FILE.fullmatch(p.name)) if folder.is_dir() else []


def remove_engine_files(folder: str | Path) -> int:
    """Remove :func:`engine_files` (an earlier run's, before a fresh start); returns how many were removed."""
    removed = 0
    for path in engine_files(folder):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def last_complete_iteration(folder: str | Path) -> int:
    """Highest iteration with its state and both half maps and the combined map in ``folder`` (0 if none)."""
    best = 0
    for path in Path(folder).glob("it*_state.npz"):
        match = re.fullmatch(r"it(\d{3,})_state\.npz", path.name)
        if match:
            it = int(match.group(1))
            if all((path.parent / f"it{it:03d}_{suffix}.mrc").is_file() for suffix in ("half1", "half2", "map")):
                best = max(best, it)
    return best


# ------------------------------------------------------------------------------------------------ fingerprint
def _digest(*arrays) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        data = np.ascontiguousarray(array)
        hasher.update(str((data.dtype.str, data.shape)).encode())
        hasher.update(data.tobytes() if data.dtype != object else "\n".join(map(str, data.ravel())).encode())
    return _DIGEST + hasher.hexdigest()[:24]


def run_fingerprint(particles: ParticleSet, initial_map: np.ndarray, mask: np.ndarray | None,
                    config: RefineConfig, halves: np.ndarray) -> dict[str, Any]:
    """What a resumed run must share with the saved one: particle count, image files and indices, CTF, pixel
    size (Å/px), box (px), initial map, mask, half sets, and every setting except :data:`RESUMABLE_SETTINGS`.
    Arrays enter as digests (``"sha256:..."``)."""
    ctf = particles.ctf
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_SETTINGS}
    return {"particles": len(particles),
            "image files": _digest(particles.image_files, particles.image_indices),
            "CTF": _digest(*(getattr(ctf, name) for name in ctf.FIELDS)) if ctf is not None else None,
            "pixel size": float(particles.pixel_size), "box": int(particles.box),
            "initial map": _digest(np.asarray(initial_map, dtype=np.float32)),
            "mask": _digest(np.asarray(mask, dtype=np.float32)) if mask is not None else None,
            "half sets": _digest(np.asarray(halves, dtype=np.int64)), **settings}


def check_same_run(saved: dict[str, Any], current: dict[str, Any], folder: str | Path) -> None:
    """Raise ``ValueError`` (one line naming what differs) unless two :func:`run_fingerprint` dicts agree."""
    differences = []
    for name in dict.fromkeys([*saved, *current]):
        old, new = saved.get(name), current.get(name)
        if jsonable(old) == jsonable(new):
            continue
        hidden = any(isinstance(v, str) and v.startswith(_DIGEST) for v in (old, new))
        differences.append(name if hidden else f"{name} ({old}, now {new})")
    if differences:
        raise ValueError(f"cannot resume the refinement in {folder}: it was run with different "
                         f"{', '.join(differences)}; resume with the same inputs and settings, or start anew in "
                         "another folder")
