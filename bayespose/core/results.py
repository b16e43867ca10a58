"""One schema for the per-particle results of assign, refine and predict.

Every per-particle statistic bayespose reports is one :class:`ResultColumn` of :data:`COLUMNS`: its field name in
:class:`ParticleResults` (and in saved ``.npz`` files), its column in RELION star files (RELION's own name where
RELION has one), its Scipion attribute (stored on output particles as ``_bp<name>``, sortable in the particle
viewer) and its dtype. Adding a statistic means adding one row here and filling the field in the engine; the star
writer, the npz files and the protocols follow from the table.

Poses: each estimator's rotations are RELION ``A`` matrices (N, 3, 3) and origins ``rlnOriginX/YAngst`` (N, 2) in
Å. The chosen estimator's pose goes to the particles' alignment (``rlnAngleRot/Tilt/Psi``); the other estimators'
angles go to the star columns ``bp<EST>AngleRot/Tilt/Psi`` (e.g. ``bpMAPAngleRot``, degrees) and, for Scipion, to
the attributes ``<Est>Rot/Tilt/Psi`` (e.g. ``_bpMapRot``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np

from bayespose.core.geometry.rotations import matrix_to_euler
from bayespose.core.imaging.particles import ParticleSet

__all__ = ["ESTIMATORS", "Estimator", "ResultColumn", "COLUMNS", "ParticleResults", "estimator_angle_columns",
           "scipion_attributes", "drop_result_columns", "ANGLE_LABELS"]

Estimator = Literal["mmse", "map", "mle"]
ESTIMATORS: tuple[Estimator, ...] = ("mmse", "map", "mle")
ANGLE_LABELS = ("Rot", "Tilt", "Psi")


@dataclass(frozen=True)
class ResultColumn:
    """One per-particle statistic: ``field`` (Python / npz name), ``star`` (star column), ``scipion`` (attribute
    name without the ``_bp`` prefix), ``dtype`` and a one-line ``description`` with its unit."""

    field: str
    star: str
    scipion: str
    dtype: type
    description: str


COLUMNS: tuple[ResultColumn, ...] = (
    ResultColumn("pmax", "rlnMaxValueProbDistribution", "MaxProb", np.float64,
                 "largest posterior probability of one (rotation, shift) cell (RELION's pmax)"),
    ResultColumn("n_significant", "rlnNrOfSignificantSamples", "NrSignificant", np.int64,
                 "number of grid rotations holding 99 % of the rotation posterior"),
    ResultColumn("expected_error_deg", "bpExpectedErrorDeg", "ExpectedErrorDeg", np.float64,
                 "posterior expected angle between the true and the MMSE rotation, degrees"),
    ResultColumn("concentration", "bpConcentration", "Concentration", np.float64,
                 "sum of the singular values of the posterior mean rotation matrix / 3 (1: point mass, 0: uniform)"),
    ResultColumn("log_evidence", "bpLogEvidence", "LogEvidence", np.float64,
                 "log p(image) over the scored band, up to the Gaussian normalisation constant, nats"),
    ResultColumn("n_candidates", "bpCandidates", "Candidates", np.int64,
                 "EM refinement: rotations per particle given to the M-step"),
    ResultColumn("deep_confidence", "bpDeepConfidence", "DeepConfidence", np.float64,
                 "pose network: confidence of the predicted mode, in [0, 1]"),
    ResultColumn("deep_top_probability", "bpDeepTopProbability", "DeepTopProbability", np.float64,
                 "pose network: probability of the most probable grid cell"),
    ResultColumn("deep_fit_z", "bpDeepFitZ", "DeepFitZ", np.float64,
                 "deep-prior MMSE: fit z-score of the best searched pose (N(0, 1) at the true pose)"),
    ResultColumn("deep_fallback", "bpDeepFallback", "DeepFallback", np.int64,
                 "deep-prior MMSE: 1 when the particle was re-assigned by the global search"),
)
_BY_FIELD = {c.field: c for c in COLUMNS}
_BY_STAR = {c.star: c for c in COLUMNS}
_POSE_FIELDS = tuple(f"{e}_{kind}" for e in ESTIMATORS for kind in ("rotations", "origins_A"))


@dataclass
class ParticleResults:
    """Per-particle results of N particles; fields not computed by an engine stay None.

    Poses: ``<est>_rotations`` (N, 3, 3) RELION ``A`` and ``<est>_origins_A`` (N, 2) Å for ``est`` in
    :data:`ESTIMATORS`. Statistics: one (N,) array per :data:`COLUMNS` row (units there).
    """

    mmse_rotations: np.ndarray | None = None
    mmse_origins_A: np.ndarray | None = None
    map_rotations: np.ndarray | None = None
    map_origins_A: np.ndarray | None = None
    mle_rotations: np.ndarray | None = None
    mle_origins_A: np.ndarray | None = None
    pmax: np.ndarray | None = None
    n_significant: np.ndarray | None = None
    expected_error_deg: np.ndarray | None = None
    concentration: np.ndarray | None = None
    log_evidence: np.ndarray | None = None
    n_candidates: np.ndarray | None = None
    deep_confidence: np.ndarray | None = None
    deep_top_probability: np.ndarray | None = None
    deep_fit_z: np.ndarray | None = None
    deep_fallback: np.ndarray | None = None

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def zeros(cls, n: int, statistics: tuple[str, ...] = ("pmax", "n_significant", "expected_error_deg",
                                                           "concentration", "log_evidence")) -> ParticleResults:
        """Results of ``n`` particles with all three estimators' poses (identity, zero origins) and the named
        statistics (zeros) allocated, to be filled row by row (:meth:`set_rows`)."""
        out = cls()
        for est in ESTIMATORS:
            setattr(out, f"{est}_rotations", np.tile(np.eye(3), (n, 1, 1)))
            setattr(out, f"{est}_origins_A", np.zeros((n, 2)))
        for name in statistics:
            setattr(out, name, np.zeros(n, dtype=_BY_FIELD[name].dtype))
        return out

    def result_fields(self) -> list[str]:
        """Names of the fields that hold values (poses and statistics), in schema order."""
        return [f.name for f in fields(ParticleResults) if getattr(self, f.name) is not None]

    def set_rows(self, rows, other: ParticleResults) -> None:
        """Write ``other``'s values (len(rows) particles) into rows ``rows`` of every field both hold."""
        for name in other.result_fields():
            mine = getattr(self, name)
            if mine is not None:
                mine[rows] = getattr(other, name)

    def subset(self, rows) -> ParticleResults:
        """The results of the particles ``rows`` (a new object of the same class, copies of the arrays)."""
        values = {name: np.array(getattr(self, name)[rows]) for name in self.result_fields()
                  if name in _POSE_FIELDS or name in _BY_FIELD}
        return replace(self, **values)

    def copy_results(self) -> ParticleResults:
        """A :class:`ParticleResults` holding independent copies of every result array (no aliasing: later
        in-place updates of ``self`` do not change the copy)."""
        return ParticleResults(**{name: np.array(getattr(self, name)) for name in self.result_fields()
                                  if name in _POSE_FIELDS or name in _BY_FIELD})

    # ---------------------------------------------------------------------------------------------- poses
    def poses(self, estimator: str = "mmse") -> tuple[np.ndarray, np.ndarray]:
        """(rotations (N, 3, 3) RELION ``A``, origins (N, 2) Å) of one estimator: ``mmse``, ``map`` or ``mle``."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        return getattr(self, f"{estimator}_rotations"), getattr(self, f"{estimator}_origins_A")

    # ---------------------------------------------------------------------------------------------- columns
    def statistic_columns(self) -> dict[str, np.ndarray]:
        """``{star column: (N,) array}`` of the statistics that hold values, with their schema dtypes."""
        return {c.star: np.asarray(getattr(self, c.field), dtype=c.dtype) for c in COLUMNS
                if getattr(self, c.field) is not None}

    def star_columns(self, estimator: str | None = "mmse") -> dict[str, np.ndarray]:
        """The statistics' star columns and the angles of every estimator other than ``estimator`` (the one
        written as the particles' alignment) as ``bp<EST>AngleRot/Tilt/Psi``."""
        columns = self.statistic_columns()
        others = {e: getattr(self, f"{e}_rotations") for e in ESTIMATORS if e != estimator}
        columns.update(estimator_angle_columns({e: r for e, r in others.items() if r is not None}))
        return columns

    def to_particle_set(self, particles: ParticleSet, estimator: str = "mmse") -> ParticleSet:
        """A copy of ``particles`` with ``estimator``'s poses as the alignment and :meth:`star_columns` in
        ``extra`` (earlier bayespose ``bp`` columns of the input are dropped: they would be stale)."""
        rotations, origins = self.poses(estimator)
        if rotations is None:
            raise ValueError(f"these results hold no {estimator.upper()} poses")
        extra = drop_result_columns(particles.extra)
        extra.update(self.star_columns(estimator))
        return replace(particles, rotations=np.array(rotations, dtype=np.float64),
                       origins_A=np.array(origins, dtype=np.float64), extra=extra)

    @classmethod
    def from_star_columns(cls, extra: Mapping[str, np.ndarray]) -> ParticleResults:
        """The statistics found in star columns ``extra`` (e.g. ``ParticleSet.extra`` of a written star)."""
        return cls(**{c.field: np.asarray(extra[c.star], dtype=c.dtype) for c in COLUMNS if c.star in extra})

    # ---------------------------------------------------------------------------------------------- arrays
    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix + field: array}`` of every field that holds values (for ``np.savez``)."""
        return {prefix + name: np.asarray(getattr(self, name)) for name in self.result_fields()
                if name in _POSE_FIELDS or name in _BY_FIELD}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> ParticleResults:
        """Inverse of :meth:`to_arrays` (copies: the result never aliases ``arrays``)."""
        names = [f.name for f in fields(ParticleResults)]
        return cls(**{name: np.array(arrays[prefix + name]) for name in names if prefix + name in arrays})


def estimator_angle_columns(rotations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"bp<EST>AngleRot"/"Tilt"/"Psi": degrees}`` for each ``{estimator: rotations (N, 3, 3)}``."""
    columns = {}
    for est, rots in rotations.items():
        angles = matrix_to_euler(np.asarray(rots))
        for col, label in enumerate(ANGLE_LABELS):
            columns[f"bp{est.upper()}Angle{label}"] = angles[:, col]
    return columns


def scipion_attributes(extra: Mapping[str, np.ndarray], half_set: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The Scipion attributes (names without the ``_bp`` prefix) of per-particle star columns ``extra``: every
    :data:`COLUMNS` statistic present (its ``scipion`` name and dtype), each estimator's angles
    ``bp<EST>Angle<L>`` as ``<Est><L>`` (e.g. ``MapRot``, degrees) and ``HalfSet`` from ``half_set``."""
    attrs = {c.scipion: np.asarray(extra[c.star], dtype=c.dtype) for c in COLUMNS if c.star in extra}
    for est in ESTIMATORS:
        for label in ANGLE_LABELS:
            key = f"bp{est.upper()}Angle{label}"
            if key in extra:
                attrs[f"{est.capitalize()}{label}"] = np.asarray(extra[key], dtype=np.float64)
    if half_set is not None:
        attrs["HalfSet"] = np.asarray(half_set, dtype=np.int64)
    return attrs


def drop_result_columns(extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``extra`` without bayespose's result columns (``bp*`` and the RELION statistics of :data:`COLUMNS`): what
    an earlier bayespose run or a RELION refinement wrote would be stale next to new results."""
    return {k: v for k, v in extra.items() if not k.startswith("bp") and k not in _BY_STAR}
