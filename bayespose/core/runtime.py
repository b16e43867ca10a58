"""Where and how torch computes: the device, and CPU threads for the duration of one call.

Library functions never change process-wide state for good: :func:`torch_threads` sets torch's CPU thread count
for a ``with`` block and restores the previous value afterwards (a caller's own setting survives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["choose_device", "torch_threads", "DEVICE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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
