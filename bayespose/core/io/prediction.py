"""The file of a pose network's prediction (``.npz``): what a run keeps of a
:class:`~bayespose.core.deep.PosePrediction` for its outputs and viewers.

Arrays (N particles, K top cells; rotations RELION ``A``):

* ``rotations`` (N, 3, 3): the predicted mode; ``top_rotations`` (N, K, 3, 3) and ``top_probabilities`` (N, K):
  the K most probable cells (or test-time turns); the full grid distribution is not stored (N x 72·8^order
  floats) and is recomputed for one particle when a viewer needs it;
* the per-particle statistics under their :class:`~bayespose.core.results.ParticleResults` field names
  (``deep_confidence``, ``deep_top_probability``);
* ``scipion_id`` (N,): the particles' ids in the caller's numbering (e.g. Scipion object ids; 1..N when not
  given); ``input_rotations`` (N, 3, 3) the input poses, (0, 3, 3) when the input had none;
* ``grid_order`` (-1 for the quaternion model) and ``symmetry`` (point group, RELION notation).

Files written before the schema (a ``confidence`` array and ``col_bpDeep*`` star columns) are still read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.atomic import atomic_file
from bayespose.core.results import ParticleResults

if TYPE_CHECKING:  # pragma: no cover
    from bayespose.core.deep.predict import PosePrediction

__all__ = ["save_prediction", "load_prediction"]


def save_prediction(path, prediction: PosePrediction, particles: ParticleSet, symmetry: str,
                    ids: np.ndarray | None = None) -> None:
    """Write ``prediction`` of ``particles`` (its input poses are kept when they have some) to ``path`` (npz,
    atomically: the file is complete or absent). ``symmetry``: the network's point group; ``ids`` (N,): the
    particles' ids (default 1..N)."""
    n = len(prediction)
    if len(particles) != n:
        raise ValueError(f"prediction has {n} particles, the set {len(particles)}")
    ids = np.arange(1, n + 1) if ids is None else np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"need one id per particle, got shape {ids.shape} for {n} particles")
    arrays = prediction.results().to_arrays()
    arrays.update(rotations=np.asarray(prediction.rotations, dtype=np.float64),
                  top_rotations=np.asarray(prediction.top_rotations, dtype=np.float64),
                  top_probabilities=np.asarray(prediction.top_probabilities, dtype=np.float64),
                  scipion_id=ids,
                  input_rotations=particles.rotations if particles.rotations is not None else np.zeros((0, 3, 3)),
                  grid_order=np.int64(-1 if prediction.grid_order is None else prediction.grid_order),
                  symmetry=np.str_(symmetry))
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_prediction(path) -> dict:
    """Read :func:`save_prediction`'s file: a dict of its arrays with ``symmetry`` as str, ``grid_order`` as int
    or None, ``input_rotations`` None when the input had no alignment, ``results`` the
    :class:`~bayespose.core.results.ParticleResults` of the deep statistics and ``confidence`` (N,) (=
    ``results.deep_confidence``)."""
    with np.load(path) as data:
        out = {key: data[key] for key in data.files}
    out["symmetry"] = str(out["symmetry"])
    order = int(out["grid_order"])
    out["grid_order"] = None if order < 0 else order
    if len(out["input_rotations"]) == 0:
        out["input_rotations"] = None
    old_columns = {key[4:]: out.pop(key) for key in list(out) if key.startswith("col_")}
    if "deep_confidence" in out:
        results = ParticleResults.from_arrays(out)
    elif old_columns:
        results = ParticleResults.from_star_columns(old_columns)
    else:
        results = ParticleResults(deep_confidence=out["confidence"],
                                  deep_top_probability=out["top_probabilities"][:, 0])
    for name in results.result_fields():
        out.pop(name, None)
    out["results"] = results
    out["confidence"] = np.asarray(results.deep_confidence, dtype=np.float64)
    return out
