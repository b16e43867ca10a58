"""Data shipped with bayespose (used by ``bayespose demo`` and the tests).

``3j9g_potential_ps4_4.mrc``: electrostatic-potential map computed from the atomic model PDB 3J9G (public, CC0),
64^3 voxels at 4.4 Å/px, float32. Taken from the cryojax project's test data (see ../shared/data/README.md).
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def demo_map_path() -> Path:
    """Path of the demo map (64^3, 4.4 Å/px)."""
    return DATA_DIR / "3j9g_potential_ps4_4.mrc"
