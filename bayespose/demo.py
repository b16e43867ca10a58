"""``bayespose demo``: an end-to-end run on the map shipped with the package.

Steps (each prints one line; later features add their own steps here):
1. simulate particles with known poses, CTF, shifts and noise from the 3J9G map (64 px, 4.4 Å/px);
2. read the written RELION star back and check it reproduces the ground truth (poses, origins, CTF);
3. plot the pose distribution and a gallery of clean vs noisy particles;
4. MMSE vs MAP vs MLE pose assignment at low SNR on the asymmetric fragment of the map (the ring itself is
   pseudo-6-fold symmetric), with the errors against the truth and the calibration of the posterior uncertainty.
5. deep pose prediction: train a small so3grid network on simulated fragment particles, predict new particles and
   refine them by MMSE with the predicted distribution as the prior (median errors of both against the truth).
6. EM refinement with prior estimation: particles with a preferred orientation refined from the low-passed true
   map; resolution (half-map FSC), FSC against the truth and the estimated prior at the preferred view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.simulate import simulate_images
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.io.relion_star import read_star, write_star
from bayespose.data import demo_map_path, fragment_map_path
from bayespose.plotting import save_figure
from bayespose.plotting.poses import plot_estimator_errors, plot_image_gallery, plot_pose_distribution


def run_demo(out_dir: str | Path, n_particles: int = 500, seed: int = 0,
             progress: Callable[[str], Callable[[int, int], None]] | None = None, n_assign: int = 300,
             assign_snr: float = 0.01, n_refine: int = 200, refine_iterations: int = 4, n_deep_train: int = 240,
             n_deep_test: int = 40, deep_epochs: int = 5) -> dict:
    """Run the demo into ``out_dir``; returns a dict of the measured numbers and output paths.

    ``n_refine`` / ``refine_iterations``: size of the EM refinement step (particles >= 20, iterations >= 1).
    ``n_deep_train`` / ``n_deep_test`` / ``deep_epochs``: size of the deep pose-prediction step (>= 4 training
    particles, >= 1 test particle, >= 1 epoch)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    map_path = demo_map_path()
    results: dict = {"out_dir": str(out_dir.resolve())}

    # 1. simulation with known poses
    spec = SimulationSpec(n_particles=n_particles, snr=0.1, pose_distribution="uniform", ctf=True,
                          max_shift_px=2.0, seed=seed)
    sim_dir = out_dir / "simulated"
    truth = simulate_dataset(map_path, spec, sim_dir, progress=progress("simulating") if progress else None)
    print(f"[1/6] simulated {len(truth)} particles (SNR {spec.snr}, CTF, shifts ±{spec.max_shift_px} px) "
          f"-> {sim_dir / 'particles.star'}")

    # 2. the star file is the ground truth: read it back as any user would
    reread = read_star(sim_dir / "particles.star")
    pose_err = float(geodesic_distance_deg(reread.rotations, truth.rotations).max())
    origin_err = float(np.abs(reread.origins_A - truth.origins_A).max())
    defocus_err = float(np.abs(reread.ctf.defocus_u - truth.ctf.defocus_u).max())
    results.update(star_max_pose_error_deg=pose_err, star_max_origin_error_A=origin_err,
                   star_max_defocus_error_A=defocus_err)
    print(f"[2/6] star round trip: max pose error {pose_err:.2e}°, origin {origin_err:.2e} Å, "
          f"defocus {defocus_err:.2e} Å")

    # 3. plots
    poses_png = out_dir / "poses.png"
    save_figure(plot_pose_distribution(truth.rotations, title="demo: ground-truth poses (uniform)"), poses_png)
    volume, pixel_size = read_map(map_path)
    clean, _ = simulate_images(volume, pixel_size, truth.rotations[:8], truth.origins_A[:8], truth.ctf.subset(
        slice(0, 8)), snr=None, seed=seed)
    gallery_png = out_dir / "particles.png"
    noisy = read_images(reread, np.arange(8))
    save_figure(plot_image_gallery([clean, noisy], row_labels=["clean (CTF)", f"SNR {spec.snr}"],
                                   title="first 8 simulated particles"), gallery_png)
    results.update(poses_png=str(poses_png), gallery_png=str(gallery_png))
    print(f"[3/6] plots: {poses_png}, {gallery_png}")

    # 4. Bayesian pose assignment: MMSE vs MAP vs MLE at low SNR
    results.update(_mmse_vs_mle(out_dir, n_assign, assign_snr, seed, progress))

    # 5. deep pose prediction: a small network, its predictions and the deep-prior MMSE refinement
    results.update(_deep_prior_step(out_dir, seed, progress, n_train=n_deep_train, n_test=n_deep_test,
                                    epochs=deep_epochs))

    # 6. EM refinement with prior estimation on particles with a preferred orientation
    results.update(_refine_step(out_dir, seed, progress, n=n_refine, iterations=refine_iterations))
    print(f"demo finished; results in {out_dir.resolve()}")
    return results


def _mmse_vs_mle(out_dir: Path, n: int, snr: float, seed: int, progress) -> dict:
    """Simulate ``n`` fragment particles at ``snr`` (CTF, shifts ±2 px), assign poses, compare with the truth."""
    spec = SimulationSpec(n_particles=n, snr=snr, pose_distribution="uniform", ctf=True, max_shift_px=2.0,
                          seed=seed + 1)
    sim_dir = out_dir / "assign"
    truth = simulate_dataset(fragment_map_path(), spec, sim_dir)
    volume, _ = read_map(fragment_map_path())
    search = PoseSearch(healpix_order=2, refine_levels=2, shift_range_px=3.0)
    result = assign_poses(truth, volume, search, progress=progress("assigning poses") if progress else None)
    write_star(sim_dir / "particles_mmse.star", result.to_particle_set(truth, "mmse"))
    errors = {name.upper(): geodesic_distance_deg(result.poses(name)[0], truth.rotations)
              for name in ("mmse", "map", "mle")}
    png = out_dir / "mmse_vs_mle.png"
    save_figure(plot_estimator_errors(errors, expected_error=result.expected_error_deg,
                                      title=f"{n} fragment particles, SNR {snr}, CTF: errors against the true poses"),
                png)
    summary = "  ".join(f"{k} mean {v.mean():.1f}° median {np.median(v):.1f}°" for k, v in errors.items())
    print(f"[4/6] pose assignment at SNR {snr} ({result.timings['total_s']:.0f} s): {summary}; "
          f"plot {png}, poses {sim_dir / 'particles_mmse.star'}")
    return {f"{k.lower()}_mean_error_deg": float(v.mean()) for k, v in errors.items()} | {"assign_png": str(png)}


def _deep_prior_step(out_dir: Path, seed: int, progress, n_train: int = 240, n_test: int = 40, epochs: int = 5,
                     snr: float = 1.0, step: str = "[5/6]") -> dict:
    """Deep pose prediction on the fragment map: simulate ``n_train`` + ``n_test`` particles (CTF, shifts ±1 px,
    ``snr``, a preferred orientation: 75 % near the top view, uniform in-plane), train a small so3grid network (net
    box 32, ``epochs``; about a minute on 2 CPU cores), predict the test particles and refine them by deep-prior
    MMSE (local grid around the top-4 predicted cells, the prediction as prior); print the median errors against
    the truth and save the training curves and the error plot. A few epochs on a few hundred particles are enough
    for the network to find the in-plane angle and the dominant view, not for a converged network."""
    import time

    from bayespose.core.deep import TrainConfig, deep_prior_assign, load_pose_network, predict_poses, train_pose_network
    from bayespose.plotting.deep import plot_angular_errors, plot_training_history

    start = time.perf_counter()
    deep_dir = out_dir / "deep"
    sets = {}
    for name, n, offset in (("train", n_train, 11), ("test", n_test, 12)):
        spec = SimulationSpec(n_particles=n, snr=snr, pose_distribution="preferred", ctf=True, max_shift_px=1.0,
                              seed=seed + offset)
        sets[name] = simulate_dataset(fragment_map_path(), spec, deep_dir / name)
    config = TrainConfig(model="so3grid", net_box=32, epochs=epochs, batch_size=32, learning_rate=2e-3,
                         patience=epochs, seed=seed)
    trained = train_pose_network(sets["train"], config, deep_dir / "network.pt", log=None,
                                 progress=progress)
    curves_png = deep_dir / "training.png"
    save_figure(plot_training_history(trained.history, best_epoch=trained.best_epoch,
                                      title=f"so3grid network, {n_train} fragment particles at SNR {snr} "
                                            "(preferred view)"), curves_png)
    network = load_pose_network(trained.checkpoint)
    test = sets["test"]
    prediction = predict_poses(network, test, top_k=4)
    volume, _ = read_map(fragment_map_path())
    refined = deep_prior_assign(test, prediction, volume, PoseSearch(shift_range_px=2.0),
                                progress=progress("deep-prior MMSE") if progress else None)
    network_set = prediction.to_particle_set(test)
    mmse_set = refined.to_particle_set(network_set, "mmse")  # drops every earlier bp column: keep the network's
    write_star(deep_dir / "test_deep_mmse.star", replace(mmse_set, extra={**network_set.extra, **mmse_set.extra}))
    errors = {"network mode": geodesic_distance_deg(prediction.rotations, test.rotations),
              "deep-prior MMSE": geodesic_distance_deg(refined.mmse_rotations, test.rotations)}
    errors_png = deep_dir / "errors.png"
    save_figure(plot_angular_errors(errors, title=f"{n_test} test particles: angle to the true poses"), errors_png)
    seconds = time.perf_counter() - start
    print(f"{step} deep pose prediction ({n_train} training particles, {len(trained.history)} epochs, "
          f"{seconds:.0f} s): median error on {n_test} new particles: network "
          f"{np.median(errors['network mode']):.1f}°, deep-prior MMSE {np.median(errors['deep-prior MMSE']):.1f}°; "
          f"plots {curves_png}, {errors_png}")
    return {"deep_network_median_error_deg": float(np.median(errors["network mode"])),
            "deep_mmse_median_error_deg": float(np.median(errors["deep-prior MMSE"])),
            "deep_training_png": str(curves_png), "deep_errors_png": str(errors_png)}


def _refine_step(out_dir: Path, seed: int, progress, n: int = 200, snr: float = 0.5, iterations: int = 4,
                 step: str = "[6/6]") -> dict:
    """EM refinement with prior estimation: simulate ``n`` fragment particles with a preferred orientation (CTF,
    shifts ±1 px, ``snr``), refine from the true map low-passed to 30 Å (``iterations``, HEALPix order 1 refined up
    to 2, ``prior_mode="estimate"``), write the outputs (map, half maps, FSC, star, prior, figures) and print the
    half-map resolution, the FSC against the true map and the estimated prior at the preferred view (+z)."""
    import time

    import healpy

    from bayespose.core.imaging.reconstruct import fsc
    from bayespose.core.refine import RefineConfig, refine
    from bayespose.core.refine.outputs import resolution_from_fsc, write_refine_outputs
    from bayespose.plotting.refine import refine_figure_writer

    start = time.perf_counter()
    refine_dir = out_dir / "refine"
    spec = SimulationSpec(n_particles=n, snr=snr, pose_distribution="preferred", ctf=True, max_shift_px=1.0,
                          seed=seed + 21)
    particles = simulate_dataset(fragment_map_path(), spec, refine_dir / "simulated")
    truth, pixel_size = read_map(fragment_map_path())
    config = RefineConfig(iterations=iterations, healpix_order=1, max_healpix_order=2, shift_range_px=1.0,
                          prior_mode="estimate", initial_lowpass_A=30.0, seed=seed)
    result = refine(particles, truth, config, out_dir=refine_dir / "iterations", log=None, progress=progress)
    write_refine_outputs(result, refine_dir, pixel_size=pixel_size, particles_template=particles, config=config,
                         figure_writer=refine_figure_writer(f"demo: {n} preferred-orientation particles"))
    freq, values = fsc(result.map, truth, pixel_size)
    vs_truth = resolution_from_fsc(freq.cpu().numpy(), values.cpu().numpy(), threshold=0.5)
    corr = float(np.corrcoef(result.map.ravel(), truth.ravel())[0, 1])
    theta, _ = healpy.pix2ang(2 ** result.prior_order, np.arange(len(result.direction_prior)), nest=True)
    top = float(result.direction_prior[theta < np.radians(30)].mean())  # the simulator's preferred view is +z
    seconds = time.perf_counter() - start
    print(f"{step} EM refinement with prior estimation ({n} particles with a preferred view, SNR {snr}, "
          f"{len(result.history)} iterations, {seconds:.0f} s): resolution {result.resolution_A:.1f} Å (half-map FSC "
          f"0.143), {vs_truth:.1f} Å against the true map (FSC 0.5), correlation {corr:.2f}; estimated prior "
          f"{top:.1f}x uniform near the preferred view; outputs in {refine_dir}")
    return {"refine_resolution_A": float(result.resolution_A), "refine_vs_truth_A": float(vs_truth),
            "refine_correlation": corr, "refine_prior_top": top, "refine_dir": str(refine_dir)}
