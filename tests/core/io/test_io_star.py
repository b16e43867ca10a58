"""RELION star files: values read equal the files' own values (independent ``starfile`` parse or numbers copied
from the file text), write -> read round trips, and RELION 3.1 itself reading what we write."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import mrcfile
import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from bayespose.core.imaging.particles import CTFParams, ParticleSet
from bayespose.core.io import read_images, read_star, write_star
from tests.helpers import ASPIRE, CRYODRGN, need_relion
from tests.helpers import relion_euler_matrix as _relion_matrix


def _expected_matrices(df) -> np.ndarray:
    return np.stack([_relion_matrix(r, t, p) for r, t, p in
                     df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float)])


def _read_quiet(path, **kwargs) -> ParticleSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "image stack(s) not found"
        return read_star(path, **kwargs)


# ---------------------------------------------------------------------------------------------------- reading


def test_relion31_values_equal_the_file():
    path = CRYODRGN / "relion31.star"
    p = read_star(path)
    ref = starfile.read(path)["particles"]
    assert len(p) == 5
    # optics block (copied from the file text): Q0 0.1, Cs 0.01, 300 kV, 2.806 Å/px, 256 px
    assert p.pixel_size == pytest.approx(2.806) and p.box == 256
    np.testing.assert_allclose(p.ctf.voltage, 300.0)
    np.testing.assert_allclose(p.ctf.cs, 0.01)
    np.testing.assert_allclose(p.ctf.amplitude_contrast, 0.1)
    # angles: same matrices and projection directions as RELION's formula on the file's angles
    np.testing.assert_allclose(p.rotations, _expected_matrices(ref), atol=1e-12)
    rot, tilt = np.radians(ref["rlnAngleRot"]), np.radians(ref["rlnAngleTilt"])
    directions = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=1)
    np.testing.assert_allclose(p.rotations[:, 2, :], directions, atol=1e-12)
    # first particle copied from the text: origin (0.019324, -0.64686) Å, defocus 13108.082418 / 12845.582418
    np.testing.assert_allclose(p.origins_A[0], [0.019324, -0.64686])
    assert p.ctf.defocus_u[0] == pytest.approx(13108.082418) and p.ctf.defocus_v[0] == pytest.approx(12845.582418)
    np.testing.assert_allclose(p.origins_A, ref[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    np.testing.assert_allclose(p.ctf.defocus_angle, ref["rlnDefocusAngle"])
    np.testing.assert_allclose(p.ctf.phase_shift, ref["rlnPhaseShift"])
    np.testing.assert_array_equal(p.half_set, ref["rlnRandomSubset"])
    np.testing.assert_array_equal(p.optics_group, [1] * 5)
    np.testing.assert_array_equal(p.image_indices, np.arange(5))
    assert all(f == str((CRYODRGN / "relion31.mrcs").resolve()) for f in p.image_files)
    # unknown columns kept
    np.testing.assert_allclose(p.extra["rlnLogLikeliContribution"], ref["rlnLogLikeliContribution"])
    np.testing.assert_array_equal(p.extra["rlnClassNumber"], ref["rlnClassNumber"])
    assert list(p.extra["rlnMicrographName"]) == list(ref["rlnMicrographName"])
    assert "rlnAngleRot" not in p.extra and "rlnDefocusU" not in p.extra


def test_block_order_does_not_matter():
    """relion31.v2.star has data_particles before data_optics; same content as relion31.star."""
    a, b = read_star(CRYODRGN / "relion31.star"), read_star(CRYODRGN / "relion31.v2.star")
    assert (a.pixel_size, a.box) == (b.pixel_size, b.box)
    np.testing.assert_array_equal(a.rotations, b.rotations)
    np.testing.assert_array_equal(a.origins_A, b.origins_A)
    np.testing.assert_array_equal(a.ctf.defocus_u, b.ctf.defocus_u)


def test_six_optics_groups_with_two_pixel_sizes():
    path = CRYODRGN / "relion31.6opticsgroups.star"
    with pytest.raises(ValueError, match=r"different pixel sizes \[1\.24, 1\.25\]"):
        _read_quiet(path)
    p = _read_quiet(path, pixel_size=1.25, box=196)
    blocks = starfile.read(path)
    optics, ref = blocks["optics"].set_index("rlnOpticsGroup"), blocks["particles"]
    groups = ref["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(p.optics_group, groups)
    # per-particle CTF constants come from each particle's optics group (group 4 has Cs 2.6, the others 2.7)
    np.testing.assert_allclose(p.ctf.cs, optics.loc[groups, "rlnSphericalAberration"].to_numpy())
    assert set(np.unique(p.ctf.cs[groups == 4])) == {2.6} and set(np.unique(p.ctf.cs[groups != 4])) == {2.7}
    np.testing.assert_allclose(p.ctf.voltage, 200.0)
    np.testing.assert_allclose(p.origins_A, ref[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    np.testing.assert_allclose(p.rotations, _expected_matrices(ref), atol=1e-12)


def test_aspire_relion31_two_optics_groups_voltage():
    p = read_star(ASPIRE / "sample_particles_relion31.star")
    ref = starfile.read(ASPIRE / "sample_particles_relion31.star")["particles"]
    assert p.pixel_size == pytest.approx(1.4)
    assert p.box == 200  # no rlnImageSize: read from sample.mrcs
    voltage = np.where(ref["rlnOpticsGroup"].to_numpy() == 1, 300.0, 200.0)
    np.testing.assert_allclose(p.ctf.voltage, voltage)
    assert set(np.unique(p.optics_group)) == {1, 2}


def test_relion30_pixel_size_from_detector_and_magnification():
    path = ASPIRE / "sample_particles_relion30.star"
    p = read_star(path)
    ref = starfile.read(path)
    # 5 µm detector pixel at magnification 37369.207031 -> 1.33800 Å/px (RELION 3.0's definition)
    px = 5.0 * 1e4 / 37369.207031
    assert p.pixel_size == pytest.approx(px, rel=1e-9)
    # rlnOriginX/Y are in pixels in RELION 3.0; first row 0.1996, 0.1996
    np.testing.assert_allclose(p.origins_A[0], [0.1996 * px, 0.1996 * px])
    np.testing.assert_allclose(p.origins_px, ref[["rlnOriginX", "rlnOriginY"]].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(p.ctf.defocus_u, ref["rlnDefocusU"])
    np.testing.assert_allclose(p.ctf.amplitude_contrast, 0.1)
    np.testing.assert_array_equal(p.half_set, ref["rlnRandomSubset"])
    assert p.optics_group is None
    np.testing.assert_allclose(p.rotations, _expected_matrices(ref), atol=1e-12)
    overridden = read_star(path, pixel_size=2.0)  # the override also converts the px origins
    assert overridden.pixel_size == 2.0
    np.testing.assert_allclose(overridden.origins_A[0], [0.1996 * 2.0, 0.1996 * 2.0])


def test_pfcrt_star_matches_cryodrgn_parse():
    """cryoDRGN's own parse of this RELION 3.0 star: rot = RELION A, trans = origin (px) / box with box 300."""
    npz = np.load(CRYODRGN / "cryodrgn_parsed_pose_from_PfCRT_star.npz")
    p = _read_quiet(CRYODRGN / "FinalRefinement-OriginalParticles-PfCRT.star", box=300)
    assert p.pixel_size == pytest.approx(1.035 * 1e4 / 10000.0)  # rlnDetectorPixelSize 1.035 at mag 10000
    np.testing.assert_allclose(p.rotations, npz["rot"], atol=1e-12)
    np.testing.assert_allclose(p.origins_px, npz["trans"] * 300, atol=1e-9)
    np.testing.assert_allclose(p.ctf.voltage, 300.0)  # from the particle columns
    np.testing.assert_allclose(p.ctf.amplitude_contrast, 0.0)  # absent: RELION's default
    with pytest.raises(ValueError, match="box="):
        _read_quiet(CRYODRGN / "FinalRefinement-OriginalParticles-PfCRT.star")


def test_relion5_star_and_missing_stacks_are_reported():
    path = CRYODRGN / "relion5.star"
    with pytest.warns(UserWarning, match="2 image stack"):
        p = read_star(path)
    ref = starfile.read(path)["particles"]
    assert (p.pixel_size, p.box) == (pytest.approx(0.89), 448)
    np.testing.assert_allclose(p.ctf.voltage, 100.0)
    np.testing.assert_allclose(p.ctf.cs, 1.6)
    np.testing.assert_allclose(p.rotations, _expected_matrices(ref), atol=1e-12)
    np.testing.assert_array_equal(p.image_indices, [int(n.split("@")[0]) - 1 for n in ref["rlnImageName"]])
    assert p.image_files[0] == str(CRYODRGN.resolve() / "toy_images_a.mrcs")
    with pytest.raises(FileNotFoundError, match="toy_images_a.mrcs"):
        read_images(p, [0])


def test_toy_projections_needs_pixel_size_and_keeps_odd_columns():
    path = CRYODRGN / "toy_projections.star"
    with pytest.raises(ValueError, match="pixel_size="):
        read_star(path)
    p = read_star(path, pixel_size=1.0)
    assert len(p) == 1000 and p.box == 30
    np.testing.assert_allclose(p.ctf.phase_shift, 90.0)
    np.testing.assert_allclose(p.ctf.cs, 0.001)
    assert p.rotations is None and p.origins_A is None
    np.testing.assert_array_equal(p.extra["dummyVariable"][:12], np.arange(1, 13))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(str(CRYODRGN / "toy_projections.mrcs"), permissive=True) as m:
            np.testing.assert_array_equal(read_images(p, [999, 7]), m.data[[999, 7]])


def test_empiar_star_old_style_without_poses():
    p = read_star(CRYODRGN / "empiar_10076_7.star")
    assert p.pixel_size == pytest.approx(5 * 1e4 / 38168)
    assert p.rotations is None and p.half_set is None
    np.testing.assert_allclose(p.ctf.defocus_u[:2], [15301.1, 15303.0])
    np.testing.assert_allclose(p.ctf.defocus_angle, 5.28)
    assert list(p.extra["rlnMicrographName"][:2]) == ["1", "2"]  # names stay text


def test_missing_ctf_labels_take_relion_defaults(tmp_path):
    """RELION's CTF::read: 200 kV, Cs 0, Q0 0, DefocusV = DefocusU, angle 0 when the labels are absent."""
    (tmp_path / "nodefo.star").write_text(
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnImagePixelSize\n_rlnImageSize\n1@x.mrcs 10000 1.0 32\n")
    with pytest.warns(UserWarning) as record:
        p = read_star(tmp_path / "nodefo.star")
    assert any("no rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast" in str(w.message) for w in record)
    assert (p.ctf.voltage[0], p.ctf.cs[0], p.ctf.amplitude_contrast[0]) == (200.0, 0.0, 0.0)
    assert (p.ctf.defocus_v[0], p.ctf.defocus_angle[0], p.ctf.phase_shift[0]) == (10000.0, 0.0, 0.0)


def test_bad_files_give_value_errors(tmp_path):
    (tmp_path / "badname.star").write_text(
        "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_rlnImageSize\n0@x.mrcs 1.0 32\n")
    with pytest.raises(ValueError, match="1-based"):
        _read_quiet(tmp_path / "badname.star")
    with pytest.raises(ValueError, match="no table with an rlnImageName"):
        read_star(ASPIRE / "sample_data_model.star")


def test_project_dir_resolves_relion_relative_paths(tmp_path):
    """Image names relative to a RELION project folder above the star file's folder."""
    project = tmp_path / "project"
    (project / "Extract" / "job001").mkdir(parents=True)
    (project / "Select" / "job002").mkdir(parents=True)
    shutil.copy(ASPIRE / "rln_proj_64_centered.mrcs", project / "Extract" / "job001" / "p.mrcs")
    star = project / "Select" / "job002" / "particles.star"
    text = (ASPIRE / "rln_proj_64_centered.star").read_text()
    star.write_text(text.replace("rln_proj_64_centered.mrcs", "Extract/job001/p.mrcs"))
    p = read_star(star)  # found by walking up from the star's folder
    assert p.image_files[0] == str((project / "Extract" / "job001" / "p.mrcs").resolve())
    q = read_star(star, project_dir=project)
    np.testing.assert_array_equal(read_images(q), read_images(p))


# ---------------------------------------------------------------------------------------------------- writing


def _assert_same(a: ParticleSet, b: ParticleSet, rot_atol=1e-6):
    assert a.pixel_size == pytest.approx(b.pixel_size, rel=1e-9) and a.box == b.box
    np.testing.assert_array_equal(a.image_files, b.image_files)
    np.testing.assert_array_equal(a.image_indices, b.image_indices)
    np.testing.assert_allclose(a.rotations, b.rotations, atol=rot_atol)
    np.testing.assert_allclose(a.origins_A, b.origins_A, atol=1e-8)
    for name in CTFParams.FIELDS:
        np.testing.assert_allclose(getattr(a.ctf, name), getattr(b.ctf, name), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(a.half_set, b.half_set)
    np.testing.assert_array_equal(a.optics_group, b.optics_group)


def test_round_trip_real_file_preserves_everything(tmp_path):
    original = read_star(CRYODRGN / "relion31.star")
    out = tmp_path / "rt.star"
    scores = np.array([0.5, 1e-7, 3.25, -2.0, 1234567.5])
    write_star(out, original, extra_columns={"bpPmax": scores})
    back = read_star(out)
    _assert_same(original, back)
    assert set(back.extra) == set(original.extra) | {"bpPmax"}
    for name, values in original.extra.items():
        if values.dtype == object:
            assert list(back.extra[name]) == list(values)
        else:
            np.testing.assert_allclose(back.extra[name], values, rtol=1e-9)
    np.testing.assert_allclose(back.extra["bpPmax"], scores, rtol=1e-9)
    # independent parse of the written file: RELION 3.1 layout and labels
    blocks = starfile.read(out)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"]["rlnImagePixelSize"][0] == pytest.approx(2.806)
    assert blocks["optics"]["rlnImageSize"][0] == 256
    ref = starfile.read(CRYODRGN / "relion31.star")["particles"]
    np.testing.assert_allclose(_expected_matrices(blocks["particles"]), _expected_matrices(ref), atol=1e-8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.star"]


def test_round_trip_random_poses_two_optics_groups(tmp_path):
    rng = np.random.default_rng(4)
    n = 40
    rotations = Rotation.random(n, random_state=5).as_matrix()
    rotations[0] = Rotation.from_euler("ZYZ", [30, 0, 0], degrees=True).as_matrix()  # gimbal lock, tilt 0
    rotations[1] = Rotation.from_euler("ZYZ", [30, 180, 10], degrees=True).as_matrix()  # tilt 180
    group = np.where(np.arange(n) < 25, 1, 2)
    ctf = CTFParams(defocus_u=rng.uniform(5000, 30000, n), defocus_v=rng.uniform(5000, 30000, n),
                    defocus_angle=rng.uniform(-180, 180, n), voltage=np.where(group == 1, 300.0, 200.0),
                    cs=np.where(group == 1, 2.7, 0.01), amplitude_contrast=np.full(n, 0.07),
                    phase_shift=rng.uniform(0, 90, n))
    stack = tmp_path / "stacks" / "p.mrcs"
    stack.parent.mkdir()
    stack.write_bytes(b"")
    particles = ParticleSet(pixel_size=1.234, box=48, image_files=[str(stack)] * n, image_indices=np.arange(n),
                            rotations=rotations, origins_A=rng.uniform(-20, 20, (n, 2)), ctf=ctf,
                            optics_group=group, half_set=rng.integers(1, 3, n),
                            extra={"rlnClassNumber": rng.integers(1, 4, n), "rlnMicrographName":
                                   np.array([f"mics/m {i % 3}.mrc" for i in range(n)], dtype=object)})
    out = tmp_path / "out.star"
    write_star(out, particles)
    back = read_star(out)
    _assert_same(particles, back)
    np.testing.assert_array_equal(back.extra["rlnClassNumber"], particles.extra["rlnClassNumber"])
    assert list(back.extra["rlnMicrographName"]) == list(particles.extra["rlnMicrographName"])
    text = out.read_text()
    assert "000001@stacks/p.mrcs" in text  # relative to the star's folder
    optics = starfile.read(out)["optics"]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0] and optics["rlnSphericalAberration"].tolist() == [2.7,
                                                                                                              0.01]
    # a stack outside the star's folder is written with its absolute path; relative_to= changes the base
    write_star(tmp_path / "stacks" / "again.star", particles, relative_to=tmp_path)
    assert "000001@stacks/p.mrcs" in (tmp_path / "stacks" / "again.star").read_text()
    (tmp_path / "sub").mkdir()
    write_star(tmp_path / "sub" / "abs.star", particles)
    assert f"000001@{stack.resolve().as_posix()}" in (tmp_path / "sub" / "abs.star").read_text()


def test_write_without_ctf_and_poses_reads_back_without_them(tmp_path):
    particles = ParticleSet(pixel_size=2.0, box=64, image_files=[str(ASPIRE / "rln_proj_64.mrcs")] * 2,
                            image_indices=[0, 1])
    write_star(tmp_path / "plain.star", particles)
    back = read_star(tmp_path / "plain.star")
    assert back.ctf is None and back.rotations is None and back.origins_A is None and back.half_set is None
    np.testing.assert_array_equal(read_images(back), read_images(particles))


def test_failed_write_star_leaves_old_file(tmp_path, monkeypatch):
    particles = read_star(CRYODRGN / "relion31.star")
    out = tmp_path / "keep.star"
    write_star(out, particles)
    before = out.read_text()
    with pytest.raises(ValueError, match="shape"):
        write_star(out, particles, extra_columns={"bpScore": np.zeros(3)})
    with pytest.raises(ValueError, match="standard column"):
        write_star(out, particles, extra_columns={"rlnAngleRot": np.zeros(5)})

    def boom(*args, **kwargs):
        raise OSError("simulated failure while writing")

    monkeypatch.setattr(starfile, "write", boom)
    with pytest.raises(OSError, match="simulated"):
        write_star(tmp_path / "new.star", particles)
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.star"]


# ---------------------------------------------------------------------------------------------------- RELION itself


@pytest.mark.relion
def test_relion_star_printtable_parses_written_file(tmp_path):
    need_relion("relion_star_printtable")
    particles = read_star(CRYODRGN / "relion31.star")
    write_star(tmp_path / "out.star", particles, extra_columns={"bpScore": np.arange(5) * 0.5})
    result = subprocess.run(["relion_star_printtable", "out.star", "data_particles", "rlnImageName",
                             "rlnAngleTilt", "rlnOriginXAngst", "rlnDefocusU", "rlnRandomSubset"],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    ref = starfile.read(CRYODRGN / "relion31.star")["particles"]
    assert len(rows) == 5
    assert [r[0] for r in rows] == [f"{k:06d}@{(CRYODRGN / 'relion31.mrcs').resolve()}" for k in range(1, 6)]
    np.testing.assert_allclose([float(r[1]) for r in rows], ref["rlnAngleTilt"], atol=1e-5)
    np.testing.assert_allclose([float(r[2]) for r in rows], ref["rlnOriginXAngst"], atol=1e-6)
    np.testing.assert_allclose([float(r[3]) for r in rows], ref["rlnDefocusU"], atol=1e-4)
    assert [int(r[4]) for r in rows] == ref["rlnRandomSubset"].tolist()


@pytest.mark.relion
def test_relion_reconstruct_reads_our_poses_like_a_hand_written_star(tmp_path):
    """relion_reconstruct gives the same map from our star as from a star written by hand with the same
    Euler angles and origins; with the origins zeroed the map differs (so origins were read)."""
    need_relion("relion_reconstruct")
    source = ASPIRE / "rln_proj_64_centered.star"
    ref = starfile.read(source)["particles"]
    particles = read_star(source)
    origins = np.array([[2.0, -1.5], [-3.0, 0.5], [1.0, 2.5], [-0.5, -2.0]])
    particles.origins_A = origins
    write_star(tmp_path / "ours.star", particles)
    stack = (ASPIRE / "rln_proj_64_centered.mrcs").resolve()
    rows = "\n".join(f"{r.rlnAngleRot} {r.rlnAngleTilt} {r.rlnAnglePsi} {ox} {oy} 1 {i + 1:06d}@{stack}"
                     for i, (r, (ox, oy)) in enumerate(zip(ref.itertuples(), origins)))
    header = ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnVoltage\n_rlnSphericalAberration\n"
              "_rlnImagePixelSize\n_rlnImageSize\n_rlnImageDimensionality\n1 optics1 300 2.7 1.0 64 2\n\n"
              "data_particles\nloop_\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginXAngst\n"
              "_rlnOriginYAngst\n_rlnOpticsGroup\n_rlnImageName\n")
    (tmp_path / "hand.star").write_text(header + rows + "\n")
    zero = particles.subset(np.arange(4))
    zero.origins_A = np.zeros((4, 2))
    write_star(tmp_path / "zero.star", zero)
    maps = {}
    for name in ("ours", "hand", "zero"):
        subprocess.run(["relion_reconstruct", "--i", f"{name}.star", "--o", f"{name}.mrc"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
        with mrcfile.open(str(tmp_path / f"{name}.mrc")) as m:
            maps[name] = np.array(m.data)
            assert m.voxel_size.x == pytest.approx(1.0)
    scale = np.abs(maps["hand"]).max()
    print("relative max difference ours/hand:", np.abs(maps["ours"] - maps["hand"]).max() / scale,
          "zero-origin/hand:", np.abs(maps["zero"] - maps["hand"]).max() / scale)
    assert np.abs(maps["ours"] - maps["hand"]).max() < 1e-3 * scale
    assert np.abs(maps["zero"] - maps["hand"]).max() > 0.05 * scale
