"""Headless Scipion chain for deep pose prediction (issue 5):

fragment map import -> 'simulate particles' (training set and test set, known poses) -> 'train pose network' (a few
epochs) -> 'predict poses' without and with a reference map (deep-prior MMSE) -> outputs registered and readable
again from the project database (the BayesposePoseNetwork object, particles with ALIGN_PROJ alignment and ``_bp``
attributes) -> viewers write their PNGs -> ``_validate`` catches a model / particle box mismatch.

The network is trained for two epochs only (the accuracy of the CLI's identical code path is tested in
tests/cli/test_deep_cli.py); here the outputs are checked for consistency: the ``_bp`` attributes against angles
computed with scipy from the simulation's ground truth (the protocol's star file) and from the output alignment.
"""

import os

import numpy as np
import pytest
import starfile
from pyworkflow.tests import BaseTest, setupTestProject
from scipy.spatial.transform import Rotation

pytestmark = pytest.mark.scipion

PIXEL_SIZE = 4.4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_N, TEST_N, EPOCHS = 96, 12, 2


def _truth(sim) -> Rotation:
    table = starfile.read(sim._getExtraPath("particles.star"), always_dict=True)["particles"]
    return Rotation.from_euler("ZYZ", table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float),
                               degrees=True)


def _poses(particle_set) -> Rotation:
    from bayespose.convert import particles_from_scipion

    core = particles_from_scipion(particle_set)
    return Rotation.from_matrix(core.rotations.transpose(0, 2, 1))  # RELION A -> scipy ZYZ matrix


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


class TestDeepChain(BaseTest):
    @classmethod
    def setUpClass(cls):
        from pwem.protocols import ProtImportVolumes

        from bayespose.data import fragment_map_path
        from bayespose.protocols import ProtBayesposeSimulate, ProtBayesposeTrainPoseNetwork
        from bayespose.protocols.protocol_simulate import POSE_PREFERRED

        setupTestProject(cls, writeLocalConfig=True)
        imp = cls.newProtocol(ProtImportVolumes, filesPath=str(fragment_map_path()), samplingRate=PIXEL_SIZE)
        cls.launchProtocol(imp)
        cls.volume = imp.outputVolume
        cls.sim_train = cls.newProtocol(ProtBayesposeSimulate, inputVolume=cls.volume, nParticles=TRAIN_N, snr=1.0,
                                        maxShift=1.0, doCtf=True, poseDistribution=POSE_PREFERRED, seed=21)
        cls.launchProtocol(cls.sim_train)
        cls.sim_test = cls.newProtocol(ProtBayesposeSimulate, inputVolume=cls.volume, nParticles=TEST_N, snr=1.0,
                                       maxShift=1.0, doCtf=True, poseDistribution=POSE_PREFERRED, seed=22)
        cls.launchProtocol(cls.sim_test)
        cls.train = cls.newProtocol(ProtBayesposeTrainPoseNetwork, inputParticles=cls.sim_train.outputParticles,
                                    netBox=32, epochs=EPOCHS, batchSize=32, learningRate=2e-3, valFraction=0.1,
                                    gridOrder=2, numberOfThreads=2, useGpu=False)  # 15° cells (default 3)
        cls.launchProtocol(cls.train)

    def test_train_output_is_a_registered_pose_network(self):
        from pwem import Domain

        from bayespose.objects import BayesposePoseNetwork
        from bayespose.viewers import BayesposeTrainingViewer

        self.assertIs(Domain.getObjects().get("BayesposePoseNetwork"), BayesposePoseNetwork)  # bayespose.objects
        model = self.train.outputModel
        self.assertIsInstance(model, BayesposePoseNetwork)
        self.assertTrue(os.path.isfile(model.getFileName()))
        # read back from the project database (the mapper must know the class)
        stored = self.proj.getProtocol(self.train.getObjId()).outputModel
        self.assertIsInstance(stored, BayesposePoseNetwork)
        self.assertEqual(stored.getFileName(), model.getFileName())
        self.assertEqual(stored.getModelType(), "so3grid")
        self.assertEqual(stored.getBox(), 64)
        self.assertAlmostEqual(stored.getSamplingRate(), PIXEL_SIZE, places=4)
        self.assertEqual(stored.getNetBox(), 32)
        self.assertEqual(stored.getSymmetry(), "C1")
        self.assertEqual(stored.getNumberOfParticles(), TRAIN_N)
        self.assertTrue(1 <= stored.getBestEpoch() <= EPOCHS)
        self.assertIn(model.getFileName(), model.getFiles())
        self.assertIn("SO(3) grid", self.train.summary()[0])  # the model in words, not its code name
        self.assertIn("Klee", "\n".join(self.train.methods()))

        # training curves, from the protocol and from the model object
        viewer = BayesposeTrainingViewer(project=self.proj, protocol=self.train)
        self.assertEqual(len(viewer._visualize(self.train)), 1)
        self.assertTrue(_is_png(self.train._getExtraPath("viewer_training.png")))
        os.remove(self.train._getExtraPath("viewer_training.png"))
        self.assertEqual(len(viewer._visualize(model)), 1)
        self.assertTrue(_is_png(self.train._getExtraPath("viewer_training.png")))

    def test_predict_without_and_with_reference(self):
        from bayespose.core.io.prediction import load_prediction
        from bayespose.protocols import ProtBayesposePredictPoses
        from bayespose.protocols.protocol_predict_poses import PREDICTION_NPZ
        from bayespose.viewers import BayesposePredictPosesViewer

        truth = _truth(self.sim_test)
        errors = {}
        for refine in (False, True):
            kwargs = dict(inputVolume=self.volume, shiftRange=2.0) if refine else {}
            pred = self.newProtocol(ProtBayesposePredictPoses, inputModel=self.train.outputModel,
                                    inputParticles=self.sim_test.outputParticles, topK=4, doRefine=refine,
                                    numberOfThreads=2, useGpu=False, **kwargs)
            self.launchProtocol(pred)
            out = pred.outputParticles
            self.assertEqual(out.getSize(), TEST_N)
            self.assertTrue(out.hasAlignmentProj())
            self.assertTrue(out.hasCTF())
            err = np.degrees((_poses(out).inv() * truth).magnitude())
            errors[refine] = err
            items = [p.clone() for p in out.iterItems(orderBy="id")]
            conf = np.array([p._bpDeepConfidence.get() for p in items])
            self.assertTrue(np.all((conf >= 0) & (conf <= 1 + 1e-6)), conf)
            deep = Rotation.from_euler("ZYZ", [[p._bpDeepRot.get(), p._bpDeepTilt.get(), p._bpDeepPsi.get()]
                                               for p in items], degrees=True)
            deep_err = np.degrees((deep.inv() * truth).magnitude())
            top = np.array([p._bpDeepTopProbability.get() for p in items])
            self.assertTrue(np.all((top > 0) & (top <= 1 + 1e-6)), top)
            self.assertTrue(all(hasattr(p, "_bpDeepTop2AngleRot") for p in items))  # the second cell (top 4)
            to_input = np.array([p._bpDeepAngleToInputDeg.get() for p in items])
            np.testing.assert_allclose(to_input, deep_err, atol=1e-2)  # the input alignment is the truth
            if refine:
                self.assertTrue(all(p._bpExpectedErrorDeg.get() >= 0 for p in items))
                self.assertTrue(all(p._bpDeepFallback.get() in (0, 1) for p in items))  # the fit check ran
                self.assertTrue(all(np.isfinite(p._bpDeepFitZ.get()) for p in items))
                np.testing.assert_allclose([p._bpAngleToInputDeg.get() for p in items], err, atol=1e-2)
                to_mmse = np.array([p._bpDeepToMmseDeg.get() for p in items])
                np.testing.assert_allclose(to_mmse, np.degrees((deep.inv() * _poses(out)).magnitude()), atol=1e-2)
                self.assertIn("Xu2026", "\n".join(pred.methods()))
            else:
                np.testing.assert_allclose(err, deep_err, atol=1e-2)  # output alignment = the network mode
            self.assertTrue(pred.summary() and f"{TEST_N} particles" in pred.summary()[0], pred.summary())

            viewer = BayesposePredictPosesViewer(project=self.proj, protocol=pred)
            viewer.setProtocol(pred)
            first_id = items[0].getObjId()
            viewer.particleId.set(first_id)
            for method, png in ((viewer._showPoses, "viewer_poses.png"), (viewer._showErrors, "viewer_errors.png"),
                                (viewer._showDistribution, f"viewer_distribution_{first_id}.png")):
                self.assertEqual(len(method()), 1)
                self.assertTrue(_is_png(pred._getExtraPath(png)), png)
            # the one-particle recomputation is the stored prediction: its best cell is the stored top-1 pose and
            # the refined mode lies within 1.5 grid spacings (15° at order 2) of it
            rotations, probabilities, order = pred.particleDistribution(0)
            self.assertEqual(order, 2)
            self.assertEqual(len(rotations), 72 * 8 ** 2)
            self.assertAlmostEqual(float(probabilities.sum()), 1.0, places=5)
            stored = load_prediction(pred._getExtraPath(PREDICTION_NPZ))
            best = Rotation.from_matrix(rotations[int(np.argmax(probabilities))].T)
            top1 = Rotation.from_matrix(stored["top_rotations"][0, 0].T)
            self.assertLess(np.degrees((best.inv() * top1).magnitude()), 1e-3)
            self.assertLess(np.degrees((best.inv() * deep[0]).magnitude()), 1.5 * 15.0)

        print(f"\nScipion chain ({EPOCHS} epochs): network median error {np.median(errors[False]):.1f}°, "
              f"deep-prior MMSE {np.median(errors[True]):.1f}°")

    def test_forms_and_validate(self):
        import pyworkflow.protocol.params as params

        from bayespose.core.io.mrc import read_map, write_map
        from bayespose.data import fragment_map_path
        from bayespose.protocols import ProtBayesposePredictPoses, ProtBayesposeSimulate, ProtBayesposeTrainPoseNetwork

        for cls in (ProtBayesposeTrainPoseNetwork, ProtBayesposePredictPoses):
            prot = self.newProtocol(cls)
            names = []
            for name, param in prot.getDefinition().iterAllParams():
                names.append(name)
                if not isinstance(param, params.Group):
                    self.assertTrue(param.help.get(), f"{cls.__name__}.{name} has no help text")
            self.assertIn("useGpu", names)

        ok = self.newProtocol(ProtBayesposePredictPoses, inputModel=self.train.outputModel,
                              inputParticles=self.sim_test.outputParticles, doRefine=True, inputVolume=self.volume)
        self.assertEqual(ok.validate(), [])
        errors = self.newProtocol(ProtBayesposePredictPoses, inputModel=self.train.outputModel,
                                  inputParticles=self.sim_test.outputParticles, doRefine=True).validate()
        self.assertTrue(any("reference map" in e for e in errors), errors)

        # particles (and map) with another box than the network's
        from pwem.protocols import ProtImportVolumes

        map_data, _ = read_map(fragment_map_path())
        small_path = os.path.join(self.getOutputPath("small"), "box48.mrc")
        os.makedirs(os.path.dirname(small_path), exist_ok=True)
        write_map(small_path, map_data[8:56, 8:56, 8:56], PIXEL_SIZE)
        imp = self.newProtocol(ProtImportVolumes, filesPath=small_path, samplingRate=PIXEL_SIZE)
        self.launchProtocol(imp)
        sim = self.newProtocol(ProtBayesposeSimulate, inputVolume=imp.outputVolume, nParticles=3, snr=1.0, seed=1)
        self.launchProtocol(sim)
        errors = self.newProtocol(ProtBayesposePredictPoses, inputModel=self.train.outputModel,
                                  inputParticles=sim.outputParticles).validate()
        self.assertTrue(any("64 px" in e and "48 px" in e for e in errors), errors)
        errors = self.newProtocol(ProtBayesposePredictPoses, inputModel=self.train.outputModel,
                                  inputParticles=self.sim_test.outputParticles, doRefine=True,
                                  inputVolume=imp.outputVolume).validate()
        self.assertTrue(any("reference map" in e and "48 px" in e for e in errors), errors)

        # training: unaligned particles, bad symmetry, network box larger than the particles
        errors = self.newProtocol(ProtBayesposeTrainPoseNetwork, inputParticles=sim.outputParticles,
                                  symmetryGroup="x7", netBox=64).validate()
        self.assertTrue(any("Symmetry" in e for e in errors), errors)
        self.assertTrue(any("64 px" in e and "48 px" in e for e in errors), errors)
