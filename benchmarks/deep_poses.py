#!/usr/bin/env python
"""Evidence for deep pose prediction (issue 5; Lian et al. 2022, CESPED (Sanchez-Garcia et al. 2023), CryoSphere (Chheda & Nori 2024)) on simulated particles with known poses.

Data: the asymmetric 3J9G fragment (``bayespose.data.fragment_map_path()``, 64³ px, 4.4 Å/px), CTF (defocus
1.0-2.5 µm, astigmatism <= 200 Å), no shifts, uniform poses, SNR as in :mod:`bayespose.core.imaging.simulate`.
Half-set protocol (002 Fig. 1): the networks are trained on half 1 (10 % of it held out for validation / early
stopping) and evaluated on half 2, which they never saw. Networks see 32 px Fourier-cropped, phase-flipped
images (8.8 Å/px).

Sections:

1. ``halfset``: both models (``so3grid`` Image2Sphere-style head, ``quaternion`` regression) at SNR 0.1 and 0.03:
   MAnE, wMAnE (weights = the network's confidence), median, fraction < 10°, reprojection RMSE (001 eq. 16,
   relative), and reconstructions of half 2 from the predicted / deep-prior MMSE / true poses
   (FourierAccumulator, CTF-weighted insertion): PCC with the true map and the resolution where the FSC with the
   true map falls below 0.5.
2. ``equivariance``: median angle between the prediction for an in-plane turned image (random angle a) and
   ``Rz(a)`` times the prediction for the original image, on half 2 (003: an equivariant model gives 0).
3. ``symmetry``: the demo 3J9G ring (exactly C2) at SNR 0.1: so3grid trained with ``symmetry="C2"`` (mates share
   the target mass) and naively as ``C1``; errors symmetry-aware (C2) and naive (C1).
4. ``deep_prior``: deep-prior MMSE (:func:`deep_prior_assign`, prior = the predicted distribution) against the
   global coarse-to-fine MMSE search on half 2: the earlier fixed top-8 seeds, the adaptive seeds (cells holding
   99 % of the predicted mass) and the default (adaptive seeds + fit-z-score check with global fallback): errors,
   rotations scored per particle, GFLOP, wall time; and the trade-off curve of the fallback rules (fit z-score
   threshold, network confidence threshold): error against the fraction of particles falling back and the
   scored rotations (``fig_deep_prior_tradeoff.png``). Run on its own (``--sections deep_prior``) it reuses the
   simulated stacks and so3grid checkpoints in ``--work`` (trains them with the section-1 settings if missing)
   and updates the section-4 entries of an existing ``results.json``.

    .venv/bin/python benchmarks/deep_poses.py --quick     # a few minutes on 2 cores
    .venv/bin/python benchmarks/deep_poses.py             # the full run (~30 min on 2 cores)
    .venv/bin/python benchmarks/deep_poses.py --sections deep_prior --work /tmp/deepw/bfull   # section 4 only

Outputs (``--out``, default ``benchmarks/results/deep`` or ``.../deep/quick``): ``README.md`` (tables,
commands, settings, runtime), ``results.json``, ``fig_errors.png``, ``fig_training.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bayespose.core.assign import PoseSearch, assign_poses
from bayespose.core.deep import (
    DeepPriorSearch,
    TrainConfig,
    deep_prior_assign,
    load_pose_network,
    pose_error_metrics,
    predict_poses,
    reprojection_rmse,
    train_pose_network,
)
from bayespose.core.deep.data import inplane_rotation_matrix, rotate_shift_images
from bayespose.core.deep.predict import network_inputs, predict_from_inputs
from bayespose.core.deep.prior_refine import AUTO_FALLBACK_DEFICIT, AUTO_FALLBACK_Z, final_spacing_deg, fit_zscores
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.imaging.ctf import ctf_2d
from bayespose.core.imaging.reconstruct import FourierAccumulator, fsc, resolution_at
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.io.relion_star import read_star
from bayespose.data import demo_map_path, fragment_map_path


@dataclass
class Config:
    n_particles: int = 3000  # per SNR, both halves
    snrs: tuple = (0.1, 0.03)
    epochs: int = 40
    patience: int = 8
    n_symmetry: int = 2000
    n_deep_prior: int = 300  # half-2 particles for the MMSE comparison ("balls": the first third of them)
    grid_order: int = 2
    lmax: int = 4
    seed: int = 0


QUICK = Config(n_particles=600, snrs=(0.1,), epochs=6, patience=3, n_symmetry=400, n_deep_prior=60)


def train_config(cfg: Config, model: str, symmetry: str = "C1") -> TrainConfig:
    if model == "so3grid":
        return TrainConfig(model="so3grid", grid_order=cfg.grid_order, lmax=cfg.lmax, channels=32, so3_channels=4,
                           epochs=cfg.epochs, patience=cfg.patience, learning_rate=2e-3, batch_size=16,
                           symmetry=symmetry, seed=cfg.seed, threads=1, device="cpu")
    return TrainConfig(model="quaternion", channels=32, epochs=cfg.epochs, patience=cfg.patience,
                       learning_rate=1e-3, batch_size=32, symmetry=symmetry, seed=cfg.seed, threads=1, device="cpu")


def simulate(map_path: Path, n: int, snr: float, seed: int, work: Path, reuse: bool = False):
    """The simulated set (particles, images); ``reuse``: read the stack of an earlier run in ``work`` if there."""
    folder = work / f"{Path(map_path).stem}_snr{snr}_n{n}"
    if reuse and (folder / "particles.star").is_file() and (folder / "particles.mrcs").is_file():
        particles = read_star(folder / "particles.star")
        return particles, read_images(particles)
    particles = simulate_dataset(map_path, SimulationSpec(n_particles=n, snr=snr, seed=seed), folder)
    return particles, read_images(particles)


def reconstruct_pcc(particles, images, rotations, volume) -> dict:
    """Reconstruction of the particles for given poses (CTF-weighted insertion, no shifts): PCC and FSC-0.5
    resolution (Å) against the true map."""
    acc = FourierAccumulator.zeros(particles.box)
    for s in range(0, len(particles), 256):
        sl = np.arange(s, min(s + 256, len(particles)))
        ctf = ctf_2d(particles.ctf.subset(sl), particles.pixel_size, particles.box)
        y = torch.fft.rfft2(torch.as_tensor(images[sl]))
        acc.insert(y * ctf, ctf ** 2, rotations[sl])
    rec = acc.reconstruct().numpy()
    pcc = float(np.corrcoef(rec.ravel(), volume.ravel())[0, 1])
    freqs, values = fsc(rec, volume, particles.pixel_size)
    return {"pcc": pcc, "fsc05_A": resolution_at(freqs, values, 0.5)}


def equivariance_error(network, particles, images, rng) -> float:
    inputs = network_inputs(network, particles, images)
    base = predict_from_inputs(network, inputs, device="cpu").rotations
    angles = rng.uniform(0, 360, len(inputs))
    turned = predict_from_inputs(network, rotate_shift_images(inputs, angles), device="cpu").rotations
    return float(np.median(geodesic_distance_deg(turned, inplane_rotation_matrix(angles) @ base)))


def section_halfset(cfg: Config, work: Path, results: dict) -> None:
    volume, _ = read_map(fragment_map_path())
    rng = np.random.default_rng(cfg.seed)
    for snr in cfg.snrs:
        particles, images = simulate(fragment_map_path(), cfg.n_particles, snr, 1 + int(snr * 1000), work)
        h1, h2 = np.flatnonzero(particles.half_set == 1), np.flatnonzero(particles.half_set == 2)
        train, test = particles.subset(h1), particles.subset(h2)
        truth = test.rotations
        entry = {"n_train_half": len(h1), "n_test_half": len(h2),
                 "reconstruction_true_poses": reconstruct_pcc(test, images[h2], truth, volume)}
        for model in ("so3grid", "quaternion"):
            t0 = time.perf_counter()
            res = train_pose_network(train, train_config(cfg, model), work / f"{model}_snr{snr}.pt",
                                     images=images[h1], log=lambda line, tag=f"{model} {snr}": print(f"  [{tag}] {line}",
                                                                                           flush=True))
            train_s = time.perf_counter() - t0
            net = load_pose_network(res.checkpoint, device="cpu")
            t0 = time.perf_counter()
            pred = predict_poses(net, test, images=images[h2], top_k=8, device="cpu")
            predict_s = time.perf_counter() - t0
            m = pose_error_metrics(pred.rotations, truth, weights=pred.confidence)
            m.update(reprojection_rmse=reprojection_rmse(volume, pred.rotations, truth),
                     reprojection_rmse_random=reprojection_rmse(volume, np.roll(truth, 1, axis=0), truth),
                     reconstruction=reconstruct_pcc(test, images[h2], pred.rotations, volume),
                     equivariance_median_deg=equivariance_error(net, test, images[h2], rng),
                     train_s=train_s, predict_s=predict_s, best_epoch=res.best_epoch, history=res.history,
                     errors=geodesic_distance_deg(pred.rotations, truth).tolist())
            err = np.asarray(m["errors"])
            conf = pred.confidence
            lo = conf <= np.median(conf)
            m["median_error_low_conf_half"], m["median_error_high_conf_half"] = (float(np.median(err[lo])),
                                                                                 float(np.median(err[~lo])))
            print(f"  [{model} {snr}] test MAnE {m['mane_deg']:.1f} median {m['median_deg']:.1f} <10° "
                  f"{m['frac_below_10']:.2f} equivariance {m['equivariance_median_deg']:.1f}°", flush=True)
            if model == "so3grid":
                section_deep_prior(cfg, test, images[h2], pred, volume, m)
            entry[model] = m
        results.setdefault("halfset", {})[str(snr)] = entry


def _subset_prediction(pred, sel):
    return type(pred)(pred.rotations[sel], pred.confidence[sel], pred.top_rotations[sel], pred.top_probabilities[sel],
                      pred.grid_order, None if pred.log_probabilities is None else pred.log_probabilities[sel],
                      pred.symmetry, pred.model)


GLOBAL = "global MMSE (order 2 + 2 levels)"
TOP8 = "deep-prior MMSE, top-8 cells, no check"
ADAPTIVE = "deep-prior MMSE, adaptive seeds (99 % mass, <= 128 cells), no check"
DEFAULT_ROW = "deep-prior MMSE default"  # the default run's row starts so (its rule, below, changed over time)
DEFAULT = (f"{DEFAULT_ROW}: adaptive seeds + fit check (z < {AUTO_FALLBACK_Z:g}, deficit > "
           f"{AUTO_FALLBACK_DEFICIT:g}) + global fallback")
Z_THRESHOLDS = (-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, 0.0)
CONF_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _row(res, truth, seconds: float, n_total: int | None = None) -> dict:
    """Errors and work of one assignment: rotations scored per particle, GFLOP of scoring, wall seconds."""
    t = res.timings
    gflop = t.get("scoring_gflop", t.get("scoring_gflops", 0.0) * t.get("scoring_s", 0.0))
    return {**pose_error_metrics(res.mmse_rotations, truth), "rotations": t["scored_rotations_per_particle"],
            "gflop": gflop, "seconds": seconds,
            "fallback_fraction": (float(np.mean(res.deep_fallback)) if getattr(res, "deep_fallback", None) is not None
                                  else None)}


def _tradeoff(deep_err, glob_err, score, thresholds, deep_rot, glob_rot, deep_s, fit_s, glob_s,
              below: bool = True) -> list[dict]:
    """The curve of one fallback rule from the per-particle errors of the deep-prior and global searches (the
    particles are independent, so a particle that falls back gets exactly its global result): for each threshold
    the fraction falling back (``score < threshold``), the errors, the rotations scored per particle
    (deep + fraction x global) and the wall time estimated as deep + fit + fraction x global."""
    rows = []
    for thr in thresholds:
        fb = score < thr if below else score > thr
        err = np.where(fb, glob_err, deep_err)
        frac = float(fb.mean())
        label = thr if np.isfinite(thr) else ("never" if thr < 0 else "always")
        rows.append({"threshold": label, "fallback_fraction": frac, "mane_deg": float(err.mean()),
                     "median_deg": float(np.median(err)), "frac_below_10": float((err < 10).mean()),
                     "rotations": deep_rot + frac * glob_rot, "seconds_estimate": deep_s + fit_s + frac * glob_s})
    return rows


def section_deep_prior(cfg: Config, test, images, pred, volume, out: dict) -> None:
    """Deep-prior MMSE vs the global MMSE search on the first ``n_deep_prior`` half-2 particles (module doc)."""
    sel = np.arange(min(cfg.n_deep_prior, len(test)))
    sub, imgs = test.subset(sel), images[sel]
    truth = sub.rotations
    sub_pred = _subset_prediction(pred, sel)
    search = PoseSearch(shift_range_px=0.0, threads=1, device="cpu")
    table = {"network mode": {**pose_error_metrics(sub_pred.rotations, truth), "rotations": None, "gflop": None,
                              "seconds": None, "fallback_fraction": None}}
    runs = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        res = fn()
        runs[name] = (res, time.perf_counter() - t0)
        table[name] = _row(res, truth, runs[name][1])
        r = table[name]
        print(f"    [deep prior] {name}: median {r['median_deg']:.2f}° mean {r['mane_deg']:.2f}° rotations/particle "
              f"{r['rotations']:.0f} {r['gflop']:.1f} GFLOP {r['seconds']:.1f} s", flush=True)
        return res

    glob = timed(GLOBAL, lambda: assign_poses(sub, volume, search, images=imgs))
    no_check = DeepPriorSearch(fallback_z=None)
    top8 = timed(TOP8, lambda: deep_prior_assign(sub, sub_pred, volume, search,
                                                 replace(no_check, seed_mass=None), images=imgs))
    adaptive = timed(ADAPTIVE, lambda: deep_prior_assign(sub, sub_pred, volume, search, no_check, images=imgs))
    default = timed(DEFAULT, lambda: deep_prior_assign(sub, sub_pred, volume, search, DeepPriorSearch(),
                                                       images=imgs))
    third = np.arange(max(1, len(sel) // 3))  # the per-particle ball lattices are slow on a CPU: fewer particles
    t0 = time.perf_counter()
    balls = deep_prior_assign(sub.subset(third), _subset_prediction(sub_pred, third), volume, search,
                              replace(no_check, method="balls", seed_mass=None), images=imgs[third])
    table[f"deep-prior MMSE (balls around the top 8, first {len(third)} particles, no check)"] = _row(
        balls, truth[third], time.perf_counter() - t0)

    # trade-off curves: the fit z-score (and, for comparison, the network confidence) of the no-check runs
    glob_err = geodesic_distance_deg(glob.mmse_rotations, truth)
    glob_s = runs[GLOBAL][1]
    curves = {}
    for seeds, res in (("adaptive seeds", adaptive), ("top-8 cells", top8)):
        t0 = time.perf_counter()
        fit = fit_zscores(sub, volume, res.mle_rotations, res.mle_origins_A, res.noise, res.timings["radii_px"][-1],
                          imgs, tolerance_deg=final_spacing_deg(search) / 2.0)  # as deep_prior_assign
        fit_s = time.perf_counter() - t0
        deep_err = geodesic_distance_deg(res.mmse_rotations, truth)
        wrong = deep_err > 15
        common = (deep_err, glob_err)
        work = (res.timings["scored_rotations_per_particle"], glob.timings["scored_rotations_per_particle"],
                runs[TOP8 if seeds == "top-8 cells" else ADAPTIVE][1], fit_s, glob_s)
        curves[f"fit z-score, {seeds}"] = _tradeoff(*common, fit.z, (-np.inf,) + Z_THRESHOLDS + (np.inf,), *work)
        curves[f"network confidence, {seeds}"] = _tradeoff(*common, sub_pred.confidence, CONF_THRESHOLDS, *work)
        table[f"fit z-score separation, {seeds}"] = {
            "n_wrong_over_15deg": int(wrong.sum()),
            "z_wrong_max": float(fit.z[wrong].max()) if wrong.any() else None,
            "z_right_percentiles_1_5_50": np.percentile(fit.z[~wrong], [1, 5, 50]).tolist(),
            "confidence_wrong_median": float(np.median(sub_pred.confidence[wrong])) if wrong.any() else None,
            "confidence_right_median": float(np.median(sub_pred.confidence[~wrong])), "fit_s": fit_s}
    table["tradeoff"] = curves
    table["reconstruction_deep_prior_default"] = reconstruct_pcc(sub, imgs, default.mmse_rotations, volume)
    table["reconstruction_deep_prior_top8"] = reconstruct_pcc(sub, imgs, top8.mmse_rotations, volume)
    table["reconstruction_global"] = reconstruct_pcc(sub, imgs, glob.mmse_rotations, volume)
    out["deep_prior"] = table


def section_deep_prior_only(cfg: Config, work: Path, results: dict) -> None:
    """Section 4 on its own: the half-2 particles and so3grid networks of section 1 from ``work`` (simulated /
    trained with the section-1 settings when missing)."""
    volume, _ = read_map(fragment_map_path())
    for snr in cfg.snrs:
        particles, images = simulate(fragment_map_path(), cfg.n_particles, snr, 1 + int(snr * 1000), work, reuse=True)
        h1, h2 = np.flatnonzero(particles.half_set == 1), np.flatnonzero(particles.half_set == 2)
        checkpoint = work / f"so3grid_snr{snr}.pt"
        if not checkpoint.is_file():
            train_pose_network(particles.subset(h1), train_config(cfg, "so3grid"), checkpoint, images=images[h1],
                               log=lambda line, tag=snr: print(f"  [so3grid {tag}] {line}", flush=True))
        net = load_pose_network(checkpoint, device="cpu")
        test = particles.subset(h2)
        pred = predict_poses(net, test, images=images[h2], top_k=8, device="cpu")
        entry = results.setdefault("halfset", {}).setdefault(str(snr), {}).setdefault("so3grid", {})
        print(f"  [deep prior {snr}] {len(h2)} test particles, network {checkpoint}", flush=True)
        section_deep_prior(cfg, test, images[h2], pred, volume, entry)


def plot_tradeoff(results: dict, out: Path) -> None:
    """fig_deep_prior_tradeoff.png: mean error against rotations scored per particle (% of the global search) for
    the fallback rules, one panel per SNR."""
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    snrs = [snr for snr, e in results.get("halfset", {}).items() if "tradeoff" in e.get("so3grid", {}).get(
        "deep_prior", {})]
    if not snrs:
        return
    fig = Figure(figsize=(5.2 * len(snrs), 4.0))
    axes = fig.subplots(1, len(snrs), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        dp = results["halfset"][snr]["so3grid"]["deep_prior"]
        g = dp[GLOBAL]
        for (name, rows), style in zip(dp["tradeoff"].items(), ("o-", "o--", "s-", "s--")):
            x = [100 * r["rotations"] / g["rotations"] for r in rows]
            ax.plot(x, [r["mane_deg"] for r in rows], style, ms=3, label=name)
        d = next(row for name, row in dp.items() if name.startswith(DEFAULT_ROW))
        ax.plot(100 * d["rotations"] / g["rotations"], d["mane_deg"], "k*", ms=12, label="default (measured run)")
        ax.axhline(g["mane_deg"], color="gray", lw=1, ls=":", label=f"global search ({g['mane_deg']:.1f}°)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rotations scored per particle (% of the global search)")
        ax.set_ylabel("mean angular error (deg)")
        ax.set_title(f"SNR {snr}: {dp['network mode']['n']} test particles")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "fig_deep_prior_tradeoff.png", dpi=110)


def section_symmetry(cfg: Config, work: Path, results: dict) -> None:
    particles, images = simulate(demo_map_path(), cfg.n_symmetry, 0.1, 77, work)
    h1, h2 = np.flatnonzero(particles.half_set == 1), np.flatnonzero(particles.half_set == 2)
    out = {}
    for sym in ("C2", "C1"):
        res = train_pose_network(particles.subset(h1), train_config(cfg, "so3grid", symmetry=sym),
                                 work / f"ring_{sym}.pt", images=images[h1],
                                 log=lambda line, tag=sym: print(f"  [ring {tag}] {line}", flush=True))
        net = load_pose_network(res.checkpoint, device="cpu")
        pred = predict_poses(net, particles.subset(h2), images=images[h2], device="cpu")
        out[f"trained {sym}"] = {"errors C2-aware": pose_error_metrics(pred.rotations, particles.rotations[h2], "C2"),
                                 "errors naive C1": pose_error_metrics(pred.rotations, particles.rotations[h2], "C1"),
                                 "best_epoch": res.best_epoch}
        print(f"  [ring {sym}] C2-aware median {out[f'trained {sym}']['errors C2-aware']['median_deg']:.1f}, naive "
              f"{out[f'trained {sym}']['errors naive C1']['median_deg']:.1f}", flush=True)
    results["symmetry"] = out


# ------------------------------------------------------------------- issue 12: the relion_project benchmark
@dataclass
class RelionConfig:
    """Sizes of the relion_project benchmark (benchmarks/_deep_relion.py): training pool and test set at box 64,
    training sizes, network kinds, deep-prior comparison sizes (box 64, bigger boxes, finer sampling)."""

    n_pool: int = 20000
    n_test: int = 1000
    sizes: tuple = (400, 4000, 20000)
    kinds: tuple = ("particles", "map+particles")
    map_only_particles: int = 4000  # particles lending their CTFs, noise and shifts to the map-only network
    pretrain_steps: int | None = None  # None: bayespose's default
    threads: int = 2
    n_prior: int = 1000
    n_box: int = 200
    boxes: tuple = (128, 256)
    n_fine: int = 300
    prior_network: str = "map+particles_4000"
    seed: int = 12
    only_runs: tuple = ()  # relion_sizes: train just these networks (e.g. "map+particles_4000"); () = all


QUICK_RELION = RelionConfig(n_pool=1200, n_test=200, sizes=(400, 1000), map_only_particles=1000, pretrain_steps=500,
                            n_prior=100, n_box=30, boxes=(128,), n_fine=30, prior_network="map+particles_1000")


def _relion_train_config(rcfg: RelionConfig):
    from bayespose.core.deep.vocabulary import DEFAULT_PRETRAIN_STEPS

    steps = DEFAULT_PRETRAIN_STEPS if rcfg.pretrain_steps is None else rcfg.pretrain_steps
    return TrainConfig(pretrain_steps=steps, threads=rcfg.threads, device="cpu", seed=0)


def _relion_data(rcfg: RelionConfig, snr: float) -> dict:
    """The report's description of the box-64 data and the training settings."""
    import _deep_relion as dr

    return {"box": dr.BASE_BOX, "snr_measured": snr, "n_pool": rcfg.n_pool, "n_test": rcfg.n_test,
            "config": asdict(rcfg), "train_config": asdict(_relion_train_config(rcfg))}


def section_relion_sizes(rcfg: RelionConfig, work: Path, results: dict, save) -> None:
    """Networks trained on 400 / 4000 / 20000 particles alone, with map pre-training, and on the map alone, on
    the relion_project particles; evaluated on the test particles (never seen, no origins)."""
    import _deep_relion as dr
    from _machine import engine_version

    particles, images, snr = dr.relion_box_data(work, dr.BASE_BOX, rcfg.n_pool + rcfg.n_test, rcfg.seed)
    volume, _ = read_map(fragment_map_path())
    test_idx = np.arange(rcfg.n_pool, rcfg.n_pool + rcfg.n_test)
    test, truth = dr.picked(particles.subset(test_idx)), particles.rotations[test_idx]
    entry = results.setdefault("relion", {}).setdefault("sizes", {})
    results["relion"]["data"] = _relion_data(rcfg, snr)
    runs = [(kind, n) for n in rcfg.sizes for kind in rcfg.kinds] + [("map", rcfg.map_only_particles)]
    if rcfg.only_runs:
        unknown = set(rcfg.only_runs) - {f"{kind}_{n}" for kind, n in runs}
        if unknown:
            raise SystemExit(f"--relion-runs: unknown networks {sorted(unknown)}")
        runs = [(kind, n) for kind, n in runs if f"{kind}_{n}" in rcfg.only_runs]
    for kind, n in runs:
        name = f"{kind}_{n}"
        train_idx = np.arange(n)
        print(f"  [relion sizes] {name}", flush=True)
        row = dr.train_variant(kind, particles.subset(train_idx), images[train_idx], volume,
                               _relion_train_config(rcfg), work / "nets" / f"{name}.pt",
                               lambda line, tag=name: print(f"    [{tag}] {line}", flush=True))
        row["test"] = dr.evaluate_network(row["checkpoint"], test, images[test_idx], truth)
        t = row["test"]
        print(f"  [relion sizes] {name}: test MAnE {t['mane_deg']:.1f} median {t['median_deg']:.1f} > 30° "
              f"{t['frac_over_30']:.3f} (confident half {t['frac_over_30_confident_half']:.3f}); train "
              f"{row['train_wall_s'] / 60:.1f} min wall, other processes {row['other_cores']:.1f} cores", flush=True)
        row["engine_version"] = engine_version()
        entry[name] = row
        save()


def section_relion_prior(rcfg: RelionConfig, work: Path, results: dict, save) -> None:
    """``predict --refine-map`` (network + deep-prior MMSE) against the global MMSE search: box 64 (n_prior test
    particles), boxes 128 / 256 (n_box particles, the upsampled map, the same network relabelled) and finer
    sampling (order 3 + 1 and + 2 levels, n_fine particles); each also from a perfect prediction (the bound of any
    network)."""
    import _deep_relion as dr

    network = str(work / "nets" / f"{rcfg.prior_network}.pt")
    if not Path(network).is_file():
        raise SystemExit(f"no network {network}: run the relion_sizes section first")
    entry = results.setdefault("relion", {}).setdefault("prior", {})
    log = lambda line: print(f"  {line}", flush=True)  # noqa: E731
    cases = [(dr.BASE_BOX, rcfg.n_prior, {})] + [(box, rcfg.n_box, {}) for box in rcfg.boxes] + [
        (dr.BASE_BOX, rcfg.n_fine, {"healpix_order": 3, "refine_levels": levels}) for levels in (1, 2)]
    for box, n, grid in cases:
        if box == dr.BASE_BOX:
            particles, images, snr = dr.relion_box_data(work, box, rcfg.n_pool + rcfg.n_test, rcfg.seed)
            results["relion"].setdefault("data", _relion_data(rcfg, snr))
        else:  # other poses than the training pool's
            particles, images, _ = dr.relion_box_data(work, box, n, rcfg.seed + box)
        idx = np.arange(len(particles) - rcfg.n_test, len(particles) - rcfg.n_test + n) if box == 64 else np.arange(n)
        test, truth = dr.picked(particles.subset(idx)), particles.rotations[idx]
        volume, px = read_map(dr.box_map(work, box))
        net = network if box == dr.BASE_BOX else dr.relabelled_network(network, box, particles.pixel_size,
                                                                        work / "nets" / f"relabelled_box{box}.pt")
        search = PoseSearch(threads=rcfg.threads, device="cpu", **dr.box_search_kwargs(box), **grid)
        label = f"box {box}, order {search.healpix_order} + {search.refine_levels} levels, {n} particles"
        row = dr.compare_searches(test, images[idx], truth, volume, net, search, log, label)
        row.update(box=box, n=n, snr_note=dr.snr_note(box), search=asdict(search))
        entry[label] = row
        save()


# ------------------------------------------------------------------------------------------------ report
def plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    snrs = list(results.get("halfset", {}))
    fig = Figure(figsize=(5 * max(len(snrs), 1), 3.6))
    axes = fig.subplots(1, max(len(snrs), 1), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        for model in ("so3grid", "quaternion"):
            err = np.asarray(results["halfset"][snr][model]["errors"])
            ax.hist(err, bins=np.linspace(0, 180, 37), alpha=0.55, label=f"{model} (median {np.median(err):.0f}°)")
        ax.set_xlabel("angular error on half 2 (deg)")
        ax.set_ylabel("particles")
        ax.set_title(f"SNR {snr}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "fig_errors.png", dpi=110)
    fig = Figure(figsize=(5 * max(len(snrs), 1), 3.6))
    axes = fig.subplots(1, max(len(snrs), 1), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        for model in ("so3grid", "quaternion"):
            h = results["halfset"][snr][model]["history"]
            ax.plot([r["epoch"] for r in h], [r["val_median_error_deg"] for r in h], marker="o", ms=3,
                    label=f"{model}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation median error (deg)")
        ax.set_title(f"SNR {snr}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "fig_training.png", dpi=110)


def _f(x, fmt=".1f"):
    return "—" if x is None else format(x, fmt)


def _pct(x, total) -> str:
    return "—" if x is None or not total else f"{100 * x / total:.1f} %"


def _deep_prior_lines(snr: str, dp: dict | None) -> list[str]:
    """Section 4 of the report for one SNR: the comparison table, the z-score separation and the trade-off."""
    if not dp:
        return []
    if GLOBAL not in dp:  # an older run's layout
        return [f"### 4. Deep-prior MMSE, SNR {snr}: results of an older layout, see results.json", ""]
    g = dp[GLOBAL]
    lines = [f"### 4. Deep-prior MMSE vs global MMSE, SNR {snr} (first {dp['network mode']['n']} test particles, "
             "so3grid network)", "",
             "| poses | MAnE | median | < 5° | < 10° | falls back | rotations scored / particle (% of global) | "
             "scoring GFLOP | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in dp.items():
        if not isinstance(r, dict) or "mane_deg" not in r:
            continue
        rot = "—" if r["rotations"] is None else f"{r['rotations']:.0f} ({_pct(r['rotations'], g['rotations'])})"
        fb = "—" if r.get("fallback_fraction") is None else f"{100 * r['fallback_fraction']:.1f} %"
        lines.append(f"| {name} | {_f(r['mane_deg'], '.2f')} | {_f(r['median_deg'], '.2f')} | "
                     f"{_f(r['frac_below_5'], '.2f')} | {_f(r['frac_below_10'], '.2f')} | {fb} | {rot} | "
                     f"{_f(r['gflop'], '.2f')} | {_f(r['seconds'])} |")
    lines += ["", "Reconstruction of those particles (PCC with the true map): "
              + ", ".join(f"{k.replace('reconstruction_', '').replace('_', ' ')} {v['pcc']:.3f}"
                          for k, v in dp.items() if k.startswith("reconstruction")) + ".", ""]
    for name, sep in dp.items():
        if name.startswith("fit z-score separation"):
            lines.append(f"{name}: {sep['n_wrong_over_15deg']} particles > 15° off; their largest z "
                         f"{_f(sep['z_wrong_max'], '.2f')}; z of the others (1st / 5th / 50th percentile) "
                         + " / ".join(f"{v:.2f}" for v in sep["z_right_percentiles_1_5_50"])
                         + f"; median network confidence wrong {_f(sep['confidence_wrong_median'], '.2f')} vs right "
                         f"{sep['confidence_right_median']:.2f}; fit {sep['fit_s']:.2f} s.")
    lines += ["", f"#### Trade-off of the fallback rules, SNR {snr}", "",
              "Falling back = the particle gets its global-search result (computed once above; particles are "
              "independent). Wall time estimated as deep-prior run + fit + fraction x global run.", "",
              "| rule | fall back when | falls back | MAnE | median | < 10° | rotations / particle (% of global) "
              "| wall s (est.) |", "|---|---|---|---|---|---|---|---|"]
    for rule, rows in dp["tradeoff"].items():
        if rule == "network confidence, top-8 cells":
            continue  # in results.json and the figure
        sign = "z < " if rule.startswith("fit") else "confidence < "
        for r in rows:
            when = r["threshold"] if isinstance(r["threshold"], str) else f"{sign}{r['threshold']:g}"
            lines.append(f"| {rule} | {when} | {100 * r['fallback_fraction']:.1f} % | "
                         f"{r['mane_deg']:.2f} | {r['median_deg']:.2f} | {r['frac_below_10']:.2f} | "
                         f"{r['rotations']:.0f} ({_pct(r['rotations'], g['rotations'])}) | "
                         f"{r['seconds_estimate']:.1f} |")
    return lines + [""]


def _oracle_cell(row: dict) -> str:
    oracle = row.get("oracle_prior")
    return f"{oracle['mane_deg']:.2f}°, {row['oracle_wall_ratio']:.2f}" if oracle else "–"


def _relion_lines(results: dict) -> list[str]:
    """The issue-12 sections of the report (relion_project benchmark)."""
    rel = results.get("relion")
    if not rel:
        return []
    data = rel.get("data", {})
    lines = ["## Issue 12: relion_project benchmark (networks at realistic training sizes, train from the map, "
             "calibrated confidence, deep prior vs global search)", "",
             f"Data: benchmarks/_deep_relion.py (module doc). {data.get('n_pool', '?')} training-pool and "
             f"{data.get('n_test', '?')} test particles of the 3J9G fragment at box 64 (4.4 Å/px), relion_project "
             f"--ctf --add_noise, measured SNR {data.get('snr_measured', float('nan')):.3f}, uniform poses, origins "
             "±2 px, test particles without origins. Networks: so3grid with bayespose's defaults "
             f"({json.dumps(data.get('train_config', {}))}); 'particles' = training on the particles alone, "
             "'map+particles' = pre-training on synthetic projections of the consensus map then fine-tuning, "
             "'map' = the map alone (the particles lend CTFs, noise and shifts, not their poses). Errors: geodesic "
             "angles (degrees) on the test particles; MAnE and wMAnE (weights = network confidence) as in CESPED "
             "(Sánchez-García et al. 2024).", ""]
    sizes = rel.get("sizes", {})
    if sizes:
        lines += ["### Network alone", "",
                  "| training | MAnE | wMAnE | median | < 10° | > 30° | > 30° in the most confident 50 % | "
                  "train min (wall) | train CPU min | other processes (cores) | particles/s pre-train / "
                  "fine-tune | epochs (best) | temperature | code |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sizes.items():
            t, rate = r["test"], r.get("samples_per_s", {})
            lines.append(f"| {name.replace('_', ' on ')} | {t['mane_deg']:.1f} | {t['wmane_deg']:.1f} | "
                         f"{t['median_deg']:.1f} | {t['frac_below_10']:.2f} | {t['frac_over_30']:.3f} | "
                         f"{t['frac_over_30_confident_half']:.3f} | {r['train_wall_s'] / 60:.1f} | "
                         f"{r['train_cpu_s'] / 60:.1f} | {r['other_cores']:.1f} | "
                         f"{_f(rate.get('pretrain'), '.0f')} / {_f(rate.get('finetune'), '.0f')} | "
                         f"{r['epochs']} ({r['best_epoch']}) | {r['temperature']:.2f} | "
                         f"{r.get('engine_version', 'before 2026-12-07')} |")
        lines.append("")
        calib = next((r for n, r in sizes.items() if n.startswith("map+particles")
                      and "reliability" in r["test"]), None)
        if calib:
            rows, raw = calib["test"]["reliability"], calib["test"]["uncalibrated"].get("reliability", [])
            lines += ["### Calibration (reliability, `fig_reliability.png`)", "",
                      "Predicted probability mass within X° of the mode (mean over the test particles) against the "
                      f"observed fraction within X° ({calib['checkpoint'].split('/')[-1]}).", "",
                      "| X | predicted, calibrated | predicted, temperature 1 | observed |", "|---|---|---|---|"]
            for r, u in zip(rows, raw or [{}] * len(rows)):
                lines.append(f"| {r['radius_deg']:g}° | {r['predicted']:.3f} | {_f(u.get('predicted'), '.3f')} | "
                             f"{r['observed']:.3f} |")
            lines.append("")
    prior = rel.get("prior", {})
    if prior:
        lines += ["### predict --refine-map (network + deep-prior MMSE) against the global MMSE search", "",
                  "Wall and CPU seconds on the same particles (network inference included in the deep prior's), "
                  f"the fastest of {next(iter(prior.values())).get('repeats', 1)} runs of each taken in turn (the "
                  "machine's speed drifts within minutes); 'other cores' = CPU used by other processes meanwhile.",
                  "",
                  "| case | global MAnE / wMAnE / median | deep prior MAnE / wMAnE / median | global wall s (CPU s) | "
                  "deep prior wall s (CPU s) | falls back | wall ratio | CPU ratio | mean-error ratio | other "
                  "cores | perfect prediction: MAnE, wall ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in prior.items():
            g, d = r["global"], r["deep_prior"]
            lines.append(f"| {name} ({r['snr_note']}) | {g['mane_deg']:.2f} / {g['wmane_deg']:.2f} / "
                         f"{g['median_deg']:.2f} | {d['mane_deg']:.2f} / {d['wmane_deg']:.2f} / "
                         f"{d['median_deg']:.2f} | {g['wall_s']:.1f} ({g['cpu_s']:.1f}) | {d['wall_s']:.1f} "
                         f"({d['cpu_s']:.1f}) | {100 * d['fallback_fraction']:.1f} % | {r['wall_ratio']:.2f} | "
                         f"{r['cpu_ratio']:.2f} | {r['mean_error_ratio']:.3f} | {g['other_cores']:.1f} / "
                         f"{d['other_cores']:.1f} | {_oracle_cell(r)} |")
        lines += ["", "'Perfect prediction': the deep prior seeded by all probability on the true pose's cell of "
                  "the network's grid, without network cost (benchmarks/_deep_relion.py `oracle_prediction`): the "
                  "wall ratio no network can beat at that sampling.", "",
                  "The network alone in those runs (its predicted modes; `predict` without `--refine-map`):", "",
                  "| case | MAnE | wMAnE | median | < 10° | > 30° | > 30° in the most confident 50 % |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in prior.items():
            n = r["deep_prior"]["network"]
            lines.append(f"| {name} | {n['mane_deg']:.1f} | {n['wmane_deg']:.1f} | {n['median_deg']:.1f} | "
                         f"{n['frac_below_10']:.2f} | {n['frac_over_30']:.3f} | {n['frac_over_30_confident_half']:.3f} |")
        name, first = next(iter(prior.items()))
        if "reliability" in first["deep_prior"]["network"]:
            lines += ["", f"Reliability of the network's confidence ({name}): predicted probability mass within X° "
                      "of the mode (mean over the particles) against the observed fraction within X°.", "",
                      "| X | predicted | observed |", "|---|---|---|"]
            lines += [f"| {row['radius_deg']:g}° | {row['predicted']:.3f} | {row['observed']:.3f} |"
                      for row in first["deep_prior"]["network"]["reliability"]]
        lines.append("")
    return lines


def plot_relion(results: dict, out: Path) -> None:
    """fig_reliability.png (calibration of the map+particles networks) and fig_sizes.png (test error against
    training size)."""
    from bayespose.plotting import save_figure
    from bayespose.plotting.deep import plot_reliability

    sizes = results.get("relion", {}).get("sizes", {})
    tables = {}
    for name, r in sizes.items():
        if name.startswith("map") and "reliability" in r["test"]:
            tables[f"{name.replace('_', ' on ')}"] = r["test"]["reliability"]
            if name.startswith("map+particles") and "reliability" in r["test"].get("uncalibrated", {}):
                tables[f"{name.replace('_', ' on ')}, temperature 1"] = r["test"]["uncalibrated"]["reliability"]
    if tables:
        save_figure(plot_reliability(tables, title="reliability on the test particles"), out / "fig_reliability.png",
                    dpi=110)
    if sizes:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.2, 3.8))
        ax = fig.subplots()
        for kind, style in (("particles", "o-"), ("map+particles", "s-")):
            pts = sorted((int(n.split("_")[-1]), r["test"]) for n, r in sizes.items() if n.startswith(kind + "_"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1]["mane_deg"] for p in pts], style, label=f"{kind}: mean")
                ax.plot([p[0] for p in pts], [p[1]["median_deg"] for p in pts], style, alpha=0.5,
                        label=f"{kind}: median")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training particles")
        ax.set_ylabel("test angular error (deg)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "fig_sizes.png", dpi=110)


NOTES_HEADING = "## Notes on this run"


def write_report(results: dict, cfg: Config, out: Path, argv: list[str], seconds: float) -> None:
    """README.md from ``results``; a hand-written part from the ``## Notes on this run`` heading on is kept."""
    runs = results.get("runs") or {"all": {"command": " ".join(argv), "minutes": seconds / 60}}
    commands = "; ".join(f"sections {name}: `.venv/bin/python benchmarks/deep_poses.py {run['command']}` — "
                         f"{run['minutes']:.1f} min" for name, run in runs.items())
    lines = ["# Deep pose prediction: evidence", "",
             f"Commands: {commands} — on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, shared machine (other jobs ran at the same time, timings are indicative).",
             "",
             f"Settings: {json.dumps(asdict(cfg))}. Networks: so3grid = {asdict(train_config(cfg, 'so3grid'))}; "
             f"quaternion = {asdict(train_config(cfg, 'quaternion'))}.", "",
             "Errors are geodesic angles (degrees) between predicted and true RELION poses on half 2 (never seen "
             "in training). Random poses give a median of ~126°.", ""]
    for snr, entry in results.get("halfset", {}).items():
        rt = entry["reconstruction_true_poses"]
        lines += [f"## 1. Half-set evaluation, SNR {snr} (train {entry['n_train_half']}, test "
                  f"{entry['n_test_half']})", "",
                  "| model | MAnE | wMAnE | median | < 10° | reproj. RMSE (random poses) | PCC rec. vs truth "
                  "| FSC 0.5 (Å) | equivariance median | best epoch | train s | median err. low / high conf. half |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model in ("so3grid", "quaternion"):
            m = entry[model]
            lines.append(f"| {model} | {_f(m['mane_deg'])} | {_f(m['wmane_deg'])} | {_f(m['median_deg'])} | "
                         f"{_f(m['frac_below_10'], '.2f')} | {_f(m['reprojection_rmse'], '.3f')} "
                         f"({_f(m['reprojection_rmse_random'], '.3f')}) | "
                         f"{_f(m['reconstruction']['pcc'], '.3f')} | {_f(m['reconstruction']['fsc05_A'])} | "
                         f"{_f(m['equivariance_median_deg'])}° | {m['best_epoch']} | {_f(m['train_s'], '.0f')} | "
                         f"{_f(m['median_error_low_conf_half'])} / {_f(m['median_error_high_conf_half'])} |")
        lines += [f"| true poses | 0 | 0 | 0 | 1 | 0 | {_f(rt['pcc'], '.3f')} | {_f(rt['fsc05_A'])} | | | | |", ""]
        lines += _deep_prior_lines(snr, entry["so3grid"].get("deep_prior"))
    if "symmetry" in results:
        lines += ["## 3. Symmetric map (3J9G ring, exactly C2), SNR 0.1, so3grid", "",
                  "| trained as | median (C2-aware) | MAnE (C2-aware) | < 10° (C2-aware) | median (naive C1) | "
                  "MAnE (naive C1) |", "|---|---|---|---|---|---|"]
        for name, r in results["symmetry"].items():
            a, b = r["errors C2-aware"], r["errors naive C1"]
            lines.append(f"| {name} | {_f(a['median_deg'])} | {_f(a['mane_deg'])} | {_f(a['frac_below_10'], '.2f')} "
                         f"| {_f(b['median_deg'])} | {_f(b['mane_deg'])} |")
        lines.append("")
    lines += _relion_lines(results)
    lines += ["Figures: `fig_errors.png` (error histograms on half 2), `fig_training.png` (validation median "
              "error per epoch), `fig_deep_prior_tradeoff.png` (section 4: mean error against scored rotations "
              "for the fallback rules). All numbers: `results.json`.", ""]
    readme = out / "README.md"
    if readme.is_file() and NOTES_HEADING in readme.read_text():
        old = readme.read_text()
        lines.append(old[old.index(NOTES_HEADING):].rstrip("\n"))
        lines.append("")
    readme.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (a few minutes)")
    parser.add_argument("--sections", default="halfset,symmetry", help="comma list: halfset (incl. equivariance "
                        "and deep prior), symmetry, deep_prior (section 4 alone, reusing --work; updates the "
                        "existing results.json), relion_sizes (issue 12: networks on 400/4000/20000 "
                        "relion_project particles with and without the map), relion_prior (issue 12: predict "
                        "--refine-map against the global search at box 64/128/256 and finer sampling; needs "
                        "relion_sizes' networks in --work); the relion_* sections update results.json")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder for simulated stacks and checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the relion_* sections [2]")
    parser.add_argument("--relion-runs", default="", help="relion_sizes: comma list of the networks to (re)train, "
                        "e.g. map+particles_4000,map_4000 (the others keep their rows in results.json); all when "
                        "empty")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    rcfg = QUICK_RELION if args.quick else RelionConfig()
    if args.threads:
        rcfg = replace(rcfg, threads=args.threads)
    if args.relion_runs:
        rcfg = replace(rcfg, only_runs=tuple(args.relion_runs.split(",")))
    root = Path(__file__).resolve().parent / "results" / "deep"
    out = args.out or (root / "quick" if args.quick else root)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bayespose-deep-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {"config": asdict(cfg)}
    sections = args.sections.split(",")
    unknown = set(sections) - {"halfset", "symmetry", "deep_prior", "relion_sizes", "relion_prior"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    only_deep_prior = "halfset" not in sections and "symmetry" not in sections
    if only_deep_prior and (out / "results.json").is_file():  # update the given sections of the earlier run
        results = json.loads((out / "results.json").read_text())
        results.setdefault("runs", {"halfset,symmetry": {"command": "(earlier run)",
                                                         "minutes": results.get("seconds", 0.0) / 60}})

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    for name, section in (("relion_sizes", section_relion_sizes), ("relion_prior", section_relion_prior)):
        if name in sections:
            started = time.perf_counter()
            section(rcfg, work, results, save)
            results.setdefault("runs", {})[name] = {"command": " ".join(argv),
                                                    "minutes": (time.perf_counter() - started) / 60}
            save()
    if "halfset" in sections:
        section_halfset(cfg, work, results)
    elif "deep_prior" in sections:
        section_deep_prior_only(cfg, work, results)
    if "symmetry" in sections:
        section_symmetry(cfg, work, results)
    seconds = time.perf_counter() - t0
    if only_deep_prior:
        if "deep_prior" in sections:
            results.setdefault("runs", {})["deep_prior"] = {"command": " ".join(argv), "minutes": seconds / 60}
    else:
        results["seconds"] = seconds
        results["runs"] = {args.sections: {"command": " ".join(argv), "minutes": seconds / 60}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if "halfset" in results and all(m in e for e in results["halfset"].values() for m in ("so3grid", "quaternion")):
        plot(results, out)
    plot_tradeoff(results, out)
    plot_relion(results, out)
    write_report(results, cfg, out, argv, seconds)
    print(f"wrote {out} in {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
