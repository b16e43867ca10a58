"""Bayesian pose assignment: for every particle, the posterior over (rotation, shift) against a reference map, and
from it the MMSE, MAP and MLE poses with their uncertainty (Xu, Balanov, Singer & Bendory (2026), "Bayesian
perspective for orientation determination in cryo-EM with application to structural heterogeneity analysis",
Acta Cryst. D 82, doi:10.48550/arXiv.2412.03723; ``Xu2026`` in :mod:`bayespose.bibtex`).

Modules, in pipeline order:

* :mod:`.search` — :class:`PoseSearch`: grid, refinement, shifts, resolution, device; its limits;
* :mod:`._search_space` — the candidate rotations of each batch (global HEALPix grid, local balls, the union of
  several balls per particle) and :func:`shift_lattice`;
* :mod:`.noise_model` — :class:`NoiseModel`, :func:`estimate_noise_model` and the stages' frequency cut-offs
  (:func:`information_radius`, :func:`geometric_radius`, :func:`signal_radius`);
* :mod:`._scoring` — the streamed log-likelihood of every (particle, rotation, shift) (:class:`ScoringCall` logs
  each call);
* :mod:`._statistics` — estimators and per-particle statistics from each stage's posterior (:data:`CELL_SPREAD`);
* :mod:`.engine` — :func:`assign_poses` (first grid, then coarse-to-fine refinement) -> :class:`PoseAssignment`,
  a :class:`~bayespose.core.results.ParticleResults`.

Rotations are RELION ``A`` matrices; origins ``rlnOriginX/YAngst`` in Å; angles in degrees; shifts in px.

The public names load on first use (PEP 562 module ``__getattr__``): importing :mod:`.search` alone, as the CLI's
argument parser does for the search limits, does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__all__ = [
    "PoseSearch",
    "HealpixOrder",
    "NoiseModel",
    "estimate_noise_model",
    "information_radius",
    "signal_radius",
    "geometric_radius",
    "shift_lattice",
    "PoseAssignment",
    "ScoringCall",
    "assign_poses",
    "ESTIMATORS",
    "CELL_SPREAD",
]

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs; at run time __getattr__ imports them
    from bayespose.core.assign._scoring import ScoringCall
    from bayespose.core.assign._search_space import shift_lattice
    from bayespose.core.assign._statistics import CELL_SPREAD, ESTIMATORS
    from bayespose.core.assign.engine import PoseAssignment, assign_poses
    from bayespose.core.assign.noise_model import (
        NoiseModel,
        estimate_noise_model,
        geometric_radius,
        information_radius,
        signal_radius,
    )
    from bayespose.core.assign.search import HealpixOrder, PoseSearch

_MODULES = ("search", "noise_model", "_search_space", "_scoring", "_statistics", "engine")


def __getattr__(name: str):
    """The public name ``name``, imported from the first of :data:`_MODULES` that defines it, on first use."""
    if name in __all__:
        for module in _MODULES:
            found = getattr(import_module(f"{__name__}.{module}"), name, None)
            if found is not None:
                globals()[name] = found
                return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
