"""Headless Scipion chain for ``refine with prior estimation (EM)`` (issue 4):

simulated particles (RELION star, known poses) -> pwem's RELION import + volume import -> ProtBayesposeRefine (2
iterations) -> outputs registered and readable: a Volume with half maps and the sampling rate, an FSC equal to the
written fsc.csv, particles with projection alignment (exported with the relion plugin's ``writeSetOfParticles`` and
compared with the truth) and ``_bp`` attributes; the prior file in the extra folder; the viewer writes its PNGs
headless. The run takes the form's default prior (estimate, the protocol's point) and a random half-set split
(the output's half sets are balanced and not the input's). Also: the form has help everywhere and ``_validate``
catches a mismatched box, missing CTF, too few particles (per half set, with the chosen split: input half sets of
25 and 5 are refused, a random split of the same 30 particles is not) and a bad symmetry.

Data and bounds as in tests/cli/test_refine_cli.py: the fragment map Fourier-cropped to 32 px (8.8 Å/px), 60 particles
with CTF at SNR 1, no shifts; the initial volume is the true map (low-passed to 30 Å by the refinement). Measured:
correlation of the refined map with the truth 0.88, median pose error 11.6° (2 iterations, seed 1); bounds 0.7 and
25°.
"""

import csv
import os

import numpy as np
import pytest
import starfile
from pyworkflow.tests import BaseTest, setupTestProject

from tests.helpers import fourier_crop
from tests.helpers import star_rotations as _rotations
from tests.scipion.scipion_imports import import_relion_particles, import_volume, simulate_star

pytestmark = pytest.mark.scipion

BOX = 32
PIXEL_SIZE = 8.8
N_PARTICLES = 60
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TestRefineChain(BaseTest):
    @classmethod
    def setUpClass(cls):
        from bayespose.core.io.mrc import read_map, write_map
        from bayespose.data import fragment_map_path

        setupTestProject(cls, writeLocalConfig=True)
        full, _ = read_map(fragment_map_path())
        cls.truth = fourier_crop(full, BOX)
        folder = cls.getOutputPath("maps")
        os.makedirs(folder, exist_ok=True)
        cls.truth_path = os.path.join(folder, "truth32.mrc")
        write_map(cls.truth_path, cls.truth, PIXEL_SIZE)
        cls.star = cls._simulate("sim", N_PARTICLES, ctf=True)
        cls.particles = cls._import_particles(cls.star)
        cls.volume = cls._import_volume(cls.truth_path)

    # ---------------------------------------------------------------------------------------------- helpers
    @classmethod
    def _simulate(cls, name: str, n: int, ctf: bool, drop_angles: bool = False) -> str:
        from bayespose.core.imaging.synthetic_dataset import SimulationSpec

        return simulate_star(cls.getOutputPath(name), cls.truth_path, SimulationSpec(n_particles=n, snr=1.0, ctf=ctf,
                                                                                     seed=1), drop_angles)

    @classmethod
    def _import_particles(cls, star: str):
        return import_relion_particles(cls, star, PIXEL_SIZE)

    @classmethod
    def _import_volume(cls, path: str, sampling: float = PIXEL_SIZE):
        return import_volume(cls, path, sampling)

    # ------------------------------------------------------------------------------------------------ tests
    def test_import_refine_outputs_view(self):
        from pyworkflow.viewer import View
        from relion.convert import writeSetOfParticles

        from bayespose.core.io.mrc import read_map
        from bayespose.core.refine import HALF_SPLITS
        from bayespose.protocols import ProtBayesposeRefine
        from bayespose.viewers import BayesposeRefineViewer
        from bayespose.viewers.viewer_refine import MAP_ALL, VOLUME_CHIMERA, VOLUME_SLICES, VOLUME_XMIPP

        # the form's defaults: the estimated prior (the protocol's point); half sets: a new random split, not the
        # input's alternating 1, 2, 1, 2 (simulated)
        prot = self.newProtocol(ProtBayesposeRefine, inputParticles=self.particles, inputVolume=self.volume,
                                numberOfIterations=2, healpixOrder=1, maxHealpixOrder=2, shiftRange=0.0,
                                halfSets=HALF_SPLITS.index("random"), numberOfThreads=2, useGpu=False)
        self.assertEqual(prot.refineConfig().prior_mode, "estimate")
        self.launchProtocol(prot)

        # volume with half maps and the sampling rate; the map is close to the truth
        vol = prot.outputVolume
        self.assertAlmostEqual(vol.getSamplingRate(), PIXEL_SIZE, places=4)
        self.assertTrue(vol.hasHalfMaps())
        halves = vol.getHalfMaps().split(",")
        self.assertEqual(len(halves), 2)
        for path in [vol.getFileName(), *halves]:
            self.assertTrue(os.path.isfile(path), path)
        refined, map_px = read_map(vol.getFileName())
        self.assertAlmostEqual(map_px, PIXEL_SIZE, places=3)
        corr = float(np.corrcoef(refined.ravel(), self.truth.ravel())[0, 1])
        half1, _ = read_map(halves[0])
        self.assertFalse(np.allclose(half1, refined))  # a half map, not a copy of the map

        # FSC object = the written fsc.csv (independent csv parse); pwem's resolution agrees within a shell
        fsc = prot.outputFSC
        x, y = fsc.getData()
        with open(prot._getExtraPath("fsc.csv"), newline="") as fh:
            rows = list(csv.DictReader(fh))
        np.testing.assert_allclose([float(v) for v in x], [float(r["frequency_1/A"]) for r in rows], rtol=1e-6)
        np.testing.assert_allclose([float(v) for v in y], [float(r["fsc"]) for r in rows], rtol=1e-6, atol=1e-7)
        reported = prot.results().resolution_A
        shell = 1.0 / (BOX * PIXEL_SIZE)
        self.assertLess(abs(1 / float(fsc.calculateResolution()) - 1 / reported), shell + 1e-9)
        self.assertTrue(os.path.isfile(prot._getExtraPath("prior.npy")))
        self.assertTrue(os.path.isfile(prot._getExtraPath("prior.json")))

        # particles: alignment exported by the relion plugin = our star's poses, close to the truth
        out = prot.outputParticles
        self.assertEqual(out.getSize(), N_PARTICLES)
        self.assertTrue(out.hasAlignmentProj())
        self.assertTrue(out.hasCTF())
        export_dir = self.getOutputPath("export")
        os.makedirs(export_dir, exist_ok=True)
        exported = os.path.join(export_dir, "refined.star")
        writeSetOfParticles(out, exported)
        table = starfile.read(exported, always_dict=True)["particles"]
        ours = starfile.read(prot._getExtraPath("particles.star"), always_dict=True)["particles"]
        truth = starfile.read(self.star, always_dict=True)["particles"]
        self.assertEqual(len(table), N_PARTICLES)
        np.testing.assert_allclose(table["rlnDefocusU"], truth["rlnDefocusU"], rtol=1e-5)  # CTF kept
        np.testing.assert_allclose(np.degrees((_rotations(table).inv() * _rotations(ours)).magnitude()), 0.0,
                                   atol=1e-3)
        err = np.degrees((_rotations(table).inv() * _rotations(truth)).magnitude())
        print(f"\nrefined map vs truth: correlation {corr:.3f}; exported poses vs truth: median {np.median(err):.1f}°,"
              f" 90 % {np.percentile(err, 90):.1f}°; resolution {reported:.1f} Å")
        self.assertGreater(corr, 0.7)
        self.assertLess(np.median(err), 25.0, np.sort(err))

        # _bp attributes
        items = [p.clone() for p in out.iterItems(orderBy="id")]  # iterItems reuses one object
        pmax = np.array([p._bpMaxProb.get() for p in items])
        self.assertTrue(np.all((pmax > 0) & (pmax <= 1 + 1e-6)), pmax)
        self.assertTrue(all(p._bpExpectedErrorDeg.get() >= 0 for p in items))
        halves_attr = np.array([p._bpHalfSet.get() for p in items])
        self.assertEqual(set(halves_attr.tolist()), {1, 2})
        np.testing.assert_array_equal(halves_attr, ours["rlnRandomSubset"].to_numpy())
        self.assertEqual(np.bincount(halves_attr).tolist(), [0, N_PARTICLES // 2, N_PARTICLES // 2])
        alternating = np.where(np.arange(N_PARTICLES) % 2 == 0, 1, 2)
        self.assertGreater(int(np.sum(halves_attr != alternating)), N_PARTICLES // 4)  # not the input's split
        to_input = np.array([p._bpAngleToInputDeg.get() for p in items])
        np.testing.assert_allclose(to_input, err, atol=1e-3)  # the imported poses are the truth

        # viewer: every figure as a PNG (headless), the maps in the volume viewers
        viewer = BayesposeRefineViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        for method, name in ((viewer._showFsc, "fsc"), (viewer._showHistory, "history"),
                             (viewer._showPrior, "prior"), (viewer._showSlices, "slices")):
            self.assertEqual(len(method()), 1)
            with open(prot._getExtraPath(f"viewer_{name}.png"), "rb") as fh:
                self.assertEqual(fh.read(8), PNG_MAGIC, name)
        # the maps: ChimeraX when pwem finds it, else (as here, a pip-only Scipion) a message and the central
        # slices drawn with matplotlib; the Xmipp viewer only with the xmipp plugin; never an exception
        from bayespose.viewers._common import FigureView
        from bayespose.viewers.viewer_refine import chimerax_program, xmipp_available

        viewer.whichMaps.set(MAP_ALL)
        viewer.volumeViewer.set(VOLUME_CHIMERA)
        views = viewer._showVolumes()
        self.assertTrue(all(isinstance(v, View) for v in views), views)
        with open(prot._getExtraPath("viewer_chimera.cxc")) as fh:
            self.assertEqual(fh.read().count("open "), 3)
        if chimerax_program() is None:
            self.assertEqual([type(v).__name__ for v in views], ["MessageView", "FigureView"])
            self.assertIn("ChimeraX", views[0].getMessage())
        viewer.volumeViewer.set(VOLUME_SLICES)
        if os.path.exists(prot._getExtraPath("viewer_maps.png")):
            os.remove(prot._getExtraPath("viewer_maps.png"))
        views = viewer._showVolumes()
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], FigureView)
        self.assertEqual(len(views[0].getFigure().axes), 9)  # 3 maps x 3 sections
        with open(prot._getExtraPath("viewer_maps.png"), "rb") as fh:
            self.assertEqual(fh.read(8), PNG_MAGIC)
        viewer.volumeViewer.set(VOLUME_XMIPP)
        views = viewer._showVolumes()
        if not xmipp_available():
            self.assertEqual([type(v).__name__ for v in views], ["MessageView", "FigureView"])
        half2 = prot._getExtraPath("half2.mrc")
        os.rename(half2, half2 + ".away")
        try:
            views = viewer._showVolumes()  # a missing map is a message, not an exception
            self.assertEqual([type(v).__name__ for v in views], ["MessageView"])
            self.assertIn("half2.mrc", views[0].getMessage())
        finally:
            os.rename(half2 + ".away", half2)

        summary = prot.summary()
        self.assertTrue(summary and f"{N_PARTICLES} particles" in summary[0], summary)
        self.assertTrue(any("Å" in line and "0.143" in line for line in summary), summary)
        methods = "\n".join(prot.methods())  # also renders the citations (pyworkflow's _references)
        self.assertIn("Xu2026", methods)

    def test_form_and_validate(self):
        import pyworkflow.protocol.params as params

        from bayespose.core.io.mrc import write_map
        from bayespose.core.refine import HALF_SPLITS, PRIOR_MODES
        from bayespose.protocols import ProtBayesposeRefine

        prot = self.newProtocol(ProtBayesposeRefine)
        names = []
        for name, param in prot.getDefinition().iterAllParams():
            names.append(name)
            if not isinstance(param, (params.Group,)):
                self.assertTrue(param.help.get(), f"{name} has no help text")
        for name in ("useGpu", "inputMask", "initialLowPass", "symmetryGroup", "priorMode", "assignmentMode",
                     "numberOfIterations", "healpixOrder", "shiftRange", "shiftStep", "numberOfThreads"):
            self.assertIn(name, names)

        for name in ("halfSets", "seed"):
            self.assertIn(name, names)
        ok = self.newProtocol(ProtBayesposeRefine, inputParticles=self.particles, inputVolume=self.volume)
        self.assertEqual(ok.validate(), [])
        self.assertEqual(PRIOR_MODES[ok.priorMode.get()], "estimate")  # the protocol's point
        self.assertEqual(ok.refineConfig().half_split, "input")

        # half sets: 30 particles whose input half sets hold 25 and 5 are too few per half set with the input's
        # split, and fine with a random one (15 and 15)
        star = self._simulate("unbalanced", 30, ctf=True)
        table = starfile.read(star, always_dict=True)
        table["particles"]["rlnRandomSubset"] = np.where(np.arange(30) < 25, 1, 2)
        starfile.write(table, star, overwrite=True)
        unbalanced = self._import_particles(star)
        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=unbalanced, inputVolume=self.volume).validate()
        self.assertTrue(any("half sets of 25 and 5" in e and "at least 10 per half set" in e for e in errors), errors)
        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=unbalanced, inputVolume=self.volume,
                                  halfSets=HALF_SPLITS.index("random")).validate()
        self.assertEqual(errors, [])

        small_path = os.path.join(self.getOutputPath("small"), "box24.mrc")
        os.makedirs(os.path.dirname(small_path), exist_ok=True)
        write_map(small_path, self.truth[4:28, 4:28, 4:28], PIXEL_SIZE)
        small = self._import_volume(small_path)
        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=self.particles, inputVolume=small).validate()
        self.assertTrue(any("32 px" in e and "24 px" in e for e in errors), errors)

        other_px = self._import_volume(self.truth_path, sampling=4.4)
        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=self.particles,
                                  inputVolume=other_px).validate()
        self.assertTrue(any("pixel size" in e for e in errors), errors)

        bare = self._import_particles(self._simulate("bare", 12, ctf=False, drop_angles=True))
        self.assertFalse(bare.hasCTF())
        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=bare, inputVolume=self.volume,
                                  symmetryGroup="x7").validate()
        self.assertTrue(any("no CTF" in e for e in errors), errors)
        self.assertTrue(any("at least 10 per half" in e for e in errors), errors)
        self.assertTrue(any("Symmetry" in e for e in errors), errors)

        errors = self.newProtocol(ProtBayesposeRefine, inputParticles=self.particles, inputVolume=self.volume,
                                  healpixOrder=3, maxHealpixOrder=2).validate()
        self.assertTrue(any("HEALPix" in e for e in errors), errors)
