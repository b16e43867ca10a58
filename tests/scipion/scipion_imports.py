"""Shared steps of the headless Scipion tests: simulate a RELION star, import it and a volume with pwem's own
protocols (the path a user takes), so each test starts from real Scipion objects."""

from __future__ import annotations

import os

import starfile


def simulate_star(out_dir: str, map_path, spec, drop_angles: bool = False) -> str:
    """Simulate particles from ``map_path`` with ``spec`` (a SimulationSpec) into ``out_dir``; returns the star path
    (a copy without rlnAngleRot/Tilt/Psi when ``drop_angles``)."""
    from bayespose.core.imaging.synthetic_dataset import simulate_dataset

    simulate_dataset(map_path, spec, out_dir)
    star = os.path.join(out_dir, "particles.star")
    if drop_angles:
        tables = starfile.read(star, always_dict=True)
        tables["particles"] = tables["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
        star = os.path.join(out_dir, "no_angles.star")
        starfile.write(tables, star)
    return star


def import_relion_particles(test, star: str, pixel_size: float):
    """pwem's RELION particle import of ``star`` in the project of ``test`` (a pyworkflow BaseTest class)."""
    from pwem.protocols import ProtImportParticles

    prot = test.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION, starFile=star,
                            magnification=10000, samplingRate=pixel_size, haveDataBeenPhaseFlipped=False)
    test.launchProtocol(prot)
    return prot.outputParticles


def import_volume(test, path, pixel_size: float):
    """pwem's volume import of ``path`` at ``pixel_size`` Å/px."""
    from pwem.protocols import ProtImportVolumes

    prot = test.newProtocol(ProtImportVolumes, filesPath=str(path), samplingRate=pixel_size)
    test.launchProtocol(prot)
    return prot.outputVolume
