#!/usr/bin/env python
"""Evidence for deep pose prediction (issue 5; papers 001, 002, 003) on simulated particles with known poses.

Data: the asymmetric 3J9G fragment (``bayespose.data.fragment_map_path()``, 64³ px, 4.4 Å/px), CTF (defocus
1.0-2.5 µm, astigmatism <= 200 Å), no shifts, uniform poses, SNR as in :mod:`bayespose.core.simulate`.
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
4. ``deep_prior``: deep-prior MMSE (:func:`deep_prior_assign`, cells near the top-8 predicted rotations, prior =
   the predicted distribution) against the global coarse-to-fine MMSE search on half 2: errors, rotations scored
   per particle, wall time.

    .venv/bin/python benchmarks/deep_poses.py --quick     # a few minutes on 2 cores
    .venv/bin/python benchmarks/deep_poses.py             # the full run (~30 min on 2 cores)

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bayespose.core.deep import (TrainConfig, deep_prior_assign, load_pose_network, pose_error_metrics,
                                 predict_poses, reprojection_rmse, train_pose_network)
from bayespose.core.deep.data import inplane_rotation_matrix, rotate_shift_images
from bayespose.core.deep.predict import network_inputs, predict_from_inputs
from bayespose.core.ctf import ctf_2d
from bayespose.core.io.mrc import read_images, read_map
from bayespose.core.posterior import PoseSearch, assign_poses
from bayespose.core.reconstruct import FourierAccumulator, fsc, resolution_at
from bayespose.core.rotations import geodesic_distance_deg
from bayespose.core.simulate_dataset import SimulationSpec, simulate_dataset
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


def simulate(map_path: Path, n: int, snr: float, seed: int, work: Path):
    particles = simulate_dataset(map_path, SimulationSpec(n_particles=n, snr=snr, seed=seed),
                                 work / f"{Path(map_path).stem}_snr{snr}_n{n}")
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
                                     images=images[h1], log=lambda line: print(f"  [{model} {snr}] {line}",
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


def section_deep_prior(cfg: Config, test, images, pred, volume, out: dict) -> None:
    """Deep-prior MMSE vs the global MMSE search on the first ``n_deep_prior`` half-2 particles."""
    sel = np.arange(min(cfg.n_deep_prior, len(test)))
    sub, imgs = test.subset(sel), images[sel]
    sub_pred = _subset_prediction(pred, sel)
    search = PoseSearch(shift_range_px=0.0, threads=1, device="cpu")
    rows = {}
    t0 = time.perf_counter()
    glob = assign_poses(sub, volume, search, images=imgs)
    rows["global MMSE (order 2 + 2 levels)"] = (glob, time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = deep_prior_assign(sub, sub_pred, volume, search, images=imgs, method="cells")
    rows["deep-prior MMSE (cells)"] = (res, time.perf_counter() - t0)
    third = np.arange(max(1, len(sel) // 3))  # the per-particle ball lattices are slow on a CPU: fewer particles
    t0 = time.perf_counter()
    res = deep_prior_assign(sub.subset(third), _subset_prediction(sub_pred, third), volume, search,
                            images=imgs[third], method="balls")
    rows[f"deep-prior MMSE (balls, first {len(third)} particles)"] = (res, time.perf_counter() - t0)
    table = {"network mode": {**pose_error_metrics(sub_pred.rotations, sub.rotations), "rotations": None,
                              "seconds": None}}
    for name, (res, sec) in rows.items():
        rows_idx = third if "balls" in name else sel
        table[name] = {**pose_error_metrics(res.mmse_rotations, sub.rotations[rows_idx]),
                       "rotations": res.timings["scored_rotations_per_particle"], "seconds": sec}
        print(f"    [deep prior] {name}: median {table[name]['median_deg']:.2f}° mean {table[name]['mane_deg']:.2f}° "
              f"rotations/particle {table[name]['rotations']:.0f} {sec:.1f} s", flush=True)
    deep = rows["deep-prior MMSE (cells)"][0]
    table["reconstruction_deep_prior_cells"] = reconstruct_pcc(sub, imgs, deep.mmse_rotations, volume)
    table["reconstruction_global"] = reconstruct_pcc(sub, imgs, glob.mmse_rotations, volume)
    out["deep_prior"] = table


def section_symmetry(cfg: Config, work: Path, results: dict) -> None:
    particles, images = simulate(demo_map_path(), cfg.n_symmetry, 0.1, 77, work)
    h1, h2 = np.flatnonzero(particles.half_set == 1), np.flatnonzero(particles.half_set == 2)
    out = {}
    for sym in ("C2", "C1"):
        res = train_pose_network(particles.subset(h1), train_config(cfg, "so3grid", symmetry=sym),
                                 work / f"ring_{sym}.pt", images=images[h1],
                                 log=lambda line: print(f"  [ring {sym}] {line}", flush=True))
        net = load_pose_network(res.checkpoint, device="cpu")
        pred = predict_poses(net, particles.subset(h2), images=images[h2], device="cpu")
        out[f"trained {sym}"] = {"errors C2-aware": pose_error_metrics(pred.rotations, particles.rotations[h2], "C2"),
                                 "errors naive C1": pose_error_metrics(pred.rotations, particles.rotations[h2], "C1"),
                                 "best_epoch": res.best_epoch}
        print(f"  [ring {sym}] C2-aware median {out[f'trained {sym}']['errors C2-aware']['median_deg']:.1f}, naive "
              f"{out[f'trained {sym}']['errors naive C1']['median_deg']:.1f}", flush=True)
    results["symmetry"] = out


# ------------------------------------------------------------------------------------------------ report
def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = list(results.get("halfset", {}))
    fig, axes = plt.subplots(1, max(len(snrs), 1), figsize=(5 * max(len(snrs), 1), 3.6), squeeze=False)
    for ax, snr in zip(axes[0], snrs):
        for model in ("so3grid", "quaternion"):
            err = np.asarray(results["halfset"][snr][model]["errors"])
            ax.hist(err, bins=np.linspace(0, 180, 37), alpha=0.55, label=f"{model} (median {np.median(err):.0f}°)")
        ax.set_xlabel("angular error on half 2 (deg)")
        ax.set_ylabel("particles")
        ax.set_title(f"SNR {snr}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig_errors.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, max(len(snrs), 1), figsize=(5 * max(len(snrs), 1), 3.6), squeeze=False)
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
    fig.savefig(out / "fig_training.png", dpi=110)
    plt.close(fig)


def _f(x, fmt=".1f"):
    return "—" if x is None else format(x, fmt)


def write_report(results: dict, cfg: Config, out: Path, argv: list[str], seconds: float) -> None:
    lines = ["# Deep pose prediction: evidence", "",
             f"Command: `.venv/bin/python benchmarks/deep_poses.py {' '.join(argv)}` — {seconds / 60:.1f} min on "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
             f"{torch.__version__}, shared machine (other jobs ran at the same time, timings are indicative).", "",
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
        dp = entry["so3grid"].get("deep_prior")
        if dp:
            lines += [f"### 4. Deep-prior MMSE vs global MMSE, SNR {snr} (first {dp['network mode']['n']} test "
                      "particles, so3grid network)", "",
                      "| poses | MAnE | median | < 5° | < 10° | rotations scored / particle | wall s |",
                      "|---|---|---|---|---|---|---|"]
            for name, r in dp.items():
                if name.startswith("reconstruction"):
                    continue
                lines.append(f"| {name} | {_f(r['mane_deg'], '.2f')} | {_f(r['median_deg'], '.2f')} | "
                             f"{_f(r['frac_below_5'], '.2f')} | {_f(r['frac_below_10'], '.2f')} | "
                             f"{_f(r['rotations'], '.0f')} | {_f(r['seconds'])} |")
            lines += ["", f"Reconstruction of those particles: deep-prior MMSE poses PCC "
                      f"{dp['reconstruction_deep_prior_cells']['pcc']:.3f}, global MMSE poses PCC "
                      f"{dp['reconstruction_global']['pcc']:.3f}.", ""]
    if "symmetry" in results:
        lines += ["## 3. Symmetric map (3J9G ring, exactly C2), SNR 0.1, so3grid", "",
                  "| trained as | median (C2-aware) | MAnE (C2-aware) | < 10° (C2-aware) | median (naive C1) | "
                  "MAnE (naive C1) |", "|---|---|---|---|---|---|"]
        for name, r in results["symmetry"].items():
            a, b = r["errors C2-aware"], r["errors naive C1"]
            lines.append(f"| {name} | {_f(a['median_deg'])} | {_f(a['mane_deg'])} | {_f(a['frac_below_10'], '.2f')} "
                         f"| {_f(b['median_deg'])} | {_f(b['mane_deg'])} |")
        lines.append("")
    lines += ["Figures: `fig_errors.png` (error histograms on half 2), `fig_training.png` (validation median "
              "error per epoch). All numbers: `results.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (a few minutes)")
    parser.add_argument("--sections", default="halfset,symmetry", help="comma list: halfset (incl. equivariance "
                        "and deep prior), symmetry")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder for simulated stacks and checkpoints")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    root = Path(__file__).resolve().parent / "results" / "deep"
    out = args.out or (root / "quick" if args.quick else root)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bayespose-deep-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {"config": asdict(cfg)}
    sections = args.sections.split(",")
    if "halfset" in sections:
        section_halfset(cfg, work, results)
    if "symmetry" in sections:
        section_symmetry(cfg, work, results)
    seconds = time.perf_counter() - t0
    results["seconds"] = seconds
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    write_report(results, cfg, out, argv, seconds)
    print(f"wrote {out} in {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
