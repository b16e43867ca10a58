"""The words and numbers of deep pose prediction that the engine, the CLI and the Scipion protocols share.

Defined once here (no torch: the CLI builds its argument choices from this module without loading the engine):

* :data:`ModelType` (``"so3grid"``: a distribution on a HEALPix x in-plane grid; ``"quaternion"``: one regressed
  pose) and :data:`CtfCorrection` (``"phase_flip"``: images multiplied by the sign of their CTF; ``"none"``), as
  ``Literal`` types and as the tuples :data:`MODEL_TYPES` / :data:`CTF_CORRECTIONS` of their values;
* :data:`SearchMethod` / :data:`SEARCH_METHODS` of deep-prior MMSE (``"cells"``, ``"balls"``,
  :mod:`.prior_refine`) and its measured defaults :data:`DEFAULT_SEED_MASS`, :data:`DEFAULT_MAX_SEED_CELLS`,
  :data:`AUTO_FALLBACK_Z`, :data:`AUTO_FALLBACK_DEFICIT` and :data:`PRIOR_INPLANE_TURNS`, and
  :func:`fallback_threshold` that reads a user's ``auto | none | Z``;
* :data:`NETWORK_PIXEL_RTOL`: the relative pixel-size tolerance between a network's training particles and the
  particles it predicts;
* the training defaults (:data:`TRAINING_DEFAULTS`: learning rate, epochs, output grid order, pre-training steps
  with a map, fine-tuning rate factor), measured on benchmarks/deep_poses.py (benchmarks/results/deep/README.md).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = ["ModelType", "MODEL_TYPES", "CtfCorrection", "CTF_CORRECTIONS", "SearchMethod", "SEARCH_METHODS",
           "NETWORK_PIXEL_RTOL", "DEFAULT_SEED_MASS", "DEFAULT_MAX_SEED_CELLS", "AUTO_FALLBACK_Z",
           "AUTO_FALLBACK_DEFICIT", "PRIOR_INPLANE_TURNS", "fallback_threshold", "DEFAULT_PRETRAIN_STEPS",
           "TRAINING_DEFAULTS"]

ModelType = Literal["so3grid", "quaternion"]
MODEL_TYPES: tuple[ModelType, ...] = get_args(ModelType)

CtfCorrection = Literal["phase_flip", "none"]
CTF_CORRECTIONS: tuple[CtfCorrection, ...] = get_args(CtfCorrection)

SearchMethod = Literal["cells", "balls"]
SEARCH_METHODS: tuple[SearchMethod, ...] = get_args(SearchMethod)

# A network sees Fourier-cropped images in pixel units: particles at another pixel size show the molecule at
# another magnification, and its predictions would be silently wrong. Pixel sizes must agree within 0.1 %.
NETWORK_PIXEL_RTOL = 1e-3

# training defaults (TrainConfig reads them; the CLI shows them without importing torch)
# steps on synthetic projections when a map is given (``bayespose train --map``): 9000 fill the 10-minute budget of
# 4000 particles on 2 CPU cores (9.6 min, benchmarks/deep_poses.py relion_sizes); more steps still help (20000
# particles, batch 128: 6.8° / 4.4° in 19.7 min)
DEFAULT_PRETRAIN_STEPS = 9000
TRAINING_DEFAULTS = {"learning_rate": 2e-3, "epochs": 30, "grid_order": 3, "finetune_lr_factor": 0.3}

# deep-prior MMSE defaults, chosen on benchmarks/deep_poses.py section 4 (benchmarks/results/deep/README.md,
# "Deep-prior MMSE: seeds and fallback")
DEFAULT_SEED_MASS = 0.99  # the seeds: the most probable network cells holding 99 % of the predicted probability
DEFAULT_MAX_SEED_CELLS = 128  # ... but at most this many cells per particle
AUTO_FALLBACK_Z = -1.5  # particles whose fit z-score is below this go to the global search ...
# ... if their best pose also leaves this fraction of its expected signal energy unexplained (the fit deficit):
# measured on relion_project particles (SNR 0.1, box 64: right poses <= 0.46, wrong ones >= 0.79; box 128: 0.37 /
# 0.69), the z-score alone sent 16-25 % of right poses to the global search there (model mismatch grows with the
# signal energy); at SNR 0.03 the z-score decides alone (see prior_refine's module doc)
AUTO_FALLBACK_DEFICIT = 0.25
# test-time in-plane turns of the grid network when its prediction is the prior of deep-prior MMSE (predict
# --refine-map): the MMSE search decides the pose, the prediction only has to hold it within its seeds. Two turns
# (0°, 180°: exact, no interpolation) against the default 8, 4000 + map network, 1000 relion_project particles at box
# 64 (benchmarks/deep_poses.py relion_prior): network 1.5 s instead of 5.6 s, MMSE mean error 1.406° vs 1.402°,
# fallbacks 3.3 % vs 3.1 %, the whole run 0.98x instead of 1.53x the global search's wall time
PRIOR_INPLANE_TURNS = 2


def fallback_threshold(fallback: str | float | None) -> float | None:
    """The z threshold (``DeepPriorSearch.fallback_z``) of a user's ``fallback`` setting: ``"auto"`` ->
    ``AUTO_FALLBACK_Z``, ``"none"``/None -> None (no check), a finite number (or a numeric string) -> itself."""
    if fallback is None:
        return None
    if isinstance(fallback, str):
        word = fallback.strip().lower()
        if word == "auto":
            return AUTO_FALLBACK_Z
        if word in ("none", "off", "no"):
            return None
        try:
            fallback = float(word)
        except ValueError:
            raise ValueError(f"fallback must be 'auto', 'none' or a z threshold (a number), got {fallback!r}") \
                from None
    if isinstance(fallback, bool) or not isinstance(fallback, (int, float)) or not math.isfinite(fallback):
        raise ValueError(f"fallback must be 'auto', 'none' or a finite z threshold, got {fallback!r}")
    return float(fallback)
