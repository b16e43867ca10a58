"""cryoSPARC ``.cs`` import, checked against cryoDRGN's independent parse, pyem's conversion formula, the RELION
star file of the same particles, and the raw fields read with cryosparc-tools.

Convention verified here (``test_p12_poses_match_cryodrgn_parse``): for ``alignments3D/pose`` = r (rotation
vector, radians) and ``alignments3D/shift`` = s (px), RELION's matrix is ``A = expmap(r)^T`` and RELION's origin
is ``rlnOriginX/Y = +s`` px. cryoDRGN's parse of the P12 file gives ``rot = expmap(r)^T`` and ``trans * box = +s``,
and its parse of a RELION star gives ``rot = A`` and ``trans * box = +origin`` (``test_io_star``), so both readings
agree; pyem's csparc2star uses the same relation (its ``expmap`` returns the transposed Rodrigues matrix, fed to
RELION's Euler decomposition, and ``rlnOriginX/Y = shift``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from bayespose.core.io import read_cryosparc, read_images, read_star
from tests.helpers import CRYODRGN

P12 = CRYODRGN / "cryosparc_P12_J24_001_particles.cs"


def _rodrigues(vectors: np.ndarray) -> np.ndarray:
    """exp of the skew matrix of each rotation vector, written out (not scipy): I + sin(t) K + (1 - cos(t)) K^2."""
    out = []
    for v in np.asarray(vectors, dtype=np.float64):
        theta = np.linalg.norm(v)
        w = v / theta
        k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
        out.append(np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k)
    return np.stack(out)


def _read_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the test .cs files do not ship their stacks
        return read_cryosparc(*args, **kwargs)


def test_p12_poses_match_cryodrgn_parse():
    p = _read_quiet(P12)
    npz = np.load(CRYODRGN / "cryodrgn_parsed_pose_from_P12_cs.npz")
    assert len(p) == 2019 and p.box == 180
    assert p.pixel_size == pytest.approx(2.95, abs=1e-6)
    # cryoDRGN: rot = expmap(pose)^T (float32 in its pickle) and trans = shift / box
    np.testing.assert_allclose(p.rotations, npz["rot"], atol=2e-6)
    np.testing.assert_allclose(p.origins_px, npz["trans"].astype(np.float64) * 180, atol=1e-4)
    # the opposite conventions are far off (so the check above discriminates)
    assert np.abs(p.rotations.transpose(0, 2, 1) - npz["rot"]).max() > 1.0
    assert np.abs(-p.origins_px - npz["trans"] * 180).max() > 10.0


def test_p12_poses_match_pyem_relation():
    """pyem csparc2star: A = Rodrigues(pose)^T, rlnOriginX/Y (px) = shift; origins_A = shift * psize."""
    p = _read_quiet(P12)
    raw = Dataset.load(str(P12))
    pose = np.asarray(raw["alignments3D/pose"], dtype=np.float64)
    shift = np.asarray(raw["alignments3D/shift"], dtype=np.float64)
    np.testing.assert_allclose(p.rotations, _rodrigues(pose).transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(p.origins_A, shift * 2.95, rtol=1e-6, atol=1e-9)


def test_p12_ctf_half_sets_and_paths_from_raw_fields():
    p = _read_quiet(P12)
    raw = Dataset.load(str(P12))
    np.testing.assert_allclose(p.ctf.defocus_u, raw["ctf/df1_A"], rtol=1e-7)
    np.testing.assert_allclose(p.ctf.defocus_v, raw["ctf/df2_A"], rtol=1e-7)
    np.testing.assert_allclose(p.ctf.defocus_angle, np.degrees(raw["ctf/df_angle_rad"].astype(np.float64)))
    assert p.ctf.defocus_angle[0] == pytest.approx(np.degrees(-1.3636448), abs=1e-5)  # first row, by hand
    np.testing.assert_allclose(p.ctf.voltage, 200.0)
    np.testing.assert_allclose(p.ctf.cs, 2.0)
    np.testing.assert_allclose(p.ctf.amplitude_contrast, 0.07, rtol=1e-6)
    np.testing.assert_allclose(p.ctf.phase_shift, 0.0)
    np.testing.assert_array_equal(p.half_set, np.asarray(raw["alignments3D/split"]) + 1)
    assert set(np.unique(p.half_set)) == {1, 2}
    np.testing.assert_array_equal(p.image_indices, raw["blob/idx"])
    np.testing.assert_array_equal(p.extra["cryosparcUid"], raw["uid"])
    # blob paths are relative to the (absent) project folder: kept, joined to the .cs folder
    assert p.image_files[0] == str(CRYODRGN.resolve() / str(raw["blob/path"][0]))
    with pytest.raises(FileNotFoundError, match="J19/extract"):
        read_images(p, [0])


def test_empiar_cs_and_star_describe_the_same_particles():
    """Cross-format check: the .cs and the RELION 3.0 star of the same 7 EMPIAR-10076 particles."""
    cs = read_cryosparc(CRYODRGN / "empiar_10076_7.cs")
    star = read_star(CRYODRGN / "empiar_10076_7.star")
    assert len(cs) == len(star) == 7 and cs.box == star.box == 320
    assert cs.pixel_size == pytest.approx(star.pixel_size, rel=1e-6)  # 1.30999 = 5 µm / 38168
    np.testing.assert_allclose(cs.ctf.defocus_u, star.ctf.defocus_u, atol=2e-3)
    np.testing.assert_allclose(cs.ctf.defocus_v, star.ctf.defocus_v, atol=2e-3)
    np.testing.assert_allclose(cs.ctf.defocus_angle, star.ctf.defocus_angle, atol=1e-5)  # 0.0921534 rad = 5.28°
    for name in ("voltage", "cs", "amplitude_contrast", "phase_shift"):
        np.testing.assert_allclose(getattr(cs.ctf, name), getattr(star.ctf, name), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(cs.image_files, star.image_files)
    np.testing.assert_array_equal(cs.image_indices, star.image_indices)
    assert cs.rotations is None and star.rotations is None
    np.testing.assert_array_equal(read_images(cs, [6, 0]), read_images(star, [6, 0]))


def test_exported_cs_strips_leading_marker_and_has_no_3d_pose():
    p = _read_quiet(CRYODRGN / "cryosparc_J2_particles_exported.cs")
    raw = Dataset.load(str(CRYODRGN / "cryosparc_J2_particles_exported.cs"))
    assert str(raw["blob/path"][0]).startswith(">")
    assert p.image_files[0] == str(CRYODRGN.resolve() / str(raw["blob/path"][0])[1:])
    assert p.rotations is None and p.origins_A is None and p.half_set is None  # only alignments2D there
    assert p.box == 300 and p.pixel_size == pytest.approx(1.345, abs=1e-6)
    np.testing.assert_allclose(p.ctf.defocus_angle[0], np.degrees(0.86163914), atol=1e-5)


def test_blob_root_and_parent_folder_resolution(tmp_path):
    """Blob paths are relative to the project folder: found from a job folder below it, or via blob_root."""
    project = tmp_path / "P1"
    (project / "J5").mkdir(parents=True)
    shutil.copy(CRYODRGN / "empiar_10076_7.cs", project / "J5" / "particles.cs")
    shutil.copy(CRYODRGN / "empiar_10076_7.mrc", project / "empiar_10076_7.mrc")
    p = read_cryosparc(project / "J5" / "particles.cs")  # found in the parent folder
    assert p.image_files[0] == str((project / "empiar_10076_7.mrc").resolve())
    q = read_cryosparc(CRYODRGN / "empiar_10076_7.cs", blob_root=project)
    assert q.image_files[0] == p.image_files[0]
    np.testing.assert_array_equal(read_images(p, [3]), read_images(read_star(CRYODRGN / "empiar_10076_7.star"), [3]))


def _split_p12(folder: Path, shuffle: bool = True, drop: int = 0) -> Path:
    """Write P12 as a job output: alignments in the main file, blob + ctf in a passthrough file."""
    folder.mkdir(parents=True, exist_ok=True)
    main = Dataset.load(str(P12), prefixes=["alignments3D"])
    passthrough = Dataset.load(str(P12), prefixes=["blob", "ctf"])
    order = np.random.default_rng(0).permutation(len(passthrough)) if shuffle else np.arange(len(passthrough))
    passthrough = passthrough.take(order[drop:])
    main.save(str(folder / "P12_J24_001_particles.cs"))
    passthrough.save(str(folder / "J24_passthrough_particles.cs"))
    return folder / "P12_J24_001_particles.cs"


def test_passthrough_merge_by_uid(tmp_path):
    main = _split_p12(tmp_path / "J24")
    full = _read_quiet(P12)
    for p in (_read_quiet(main), _read_quiet(main, passthrough_path=tmp_path / "J24" / "J24_passthrough_particles.cs")):
        np.testing.assert_array_equal(p.extra["cryosparcUid"], full.extra["cryosparcUid"])
        np.testing.assert_allclose(p.rotations, full.rotations)
        np.testing.assert_allclose(p.ctf.defocus_u, full.ctf.defocus_u)
        np.testing.assert_array_equal(p.image_indices, full.image_indices)
        assert [Path(f).name for f in p.image_files] == [Path(f).name for f in full.image_files]
    with pytest.raises(ValueError, match="passthrough"):
        _read_quiet(main, auto_passthrough=False)  # no blob fields without the passthrough file


def test_passthrough_missing_uids_is_an_error(tmp_path):
    main = _split_p12(tmp_path / "J24", drop=3)
    with pytest.raises(ValueError, match="lacks 3 of the 2019"):
        _read_quiet(main, passthrough_path=tmp_path / "J24" / "J24_passthrough_particles.cs")
    with pytest.raises(ValueError, match="blob/path"):
        _read_quiet(main)  # auto-detection skips a passthrough that does not cover all uids


def test_pixel_size_override_rescales_shifts():
    base = _read_quiet(P12)
    p = _read_quiet(P12, pixel_size=1.475)  # e.g. a wrong header: half the pixel size
    assert p.pixel_size == 1.475
    np.testing.assert_allclose(p.origins_px, base.origins_px, rtol=1e-9)  # shifts are in pixels
