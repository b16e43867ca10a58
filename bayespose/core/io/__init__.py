"""File I/O: MRC maps and stacks, RELION star files and cryoSPARC ``.cs`` files <-> ParticleSet; atomic outputs.

* :mod:`.mrc` — ``read_map`` / ``write_map`` (float32 ``[z, y, x]``, Å/px), ``read_stack`` / ``write_stack``
  (``(N, H, W)``), ``read_images`` (the images a ParticleSet refers to).
* :mod:`.relion_star` — ``read_star`` (RELION 3.0 and 3.1+ layouts) / ``write_star`` (RELION 3.1).
* :mod:`.cryosparc` — ``read_cryosparc`` (``.cs`` + passthrough; poses from rotation vectors).
* :mod:`.atomic` — ``atomic_file`` / ``atomic_folder``: every output of bayespose appears complete or not at all.

Units follow :mod:`bayespose.core.imaging.particles` (Å, degrees, kV, mm; RELION ``A`` matrices;
``rlnOriginX/YAngst``).
"""

from bayespose.core.io.atomic import atomic_file, atomic_folder, refuse_overwriting_inputs
from bayespose.core.io.cryosparc import read_cryosparc
from bayespose.core.io.mrc import read_images, read_map, read_stack, write_map, write_stack
from bayespose.core.io.relion_star import read_star, write_star

__all__ = [
    "atomic_file",
    "atomic_folder",
    "refuse_overwriting_inputs",
    "read_map",
    "write_map",
    "read_stack",
    "write_stack",
    "read_images",
    "read_star",
    "write_star",
    "read_cryosparc",
]
