"""bayespose: Bayesian and learned particle-pose estimation for single-particle cryo-EM.

The science lives in :mod:`bayespose.core` (torch/numpy only). This module also registers the
Scipion plugin (``Plugin``) when Scipion's ``pwem`` is importable; the core and the CLI work without it.
"""

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
