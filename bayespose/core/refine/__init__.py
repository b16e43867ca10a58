"""EM 3D refinement with rotational-prior estimation and gold-standard half sets.

:func:`refine` runs the refinement (:mod:`.engine`); :class:`RefineConfig` holds its settings and the shared rules
(modes, half-set split, minimum particles per half set; :mod:`.config`); :class:`EMState` is the state carried from
one iteration to the next and saved for ``resume`` (:mod:`.state`); :mod:`.outputs` writes and reads the files of a
finished refinement. The E-step, M-step and map steps live in the private modules ``_estep``, ``_mstep`` and
``_maps``.

The configuration names are imported at once; the engine's (which import torch) on first use, so that reading
the modes (e.g. for ``bayespose --help``) stays fast.
"""

import importlib

from bayespose.core.refine.config import (
    HALF_SPLITS,
    MIN_PER_HALF,
    MODES,
    PRIOR_MODES,
    HalfSplit,
    Mode,
    PriorMode,
    RefineConfig,
    check_half_set_sizes,
    half_set_sizes,
    split_half_sets,
    subset_counts,
)

_LAZY = {"refine": "engine", "RefineResult": "engine", "EMState": "state",
         "IterationLog": "state"}

__all__ = ["refine", "RefineConfig", "RefineResult", "IterationLog", "EMState", "Mode",
           "PriorMode", "HalfSplit", "MODES", "PRIOR_MODES", "HALF_SPLITS", "MIN_PER_HALF", "half_set_sizes",
           "check_half_set_sizes", "split_half_sets", "subset_counts"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
