"""Shared by the benchmarks: CPU accounting (how busy the possibly shared machine was while a block ran) and the
code version a figure was measured with."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def system_busy_s() -> float:
    """CPU seconds all processes have been busy since boot (/proc/stat; 0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def own_cpu_s(children: bool = False) -> float:
    """CPU seconds of this process (and, with ``children``, of its finished child processes)."""
    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


class Contention:
    """Context manager: ``other_cores`` = CPU cores used by other processes while the block ran (``children``: count
    this process's child processes, e.g. RELION, as its own)."""

    def __init__(self, children: bool = True):
        self.children = children

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), system_busy_s(), own_cpu_s(self.children)
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self.t0, 1e-9)
        self.other_cores = max(0.0, (system_busy_s() - self.busy0) - (own_cpu_s(self.children) - self.own0)) / wall


def engine_version() -> str:
    """git commit of the working tree and whether bayespose/ differs from it (read-only git calls)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "bayespose"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes in bayespose/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
