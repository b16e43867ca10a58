"""Headless Scipion chain: import a map -> simulate particles (bayespose) -> pose viewer PNG -> export with the
relion plugin's writer -> pwem's RELION import -> the poses, origins and CTF are the simulated ground truth.

Also builds every bayespose protocol's form and checks ``_validate`` catches bad parameters.
"""

import os

import numpy as np
import pytest
import starfile
from pyworkflow.tests import BaseTest, setupTestProject

from tests.helpers import relion_matrices

pytestmark = pytest.mark.scipion


class TestSimulateChain(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls, writeLocalConfig=True)

    def _import_demo_map(self):
        from pwem.protocols import ProtImportVolumes

        from bayespose.data import demo_map_path

        prot = self.newProtocol(ProtImportVolumes, filesPath=str(demo_map_path()), samplingRate=4.4)
        self.launchProtocol(prot)
        return prot.outputVolume

    def test_simulate_view_export_reimport(self):
        from pwem.protocols import ProtImportParticles
        from relion.convert import writeSetOfParticles

        from bayespose.convert import particles_from_scipion
        from bayespose.protocols import ProtBayesposeSimulate
        from bayespose.viewers.viewer_poses import BayesposePoseViewer

        volume = self._import_demo_map()
        sim = self.newProtocol(ProtBayesposeSimulate, inputVolume=volume, nParticles=30, snr=0.5, maxShift=2.0,
                               doCtf=True, seed=3)
        self.launchProtocol(sim)
        out = sim.outputParticles
        self.assertEqual(out.getSize(), 30)
        self.assertTrue(out.hasCTF())
        self.assertTrue(out.hasAlignmentProj())
        self.assertAlmostEqual(out.getSamplingRate(), 4.4, places=5)
        self.assertEqual(out.getXDim(), 64)

        # the Scipion set carries exactly the ground truth written in the protocol's star file
        truth = starfile.read(sim._getExtraPath("particles.star"), always_dict=True)["particles"]
        core = particles_from_scipion(out)
        np.testing.assert_allclose(core.rotations, relion_matrices(truth), atol=1e-5)
        np.testing.assert_allclose(core.origins_A, truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                                   atol=1e-4)
        np.testing.assert_allclose(core.ctf.defocus_u, truth["rlnDefocusU"].to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(core.ctf.defocus_angle, truth["rlnDefocusAngle"].to_numpy(), atol=1e-3)

        # pose viewer writes a PNG headless
        viewer = BayesposePoseViewer(project=self.proj, protocol=sim)
        views = viewer._visualize(sim)
        self.assertEqual(len(views), 1)
        png = sim._getExtraPath("outputParticles_poses.png")
        with open(png, "rb") as fh:
            self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")

        # export with the relion plugin's writer and import back with pwem's RELION import
        export_dir = self.getOutputPath("export")
        os.makedirs(export_dir, exist_ok=True)
        exported = os.path.join(export_dir, "exported.star")
        # a new stack next to the star (relative image names, as pwem's RELION import requires)
        writeSetOfParticles(out, exported, outputStack=os.path.join(export_dir, "particles.mrcs"))
        reimport = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                    starFile=exported, magnification=10000, samplingRate=4.4,
                                    haveDataBeenPhaseFlipped=False)
        self.launchProtocol(reimport)
        back = particles_from_scipion(reimport.outputParticles)
        np.testing.assert_allclose(back.rotations, core.rotations, atol=1e-4)
        np.testing.assert_allclose(back.origins_A, core.origins_A, atol=1e-3)
        np.testing.assert_allclose(back.ctf.defocus_v, core.ctf.defocus_v, rtol=1e-5)
        # and the image data survived: the first re-imported image equals the simulated one
        from bayespose.core.io.mrc import read_images
        np.testing.assert_allclose(read_images(back, [0, 29]), read_images(core, [0, 29]), atol=1e-5)

        # the pose viewer is offered for any particle set with 3D alignment (here pwem's RELION import) and draws
        # it, saving the PNG in the project's Tmp folder (not in another plugin's run)
        self._check_pose_viewer_on_foreign_sets(reimport, exported)

    def _check_pose_viewer_on_foreign_sets(self, reimport, exported_star):
        from pwem import Domain
        from pwem.protocols import ProtImportParticles
        from pyworkflow.viewer import DESKTOP_TKINTER, MessageView

        from bayespose.viewers._common import FigureView
        from bayespose.viewers.viewer_poses import BayesposePoseViewer

        aligned = reimport.outputParticles
        viewers = Domain.findViewers(aligned, DESKTOP_TKINTER)
        self.assertIn(BayesposePoseViewer, viewers)
        self.assertIsNot(viewers[0], BayesposePoseViewer)  # low priority: the default particle viewer stays first
        viewer = BayesposePoseViewer(project=self.proj, protocol=reimport)
        views = viewer._visualize(aligned)
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], FigureView)
        png = os.path.join(self.proj.getTmpPath(), f"bayespose_poses_{aligned.getObjId()}.png")
        with open(png, "rb") as fh:
            self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertFalse(os.path.exists(reimport._getExtraPath("outputParticles_poses.png")))

        # a set without 3D alignment: not offered, and a message (not an exception) when asked anyway
        table = starfile.read(exported_star, always_dict=True)
        table["particles"] = table["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
        bare_star = os.path.join(os.path.dirname(exported_star), "no_angles.star")
        starfile.write(table, bare_star)
        bare = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                starFile=bare_star, magnification=10000, samplingRate=4.4,
                                haveDataBeenPhaseFlipped=False)
        self.launchProtocol(bare)
        unaligned = bare.outputParticles
        self.assertFalse(unaligned.hasAlignmentProj())
        self.assertNotIn(BayesposePoseViewer, Domain.findViewers(unaligned, DESKTOP_TKINTER))
        views = BayesposePoseViewer(project=self.proj, protocol=bare)._visualize(unaligned)
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], MessageView)
        self.assertIn("no 3D alignment", views[0].getMessage())

    def test_forms_build_and_validate_catches_bad_input(self):
        import pyworkflow.protocol.params as params

        from bayespose.protocols import ProtBayesposeImportCryosparc, ProtBayesposeSimulate

        for cls in (ProtBayesposeSimulate, ProtBayesposeImportCryosparc):
            prot = self.newProtocol(cls)
            form = prot.getDefinition()
            names = [name for name, _ in form.iterAllParams()]
            self.assertTrue(names, cls)
            for name, param in form.iterAllParams():
                if not isinstance(param, (params.Line, params.Group)):
                    self.assertTrue(param.help.get(), f"{cls.__name__}.{name} has no help text")
            self.assertTrue(cls._label)
            citations = prot.citations()  # pyworkflow formats _references from bibtex.py
            self.assertTrue(citations and all(isinstance(c, str) for c in citations), cls.__name__)

        volume = self._import_demo_map()
        bad = self.newProtocol(ProtBayesposeSimulate, inputVolume=volume, snr=-1.0, defocusMin=3.0,
                               defocusMax=1.0)
        errors = bad.validate()
        self.assertTrue(any("signal-to-noise" in e for e in errors), errors)
        self.assertTrue(any("defocus" in e for e in errors), errors)
