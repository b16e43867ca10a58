"""bayespose: Bayesian and learned particle-pose estimation for single-particle cryo-EM.

The science lives in :mod:`bayespose.core` (torch/numpy only). This module also registers the
Scipion plugin (``Plugin``) when Scipion's ``pwem`` is importable; the core and the CLI work without it.
"""

import os

# OpenMP threads wait asleep, not spinning, between parallel regions. The engines alternate torch's OpenMP regions
# (matrix products) with numba's (the compiled central slices, a second OpenMP pool): with spinning waits the idle
# pool's threads take the cores of the working one's, and concurrent processes (torchrun, several jobs on a node)
# each other's. Measured on 2 cores (`bayespose assign`, 1000 particles): 2 threads 26.0 -> 22.0 s at box 64;
# 2 data-parallel processes x 1 thread at box 128 53 -> 24 s (two single-thread runs side by side: 22 -> 9-10 s
# each). Set before torch or numba load the OpenMP runtime, which reads it once; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_logo = "bayespose_logo.png"
_references = ["Xu2026", "Scheres2012a"]

try:
    import pwem
except ImportError:  # plain-library use without Scipion: no plugin class, core/CLI still work
    pwem = None

if pwem is not None:

    class Plugin(pwem.Plugin):
        """bayespose needs no external binary: everything runs in this Python environment."""

        _url = "https://github.com/bayespose/scipion-em-bayespose"

        @classmethod
        def _defineVariables(cls):
            pass

        @classmethod
        def defineBinaries(cls, env):
            pass
