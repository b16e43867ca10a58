"""The result file of a pose assignment (``.npz``): what the Scipion protocols 'assign poses (MMSE)' and 'predict
poses' (deep-prior MMSE) save, and their viewers and summaries read.

Arrays (names = keys): every per-particle field of the results that holds values
(:meth:`~bayespose.core.results.ParticleResults.to_arrays`: ``<est>_rotations`` (N, 3, 3) RELION ``A``,
``<est>_origins_A`` (N, 2) Å, ``pmax``, ``n_significant``, ...), the noise model (``noise_power`` per shell,
``noise_scale``, ``noise_ctf2``, empty when none), ``scipion_id`` (N,) the particles' ids, ``input_rotations``
(N, 3, 3) (empty when the input had no alignment), ``estimator`` and ``symmetry`` (str) and ``info`` (JSON: the
search's size and timings). The file is written atomically (:func:`~bayespose.core.io.atomic.atomic_file`).

Not imported by :mod:`bayespose.core.io` itself: it depends on :mod:`bayespose.core.assign`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from bayespose.core.assign import PoseAssignment
from bayespose.core.assign.noise_model import NoiseModel
from bayespose.core.io.atomic import atomic_file

__all__ = ["save_assignment", "load_assignment"]


def save_assignment(path: str | os.PathLike, result: PoseAssignment, estimator: str, symmetry: str,
                    ids: np.ndarray | None = None, input_rotations: np.ndarray | None = None) -> None:
    """Write the per-particle results of ``result`` (one :func:`~bayespose.core.assign.assign_poses` run), its
    noise model (what a viewer needs to recompute one particle's posterior) and the metadata to ``path`` (npz).

    ``estimator``: the pose chosen as the particles' alignment; ``symmetry``: the point group searched; ``ids``
    (N,): the particles' ids (default 1..N); ``input_rotations`` (N, 3, 3) RELION ``A``: the input alignment, if
    any. Raises ``ValueError`` when the folder does not exist (nothing is written).
    """
    n = len(result.pmax)
    noise = result.noise
    arrays = result.to_arrays()
    arrays.update(noise_power=noise.noise_power, noise_scale=np.float64(noise.scale),
                  noise_ctf2=noise.ctf2 if noise.ctf2 is not None else np.zeros(0),
                  scipion_id=np.asarray(ids if ids is not None else np.arange(1, n + 1)),
                  input_rotations=input_rotations if input_rotations is not None else np.zeros((0, 3, 3)),
                  estimator=np.str_(estimator), symmetry=np.str_(symmetry),
                  info=np.str_(json.dumps({"n_rotations": result.n_rotations, "n_shifts": result.n_shifts,
                                           "n_frequencies": result.n_frequencies,
                                           "timings": dict(result.timings.items())}, default=float)))
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, **arrays)


def load_assignment(path: str | os.PathLike) -> dict:
    """Read :func:`save_assignment`'s file: a dict of the per-particle arrays by field name (as
    :meth:`~bayespose.core.results.ParticleResults.from_arrays` takes them), ``scipion_id`` (N,),
    ``input_rotations`` ((N, 3, 3), None when the input had no alignment), ``noise`` (a :class:`NoiseModel`),
    ``estimator`` and ``symmetry`` (str) and ``info`` (dict)."""
    with np.load(path) as data:
        out = {key: data[key] for key in data.files}
    for key in ("estimator", "symmetry"):
        out[key] = str(out[key])
    out["info"] = json.loads(str(out["info"]))
    ctf2 = out.pop("noise_ctf2")
    out["noise"] = NoiseModel(noise_power=out.pop("noise_power"), scale=float(out.pop("noise_scale")),
                              ctf2=ctf2 if len(ctf2) else None)
    if len(out["input_rotations"]) == 0:
        out["input_rotations"] = None
    return out
