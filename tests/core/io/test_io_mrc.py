"""MRC maps / stacks and ParticleSet image loading, checked against mrcfile reads of real files and RELION."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io import mrc as mrc_io
from bayespose.core.io import read_images, read_map, read_stack, read_star, write_map, write_stack
from bayespose.data import demo_map_path
from tests.helpers import ASPIRE, CRYODRGN, need_relion


def _mrcfile_data(path: Path) -> np.ndarray:
    """Independent read of an MRC file (permissive: old RELION stacks lack the MAP id)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(str(path), permissive=True) as m:
            return np.array(m.data, dtype=np.float32)


def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------- maps


def test_read_real_map_matches_mrcfile():
    path = demo_map_path()
    volume, pixel_size = read_map(path)
    assert volume.dtype == np.float32 and volume.shape == (64, 64, 64)
    assert pixel_size == pytest.approx(4.4, abs=1e-5)
    np.testing.assert_array_equal(volume, _mrcfile_data(path))


def test_write_map_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((24, 24, 24)).astype(np.float32)
    out = tmp_path / "vol.mrc"
    write_map(out, volume, 1.7)
    with mrcfile.open(str(out)) as m:  # strict mode: a valid MRC 2014 header
        np.testing.assert_array_equal(m.data, volume)
        assert m.voxel_size.x == pytest.approx(1.7) and m.voxel_size.z == pytest.approx(1.7)
        assert m.is_volume()
    back, px = read_map(out)
    np.testing.assert_array_equal(back, volume)
    assert px == pytest.approx(1.7)
    assert _folder_listing(tmp_path) == ["vol.mrc"]  # no temporary file left behind


def test_read_map_undoes_axis_permutation(tmp_path):
    """A file stored with columns = z, rows = y, sections = x must still come back indexed [z, y, x]."""
    rng = np.random.default_rng(1)
    zyx = rng.standard_normal((8, 8, 8)).astype(np.float32)
    out = tmp_path / "perm.mrc"
    with mrcfile.new(str(out)) as m:
        m.set_data(np.ascontiguousarray(zyx.transpose(2, 1, 0)))  # data dims: (sections=x, rows=y, columns=z)
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
        m.voxel_size = 2.0
    volume, px = read_map(out)
    np.testing.assert_array_equal(volume, zyx)
    assert px == pytest.approx(2.0)


def test_read_map_rejects_non_cubic_and_stacks(tmp_path):
    out = tmp_path / "box.mrc"
    with mrcfile.new(str(out)) as m:
        m.set_data(np.zeros((4, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="cubic"):
        read_map(out)
    with pytest.raises(FileNotFoundError):
        read_map(tmp_path / "nope.mrc")


def test_write_map_rejects_bad_input_and_leaves_no_file(tmp_path):
    bad = np.zeros((8, 8, 8), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_map(tmp_path / "bad.mrc", bad, 1.0)
    with pytest.raises(ValueError, match="pixel size"):
        write_map(tmp_path / "bad.mrc", np.zeros((8, 8, 8)), 0.0)
    assert _folder_listing(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.mrc"
    old = np.ones((8, 8, 8), dtype=np.float32)
    write_map(out, old, 1.0)

    def boom(self):
        raise RuntimeError("simulated disk failure in the middle of the write")

    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        write_map(out, np.zeros((8, 8, 8), dtype=np.float32), 1.0)
    with pytest.raises(RuntimeError, match="simulated"):
        write_stack(tmp_path / "new.mrcs", np.zeros((3, 8, 8), dtype=np.float32), 1.0)
    monkeypatch.undo()
    assert _folder_listing(tmp_path) == ["keep.mrc"]  # neither a partial new.mrcs nor a temp file
    np.testing.assert_array_equal(read_map(out)[0], old)  # the old content survived


# ---------------------------------------------------------------------------------------------------- stacks


def test_stack_round_trip_is_an_image_stack(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.standard_normal((5, 16, 16)).astype(np.float32)
    out = tmp_path / "s.mrcs"
    write_stack(out, images, 3.2)
    with mrcfile.open(str(out)) as m:
        assert m.is_image_stack()
        np.testing.assert_array_equal(m.data, images)
        assert m.voxel_size.x == pytest.approx(3.2)
    np.testing.assert_array_equal(read_stack(out), images)


def test_single_image_reads_as_stack_of_one(tmp_path):
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    out = tmp_path / "one.mrc"
    with mrcfile.new(str(out)) as m:
        m.set_data(image)
    stack = read_stack(out)
    assert stack.shape == (1, 8, 8)
    np.testing.assert_array_equal(stack[0], image)


def test_read_stack_of_old_relion_file_without_map_id():
    path = CRYODRGN / "relion31.mrcs"  # header lacks the 'MAP ' id string
    np.testing.assert_array_equal(read_stack(path), _mrcfile_data(path))


@pytest.mark.relion
def test_relion_reads_written_stack(tmp_path):
    need_relion("relion_image_handler")
    rng = np.random.default_rng(3)
    images = (rng.standard_normal((3, 16, 16)) + np.array([0.0, 5.0, -2.0])[:, None, None]).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", images, 2.0)
    for k in range(3):
        result = subprocess.run(["relion_image_handler", "--i", f"{k + 1}@s.mrcs", "--stats"], cwd=tmp_path,
                                capture_output=True, text=True, check=True)
        line = [ln for ln in result.stdout.splitlines() if "avg=" in ln][0]
        avg = float(line.split("avg=")[1].split()[0])
        assert avg == pytest.approx(float(images[k].mean()), abs=1e-4)
        assert "16 x 16 x 1 x 1" in line


# ---------------------------------------------------------------------------------------------------- read_images


def test_read_images_relion31_matches_mrcfile():
    particles = read_star(CRYODRGN / "relion31.star")
    reference = _mrcfile_data(CRYODRGN / "relion31.mrcs")
    np.testing.assert_array_equal(read_images(particles), reference)
    picked = read_images(particles, [4, 0, 2])
    np.testing.assert_array_equal(picked, reference[[4, 0, 2]])
    mask = np.array([False, True, False, True, False])
    np.testing.assert_array_equal(read_images(particles, mask), reference[[1, 3]])


def test_read_images_aspire_rln_proj_64_matches_mrcfile():
    particles = read_star(ASPIRE / "rln_proj_64.star", pixel_size=1.0)
    reference = _mrcfile_data(ASPIRE / "rln_proj_64.mrcs")
    assert particles.box == 64
    np.testing.assert_array_equal(read_images(particles), reference)


def test_read_images_groups_several_files_and_keeps_order():
    a = ASPIRE / "rln_proj_64_centered.mrcs"
    b = ASPIRE / "rln_proj_64_shifted.mrcs"
    files = [str(b), str(a), str(b), str(a), str(a)]
    slices = [3, 0, 1, 2, 0]
    particles = ParticleSet(pixel_size=1.0, box=64, image_files=files, image_indices=slices)
    ref_a, ref_b = _mrcfile_data(a), _mrcfile_data(b)
    expected = np.stack([ref_b[3], ref_a[0], ref_b[1], ref_a[2], ref_a[0]])
    np.testing.assert_array_equal(read_images(particles), expected)


def test_read_images_errors_are_clear(tmp_path):
    stack = ASPIRE / "rln_proj_64.mrcs"  # 5 images
    too_far = ParticleSet(pixel_size=1.0, box=64, image_files=[str(stack)] * 2, image_indices=[1, 5])
    with pytest.raises(ValueError, match=r"has 5 image\(s\) but the particles refer to image\(s\) 6 \(1-based"):
        read_images(too_far)
    missing = ParticleSet(pixel_size=1.0, box=64, image_files=[str(tmp_path / "gone.mrcs")], image_indices=[0])
    with pytest.raises(FileNotFoundError, match="gone.mrcs"):
        read_images(missing)
    wrong_box = ParticleSet(pixel_size=1.0, box=32, image_files=[str(stack)], image_indices=[0])
    with pytest.raises(ValueError, match="box = 32"):
        read_images(wrong_box)


def test_resolve_relative_paths_tries_bases_in_order(tmp_path):
    (tmp_path / "proj" / "Extract").mkdir(parents=True)
    (tmp_path / "proj" / "Extract" / "a.mrcs").write_bytes(b"")
    (tmp_path / "proj" / "Star").mkdir()
    files, missing = mrc_io.resolve_relative_paths(
        ["Extract/a.mrcs", "Extract/b.mrcs"], [tmp_path / "proj" / "Star", tmp_path / "proj"])
    assert files[0] == str((tmp_path / "proj" / "Extract" / "a.mrcs").resolve())
    assert files[1] == str((tmp_path / "proj" / "Star" / "Extract" / "b.mrcs").resolve())  # first base
    assert missing == ["Extract/b.mrcs"]
