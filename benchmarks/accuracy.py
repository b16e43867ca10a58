#!/usr/bin/env python
"""Accuracy evidence for MMSE orientation assignment (issue 3, evidence 1 and 2; Xu et al. 2026 Fig. 1-3).

Known poses, the asymmetric 3J9G fragment map (``bayespose.data.fragment_map_path()``, 64³ px, 4.4 Å/px), CTF
(defocus 1.0-2.5 µm, astigmatism <= 200 Å, 300 kV, Cs 2.7 mm, 10 % amplitude contrast), no shifts unless said.
SNR = mean over the particles of the clean (CTF-modulated) image's variance over the whole 64² box divided by the
per-pixel variance of the white Gaussian noise (:mod:`bayespose.core.imaging.simulate`). Errors are geodesic angles in
degrees between estimated and true RELION pose matrices (symmetry-aware, ``symmetric_geodesic_distance_deg``,
for symmetric maps).

Sections (``--sections``, default all):

* ``snr``   MMSE vs MAP vs MLE (uniform prior) vs SNR, particles simulated by bayespose (``simulate_dataset``) and
  independently by RELION (``relion_project --ctf --add_noise --white_noise S``) for the same true poses and CTF;
  plus one row with shifts searched (Xu et al. 2026 Fig. 1, Prop. 2).
* ``prior`` poses drawn from IGSO3(identity, eta_true = 0.5 rad); MMSE/MAP with the uniform, the matched and two
  mismatched (2x, 0.5x eta) IGSO3 priors (Xu et al. 2026 Fig. 2).
* ``grid``  error vs the number L of grid rotations at high SNR for single HEALPix grids of order 0-3
  (``refine_levels=0``), with the engine's information-matched frequency cut-off and at Nyquist, against the
  nearest-grid-node (oracle) error; slope of log error vs log L; where the default coarse-to-fine lands
  (Xu et al. 2026 Fig. 3).
* ``sym``   D2- and C4-symmetrised fragment (``relion_image_handler --sym``): errors with symmetry folding vs the
  C1 fragment, and the unfolded mean (symmetric map assigned as C1) (issue 3 evidence 2).

Outputs (``--out``, default ``benchmarks/results/accuracy``, or ``.../accuracy/quick`` with ``--quick``):
``fig1_snr.png``, ``fig2_prior.png``, ``fig3_grid.png``, ``fig4_symmetry.png``, ``README.md`` (tables, commands,
runtime), ``results.json`` (all numbers). Intermediate particle stacks go to ``--work`` (a temporary folder).

    .venv/bin/python benchmarks/accuracy.py --quick        # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/accuracy.py                # full run, ~15-30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bayespose.core.assign import PoseAssignment, PoseSearch, assign_poses
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.priors import IGSO3Prior, RotationPrior, UniformPrior
from bayespose.core.geometry.rotations import geodesic_distance_deg
from bayespose.core.geometry.symmetry import symmetric_geodesic_distance_deg, symmetry_group
from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.imaging.synthetic_dataset import SimulationSpec, simulate_dataset
from bayespose.core.io.mrc import read_images, read_map, write_map
from bayespose.data import fragment_map_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_relion as rel  # noqa: E402
from _machine import engine_version  # noqa: E402

ESTIMATORS = ("mmse", "map", "mle")
ENGINE_VERSION = "unknown"  # set in main()
REPO = Path(__file__).resolve().parents[1]
SNR_DEFINITION = ("SNR = mean over particles of the clean CTF-modulated image variance (whole 64² box) / "
                  "white-noise variance per pixel")
MAP_TEXT = "3J9G fragment map (bayespose.data.fragment_map_path), 64³ px, 4.4 Å/px, CTF 1.0-2.5 µm"


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class Config:
    """Sizes of the runs. ``n_*``: particles per point; SNRs in bayespose's definition (see module doc)."""

    mode: str
    n_snr: int
    snrs: tuple[float, ...]
    shift_snrs: tuple[float, ...]
    search_snrs: tuple[float, ...]  # low SNRs where the search thoroughness is varied (same particles)
    n_prior: int
    prior_snrs: tuple[float, ...]
    eta_true: float
    n_grid: int
    grid_snrs: tuple[float, ...]
    grid_orders: tuple[int, ...]
    n_sym: int
    sym_snrs: tuple[float, ...]
    sym_groups: tuple[str, ...]
    threads: int = 2
    seeds: dict = field(default_factory=lambda: {"snr": 1, "prior": 2, "grid": 4, "sym": 3})


QUICK = Config(mode="quick", n_snr=200, snrs=(1.0, 0.1, 0.03, 0.01, 0.005), shift_snrs=(0.05,), search_snrs=(),
               n_prior=100, prior_snrs=(0.02, 0.01, 0.005), eta_true=0.5,
               n_grid=100, grid_snrs=(1.0, 10.0), grid_orders=(0, 1, 2, 3),
               n_sym=100, sym_snrs=(1.0, 0.05), sym_groups=("D2", "C4"))
FULL = Config(mode="full", n_snr=500, snrs=(1.0, 0.1, 0.05, 0.03, 0.02, 0.01, 0.007, 0.005),
              shift_snrs=(1.0, 0.05), search_snrs=(0.01, 0.005),
              n_prior=400, prior_snrs=(0.05, 0.02, 0.01, 0.005), eta_true=0.5,
              n_grid=200, grid_snrs=(1.0, 10.0), grid_orders=(0, 1, 2, 3, 4),
              n_sym=300, sym_snrs=(1.0, 0.1, 0.03), sym_groups=("D2", "C4"))


# ------------------------------------------------------------------------------------------------ metrics
def error_summary(err_deg: np.ndarray) -> dict:
    """Mean / median / 90th percentile geodesic error (deg), fraction under 5/10/15 deg, and the mean squared
    chordal (Frobenius) error ``8 sin²(θ/2)`` that the MMSE estimator minimises (Xu et al. 2026 sec. 2.2.3)."""
    e = np.asarray(err_deg, dtype=np.float64)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "frac5": float((e < 5).mean()), "frac10": float((e < 10).mean()), "frac15": float((e < 15).mean()),
            "chordal_mse": float(np.mean(8.0 * np.sin(np.radians(e) / 2.0) ** 2)), "n": int(len(e))}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of ``a - b`` over particles with its standard error (same particles, so the noise cancels)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0}


def pose_errors(truth: np.ndarray, result: PoseAssignment, group: np.ndarray | None = None) -> dict:
    """Per-particle error (deg) of each estimator; symmetry-aware when ``group`` has more than one element."""
    out = {}
    for name in ESTIMATORS:
        est = result.poses(name)[0]
        if group is None or len(group) == 1:
            out[name] = geodesic_distance_deg(truth, est)
        else:
            out[name] = symmetric_geodesic_distance_deg(truth, est, group)
    return out


def nearest_node_error(truth: np.ndarray, order: int, group: np.ndarray | None = None) -> np.ndarray:
    """Geodesic distance (deg) from each true pose to the nearest node of the HEALPix grid of ``order`` (the best
    any estimator restricted to that grid can do)."""
    grid = healpix_grid(order).rotations
    mates = truth[:, None] if group is None else np.einsum("nij,gjk->ngik", truth, group)  # (N, G, 3, 3)
    best = np.full(len(truth), -np.inf)
    for start in range(0, len(grid), 20000):
        tr = np.einsum("ngij,kij->ngk", mates, grid[start:start + 20000]).max(axis=(1, 2))
        best = np.maximum(best, tr)
    return np.degrees(np.arccos(np.clip((best - 1.0) / 2.0, -1.0, 1.0)))


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One assignment: what was run, its per-particle errors and summaries."""

    section: str
    label: dict
    errors: dict  # estimator -> (N,) deg
    seconds: float
    concentration: float
    expected_error_deg: float
    n_rotations: int
    radii_px: list
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"section": self.section, **self.label, "seconds": self.seconds,
                "mean_concentration": self.concentration, "mean_expected_error_deg": self.expected_error_deg,
                "n_rotations": self.n_rotations, "radii_px": self.radii_px, **self.extra,
                **{name: error_summary(e) for name, e in self.errors.items()},
                "mle_minus_mmse": paired(self.errors["mle"], self.errors["mmse"]),
                "map_minus_mmse": paired(self.errors["map"], self.errors["mmse"])}


def assign(particles: ParticleSet, images: np.ndarray, volume: np.ndarray, search: PoseSearch,
           prior: RotationPrior | None = None) -> tuple[PoseAssignment, float]:
    t0 = time.perf_counter()
    result = assign_poses(particles, volume, search, prior=prior, images=images)
    return result, time.perf_counter() - t0


def make_run(section: str, label: dict, truth: ParticleSet, result: PoseAssignment, seconds: float,
             group: np.ndarray | None = None, extra: dict | None = None) -> Run:
    extra = dict(extra or {})
    gap = (geodesic_distance_deg(result.mmse_rotations, result.map_rotations) if group is None or len(group) == 1
           else symmetric_geodesic_distance_deg(result.mmse_rotations, result.map_rotations, group))
    extra["mmse_map_gap_deg"] = {"mean": float(gap.mean()), "p90": float(np.percentile(gap, 90))}
    run = Run(section, label, pose_errors(truth.rotations, result, group), seconds,
              float(result.concentration.mean()), float(result.expected_error_deg.mean()), result.n_rotations,
              [round(float(r), 2) for r in result.timings.get("radii_px", [])], extra)
    s = run.summary()
    text = " ".join(f"{k}={v}" for k, v in label.items())
    print(f"  [{section}] {text}: " + "  ".join(
        f"{name} {s[name]['mean']:6.2f}/{s[name]['median']:5.2f}" for name in ESTIMATORS)
        + f"  (mean/median deg; conc {run.concentration:.2f}; {seconds:.1f} s; radii {run.radii_px})", flush=True)
    return run


def ours(map_path: Path, n: int, snr: float | None, seed: int, work: Path, pose_distribution: str = "uniform",
         max_shift_px: float = 0.0) -> tuple[ParticleSet, np.ndarray]:
    """bayespose-simulated particles (same seed -> same poses and CTF at every SNR) and their images."""
    tag = f"{Path(map_path).stem}_n{n}_snr{snr}_s{seed}_{pose_distribution.replace(':', '')}_sh{max_shift_px:g}"
    particles = simulate_dataset(map_path, SimulationSpec(n_particles=n, snr=snr, seed=seed,
                                                          pose_distribution=pose_distribution,
                                                          max_shift_px=max_shift_px), work / tag)
    return particles, read_images(particles)


def default_search(cfg: Config, **kw) -> PoseSearch:
    """The engine's defaults (HEALPix order 2 = 15°, 4608 rotations, + 2 coarse-to-fine levels -> 3.75°), no shift
    search unless given, ``cfg.threads`` CPU threads."""
    kw.setdefault("shift_range_px", 0.0)
    return PoseSearch(threads=cfg.threads, device="cpu", **kw)


# -- section 1: SNR ---------------------------------------------------------------------------------------------
def section_snr(cfg: Config, work: Path, use_relion: bool) -> list[Run]:
    print(f"== SNR sweep (uniform prior, N = {cfg.n_snr}) ==", flush=True)
    frag = fragment_map_path()
    volume, _ = read_map(frag)
    seed = cfg.seeds["snr"]
    truth, _ = ours(frag, cfg.n_snr, None, seed, work)
    truth_star = Path(truth.image_files[0]).parent / "particles.star"
    runs = []
    for snr in cfg.snrs:
        particles, images = ours(frag, cfg.n_snr, snr, seed, work)
        assert np.allclose(particles.rotations, truth.rotations)
        result, sec = assign(particles, images, volume, default_search(cfg))
        runs.append(make_run("snr", {"source": "bayespose", "snr": snr}, truth, result, sec))
        if use_relion:
            data = rel.relion_dataset(frag, truth_star, truth, snr, work / "relion_snr")
            result, sec = assign(data.particles, data.images, volume, default_search(cfg))
            runs.append(make_run("snr", {"source": "relion_project", "snr": snr}, truth, result, sec,
                                 extra={"measured_snr": data.snr, "white_noise": data.white_noise}))
    for snr in cfg.shift_snrs:  # with shifts: origins uniform in [-2, 2] px, searched within 3 px, step 1 px
        particles, images = ours(frag, cfg.n_snr, snr, seed, work, max_shift_px=2.0)
        result, sec = assign(particles, images, volume, default_search(cfg, shift_range_px=3.0, shift_step_px=1.0))
        shift_err = {name: error_summary(np.linalg.norm(result.poses(name)[1] - particles.origins_A, axis=1)
                                         / particles.pixel_size) for name in ESTIMATORS}
        runs.append(make_run("snr_shift", {"source": "bayespose", "snr": snr, "shifts": "±2 px, search 3 px"},
                             particles, result, sec, extra={"shift_error_px": shift_err}))
    for snr in cfg.search_snrs:  # the same particles as the sweep, searched more thoroughly than the default
        particles, images = ours(frag, cfg.n_snr, snr, seed, work)
        for name, kw in SEARCH_VARIANTS:
            result, sec = assign(particles, images, volume, default_search(cfg, **kw))
            runs.append(make_run("snr_search", {"source": "bayespose", "snr": snr, "search": name}, particles,
                                 result, sec))
    return runs


SEARCH_VARIANTS = (("order 3 + 1 level", {"healpix_order": 3, "refine_levels": 1}),
                   ("order 2 + 2 levels, refine_max_cells 1024", {"refine_max_cells": 1024}),
                   ("order 3 + 1 level, refine_max_cells 1024",
                    {"healpix_order": 3, "refine_levels": 1, "refine_max_cells": 1024}))


# -- section 2: prior -------------------------------------------------------------------------------------------
def section_prior(cfg: Config, work: Path) -> list[Run]:
    eta = cfg.eta_true
    print(f"== prior (poses ~ IGSO3(I, {eta} rad), N = {cfg.n_prior}) ==", flush=True)
    frag = fragment_map_path()
    volume, _ = read_map(frag)
    priors = [("uniform", UniformPrior()), (f"igso3:{eta:g} (matched)", IGSO3Prior(np.eye(3), eta)),
              (f"igso3:{2 * eta:g} (2x)", IGSO3Prior(np.eye(3), 2 * eta)),
              (f"igso3:{eta / 2:g} (0.5x)", IGSO3Prior(np.eye(3), eta / 2))]
    runs = []
    for snr in cfg.prior_snrs:
        particles, images = ours(frag, cfg.n_prior, snr, cfg.seeds["prior"], work, pose_distribution=f"igso3:{eta}")
        for name, prior in priors:
            result, sec = assign(particles, images, volume, default_search(cfg), prior=prior)
            runs.append(make_run("prior", {"snr": snr, "prior": name}, particles, result, sec))
    return runs


# -- section 3: grid size ---------------------------------------------------------------------------------------
def section_grid(cfg: Config, work: Path) -> tuple[list[Run], dict]:
    print(f"== grid size (N = {cfg.n_grid}) ==", flush=True)
    frag = fragment_map_path()
    volume, _ = read_map(frag)
    runs = []
    truth = None
    for snr in cfg.grid_snrs:
        particles, images = ours(frag, cfg.n_grid, snr, cfg.seeds["grid"], work)
        truth = particles
        for order in cfg.grid_orders:
            for cutoff, nats in (("information-matched (default)", 30.0), ("Nyquist", math.inf)):
                search = default_search(cfg, healpix_order=order, refine_levels=0, smoothness_nats=nats)
                result, sec = assign(particles, images, volume, search)
                runs.append(make_run("grid", {"snr": snr, "order": order, "levels": 0, "cutoff": cutoff,
                                              "L": len(healpix_grid(order))}, particles, result, sec))
        for order, levels in ((2, 2), (3, 1)):  # the default coarse-to-fine, and one starting finer
            for cutoff, nats in (("information-matched (default)", 30.0), ("Nyquist", math.inf)):
                search = default_search(cfg, healpix_order=order, refine_levels=levels, smoothness_nats=nats)
                result, sec = assign(particles, images, volume, search)
                runs.append(make_run("grid", {"snr": snr, "order": order, "levels": levels, "cutoff": cutoff,
                                              "L": len(healpix_grid(order + levels))}, particles, result, sec,
                                     extra={"note": "coarse-to-fine: L is the final (order 4) grid size"}))
    oracle = {int(o): error_summary(nearest_node_error(truth.rotations, o)) for o in (*cfg.grid_orders, 4)}
    for o, s in oracle.items():
        print(f"  [grid] nearest node of order {o} (L = {len(healpix_grid(o))}): mean {s['mean']:.2f} deg, "
              f"median {s['median']:.2f}", flush=True)
    return runs, oracle


def slope(orders, errors) -> float:
    """Least-squares slope of log(error) against log(L), L = 72 · 8^order."""
    x = np.log([72.0 * 8 ** o for o in orders])
    return float(np.polyfit(x, np.log(errors), 1)[0])


# -- section 4: symmetry ----------------------------------------------------------------------------------------
def c4_numpy(volume: np.ndarray) -> np.ndarray:
    """C4 (axis z) symmetrisation by exact 90° index rotations (fallback when RELION is absent)."""
    d = volume.shape[0]
    iy, ix = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    out = volume.astype(np.float64).copy()
    v = volume
    for _ in range(3):  # V'(x, y, z) = V(-y, x, z): vol'[z, iy, ix] = vol[z, ix, -iy mod d]
        v = v[:, ix, (-iy) % d]
        out += v
    return (out / 4).astype(np.float32)


def section_sym(cfg: Config, work: Path, use_relion: bool) -> tuple[list[Run], dict]:
    print(f"== symmetry (N = {cfg.n_sym}) ==", flush=True)
    frag = fragment_map_path()
    frag_volume, px = read_map(frag)
    maps = {"C1": (frag, frag_volume)}
    invariance = {}
    for sym in cfg.sym_groups:
        path = work / f"fragment_{sym}.mrc"
        if use_relion:
            vol = rel.relion_symmetrise(frag, path, sym)
            made = "relion_image_handler --sym " + sym
        elif sym == "C4":
            vol = c4_numpy(frag_volume)
            write_map(path, vol, px)
            made = "numpy 90° index rotations (RELION absent)"
        else:
            print(f"  skipping {sym}: relion_image_handler not available", flush=True)
            continue
        group = symmetry_group(sym)
        corr = rel.invariance_correlations(vol, group)
        corr_frag = rel.invariance_correlations(frag_volume, group)
        invariance[sym] = {"made_with": made, "min_corr_symmetrised": float(corr.min()),
                           "max_corr_fragment_non_identity": float(np.max(corr_frag[1:]))}
        print(f"  {sym} map ({made}): correlation with itself under bayespose's {len(group)} group matrices "
              f">= {corr.min():.4f} (unsymmetrised fragment: <= {np.max(corr_frag[1:]):.3f})", flush=True)
        maps[sym] = (path, vol)
    runs = []
    for snr in cfg.sym_snrs:
        for sym, (path, vol) in maps.items():
            particles, images = ours(path, cfg.n_sym, snr, cfg.seeds["sym"], work)
            group = symmetry_group(sym)
            result, sec = assign(particles, images, vol, default_search(cfg, symmetry=sym))
            runs.append(make_run("sym", {"snr": snr, "map": sym, "search_symmetry": sym}, particles, result, sec,
                                 group=group))
            if sym != "C1":  # the unfolded mean: symmetric map, C1 search; errors still measured up to symmetry
                result, sec = assign(particles, images, vol, default_search(cfg, symmetry="C1"))
                runs.append(make_run("sym", {"snr": snr, "map": sym, "search_symmetry": "C1 (unfolded)"},
                                     particles, result, sec, group=group))
    return runs, invariance


# ------------------------------------------------------------------------------------------------ plots
def _plain_ticks(ax, xticks=None) -> None:
    """Plain-number tick labels on log axes (``xticks``: put major x ticks exactly there)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=45)
    if ax.get_yscale() == "log":
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())


def _footer(fig, text: str) -> None:
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom", ha="left", wrap=True)


def plot_snr(runs: list[Run], cfg: Config, out: Path) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    sources = sorted({r.label["source"] for r in runs if r.section == "snr"}, key=lambda s: s != "bayespose")
    fig = Figure(figsize=(11, 4.0 * len(sources)))
    axes = fig.subplots(len(sources), 2, squeeze=False)
    colors = {"mmse": "C0", "map": "C1", "mle": "C2"}
    for row, source in enumerate(sources):
        rs = sorted([r for r in runs if r.section == "snr" and r.label["source"] == source], key=lambda r: r.label["snr"])
        snr = [r.label["snr"] for r in rs]
        ax = axes[row, 0]
        for name in ("mmse", "mle"):  # MAP = MLE under the uniform prior
            ax.plot(snr, [error_summary(r.errors[name])["mean"] for r in rs], "o-", color=colors[name],
                    label=f"{name.upper()} mean" + (" (= MAP, uniform prior)" if name == "mle" else ""))
            ax.plot(snr, [error_summary(r.errors[name])["median"] for r in rs], "s--", color=colors[name],
                    alpha=0.6, label=f"{name.upper()} median")
        ax.axhline(3.75, color="grey", lw=0.8, ls=":", label="final grid step 3.75°")
        ax.set(xscale="log", yscale="log", xlabel="SNR", ylabel="geodesic error (deg)",
               title=f"{source}: error vs SNR (uniform prior)")
        _plain_ticks(ax, snr)
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        d = [paired(r.errors["mle"], r.errors["mmse"]) for r in rs]
        ax.errorbar(snr, [x["mean"] for x in d], yerr=[2 * x["se"] for x in d], fmt="o-", color="C2",
                    capsize=3, label="MLE − MMSE geodesic error (mean ± 2 SE)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="SNR", ylabel="paired error difference (deg)",
               title=f"{source}: MLE − MMSE (> 0: MMSE better)")
        _plain_ticks(ax, snr)
        ax.legend(fontsize=7)
    _footer(fig, f"{MAP_TEXT}; N = {cfg.n_snr} particles per point (same poses/CTF at every SNR, seed "
                 f"{cfg.seeds['snr']}); no shifts. {SNR_DEFINITION}. Grid: HEALPix order 2 (15°, 4608 rotations) "
                 "+ 2 coarse-to-fine levels (final 3.75°), uniform prior.")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, out / "fig1_snr.png", dpi=120)


def plot_prior(runs: list[Run], cfg: Config, out: Path) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    rs = [r for r in runs if r.section == "prior"]
    priors = list(dict.fromkeys(r.label["prior"] for r in rs))
    snrs = sorted({r.label["snr"] for r in rs})
    fig = Figure(figsize=(11, 4.3))
    axes = fig.subplots(1, 2)
    for i, prior in enumerate(priors):
        sel = sorted([r for r in rs if r.label["prior"] == prior], key=lambda r: r.label["snr"])
        for ax, stat in zip(axes, ("mean", "median")):
            ax.plot(snrs, [error_summary(r.errors["mmse"])[stat] for r in sel], "o-", color=f"C{i}",
                    label=f"MMSE, prior {prior}")
            ax.plot(snrs, [error_summary(r.errors["map"])[stat] for r in sel], "s--", color=f"C{i}", alpha=0.6,
                    label=f"MAP, prior {prior}")
    uni = sorted([r for r in rs if r.label["prior"] == "uniform"], key=lambda r: r.label["snr"])
    for ax, stat in zip(axes, ("mean", "median")):
        ax.plot(snrs, [error_summary(r.errors["mle"])[stat] for r in uni], "k^:", label="MLE (uniform-prior run)")
        ax.set(xscale="log", yscale="log", xlabel="SNR", ylabel=f"{stat} geodesic error (deg)",
               title=f"{stat} error, true poses ~ IGSO3(I, η = {cfg.eta_true} rad)")
        _plain_ticks(ax, snrs)
    axes[0].legend(fontsize=6)
    _footer(fig, f"{MAP_TEXT}; N = {cfg.n_prior} particles per point (seed {cfg.seeds['prior']}), poses from "
                 f"IGSO3 around the identity with η = {cfg.eta_true} rad. {SNR_DEFINITION}. Grid: HEALPix order "
                 "2 + 2 coarse-to-fine levels (final 3.75°); no shifts.")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out / "fig2_prior.png", dpi=120)


def plot_grid(runs: list[Run], oracle: dict, cfg: Config, out: Path) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    rs = [r for r in runs if r.section == "grid"]
    snrs = sorted({r.label["snr"] for r in rs})
    fig = Figure(figsize=(5.8 * len(snrs), 4.8))
    axes = fig.subplots(1, len(snrs), squeeze=False)
    o_orders = sorted(oracle)
    for ax, snr in zip(axes[0], snrs):
        for stat, fmt in (("mean", "k^-"), ("median", "k^:")):
            vals = [oracle[o][stat] for o in o_orders]
            ax.plot([72 * 8 ** o for o in o_orders], vals, fmt, alpha=0.7,
                    label=f"nearest grid node (oracle) {stat}: slope {slope(o_orders, vals):.2f}")
        for i, cutoff in enumerate(("Nyquist", "information-matched (default)")):
            single = sorted([r for r in rs if r.label["snr"] == snr and r.label["levels"] == 0
                             and r.label["cutoff"] == cutoff], key=lambda r: r.label["order"])
            orders = [r.label["order"] for r in single]
            for stat, fmt in (("mean", "o-"), ("median", "s--")):
                errs = [error_summary(r.errors["mmse"])[stat] for r in single]
                fit = [(o, e) for o, e in zip(orders, errs) if o >= 1]
                s = slope([o for o, _ in fit], [e for _, e in fit]) if len(fit) >= 2 else float("nan")
                ax.plot([72 * 8 ** o for o in orders], errs, fmt, color=f"C{i}",
                        label=f"MMSE {stat}, single grid, {cutoff}: slope (orders 1-{max(orders)}) {s:.2f}")
            for r in rs:
                if r.label["snr"] == snr and r.label["levels"] > 0 and r.label["cutoff"] == cutoff:
                    o, lv = r.label["order"], r.label["levels"]
                    for stat, marker in (("mean", "*" if o == 2 else "D"), ("median", "P" if o == 2 else "X")):
                        ax.plot([r.label["L"] * (1.0 if o == 2 else 1.25)], [error_summary(r.errors["mmse"])[stat]],
                                marker, ms=12 if o == 2 else 8, color=f"C{i}", mec="k",
                                label=f"MMSE {stat}, order {o} + {lv} level(s), {cutoff}")
        ax.set(xscale="log", yscale="log", xlabel="L (grid rotations; coarse-to-fine: final-grid size)",
               ylabel="geodesic error (deg)", title=f"SNR {snr:g}: MMSE error vs grid size")
        _plain_ticks(ax)
        ax.legend(fontsize=5.5)
    _footer(fig, f"{MAP_TEXT}; N = {cfg.n_grid} particles (seed {cfg.seeds['grid']}), uniform poses and prior, "
                 f"no shifts. {SNR_DEFINITION}. Single HEALPix grids L = 72·8^order (orders "
                 f"{min(cfg.grid_orders)}-{max(cfg.grid_orders)}), refine_levels = 0. Expected slope -1/3.")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out / "fig3_grid.png", dpi=120)


def plot_sym(runs: list[Run], cfg: Config, out: Path) -> None:
    from matplotlib.figure import Figure

    from bayespose.plotting import save_figure

    rs = [r for r in runs if r.section == "sym"]
    snrs = sorted({r.label["snr"] for r in rs}, reverse=True)
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    cases = list(dict.fromkeys((r.label["map"], r.label["search_symmetry"]) for r in rs))
    width = 0.8 / len(cases)
    x = np.arange(len(snrs))
    for i, case in enumerate(cases):
        sel = {r.label["snr"]: r for r in rs if (r.label["map"], r.label["search_symmetry"]) == case}
        for ax, name in zip(axes, ("mmse", "map")):
            vals = [error_summary(sel[s].errors[name])["mean"] if s in sel else np.nan for s in snrs]
            ax.bar(x + (i - (len(cases) - 1) / 2) * width, vals, width, color=f"C{i}",
                   label=f"map {case[0]}, search {case[1]}")
    for ax, name in zip(axes, ("MMSE", "MAP")):
        ax.set(xticks=x, xticklabels=[f"SNR {s:g}" for s in snrs],
               ylabel="mean symmetry-aware geodesic error (deg)", title=f"{name}: symmetric maps")
        ax.legend(fontsize=7)
    _footer(fig, f"3J9G fragment (C1) and its D2 / C4 symmetrisations (relion_image_handler --sym), 64³ px, 4.4 Å/px,"
                 f" CTF; N = {cfg.n_sym} particles per bar (seed {cfg.seeds['sym']}), uniform poses. "
                 f"{SNR_DEFINITION}. Grid: HEALPix order 2 + 2 levels. Errors: min over symmetry mates.")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out / "fig4_symmetry.png", dpi=120)


# ------------------------------------------------------------------------------------------------ report
def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(s: dict) -> str:
    return f"{s['mean']:.2f} / {s['median']:.2f}"


def table_snr(runs: list[Run]) -> list[str]:
    lines = [_row(["source", "SNR", "MMSE mean / median", "MAP mean / median", "MLE mean / median",
                   "MLE − MMSE (± SE)", "MMSE <5° / <10° / <15°", "MLE <5° / <10° / <15°",
                   "chordal MSE MMSE / MLE", "MMSE–MAP gap mean / p90", "conc.", "post. expected error", "s"]),
             _row(["---"] * 13)]
    for r in sorted([r for r in runs if r.section == "snr"], key=lambda r: (r.label["source"] != "bayespose",
                                                                            -r.label["snr"])):
        s = r.summary()
        m, l = s["mmse"], s["mle"]
        lines.append(_row([r.label["source"], f"{r.label['snr']:g}", _fmt(m), _fmt(s["map"]), _fmt(l),
                           f"{s['mle_minus_mmse']['mean']:+.2f} ± {s['mle_minus_mmse']['se']:.2f}",
                           f"{m['frac5']:.2f} / {m['frac10']:.2f} / {m['frac15']:.2f}",
                           f"{l['frac5']:.2f} / {l['frac10']:.2f} / {l['frac15']:.2f}",
                           f"{m['chordal_mse']:.4f} / {l['chordal_mse']:.4f}",
                           f"{r.extra['mmse_map_gap_deg']['mean']:.2f} / {r.extra['mmse_map_gap_deg']['p90']:.2f}",
                           f"{r.concentration:.2f}", f"{r.expected_error_deg:.2f}", f"{r.seconds:.1f}"]))
    search_runs = [r for r in runs if r.section == "snr_search"]
    if search_runs:
        lines += ["", "Search thoroughness at low SNR (bayespose particles of the sweep above; the default row is the "
                  "sweep's): a finer first grid or refining particles with up to 1024 significant cells (default "
                  "128; particles above it keep their 15° coarse result) changes MLE as much as MMSE:", "",
                  _row(["SNR", "search", "MMSE mean / median", "MLE mean / median", "MLE − MMSE (± SE)",
                        "chordal MSE MMSE / MLE", "post. expected error", "s"]), _row(["---"] * 8)]
        for snr in sorted({r.label["snr"] for r in search_runs}, reverse=True):
            default = [r for r in runs if r.section == "snr" and r.label["source"] == "bayespose"
                       and r.label["snr"] == snr]
            for r in default + [r for r in search_runs if r.label["snr"] == snr]:
                s = r.summary()
                lines.append(_row([f"{snr:g}", r.label.get("search", "default (order 2 + 2 levels)"),
                                   _fmt(s["mmse"]), _fmt(s["mle"]),
                                   f"{s['mle_minus_mmse']['mean']:+.2f} ± {s['mle_minus_mmse']['se']:.2f}",
                                   f"{s['mmse']['chordal_mse']:.4f} / {s['mle']['chordal_mse']:.4f}",
                                   f"{r.expected_error_deg:.2f}", f"{r.seconds:.1f}"]))
    shift_runs = [r for r in runs if r.section == "snr_shift"]
    if shift_runs:
        lines += ["", "With shifts (true origins uniform in ±2 px per axis; searched on a 1 px lattice within 3 px "
                  "— 29 shifts):", "",
                  _row(["SNR", "rotation MMSE / MAP / MLE mean (deg)", "origin error MMSE / MAP / MLE mean (px)",
                        "s"]), _row(["---"] * 4)]
        for r in shift_runs:
            s = r.summary()
            se = r.extra["shift_error_px"]
            lines.append(_row([f"{r.label['snr']:g}", " / ".join(f"{s[n]['mean']:.2f}" for n in ESTIMATORS),
                               " / ".join(f"{se[n]['mean']:.2f}" for n in ESTIMATORS), f"{r.seconds:.1f}"]))
    return lines


def table_prior(runs: list[Run]) -> list[str]:
    lines = [_row(["SNR", "prior", "MMSE mean / median", "MAP mean / median", "MLE (this run) mean / median",
                   "MMSE <5° / <10° / <15°", "conc.", "s"]), _row(["---"] * 8)]
    for r in sorted([r for r in runs if r.section == "prior"], key=lambda r: -r.label["snr"]):
        s = r.summary()
        m = s["mmse"]
        lines.append(_row([f"{r.label['snr']:g}", r.label["prior"], _fmt(m), _fmt(s["map"]), _fmt(s["mle"]),
                           f"{m['frac5']:.2f} / {m['frac10']:.2f} / {m['frac15']:.2f}", f"{r.concentration:.2f}",
                           f"{r.seconds:.1f}"]))
    return lines


def table_grid(runs: list[Run], oracle: dict) -> list[str]:
    lines = [_row(["SNR", "grid", "L", "cut-off", "radii (px)", "MMSE mean / median", "MAP mean / median",
                   "MLE mean / median", "nearest node mean / median", "s"]), _row(["---"] * 10)]
    for r in sorted([r for r in runs if r.section == "grid"], key=lambda r: (r.label["snr"], r.label["cutoff"],
                                                                             r.label["levels"], r.label["order"])):
        s = r.summary()
        grid = f"order {r.label['order']}" + (f" + {r.label['levels']} levels" if r.label["levels"] else "")
        final = r.label["order"] + r.label["levels"]
        o = oracle.get(final)
        lines.append(_row([f"{r.label['snr']:g}", grid, r.label["L"], r.label["cutoff"], r.radii_px, _fmt(s["mmse"]),
                           _fmt(s["map"]), _fmt(s["mle"]), _fmt(o) if o else "", f"{r.seconds:.1f}"]))
    top = max(single_orders(runs))
    lines += ["", "Slopes of log(error) vs log(L), single grids (order 0 left out of the fits: its 60° grid is "
              "coarser than the map's pose ambiguities):", "",
              _row(["SNR", "cut-off", "estimator", f"mean, orders 1-{top}", f"median, orders 1-{top}",
                    f"mean, orders 2-{top}", f"median, orders 2-{top}"]), _row(["---"] * 7)]
    for snr in sorted({r.label["snr"] for r in runs if r.section == "grid"}):
        for cutoff in ("Nyquist", "information-matched (default)"):
            single = sorted([r for r in runs if r.section == "grid" and r.label["snr"] == snr
                             and r.label["levels"] == 0 and r.label["cutoff"] == cutoff], key=lambda r: r.label["order"])
            for name in ("mmse", "mle"):
                cells = []
                for lo in (1, 2):
                    for stat in ("mean", "median"):
                        sub = [(r.label["order"], error_summary(r.errors[name])[stat]) for r in single
                               if r.label["order"] >= lo]
                        cells.append(f"{slope(*zip(*sub)):.2f}" if len(sub) >= 2 else "")
                lines.append(_row([f"{snr:g}", cutoff, name.upper(), cells[0], cells[1], cells[2], cells[3]]))
    cells = []
    for lo in (1, 2):
        for stat in ("mean", "median"):
            sub = [o for o in sorted(oracle) if lo <= o <= max(single_orders(runs))]
            cells.append(f"{slope(sub, [oracle[o][stat] for o in sub]):.2f}" if len(sub) >= 2 else "")
    lines.append(_row(["—", "nearest grid node (oracle)", "—", *cells]))
    return lines


def single_orders(runs: list[Run]) -> list[int]:
    return sorted({r.label["order"] for r in runs if r.section == "grid" and r.label["levels"] == 0})


def table_sym(runs: list[Run], invariance: dict) -> list[str]:
    lines = []
    for sym, inv in invariance.items():
        lines.append(f"- {sym} map made with `{inv['made_with']}`: correlation with itself rotated by each of "
                     f"bayespose's {sym} matrices >= {inv['min_corr_symmetrised']:.4f} (the unsymmetrised fragment: "
                     f"<= {inv['max_corr_fragment_non_identity']:.3f})")
    lines += ["", _row(["SNR", "map", "search symmetry", "MMSE mean / median", "MAP mean / median",
                        "MLE mean / median", "MMSE <10°", "conc.", "expected error (deg)", "s"]),
              _row(["---"] * 10)]
    for r in sorted([r for r in runs if r.section == "sym"], key=lambda r: -r.label["snr"]):
        s = r.summary()
        lines.append(_row([f"{r.label['snr']:g}", r.label["map"], r.label["search_symmetry"], _fmt(s["mmse"]),
                           _fmt(s["map"]), _fmt(s["mle"]), f"{s['mmse']['frac10']:.2f}", f"{r.concentration:.2f}",
                           f"{r.expected_error_deg:.1f}", f"{r.seconds:.1f}"]))
    return lines


def summary_lines(runs: list[Run], oracle: dict, cfg: Config) -> list[str]:
    """A few numbers read off the tables below (computed, not typed in)."""
    lines = []
    sweep = [r for r in runs if r.section == "snr"]
    for source in sorted({r.label["source"] for r in sweep}, key=lambda x: x != "bayespose"):
        rs = sorted([r for r in sweep if r.label["source"] == source], key=lambda r: -r.label["snr"])
        high = [r for r in rs if r.label["snr"] >= 0.1]
        if high:
            lines.append(f"- {source}, SNR >= 0.1: MMSE and MAP/MLE coincide up to the grid (Xu et al. 2026 Prop. 2): mean "
                         "geodesic gap MMSE–MAP " + ", ".join(f"{r.extra['mmse_map_gap_deg']['mean']:.2f}° (SNR "
                                                              f"{r.label['snr']:g})" for r in high)
                         + " against a final grid step of 3.75°; mean errors " + ", ".join(
                             f"{error_summary(r.errors['mmse'])['mean']:.2f}° vs {error_summary(r.errors['mle'])['mean']:.2f}°"
                             for r in high) + " (MMSE vs MLE).")
        lines.append(f"- {source}, MMSE's paired gain over MLE in mean geodesic error (MLE − MMSE ± SE, deg): "
                     + ", ".join(f"SNR {r.label['snr']:g}: {paired(r.errors['mle'], r.errors['mmse'])['mean']:+.2f} ± "
                                 f"{paired(r.errors['mle'], r.errors['mmse'])['se']:.2f}" for r in rs) + ".")
    prior = [r for r in runs if r.section == "prior"]
    if prior:
        low = min(r.label["snr"] for r in prior)
        at = {r.label["prior"]: error_summary(r.errors["mmse"])["mean"] for r in prior if r.label["snr"] == low}
        lines.append(f"- Prior (poses ~ IGSO3, η = {cfg.eta_true}), SNR {low:g}, MMSE mean error: " +
                     ", ".join(f"{k} {v:.1f}°" for k, v in at.items()) + ".")
    grid = [r for r in runs if r.section == "grid" and r.label["levels"] == 0 and r.label["cutoff"] == "Nyquist"]
    for snr in sorted({r.label["snr"] for r in grid}):
        sel = sorted([r for r in grid if r.label["snr"] == snr and r.label["order"] >= 1], key=lambda r: r.label["order"])
        oo = [o for o in sorted(oracle) if 1 <= o <= (sel[-1].label["order"] if sel else 0)]
        if len(sel) >= 2:
            med = slope([r.label["order"] for r in sel], [error_summary(r.errors["mmse"])["median"] for r in sel])
            mean = slope([r.label["order"] for r in sel], [error_summary(r.errors["mmse"])["mean"] for r in sel])
            lines.append(f"- Grid, SNR {snr:g}, single grids scored at Nyquist, orders 1-{sel[-1].label['order']}: "
                         f"slope of log MMSE error vs log L = {med:.2f} (median), {mean:.2f} (mean); nearest node "
                         f"{slope(oo, [oracle[o]['median'] for o in oo]):.2f}; "
                         "expected -1/3.")
    sym = [r for r in runs if r.section == "sym"]
    for snr in sorted({r.label["snr"] for r in sym}, reverse=True):
        at = {(r.label["map"], r.label["search_symmetry"]): r for r in sym if r.label["snr"] == snr}
        parts = []
        for (m, search), r in at.items():
            parts.append(f"{m}/{search} MMSE {error_summary(r.errors['mmse'])['mean']:.1f}° (conc. "
                         f"{r.concentration:.2f})")
        lines.append(f"- Symmetry, SNR {snr:g} (map/search): " + "; ".join(parts) + ".")
    return lines


def write_report(out: Path, cfg: Config, runs: list[Run], oracle: dict, invariance: dict, seconds: dict,
                 argv: list[str]) -> None:
    import torch

    cmd = " ".join(["python", "benchmarks/accuracy.py", *argv])
    lines = ["# Accuracy of MMSE orientation assignment", "",
             f"Generated by `{cmd}` ({cfg.mode} run) in {sum(seconds.values()) / 60:.1f} min on "
             f"{platform.machine()} with {cfg.threads} CPU threads (torch {torch.__version__}), bayespose at "
             f"{ENGINE_VERSION}; section times: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".", "",
             f"- Map: {MAP_TEXT}; astigmatism <= 200 Å, 300 kV, Cs 2.7 mm, amplitude contrast 0.1.",
             f"- {SNR_DEFINITION}.",
             "- Errors: geodesic angle (deg) between estimated and true poses (RELION A matrices); symmetric maps: "
             "minimum over symmetry mates. Tables give mean / median; `MLE − MMSE` is the paired mean difference "
             "over the same particles with its standard error; `chordal MSE` is mean ‖R̂ − R‖²_F = 8 sin²(θ/2), "
             "the loss MMSE minimises; `conc.` the mean posterior concentration (1 = point mass); `post. expected "
             "error` the mean of the engine's per-particle posterior expected angular error (to compare with the "
             "actual MMSE error: calibration).",
             "- Search: `PoseSearch` defaults (HEALPix order 2 = 15°, 4608 rotations, + 2 coarse-to-fine levels = "
             "3.75° final step; each level's frequency cut-off information-matched, `smoothness_nats=30`, but "
             "not below the geometric floor 2 / spacing (rad)) unless a row says otherwise; no shift search except where stated; uniform prior except in section 2.", "",
             "## Summary", "", *summary_lines(runs, oracle, cfg), ""]
    if any(r.section == "snr" for r in runs):
        lines += ["## 1. MMSE vs MAP vs MLE against SNR (Xu et al. 2026 Fig. 1, Prop. 2)", "",
                  f"N = {cfg.n_snr} particles per point, uniform poses (seed {cfg.seeds['snr']}); the same poses "
                  "and CTFs at every SNR and for both simulators. `relion_project` rows: images made by "
                  "`relion_project --ctf --add_noise --white_noise S` from a RELION 3.1 star of the true poses, "
                  "S from the clean relion_project images' variance and S²(1 − 1/64).", "",
                  "![fig1](fig1_snr.png)", "", *table_snr(runs), ""]
    if any(r.section == "prior" for r in runs):
        lines += ["## 2. Prior (Xu et al. 2026 Fig. 2)", "",
                  f"N = {cfg.n_prior} particles per point with poses drawn from IGSO3(identity, η = {cfg.eta_true} "
                  f"rad) (seed {cfg.seeds['prior']}); the same particles under each prior. The MLE column is the "
                  "argmax of the likelihood over the cells that run scored: with coarse-to-fine refinement the "
                  "refined cells follow the posterior, so it moves with the prior (the uniform-prior run's MLE is "
                  "the plain MLE).", "", "![fig2](fig2_prior.png)", "", *table_prior(runs), ""]
    if any(r.section == "grid" for r in runs):
        lines += ["## 3. Grid size at high SNR (Xu et al. 2026 Fig. 3)", "",
                  f"N = {cfg.n_grid} particles (seed {cfg.seeds['grid']}); single HEALPix grids (refine_levels = 0) "
                  "scored with the engine's default cut-off (information-matched, `smoothness_nats=30`, with "
                  "its geometric floor) and at Nyquist (`smoothness_nats=inf`); `radii` are the cut-offs used; `nearest node` is the error of the grid node closest to the "
                  "truth (the best any grid-restricted estimator can do). Coarse-to-fine rows are placed at the "
                  "size of their final grid (order 4, 294912 rotations); order 3 + 1 level is shown next to the default "
                  "order 2 + 2 levels.", "",
                  "![fig3](fig3_grid.png)", "", *table_grid(runs, oracle), ""]
    if any(r.section == "sym" for r in runs):
        lines += ["## 4. Symmetric maps and the unfolded mean (issue 3, evidence 2)", "",
                  f"N = {cfg.n_sym} particles per row (seed {cfg.seeds['sym']}); each map simulated by bayespose "
                  "at the given SNR (its own signal variance). `search symmetry` D2 / C4 folds every grid rotation "
                  "to the mate nearest the MAP before averaging; `C1 (unfolded)` averages the |G| equivalent modes. "
                  "Errors are measured up to the map's symmetry in every row.", "",
                  "![fig4](fig4_symmetry.png)", "", *table_sym(runs, invariance), ""]
    lines += ["## Commands", "", "```", "# this report", cmd,
              "# quick version (~3-5 min on 2 cores; writes benchmarks/results/accuracy/quick/)",
              "python benchmarks/accuracy.py --quick",
              "# RELION commands it runs (per SNR; S from the clean projections):",
              "relion_project --i fragment.mrc --o clean --ang truth.star --ctf",
              "relion_project --i fragment.mrc --o noisy_snrX --ang truth.star --ctf --add_noise --white_noise S",
              "relion_image_handler --i fragment.mrc --o fragment_D2.mrc --sym D2   # and --sym C4", "```", ""]
    (out / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run (~3-5 min on 2 cores)")
    parser.add_argument("--sections", default="snr,prior,grid,sym",
                        help="comma-separated subset of snr, prior, grid, sym (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/accuracy[/quick])")
    parser.add_argument("--work", type=Path, default=None, help="folder for simulated stacks (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--no-relion", action="store_true", help="skip everything that needs RELION binaries")
    parser.add_argument("--n", type=int, default=None, help="override the particles per point of every section")
    parser.add_argument("--replot", action="store_true",
                        help="redo the figures and README from OUT/results.json and OUT/errors.npz (no runs)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg.threads = args.threads
    if args.n:
        cfg.n_snr = cfg.n_prior = cfg.n_grid = cfg.n_sym = args.n
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"snr", "prior", "grid", "sym"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    use_relion = not args.no_relion and rel.have_relion()
    if not args.no_relion and not use_relion:
        print("RELION binaries not found: relion_project / relion_image_handler parts are skipped", flush=True)
    out = args.out or (REPO / "benchmarks" / "results" / "accuracy" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    work_ctx = tempfile.TemporaryDirectory(prefix="bp_accuracy_") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)

    global ENGINE_VERSION
    ENGINE_VERSION = engine_version()
    runs: list[Run] = []
    oracle, invariance, seconds = {}, {}, {}
    if args.replot:
        runs, oracle, invariance, seconds, argv, cfg = load_results(out)
    else:
        try:
            for section in sections:
                t0 = time.perf_counter()
                if section == "snr":
                    runs += section_snr(cfg, work, use_relion)
                elif section == "prior":
                    runs += section_prior(cfg, work)
                elif section == "grid":
                    r, oracle = section_grid(cfg, work)
                    runs += r
                elif section == "sym":
                    r, invariance = section_sym(cfg, work, use_relion)
                    runs += r
                seconds[section] = time.perf_counter() - t0
                print(f"-- {section}: {seconds[section]:.0f} s", flush=True)
        finally:
            if work_ctx:
                work_ctx.cleanup()
        save_results(out, cfg, runs, oracle, invariance, seconds, argv)

    if any(r.section == "snr" for r in runs):
        plot_snr(runs, cfg, out)
    if any(r.section == "prior" for r in runs):
        plot_prior(runs, cfg, out)
    if any(r.section == "grid" for r in runs):
        plot_grid(runs, oracle, cfg, out)
    if any(r.section == "sym" for r in runs):
        plot_sym(runs, cfg, out)
    write_report(out, cfg, runs, oracle, invariance, seconds, argv)
    print((out / "README.md").read_text())
    print(f"total {sum(seconds.values()) / 60:.1f} min; wrote {out}")
    return 0


def save_results(out: Path, cfg: Config, runs: list[Run], oracle: dict, invariance: dict, seconds: dict,
                 argv: list[str]) -> None:
    """``results.json`` (summaries and what is needed to rebuild the runs) and ``errors.npz`` (per-particle errors,
    float32 degrees, key ``RUN_ESTIMATOR``)."""
    raw = [{"section": r.section, "label": r.label, "seconds": r.seconds, "concentration": r.concentration,
            "expected_error_deg": r.expected_error_deg, "n_rotations": r.n_rotations, "radii_px": r.radii_px,
            "extra": r.extra} for r in runs]
    (out / "results.json").write_text(json.dumps(
        {"config": asdict(cfg), "seconds": seconds, "argv": argv, "engine_version": ENGINE_VERSION,
         "runs": [r.summary() for r in runs], "raw": raw, "nearest_node": oracle, "invariance": invariance}, indent=1, default=float))
    np.savez_compressed(out / "errors.npz", **{f"{i}_{name}": np.asarray(e, dtype=np.float32)
                                              for i, r in enumerate(runs) for name, e in r.errors.items()})


def load_results(out: Path) -> tuple[list[Run], dict, dict, dict, list[str], Config]:
    """The runs saved by :func:`save_results` (for ``--replot``)."""
    data = json.loads((out / "results.json").read_text())
    errs = np.load(out / "errors.npz")
    runs = [Run(r["section"], r["label"], {name: errs[f"{i}_{name}"].astype(np.float64) for name in ESTIMATORS},
                r["seconds"], r["concentration"], r["expected_error_deg"], r["n_rotations"], r["radii_px"], r["extra"])
            for i, r in enumerate(data["raw"])]
    oracle = {int(k): v for k, v in data["nearest_node"].items()}
    global ENGINE_VERSION
    ENGINE_VERSION = data.get("engine_version", ENGINE_VERSION)
    return runs, oracle, data["invariance"], data["seconds"], data["argv"], Config(**data["config"])


if __name__ == "__main__":
    sys.exit(main())
