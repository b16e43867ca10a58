"""Headless Scipion chain for ``assign poses (MMSE)`` (issue 3, evidence 4):

simulated particles (RELION star, known poses) -> pwem's RELION import + map import -> ProtBayesposeAssignPoses ->
export with the relion plugin's ``writeSetOfParticles`` -> the exported angles and origins are close to the truth.
Also: the ``_bp`` attributes are sane, the viewer writes its PNGs headless and recomputes one particle's posterior
consistently, the form has help everywhere and ``_validate`` catches a mismatched box and missing CTF / alignment;
the ``_bp`` attribute names and dtypes (from the result schema) are those the protocol always wrote.

Data and bounds as in tests/cli/test_assign_cli.py (30 particles of the fragment map, CTF, SNR 0.1, shifts ±1.5 px;
HEALPix order 2 + 2 refinement levels = 3.75° final spacing; median error < 7.5°, 90 % < 15°, max < 30°;
origins within 1 px).
"""

import os

import numpy as np
import pytest
import starfile
from pyworkflow.tests import BaseTest, setupTestProject
from scipy.spatial.transform import Rotation

from tests.helpers import star_rotations as _rotations
from tests.scipion.scipion_imports import import_relion_particles, import_volume, simulate_star

pytestmark = pytest.mark.scipion

PIXEL_SIZE = 4.4
FINAL_SPACING_DEG = 60.0 / 2 ** 4
COARSE_SPACING_DEG = 60.0 / 2 ** 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



class TestAssignPosesChain(BaseTest):
    @classmethod
    def setUpClass(cls):
        from bayespose.data import fragment_map_path

        setupTestProject(cls, writeLocalConfig=True)
        cls.star = cls._simulate("sim", 30, ctf=True)
        cls.particles = cls._import_particles(cls.star)
        cls.volume = cls._import_volume(fragment_map_path())

    # ---------------------------------------------------------------------------------------------- helpers
    @classmethod
    def _simulate(cls, name: str, n: int, ctf: bool, drop_angles: bool = False) -> str:
        from bayespose.core.imaging.synthetic_dataset import SimulationSpec
        from bayespose.data import fragment_map_path

        return simulate_star(cls.getOutputPath(name), fragment_map_path(),
                             SimulationSpec(n_particles=n, snr=0.1, ctf=ctf, max_shift_px=1.5, seed=1), drop_angles)

    @classmethod
    def _import_particles(cls, star: str):
        return import_relion_particles(cls, star, PIXEL_SIZE)

    @classmethod
    def _import_volume(cls, path: str):
        return import_volume(cls, path, PIXEL_SIZE)

    # ------------------------------------------------------------------------------------------------ tests
    def test_import_assign_export_view(self):
        from relion.convert import writeSetOfParticles

        from bayespose.core.io.assignment import load_assignment
        from bayespose.protocols import ProtBayesposeAssignPoses
        from bayespose.protocols.protocol_assign_poses import RESULT_NPZ
        from bayespose.viewers import BayesposeAssignPosesViewer
        from bayespose.viewers.viewer_assign_poses import STAGE_COARSE

        star = self.star
        assign = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=self.particles, inputVolume=self.volume,
                                  healpixOrder=2, refineLevels=2, shiftRange=2.0, shiftStep=1.0,
                                  numberOfThreads=2, useGpu=False)
        self.launchProtocol(assign)
        out = assign.outputParticles
        self.assertEqual(out.getSize(), 30)
        self.assertTrue(out.hasAlignmentProj())
        self.assertTrue(out.hasCTF())

        # export with the relion plugin and compare with the simulated truth (independent parse: starfile + scipy)
        export_dir = self.getOutputPath("export")
        os.makedirs(export_dir, exist_ok=True)
        exported = os.path.join(export_dir, "assigned.star")
        writeSetOfParticles(out, exported)
        truth = starfile.read(star, always_dict=True)["particles"]
        table = starfile.read(exported, always_dict=True)["particles"]
        self.assertEqual(len(table), 30)
        np.testing.assert_allclose(table["rlnDefocusU"], truth["rlnDefocusU"], rtol=1e-5)  # CTF kept
        err = np.degrees((_rotations(table).inv() * _rotations(truth)).magnitude())
        print(f"\nexported vs truth: angular error mean {err.mean():.2f}°, median {np.median(err):.2f}°, "
              f"90 % {np.percentile(err, 90):.2f}°, max {err.max():.2f}°")
        self.assertLess(np.median(err), 2 * FINAL_SPACING_DEG, np.sort(err))
        self.assertLess(np.percentile(err, 90), COARSE_SPACING_DEG, np.sort(err))
        self.assertLess(err.max(), 2 * COARSE_SPACING_DEG, np.sort(err))
        origin_cols = ["rlnOriginXAngst", "rlnOriginYAngst"]
        shift_err_px = np.linalg.norm(table[origin_cols].to_numpy(dtype=float) - truth[origin_cols].to_numpy(),
                                      axis=1) / PIXEL_SIZE
        self.assertLess(shift_err_px.max(), 1.0, shift_err_px)

        # _bp attributes: present, in range, and AngleToInput is the error against the (true) input poses
        items = [p.clone() for p in out.iterItems(orderBy="id")]  # iterItems reuses one object
        pmax = np.array([p._bpMaxProb.get() for p in items])
        self.assertTrue(np.all((pmax > 0) & (pmax <= 1 + 1e-6)), pmax)
        self.assertTrue(all(p._bpNrSignificant.get() >= 1 for p in items))
        self.assertTrue(all(p._bpExpectedErrorDeg.get() >= 0 for p in items))
        conc = np.array([p._bpConcentration.get() for p in items])
        self.assertTrue(np.all((conc > 0) & (conc <= 1 + 1e-4)), conc)  # float32 sums
        for name in ("_bpMapRot", "_bpMleTilt", "_bpMmsePsi", "_bpLogEvidence"):
            self.assertTrue(items[0].hasAttribute(name), name)
        to_input = np.array([p._bpAngleToInputDeg.get() for p in items])
        np.testing.assert_allclose(to_input, err, atol=1e-3)
        mmse_angles = np.array([[p._bpMmseRot.get(), p._bpMmseTilt.get(), p._bpMmsePsi.get()] for p in items])
        np.testing.assert_allclose(
            np.degrees((Rotation.from_euler("ZYZ", mmse_angles, degrees=True).inv() * _rotations(table)).magnitude()),
            0.0, atol=1e-3)  # the exported alignment is the MMSE pose

        # viewer: every view is written as a PNG (headless)
        viewer = BayesposeAssignPosesViewer(project=self.proj, protocol=assign)
        viewer.setProtocol(assign)
        first_id = items[0].getObjId()
        viewer.particleId.set(first_id)
        for method, png in ((viewer._showPoses, "viewer_poses.png"),
                            (viewer._showUncertainty, "viewer_uncertainty.png"),
                            (viewer._showDifference, "viewer_mmse_vs_map.png"),
                            (viewer._showPosterior, f"viewer_posterior_{first_id}.png")):
            self.assertEqual(len(method()), 1)
            with open(assign._getExtraPath(png), "rb") as fh:
                self.assertEqual(fh.read(8), PNG_MAGIC, png)
        viewer.posteriorStage.set(STAGE_COARSE)
        viewer._showPosterior()
        self.assertTrue(os.path.isfile(assign._getExtraPath(f"viewer_posterior_{first_id}_coarse.png")))

        # the one-particle recomputation (viewer) reproduces the run's result for that particle
        rotations, probabilities, result = assign.particlePosterior(0)
        data = load_assignment(assign._getExtraPath(RESULT_NPZ))
        self.assertAlmostEqual(float(probabilities.sum()), 1.0, places=4)
        angle = np.degrees((Rotation.from_matrix(result.mmse_rotations[0].T).inv()
                            * Rotation.from_matrix(data["mmse_rotations"][0].T)).magnitude())
        self.assertLess(angle, 0.05)
        self.assertAlmostEqual(float(result.pmax[0]), float(data["pmax"][0]), places=3)
        self.assertTrue(assign.summary() and "30 particles" in assign.summary()[0], assign.summary())
        methods = "\n".join(assign.methods())  # also renders the citations (pyworkflow's _references)
        self.assertIn("Xu2026", methods)

    def test_form_and_validate(self):
        import pyworkflow.protocol.params as params

        from bayespose.core.io.mrc import read_map, write_map
        from bayespose.data import fragment_map_path
        from bayespose.protocols import ProtBayesposeAssignPoses
        from bayespose.protocols.protocol_assign_poses import PRIOR_LOCAL

        prot = self.newProtocol(ProtBayesposeAssignPoses)
        for name, param in prot.getDefinition().iterAllParams():
            if not isinstance(param, (params.Group,)):
                self.assertTrue(param.help.get(), f"{name} has no help text")
        self.assertIn("useGpu", [name for name, _ in prot.getDefinition().iterAllParams()])

        good, volume = self.particles, self.volume
        bare = self._import_particles(self._simulate("bare", 4, ctf=False, drop_angles=True))
        self.assertFalse(bare.hasCTF())
        self.assertFalse(bare.hasAlignmentProj())
        map_data, _ = read_map(fragment_map_path())
        small_path = os.path.join(self.getOutputPath("small"), "box48.mrc")
        os.makedirs(os.path.dirname(small_path), exist_ok=True)
        write_map(small_path, map_data[8:56, 8:56, 8:56], PIXEL_SIZE)
        small = self._import_volume(small_path)

        ok = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=good, inputVolume=volume)
        self.assertEqual(ok.validate(), [])

        errors = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=good, inputVolume=small).validate()
        self.assertTrue(any("64 px" in e and "48 px" in e for e in errors), errors)

        errors = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=bare, inputVolume=volume,
                                  prior=PRIOR_LOCAL, symmetryGroup="x7").validate()
        self.assertTrue(any("no CTF" in e for e in errors), errors)
        self.assertTrue(any("alignment" in e for e in errors), errors)
        self.assertTrue(any("Symmetry" in e for e in errors), errors)
        # 'ignore CTF' accepts particles without CTF
        errors = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=bare, inputVolume=volume,
                                  ignoreCtf=True).validate()
        self.assertEqual(errors, [])


def test_assignment_attributes_keep_their_names(tmp_path):
    """The output attributes come from the result schema and keep the names (and dtypes) the protocol always
    had; AngleToInputDeg is the symmetry-aware angle between the input and the chosen estimator's poses."""
    from bayespose.core.assign import NoiseModel, PoseAssignment
    from bayespose.core.geometry.rotations import matrix_to_euler
    from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
    from bayespose.core.io.assignment import load_assignment, save_assignment
    from bayespose.core.results import ParticleResults
    from bayespose.protocols.protocol_assign_poses import assignment_attributes
    from tests.helpers import relion_matrices

    n, rng = 4, np.random.default_rng(0)
    results = ParticleResults.zeros(n)
    for est in ("mmse", "map", "mle"):
        setattr(results, f"{est}_rotations", relion_matrices(rng.uniform(5, 175, (n, 3))))
    results.pmax, results.n_significant = rng.uniform(size=n), rng.integers(1, 9, n)
    result = PoseAssignment(**vars(results), noise=NoiseModel(np.ones(33), 1.0), n_rotations=72, n_shifts=1,
                            n_frequencies=10)
    inputs = relion_matrices(rng.uniform(5, 175, (n, 3)))
    save_assignment(tmp_path / "a.npz", result, "map", "C2", input_rotations=inputs)
    attrs = assignment_attributes(load_assignment(tmp_path / "a.npz"))
    angles = {f"{est.capitalize()}{label}" for est in ("mmse", "map", "mle") for label in ("Rot", "Tilt", "Psi")}
    assert set(attrs) == {"MaxProb", "NrSignificant", "ExpectedErrorDeg", "Concentration", "LogEvidence",
                          "AngleToInputDeg"} | angles
    assert attrs["NrSignificant"].dtype == np.int64 and attrs["MaxProb"].dtype == np.float64
    np.testing.assert_array_equal(attrs["MaxProb"], results.pmax)
    np.testing.assert_allclose(attrs["MleTilt"], matrix_to_euler(results.mle_rotations)[:, 1])
    np.testing.assert_allclose(attrs["AngleToInputDeg"], symmetric_geodesic_distance_deg(
        inputs, results.map_rotations, symmetry_group("C2")))
