"""Bad data are reported where they are read, as ``ValueError`` naming the file, the row (or image) and the column:
a value that is not a number, a NaN CTF, a star file cut short, an image beyond the end of its stack, NaN or
infinite pixels and voxels. (Before, these surfaced later as misleading errors: "reference has no power", "no
signal above the noise", an ``IndexError``, a garbage optics group.)"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.io import read_images, read_map, read_stack, read_star, write_star
from bayespose.data import fragment_map_path
from tests.helpers import ASPIRE

STACK = ASPIRE / "rln_proj_64.mrcs"  # 5 images of 64 px (RELION's relion_project)


@pytest.fixture
def star(tmp_path) -> Path:
    """A RELION 3.1 star of the 5 images with poses and CTF (values as written by bayespose)."""
    n = 5
    particles = ParticleSet(pixel_size=1.0, box=64, image_files=[str(STACK)] * n, image_indices=np.arange(n),
                            rotations=np.repeat(np.eye(3)[None], n, axis=0),
                            ctf=CTFParams.constant(n, defocus_u=15000.0))
    path = tmp_path / "particles.star"
    write_star(path, particles)
    return path


def _set_field(path: Path, row: int, label: str, value: str) -> None:
    """Replace field ``label`` of data row ``row`` (1-based) of the particle table, in the file text."""
    lines = path.read_text().splitlines(keepends=True)
    labels = [line.split()[0] for line in lines if line.startswith("_rln")]
    columns = labels[labels.index("_rlnImageName"):]
    first = max(i for i, line in enumerate(lines) if line.startswith("_rln")) + 1
    fields = lines[first + row - 1].split()
    fields[columns.index("_" + label)] = value
    lines[first + row - 1] = "\t".join(fields) + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("label, value, shown", [
    ("rlnDefocusU", "nan", "NaN"),
    ("rlnDefocusV", "inf", "inf"),
    ("rlnAngleTilt", "ninety", "'ninety'"),
    ("rlnOriginXAngst", "1.0.0", "'1.0.0'"),
])
def test_a_value_that_is_not_a_number_names_file_row_and_column(star, label, value, shown):
    _set_field(star, 4, label, value)
    with pytest.raises(ValueError) as info:
        read_star(star)
    message = str(info.value)
    assert str(star) in message and "row 4" in message and label in message and shown in message, message


def test_a_star_file_cut_short_is_reported(star):
    text = star.read_text()
    star.write_text(text[:text.rstrip().rfind("\t")])  # the last row loses its last value(s)
    with pytest.raises(ValueError, match=r"the last line has \d+ of the \d+ values.*cut short"):
        read_star(star)


def test_a_zero_voltage_is_reported(star):
    text = star.read_text().replace("300\t", "0\t", 1)  # the optics table's rlnVoltage
    star.write_text(text)
    with pytest.raises(ValueError, match="voltage of 0 kV"):
        read_star(star)


def test_an_image_beyond_its_stack_names_row_image_and_size(star):
    _set_field(star, 2, "rlnImageName", f"000007@{STACK}")
    with pytest.raises(ValueError, match=r"row 2: .*rln_proj_64.mrcs has 5 image\(s\) but the particles refer to "
                                         r"image\(s\) 7 \(1-based"):
        read_star(star)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values:RuntimeWarning")
def test_nan_or_infinite_pixels_and_voxels_name_the_file_and_image(tmp_path):
    with mrcfile.open(STACK, permissive=True) as mrc:
        images = np.array(mrc.data, dtype=np.float32)
    images[3, 5, 5] = np.nan
    images[1, 0, 0] = -np.inf
    bad = tmp_path / "bad.mrcs"
    with mrcfile.new(bad) as mrc:
        mrc.set_data(images)
    with pytest.raises(ValueError, match=r"bad.mrcs: image\(s\) 2, 4 \(1-based.*NaN or infinite"):
        read_stack(bad)
    particles = ParticleSet(pixel_size=1.0, box=64, image_files=[str(bad)] * 3, image_indices=[0, 3, 4])
    with pytest.raises(ValueError, match=r"bad.mrcs: image\(s\) 4 \(1-based"):
        read_images(particles)
    np.testing.assert_array_equal(read_images(particles.subset([0, 2])), images[[0, 4]])  # good images read

    volume = read_map(fragment_map_path())[0].copy()
    volume[10, 20, 30] = np.nan
    bad_map = tmp_path / "bad_map.mrc"
    with mrcfile.new(bad_map) as mrc:
        mrc.set_data(volume)
    with pytest.raises(ValueError, match=r"bad_map.mrc: the map has 1 NaN or infinite voxel.*\(10, 20, 30\)"):
        read_map(bad_map)
