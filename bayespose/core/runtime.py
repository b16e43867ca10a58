"""Where and how torch computes: the device, and CPU threads for the duration of one call.

Library functions never change process-wide state for good: :func:`torch_threads` sets torch's CPU thread count
for a ``with`` block and restores the previous value afterwards (a caller's own setting survives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["choose_device", "torch_threads", "DEVICE_CHOICES", "work_bytes", "memory_bytes"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_CPU_WORK_BYTES = 256e6  # one batch's working buffers on the CPU: large enough for efficient GEMMs, small for RAM


def memory_bytes(device: torch.device) -> float:
    """Memory of ``device`` in bytes: the GPU's, or the host RAM (6 GB when it cannot be read)."""
    import os

    try:
        if device.type == "cuda":
            return float(torch.cuda.get_device_properties(device).total_memory)
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 6e9


def work_bytes(device: torch.device) -> float:
    """Bytes one batch's working buffers (shifted images x frequencies, per-particle projection chunks, slices
    being inserted) may take on ``device``: 256 MB on the CPU (whatever the box: batches shrink for big boxes, so
    memory does not grow with the box), 1/16 of a GPU's memory."""
    if device.type == "cuda":
        return memory_bytes(device) / 16
    return _CPU_WORK_BYTES


def choose_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: the first CUDA device when torch sees one, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` as given. Raises ``ValueError`` when a GPU is asked for and torch sees none."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("a GPU was requested but torch sees no CUDA device")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` CPU threads in torch inside the block (None: leave torch's setting as it is)."""
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
