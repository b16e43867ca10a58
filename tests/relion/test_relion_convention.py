"""Our forward model against RELION 3.1's own projector (``relion_project``) and RELION-made data.

What is measured (one run of relion_project on the 3J9G map, 64 px, 4.4 Å/px, 8 poses with sub-pixel origins up
to ±4 px and strongly astigmatic CTFs, some with V > U):

* angles: RELION ZYZ -> A, projection samples the 3D transform at A^T k (the transposed matrix fails);
* origins: the image is the centred projection shifted by -rlnOriginXY/pixel size (the opposite sign fails);
* CTF: rlnDefocusAngle is torch-ctf's astigmatism_angle unchanged (angle + 90° or -angle fail);
* scale: relion_project writes line integrals in pixel units; ours agree within 1 %;
* odd boxes: relion_project (which assumes even boxes) writes images whose centre is pixel D // 2 + 1, one pixel
  right and down of RELION's documented centre D // 2 that bayespose uses.
"""

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from bayespose.core.geometry.rotations import euler_to_matrix
from bayespose.core.imaging.forward import prepare_volume, project, shift_fourier, to_real
from bayespose.core.imaging.particles import CTFParams
from bayespose.data import demo_map_path
from tests.helpers import ASPIRE, need_relion

MAP = demo_map_path()
PIXEL_SIZE = 4.4

def corr(a, b) -> np.ndarray:
    """Per-image Pearson correlation of two stacks (N, D, D)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def make_poses(n: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    du = rng.uniform(6000, 14000, n)
    astig = rng.uniform(3000, 6000, n) * np.where(np.arange(n) % 3 == 0, -1, 1)  # every third V > U
    return dict(
        angles=np.column_stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                                rng.uniform(-180, 180, n)]),
        origins_A=rng.uniform(-4, 4, (n, 2)) * PIXEL_SIZE,  # non-integer px
        ctf=CTFParams(du, du - astig, rng.uniform(-180, 180, n), np.full(n, 300.0), np.full(n, 2.7),
                      np.full(n, 0.1), np.zeros(n)),
    )


def write_relion31_star(path: Path, poses: dict, box: int) -> None:
    """RELION 3.1 star (optics + particles) with poses, origins in Å and CTF."""
    ctf = poses["ctf"]
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    optics = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast", "rlnImageSize", "rlnImageDimensionality"]
    lines += [f"_{name} #{i + 1}" for i, name in enumerate(optics)]
    lines += [f"1 opticsGroup1 {PIXEL_SIZE:.6f} 300.0 2.7 0.1 {box} 2", "", "", "# version 30001", "",
              "data_particles", "", "loop_"]
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU",
            "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnOpticsGroup"]
    lines += [f"_{name} #{i + 1}" for i, name in enumerate(cols)]
    for i in range(len(poses["angles"])):
        values = [*poses["angles"][i], *poses["origins_A"][i], ctf.defocus_u[i], ctf.defocus_v[i],
                  ctf.defocus_angle[i], ctf.phase_shift[i]]
        lines.append(" ".join(f"{v:.6f}" for v in values) + " 1")
    path.write_text("\n".join(lines) + "\n")


def relion_project(map_path: Path, star: Path, out: Path, ctf: bool) -> np.ndarray:
    cmd = ["relion_project", "--i", str(map_path), "--o", str(out), "--ang", str(star)] + (["--ctf"] if ctf else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(f"{out}.star").exists()
    with mrcfile.open(f"{out}.mrcs", permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32).copy()


@pytest.fixture(scope="module")
def relion_run(tmp_path_factory):
    """relion_project with and without --ctf for the same 8 poses, and our projections for the same poses."""
    need_relion("relion_project")
    tmp = tmp_path_factory.mktemp("relion_project")
    poses = make_poses()
    star = tmp / "poses.star"
    write_relion31_star(star, poses, box=64)
    with mrcfile.open(MAP, permissive=True) as m:
        volume = np.asarray(m.data, dtype=np.float32).copy()
    return dict(poses=poses, volume=volume, prepared=prepare_volume(volume),
                relion_ctf=relion_project(MAP, star, tmp / "proj_ctf", ctf=True),
                relion_plain=relion_project(MAP, star, tmp / "proj_plain", ctf=False))


def ours(run, rotations=None, origins_A="same", ctf="same", with_ctf=True):
    p = run["poses"]
    rotations = euler_to_matrix(p["angles"]) if rotations is None else rotations
    origins_A = p["origins_A"] if isinstance(origins_A, str) else origins_A
    ctf = (p["ctf"] if isinstance(ctf, str) else ctf) if with_ctf else None
    return project(run["prepared"], rotations, origins_A, PIXEL_SIZE, ctf).numpy()


@pytest.mark.relion
def test_matches_relion_project_without_ctf(relion_run):
    rel = relion_run["relion_plain"]
    mine = ours(relion_run, with_ctf=False)
    c = corr(mine, rel)
    print(f"relion_project (no CTF) vs ours: min r = {c.min():.6f}, mean r = {c.mean():.6f}")
    assert c.min() >= 0.99
    scale = float((mine * rel).sum() / (mine * mine).sum())
    assert scale == pytest.approx(1.0, abs=0.01)  # both are line integrals in pixel units
    # the conventions are pinned: the transposed rotation or the opposite origin sign do not match
    a = euler_to_matrix(relion_run["poses"]["angles"])
    assert corr(ours(relion_run, rotations=a.transpose(0, 2, 1), with_ctf=False), rel).mean() < 0.8
    assert corr(ours(relion_run, origins_A=-relion_run["poses"]["origins_A"], with_ctf=False), rel).mean() < 0.8


@pytest.mark.relion
def test_matches_relion_project_with_ctf(relion_run):
    rel = relion_run["relion_ctf"]
    mine = ours(relion_run)
    c = corr(mine, rel)
    print(f"relion_project --ctf vs ours: min r = {c.min():.6f}, mean r = {c.mean():.6f}")
    assert c.min() >= 0.99
    scale = float((mine * rel).sum() / (mine * mine).sum())
    assert scale == pytest.approx(1.0, abs=0.01)


@pytest.mark.relion
def test_defocus_angle_is_relion_convention(relion_run):
    """rlnDefocusAngle goes to torch-ctf's astigmatism_angle unchanged (its docstring's 'U along y' is wrong)."""
    rel = relion_run["relion_ctf"]
    ctf = relion_run["poses"]["ctf"]
    right = corr(ours(relion_run), rel)
    for wrong_angle in (ctf.defocus_angle + 90.0, -ctf.defocus_angle, 90.0 - ctf.defocus_angle):
        wrong = CTFParams(ctf.defocus_u, ctf.defocus_v, wrong_angle, ctf.voltage, ctf.cs,
                          ctf.amplitude_contrast, ctf.phase_shift)
        c = corr(ours(relion_run, ctf=wrong), rel)
        assert c.mean() < right.mean() - 0.05
        assert c.min() < 0.95


@pytest.mark.relion
def test_odd_box_is_one_pixel_off_in_relion_project(tmp_path):
    """For odd boxes relion_project puts the centre at pixel D // 2 + 1 (RELION assumes even boxes)."""
    need_relion("relion_project")
    with mrcfile.open(MAP, permissive=True) as m:
        volume = np.pad(np.asarray(m.data, dtype=np.float32), ((1, 0), (0, 1), (1, 0)))  # 65 px, off-centre
    odd_map = tmp_path / "map65.mrc"
    with mrcfile.new(odd_map) as m:
        m.set_data(volume)
        m.voxel_size = PIXEL_SIZE
    poses = make_poses(seed=1)
    star = tmp_path / "poses65.star"
    write_relion31_star(star, poses, box=65)
    rel = relion_project(odd_map, star, tmp_path / "proj65", ctf=True)
    mine = project(volume, euler_to_matrix(poses["angles"]), poses["origins_A"], PIXEL_SIZE, poses["ctf"]).numpy()
    shifted = np.roll(mine, (1, 1), axis=(1, 2))
    c = corr(shifted, rel)
    print(f"odd box (65 px), ours rolled by (+1, +1) vs relion_project --ctf: min r = {c.min():.6f}, "
          f"mean r = {c.mean():.6f}; unrolled mean r = {corr(mine, rel).mean():.4f}")
    assert c.min() >= 0.99
    assert corr(mine, rel).mean() < 0.9


def test_aspire_relion_shifted_stack_is_centred_stack_moved_by_minus_origin():
    """ASPIRE's RELION-made stacks (same poses, origins in px): shifted image = centred projection moved by -origin."""
    centred_star, shifted_star = ASPIRE / "rln_proj_64_centered.star", ASPIRE / "rln_proj_64_shifted.star"
    centred_rows = starfile.read(centred_star)["particles"]
    shifted_rows = starfile.read(shifted_star)["particles"]
    np.testing.assert_allclose(centred_rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
                               shifted_rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    assert np.all(centred_rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() == 0)
    origins_px = shifted_rows[["rlnOriginX", "rlnOriginY"]].to_numpy(dtype=np.float64)  # legacy column, px
    assert np.abs(origins_px).max() > 0
    with mrcfile.open(ASPIRE / "rln_proj_64_centered.mrcs", permissive=True) as m:
        centred = np.asarray(m.data, dtype=np.float32).copy()
    with mrcfile.open(ASPIRE / "rln_proj_64_shifted.mrcs", permissive=True) as m:
        shifted = np.asarray(m.data, dtype=np.float32).copy()
    moved = to_real(shift_fourier(torch.fft.rfft2(torch.from_numpy(centred)), -origins_px)).numpy()
    scale = np.abs(centred).max()
    np.testing.assert_allclose(moved, shifted, atol=1e-4 * scale)
    wrong = to_real(shift_fourier(torch.fft.rfft2(torch.from_numpy(centred)), origins_px)).numpy()
    assert np.abs(wrong - shifted).max() > 0.1 * scale
