"""Data shipped with bayespose (used by ``bayespose demo`` and the tests).

``3j9g_potential_ps4_4.mrc``: electrostatic-potential map computed from the atomic model PDB 3J9G (public, CC0),
64^3 voxels at 4.4 Å/px, float32. Taken from the cryoJAX project's test data (LGPL-2.1; provenance in the
repository's tests/data/README.md).
It is an exact C2 ring with a strong pseudo-6-fold about z.

``3j9g_fragment.mrc``: :func:`bayespose.core.imaging.volumes.asymmetric_fragment` of that map (two adjacent subunits,
recentred; no symmetry): the map of the pose-accuracy demo and benchmarks. Regenerate with
``write_map(path, asymmetric_fragment(read_map(demo_map_path())[0]), 4.4)``
(tests/core/imaging/test_volumes.py checks it).
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def demo_map_path() -> Path:
    """Path of the demo map (64^3, 4.4 Å/px)."""
    return DATA_DIR / "3j9g_potential_ps4_4.mrc"


def fragment_map_path() -> Path:
    """Path of the asymmetric fragment of the demo map (64^3, 4.4 Å/px)."""
    return DATA_DIR / "3j9g_fragment.mrc"
