"""bayespose.convert: Scipion <-> core poses, CTF and particle sets, checked against the relion plugin.

Conventions proven here with numbers (not assumed):

* the relion plugin's reader (``matrixFromGeometry(s, angles, inverseTransform=True)``, the same maths as
  ``convert31.Reader.__setParticleTransformProj``) gives ``M[:3, :3] = A^T`` and ``M[:3, 3] = A^T @ s`` with
  ``A`` RELION's ``Euler_angles2matrix`` (written out below from RELION's euler.cpp, independent of scipy and of
  bayespose) and ``s = (rlnOriginX, rlnOriginY, 0)`` in px, positive sign: ``inv(M) = [[A, -s], [0, 1]]``;
* its writer (``geometryFromMatrix(M, True)``) returns exactly ``s`` and angles whose RELION matrix is ``A``;
* ``Transform.getShifts()`` is ``A^T s``, not the origin.
"""

from __future__ import annotations

import os

os.environ.setdefault("SCIPION_DOMAIN", "pwem")

import mrcfile
import numpy as np
import pytest

pytest.importorskip("pwem")
pytest.importorskip("relion")

import pwem.constants as emcts
from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles
from pyworkflow.object import Float, Integer
from relion.convert.convert_deprecated import geometryFromMatrix, matrixFromGeometry

from bayespose import convert
from bayespose.core.imaging.particles import CTFParams, ParticleSet
from tests.helpers import relion_euler_matrix as relion_euler_to_matrix


def random_angles(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.column_stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                            rng.uniform(-180, 180, n)])


def test_transform_round_trip_random_poses():
    rng = np.random.default_rng(1)
    for rot, tilt, psi in random_angles(rng, 50):
        a = relion_euler_to_matrix(rot, tilt, psi)
        origin = rng.uniform(-20, 20, 2)
        a2, origin2 = convert.pose_from_transform(convert.transform_from_pose(a, origin))
        np.testing.assert_allclose(a2, a, atol=1e-12)
        np.testing.assert_allclose(origin2, origin, atol=1e-12)


def test_matrix_layout_and_agreement_with_relion_reader():
    """Our Transform equals what the relion plugin's reader builds from rlnAngle*/rlnOrigin* (px)."""
    rng = np.random.default_rng(2)
    for rot, tilt, psi in random_angles(rng, 40):
        origin = rng.uniform(-15, 15, 2)
        a = relion_euler_to_matrix(rot, tilt, psi)
        m_relion = matrixFromGeometry(np.array([origin[0], origin[1], 0.0]), np.array([rot, tilt, psi]),
                                      inverseTransform=True)
        m_ours = convert.transform_from_pose(a, origin).getMatrix()
        np.testing.assert_allclose(m_ours, m_relion, atol=1e-12)
        # the layout, spelled out
        np.testing.assert_allclose(m_relion[:3, :3], a.T, atol=1e-12)
        np.testing.assert_allclose(m_relion[:3, 3], a.T @ np.r_[origin, 0.0], atol=1e-12)
        inv = np.linalg.inv(m_relion)
        np.testing.assert_allclose(inv[:3, :3], a, atol=1e-12)
        np.testing.assert_allclose(inv[:3, 3], -np.r_[origin, 0.0], atol=1e-12)


def test_agreement_with_relion_writer():
    """geometryFromMatrix (what the writer puts in rlnOrigin*/rlnAngle*) gives back our origin and pose."""
    rng = np.random.default_rng(3)
    for rot, tilt, psi in random_angles(rng, 40):
        a = relion_euler_to_matrix(rot, tilt, psi)
        origin = rng.uniform(-15, 15, 2)
        shifts, angles = geometryFromMatrix(convert.transform_from_pose(a, origin).getMatrix(), True)
        np.testing.assert_allclose(shifts[:2], origin, atol=1e-10)
        assert abs(shifts[2]) < 1e-10
        np.testing.assert_allclose(relion_euler_to_matrix(*angles), a, atol=1e-10)


def test_transform_get_shifts_is_not_the_origin():
    a = relion_euler_to_matrix(40.0, 70.0, -20.0)
    origin = np.array([5.0, -3.0])
    t = convert.transform_from_pose(a, origin)
    np.testing.assert_allclose(np.array(t.getShifts()), a.T @ np.r_[origin, 0.0], atol=1e-12)
    assert np.linalg.norm(np.array(t.getShifts())[:2] - origin) > 1.0


def test_known_pose_tilt_90():
    """rot=0, tilt=90, psi=0 by hand: A = [[0,0,-1],[0,1,0],[1,0,0]] (x_image = -z_volume)."""
    a = np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=float)
    np.testing.assert_allclose(relion_euler_to_matrix(0, 90, 0), a, atol=1e-15)
    m = matrixFromGeometry(np.array([2.0, 1.0, 0.0]), np.array([0.0, 90.0, 0.0]), True)
    a2, origin = convert.pose_from_transform(convert.Transform(m))
    np.testing.assert_allclose(a2, a, atol=1e-12)
    np.testing.assert_allclose(origin, [2.0, 1.0], atol=1e-12)


def test_pose_from_transform_rejects_bad_input():
    with pytest.raises(ValueError, match="no transform"):
        convert.pose_from_transform(None)
    with pytest.raises(ValueError, match="3x3"):
        convert.transform_from_pose(np.eye(2), [0, 0])


def defocus_at(u, v, angle_deg, theta_deg):
    """Defocus along azimuth theta of an astigmatic CTF (the physical quantity, invariant to U/V swaps)."""
    return (u + v) / 2 + (u - v) / 2 * np.cos(2 * np.radians(theta_deg - angle_deg))


def test_ctf_round_trip():
    rng = np.random.default_rng(4)
    n = 30
    ctf = CTFParams(defocus_u=rng.uniform(8000, 30000, n), defocus_v=rng.uniform(8000, 30000, n),
                    defocus_angle=rng.uniform(-180, 180, n), voltage=np.full(n, 200.0), cs=np.full(n, 2.0),
                    amplitude_contrast=np.full(n, 0.07), phase_shift=rng.uniform(0, 90, n))
    parts = []
    for i in range(n):
        p = Particle()
        p.setCTF(convert.ctf_model_from_params(ctf, i))
        p.setAcquisition(convert.acquisition_from_params(ctf, i))
        parts.append(p)
    back = convert.ctf_params_from_particles(parts)
    theta = np.linspace(0, 180, 13)[:, None]
    np.testing.assert_allclose(defocus_at(back.defocus_u, back.defocus_v, back.defocus_angle, theta),
                               defocus_at(ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle, theta), atol=1e-6)
    assert np.all(back.defocus_u >= back.defocus_v)  # Scipion's EMX standard
    for name in ("voltage", "cs", "amplitude_contrast", "phase_shift"):
        np.testing.assert_allclose(getattr(back, name), getattr(ctf, name))


def test_ctf_params_need_an_acquisition():
    p = Particle()
    model = CTFModel()
    model.setStandardDefocus(10000.0, 9000.0, 10.0)
    p.setCTF(model)
    with pytest.raises(ValueError, match="acquisition"):
        convert.ctf_params_from_particles([p])
    acq = Acquisition(voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1, magnification=10000)
    back = convert.ctf_params_from_particles([p], acquisition=acq)
    assert back.voltage[0] == 300.0 and back.phase_shift[0] == 0.0 and back.defocus_u[0] == 10000.0


@pytest.fixture
def small_particles(tmp_path) -> ParticleSet:
    """10 particles in two real MRC stacks (16 px), with poses, CTF, half sets and objIds."""
    rng = np.random.default_rng(5)
    files = []
    for k in range(2):
        fn = tmp_path / f"stack{k}.mrcs"
        with mrcfile.new(str(fn)) as mrc:
            mrc.set_data(rng.standard_normal((5, 16, 16)).astype(np.float32))
            mrc.voxel_size = 2.5
        files.append(str(fn))
    n = 10
    angles = random_angles(rng, n)
    ctf = CTFParams(defocus_u=rng.uniform(15000, 20000, n), defocus_v=rng.uniform(12000, 15000, n),
                    defocus_angle=rng.uniform(0, 180, n), voltage=np.full(n, 300.0), cs=np.full(n, 2.7),
                    amplitude_contrast=np.full(n, 0.1), phase_shift=np.zeros(n))
    return ParticleSet(pixel_size=2.5, box=16, image_files=np.array([files[i // 5] for i in range(n)], dtype=object),
                       image_indices=np.arange(n) % 5,
                       rotations=np.stack([relion_euler_to_matrix(*a) for a in angles]),
                       origins_A=rng.uniform(-10, 10, (n, 2)), ctf=ctf, half_set=1 + np.arange(n) % 2,
                       extra={"scipion_id": np.arange(n) * 3 + 7})


def test_fill_set_and_read_back(tmp_path, small_particles):
    ps = small_particles
    out = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    scores = np.linspace(0.1, 1.0, len(ps))
    convert.fill_set_of_particles(out, ps, attributes={"MaxProb": scores, "NumPeaks": np.arange(len(ps))})
    out.write()
    out.close()

    reread = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    reread.loadAllProperties()  # outside a project the set's properties are read from its own sqlite
    assert reread.getSize() == len(ps)
    assert reread.getAlignment() == emcts.ALIGN_PROJ and reread.hasCTF()
    assert reread.getSamplingRate() == pytest.approx(2.5)
    first = reread.getFirstItem()
    assert first.getObjId() == 7 and first.getIndex() == 1 and first.getFileName() == ps.image_files[0]
    assert isinstance(first._bpMaxProb, Float) and isinstance(first._bpNumPeaks, Integer)
    assert first._bpMaxProb.get() == pytest.approx(0.1)

    back = convert.particles_from_scipion(reread)
    assert back.box == 16 and back.pixel_size == pytest.approx(2.5)
    np.testing.assert_array_equal(back.image_indices, ps.image_indices)
    np.testing.assert_array_equal(back.image_files, ps.image_files)
    np.testing.assert_allclose(back.rotations, ps.rotations, atol=1e-10)
    np.testing.assert_allclose(back.origins_A, ps.origins_A, atol=1e-10)
    np.testing.assert_array_equal(back.half_set, ps.half_set)
    np.testing.assert_array_equal(back.extra["scipion_id"], ps.extra["scipion_id"])
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(back.ctf, name), getattr(ps.ctf, name), rtol=1e-6)


def test_fill_with_template_keeps_user_metadata(tmp_path, small_particles):
    ps = small_particles
    template = SetOfParticles(filename=str(tmp_path / "in.sqlite"))
    convert.fill_set_of_particles(template, ps.subset(np.arange(len(ps))))
    # user metadata on the input particles that must survive
    items = [p.clone() for p in template.iterItems()]
    template.close()
    template = SetOfParticles(filename=str(tmp_path / "in2.sqlite"))
    template.setSamplingRate(2.5)
    for k, item in enumerate(items):
        item._userLabel = Integer(100 + k)
        template.append(item)
    template.setAlignmentProj()
    template.setHasCTF(True)
    template.write()

    # new poses for a subset of the particles, given in another order
    keep = np.array([6, 1, 3])
    sub = ps.subset(keep)
    new_rot = np.stack([relion_euler_to_matrix(10.0 * k, 45.0, 0.0) for k in range(len(keep))])
    sub.rotations = new_rot
    sub.origins_A = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    convert.fill_set_of_particles(out, sub, template_set=template, attributes={"Score": np.array([0.5, 0.6, 0.7])})
    out.write()

    by_id = {p.getObjId(): p.clone() for p in out.iterItems()}
    assert sorted(by_id) == sorted(int(i) for i in ps.extra["scipion_id"][keep])
    for j, i in enumerate(keep):
        item = by_id[int(ps.extra["scipion_id"][i])]
        assert item._userLabel.get() == 100 + i
        assert item._bpScore.get() == pytest.approx([0.5, 0.6, 0.7][j])
        assert item.getCTF().getDefocusU() == pytest.approx(ps.ctf.defocus_u[i], rel=1e-6)
        a, origin = convert.pose_from_transform(item.getTransform())
        np.testing.assert_allclose(a, new_rot[j], atol=1e-10)
        np.testing.assert_allclose(origin * 2.5, sub.origins_A[j], atol=1e-10)


def test_align_2d_set_is_rejected(tmp_path, small_particles):
    out = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    convert.fill_set_of_particles(out, small_particles)
    out.setAlignment2D()
    with pytest.raises(ValueError, match="2D alignment"):
        convert.particles_from_scipion(out)


def test_bad_attributes_are_rejected(tmp_path, small_particles):
    out = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    with pytest.raises(ValueError, match="one value per particle"):
        convert.fill_set_of_particles(out, small_particles, attributes={"MaxProb": np.zeros(3)})
    with pytest.raises(ValueError, match="must start with a letter"):
        convert.fill_set_of_particles(out, small_particles, attributes={"max prob": np.zeros(10)})


def test_optics_groups_are_exported_consistently_by_relion_writer(tmp_path, small_particles):
    """cryoSPARC-like optics groups (24, 5) become RELION groups 1..K with a matching optics table."""
    import starfile
    from relion.convert import writeSetOfParticles

    ps = small_particles
    ps.optics_group = np.array([24, 24, 5, 5, 5, 24, 24, 24, 5, 24])
    ps.ctf.voltage[ps.optics_group == 5] = 200.0
    out = SetOfParticles(filename=str(tmp_path / "out.sqlite"))
    convert.fill_set_of_particles(out, ps)
    star = tmp_path / "export.star"
    writeSetOfParticles(out, str(star), outputDir=str(tmp_path))
    data = starfile.read(star, always_dict=True)
    optics = data["optics"].set_index("rlnOpticsGroup")
    assert sorted(optics.index) == [1, 2]
    groups = data["particles"]["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(groups, np.where(ps.optics_group == 5, 1, 2))
    assert optics.loc[1, "rlnVoltage"] == pytest.approx(200.0) and optics.loc[2, "rlnVoltage"] == pytest.approx(300.0)
    assert optics.loc[1, "rlnImagePixelSize"] == pytest.approx(2.5) and optics.loc[1, "rlnImageSize"] == 16
    back = convert.particles_from_scipion(out)
    np.testing.assert_array_equal(back.optics_group, groups)
