"""Scipion import/export round trips in a headless project (pwem's RELION import, the relion plugin's writer, and
bayespose's own cryoSPARC ``.cs`` import), checked against independent parses of the files.

Expected values never come from bayespose: star files are parsed with ``starfile`` and angles turned into RELION
matrices with scipy (``A = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().T``); ``.cs`` poses are
compared with cryoDRGN's own parse of the same file (``cryodrgn_parsed_pose_from_P12_cs.npz``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

pytest.importorskip("pwem")
pytest.importorskip("relion")

from pwem.protocols import ProtImportParticles  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from bayespose.convert import particles_from_scipion  # noqa: E402
from tests.helpers import ASPIRE, CRYODRGN, relion_matrices


# ------------------------------------------------------------------------------------------------------------------
# independent helpers (no bayespose code)
# ------------------------------------------------------------------------------------------------------------------
def particles_table(path: Path):
    data = starfile.read(path, always_dict=True)
    return data["particles"] if "particles" in data else next(iter(data.values()))


def defocus_at(u, v, angle_deg, theta_deg):
    """Defocus along azimuth theta: the physical CTF, the same after Scipion's EMX swap of U/V."""
    return (u + v) / 2 + (u - v) / 2 * np.cos(2 * np.radians(theta_deg - angle_deg))


def assert_same_ctf_defocus(ctf, u, v, angle, atol=0.05):
    theta = np.linspace(0, 180, 19)[:, None]
    np.testing.assert_allclose(defocus_at(ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle, theta),
                               defocus_at(np.asarray(u, float), np.asarray(v, float), np.asarray(angle, float),
                                          theta), atol=atol)


def star_index(image_names) -> tuple[np.ndarray, list[str]]:
    """RELION ``000001@stack.mrcs`` -> (0-based indices, stack basenames)."""
    idx, files = zip(*(name.split("@") for name in image_names))
    return np.array([int(i) - 1 for i in idx]), [os.path.basename(f) for f in files]


@pytest.mark.scipion
class TestRelionImportToCore(BaseTest):
    """pwem's RELION import -> particles_from_scipion, and the relion plugin's writer back to a star file."""

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls, writeLocalConfig=True)
        cls.tmp = Path(tempfile.mkdtemp(prefix="bp-import-"))

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def import_star(self, star: Path, pixel_size: float, voltage=300.0, cs=2.7, amplitude_contrast=0.1):
        prot = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                starFile=str(star), magnification=10000, samplingRate=pixel_size,
                                haveDataBeenPhaseFlipped=False, voltage=voltage, sphericalAberration=cs,
                                amplitudeContrast=amplitude_contrast)
        self.launchProtocol(prot)
        return prot.outputParticles

    def check_against_star(self, ps, df, star: Path, pixel_size: float, origin_cols=("rlnOriginXAngst",
                                                                                     "rlnOriginYAngst")):
        assert len(ps) == len(df)
        assert ps.pixel_size == pytest.approx(pixel_size)
        np.testing.assert_allclose(ps.rotations, relion_matrices(df), atol=1e-6)
        np.testing.assert_allclose(ps.origins_A, df[list(origin_cols)].to_numpy(dtype=float), atol=1e-6)
        indices, names = star_index(df["rlnImageName"])
        np.testing.assert_array_equal(ps.image_indices, indices)
        for fn, name in zip(ps.image_files, names):
            assert os.path.isabs(fn) and os.path.exists(fn)
            assert os.path.realpath(fn) == os.path.realpath(star.parent / name)

    def test_relion31_star_to_core(self):
        star = CRYODRGN / "relion31.star"
        optics = starfile.read(star)["optics"].iloc[0]
        df = particles_table(star)
        pixel_size = float(optics["rlnImagePixelSize"])
        out = self.import_star(star, pixel_size, voltage=float(optics["rlnVoltage"]),
                               cs=float(optics["rlnSphericalAberration"]),
                               amplitude_contrast=float(optics["rlnAmplitudeContrast"]))
        ps = particles_from_scipion(out, project_path=self.proj.path)
        self.check_against_star(ps, df, star, pixel_size)
        assert np.abs(ps.origins_A).max() > 0.1  # the file really has non-zero origins
        assert ps.box == 256
        assert_same_ctf_defocus(ps.ctf, df["rlnDefocusU"], df["rlnDefocusV"], df["rlnDefocusAngle"])
        np.testing.assert_allclose(ps.ctf.voltage, optics["rlnVoltage"])
        np.testing.assert_allclose(ps.ctf.cs, optics["rlnSphericalAberration"])
        np.testing.assert_allclose(ps.ctf.amplitude_contrast, optics["rlnAmplitudeContrast"])
        np.testing.assert_array_equal(ps.half_set, df["rlnRandomSubset"].to_numpy())
        np.testing.assert_array_equal(np.sort(ps.extra["scipion_id"]), np.arange(1, len(df) + 1))

        # (2) export round trip with the relion plugin's writer
        from relion.convert import writeSetOfParticles

        out_star = self.tmp / "relion31_export.star"
        writeSetOfParticles(out, str(out_star), outputDir=str(self.tmp))
        back = particles_table(out_star)
        np.testing.assert_allclose(relion_matrices(back), relion_matrices(df), atol=1e-6)
        np.testing.assert_allclose(back[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float),
                                   df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float), atol=1e-6)
        assert_same_ctf_defocus(ps.ctf, back["rlnDefocusU"], back["rlnDefocusV"], back["rlnDefocusAngle"])

    def test_aspire_shifted_projections_to_core(self):
        """RELION-projected particles with known poses and origins of up to 13 px.

        The file mixes a RELION 3.1 optics block with RELION 3.0 origin labels (rlnOriginX/Y in px); the relion
        plugin's reader only reads rlnOriginX/YAngst and would import zero shifts, so the test first rewrites the
        labels as RELION 3.1 itself does (origin in Å = px * pixel size, here 1 Å/px) into a tmp copy.
        """
        src = ASPIRE / "rln_proj_64_shifted.star"
        data = starfile.read(src, always_dict=True)
        pixel_size = float(data["optics"]["rlnImagePixelSize"].iloc[0])
        df = data["particles"].copy()
        df["rlnOriginXAngst"] = df.pop("rlnOriginX") * pixel_size
        df["rlnOriginYAngst"] = df.pop("rlnOriginY") * pixel_size
        star = self.tmp / "rln_proj_64_shifted_angst.star"
        starfile.write({"optics": data["optics"], "particles": df}, star, overwrite=True)
        shutil.copy(ASPIRE / "rln_proj_64_shifted.mrcs", self.tmp / "rln_proj_64_shifted.mrcs")

        out = self.import_star(star, pixel_size)
        ps = particles_from_scipion(out, project_path=self.proj.path)
        self.check_against_star(ps, df, star, pixel_size)
        orig = particles_table(src)
        np.testing.assert_allclose(ps.origins_A / pixel_size, orig[["rlnOriginX", "rlnOriginY"]].to_numpy(float))
        assert np.abs(ps.origins_A).max() >= 10
        assert ps.box == 64 and ps.ctf is None

        from relion.convert import writeSetOfParticles

        out_star = self.tmp / "shifted_export.star"
        writeSetOfParticles(out, str(out_star), outputDir=str(self.tmp))
        back = particles_table(out_star)
        np.testing.assert_allclose(relion_matrices(back), relion_matrices(orig), atol=1e-6)
        np.testing.assert_allclose(back[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / pixel_size,
                                   orig[["rlnOriginX", "rlnOriginY"]].to_numpy(float), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# bayespose's cryoSPARC .cs import
# ------------------------------------------------------------------------------------------------------------------
OUR_PARAMS = ("csFile", "passthroughFile", "blobRoot", "pixelSize", "copyFiles", "voltage", "sphericalAberration",
              "amplitudeContrast")


def make_blob_stacks(cs_path: Path, project_dir: Path) -> int:
    """Real (zero-filled, sparse) MRC stacks of the right shape where the .cs blob paths point under
    ``project_dir``; returns the number of stacks. Test data layout only, the reader is not mocked."""
    from cryosparc.dataset import Dataset

    ds = Dataset.load(str(cs_path))
    paths = np.array([str(p).lstrip(">") for p in ds["blob/path"]])
    idx = np.asarray(ds["blob/idx"])
    box = int(np.asarray(ds["blob/shape"])[0, 0])
    for rel in np.unique(paths):
        fn = project_dir / rel
        fn.parent.mkdir(parents=True, exist_ok=True)
        n = int(idx[paths == rel].max()) + 1
        with mrcfile.new_mmap(str(fn), shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.voxel_size = float(np.asarray(ds["blob/psize_A"])[0])
    return len(np.unique(paths))


@pytest.mark.scipion
class TestCryosparcImport(BaseTest):
    """ProtBayesposeImportCryosparc against pwem's RELION import, starfile and cryoDRGN's parse of the same data."""

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls, writeLocalConfig=True)
        cls.tmp = Path(tempfile.mkdtemp(prefix="bp-cs-import-"))

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def new_cs_import(self, cs_file, **kwargs):
        from bayespose.protocols import ProtBayesposeImportCryosparc

        return self.newProtocol(ProtBayesposeImportCryosparc, csFile=str(cs_file), **kwargs)

    def test_form_builds_with_help(self):
        prot = self.new_cs_import(CRYODRGN / "empiar_10076_7.cs")
        params = dict(prot.getDefinition().iterParams())
        for name in OUR_PARAMS:
            assert name in params, name
            assert params[name].help.get(), f"parameter {name} has no help text"
        assert type(prot)._label == "import particles from cryoSPARC (.cs)"

    def test_empiar_cs_matches_relion_import_of_same_particles(self):
        cs = CRYODRGN / "empiar_10076_7.cs"
        star = CRYODRGN / "empiar_10076_7.star"
        prot = self.new_cs_import(cs)
        assert prot.validate() == []
        self.launchProtocol(prot)
        out = prot.outputParticles
        assert out.getSize() == 7 and out.hasCTF() and not out.hasAlignment()
        ours = particles_from_scipion(out, project_path=self.proj.path)

        df = particles_table(star)
        row = df.iloc[0]
        star_pixel = 1e4 * float(row["rlnDetectorPixelSize"]) / float(row["rlnMagnification"])
        rel = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                               starFile=str(star), magnification=10000, samplingRate=star_pixel,
                               haveDataBeenPhaseFlipped=False, voltage=float(row["rlnVoltage"]),
                               sphericalAberration=float(row["rlnSphericalAberration"]),
                               amplitudeContrast=float(row["rlnAmplitudeContrast"]))
        self.launchProtocol(rel)
        theirs = particles_from_scipion(rel.outputParticles, project_path=self.proj.path)

        assert ours.pixel_size == pytest.approx(star_pixel, rel=1e-5)
        assert ours.pixel_size == pytest.approx(theirs.pixel_size, rel=1e-5)
        assert ours.box == theirs.box == 320
        assert_same_ctf_defocus(ours.ctf, df["rlnDefocusU"], df["rlnDefocusV"], df["rlnDefocusAngle"], atol=0.05)
        assert_same_ctf_defocus(ours.ctf, theirs.ctf.defocus_u, theirs.ctf.defocus_v, theirs.ctf.defocus_angle)
        for name, col in (("voltage", "rlnVoltage"), ("cs", "rlnSphericalAberration"),
                          ("amplitude_contrast", "rlnAmplitudeContrast")):
            np.testing.assert_allclose(getattr(ours.ctf, name), df[col].to_numpy(float), rtol=1e-6)
            np.testing.assert_allclose(getattr(ours.ctf, name), getattr(theirs.ctf, name), rtol=1e-6)
        # the same images: our .mrcs link and the RELION import's file hold the same pixels at the same indices
        indices, _ = star_index(df["rlnImageName"])
        np.testing.assert_array_equal(ours.image_indices, indices)
        assert all(f.endswith(".mrcs") and os.path.islink(f) for f in ours.image_files)
        with mrcfile.open(ours.image_files[0], permissive=True) as a, \
                mrcfile.open(theirs.image_files[0], permissive=True) as b:
            np.testing.assert_array_equal(a.data[ours.image_indices], b.data[theirs.image_indices])
        summary = "\n".join(prot.summary())
        assert "7 particles" in summary and "without alignment" in summary
        assert not re.search(r"\d\.\d{7,}", summary), summary  # no float32 noise such as "Cs 2.70000004768372"

        # export with the relion plugin: the optics table must hold the particles' optics group
        from relion.convert import writeSetOfParticles

        exported = self.tmp / "empiar_cs_export.star"
        writeSetOfParticles(out, str(exported), outputDir=str(self.tmp))
        data = starfile.read(exported, always_dict=True)
        assert set(data["particles"]["rlnOpticsGroup"]) <= set(data["optics"]["rlnOpticsGroup"])
        np.testing.assert_allclose(data["optics"]["rlnAmplitudeContrast"], 0.07)
        np.testing.assert_allclose(data["optics"]["rlnImagePixelSize"], star_pixel, rtol=1e-5)

    def test_cs_with_poses_matches_cryodrgn_parse(self):
        cs = CRYODRGN / "cryosparc_P12_J24_001_particles.cs"
        project = self.tmp / "P12"
        assert make_blob_stacks(cs, project) == 50
        prot = self.new_cs_import(cs, blobRoot=str(project))
        assert prot.validate() == []
        self.launchProtocol(prot)
        out = prot.outputParticles
        assert out.hasAlignmentProj() and out.hasCTF()
        ps = particles_from_scipion(out, project_path=self.proj.path)
        assert len(ps) == 2019 and ps.box == 180 and ps.pixel_size == pytest.approx(2.95)

        ref = np.load(CRYODRGN / "cryodrgn_parsed_pose_from_P12_cs.npz")
        # cryoDRGN: rot = RELION A (checked on a star file in data/README), trans = origin (px) / box
        np.testing.assert_allclose(ps.rotations, ref["rot"], atol=2e-6)
        np.testing.assert_allclose(ps.origins_A / ps.pixel_size, ref["trans"] * ps.box, atol=1e-4)
        assert np.abs(ref["trans"]).max() * ps.box > 5  # real shifts, a sign error would show

        from cryosparc.dataset import Dataset

        raw = Dataset.load(str(cs))
        np.testing.assert_allclose(ps.ctf.voltage, 200.0)
        np.testing.assert_allclose(ps.ctf.cs, 2.0)
        assert_same_ctf_defocus(ps.ctf, raw["ctf/df1_A"], raw["ctf/df2_A"], np.degrees(raw["ctf/df_angle_rad"]),
                                atol=0.05)
        np.testing.assert_array_equal(ps.half_set, np.asarray(raw["alignments3D/split"]) + 1)
        np.testing.assert_array_equal(ps.image_indices, np.asarray(raw["blob/idx"]))

    def test_validate_missing_file(self):
        errors = self.new_cs_import(self.tmp / "does_not_exist.cs").validate()
        assert len(errors) == 1 and "does not exist" in errors[0]

    def test_validate_cs_without_blob_fields(self):
        from cryosparc.dataset import Dataset

        ds = Dataset.load(str(CRYODRGN / "cryosparc_P12_J24_001_particles.cs"))
        folder = self.tmp / "noblob"
        folder.mkdir()
        no_blob = Dataset({"uid": ds["uid"], "alignments3D/pose": ds["alignments3D/pose"],
                           "alignments3D/shift": ds["alignments3D/shift"]})
        no_blob.save(str(folder / "J9_particles.cs"))
        errors = self.new_cs_import(folder / "J9_particles.cs").validate()
        assert len(errors) == 1 and "no blob fields" in errors[0], errors

    def test_validate_missing_stacks_names_file_and_root(self):
        cs = CRYODRGN / "cryosparc_P12_J24_001_particles.cs"
        errors = self.new_cs_import(cs).validate()
        assert len(errors) == 1 and "not found" in errors[0], errors
        assert "J19/extract/" in errors[0] and str(CRYODRGN) in errors[0]

    def test_validate_not_a_cs_file(self):
        bad = self.tmp / "garbage.cs"
        bad.write_bytes(b"this is not a numpy array")
        errors = self.new_cs_import(bad).validate()
        assert len(errors) == 1 and "cryoSPARC dataset" in errors[0], errors

    def test_cs_without_ctf_uses_form_acquisition(self):
        """A .cs with blobs but no CTF: no CTF on the output, the form's voltage/Cs/amplitude contrast are used
        (also in the optics table the relion plugin exports)."""
        from cryosparc.dataset import Dataset
        from relion.convert import writeSetOfParticles

        ds = Dataset.load(str(CRYODRGN / "empiar_10076_7.cs"))
        folder = self.tmp / "noctf"
        folder.mkdir()
        keep = ["uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A"]
        Dataset({name: ds[name] for name in keep}).save(str(folder / "noctf.cs"))
        prot = self.new_cs_import(folder / "noctf.cs", blobRoot=str(CRYODRGN), voltage=200.0,
                                  sphericalAberration=2.0, amplitudeContrast=0.08, copyFiles=True)
        assert prot.validate() == []
        self.launchProtocol(prot)
        out = prot.outputParticles
        assert out.getSize() == 7 and not out.hasCTF() and not out.hasAlignment()
        acq = out.getAcquisition()
        assert (acq.getVoltage(), acq.getSphericalAberration(), acq.getAmplitudeContrast()) == (200.0, 2.0, 0.08)
        ps = particles_from_scipion(out, project_path=self.proj.path)
        assert ps.ctf is None and ps.box == 320
        assert not os.path.islink(ps.image_files[0]) and ps.image_files[0].endswith(".mrcs")  # copied
        export_dir = self.tmp / "noctf_export"
        export_dir.mkdir()
        exported = export_dir / "particles.star"
        writeSetOfParticles(out, str(exported), outputDir=str(export_dir))
        optics = starfile.read(exported, always_dict=True)["optics"]
        np.testing.assert_allclose(optics["rlnVoltage"], 200.0)
        np.testing.assert_allclose(optics["rlnSphericalAberration"], 2.0)
