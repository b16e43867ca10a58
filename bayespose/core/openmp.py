"""How idle OpenMP threads wait, set per process before torch or numba load the OpenMP runtime (which reads it once).
No torch or numba import here: importing this module must not load the runtime."""

from __future__ import annotations

import os

__all__ = ["openmp_waits_asleep"]


def openmp_waits_asleep() -> None:
    """Make idle OpenMP threads wait asleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a policy; call it in a
    process that runs the MMSE search or the refinement, before torch or numba are imported.

    Those engines alternate torch's OpenMP regions (matrix products) with numba's (the compiled central slices: a
    second pool in the same runtime); with spinning waits each pool's idle threads take the cores of the other's
    working ones, and of concurrent processes. Measured on 2 cores: ``bayespose assign`` of 1000 particles with 2
    threads 26.0 -> 22.0 s; 2 torchrun processes x 1 thread at box 128 53 -> 24 s (two single-thread runs side by
    side 22 -> 9-10 s each). Not for training, all torch with short convolution regions: 400 pre-training steps and
    an epoch of 4000 particles took 42-46 s with spinning waits, 52-54 s asleep.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
