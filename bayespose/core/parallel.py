"""Data-parallel runs on torch.distributed: the process group, who does which particles, and combining results.

bayespose runs on several processes (CPU cores, GPUs, nodes) through ``torchrun``, the launcher that Slurm jobs and
Scipion's queue system already start (``torchrun --nproc-per-node N bayespose assign ...``): every process runs
the same command on its share of the particles, and the results are combined so that every process holds what
one process alone would compute. Backends: gloo on CPU, NCCL on CUDA (one GPU per process, ``LOCAL_RANK``).

Everything here is a no-op in a plain run (no ``torchrun`` environment, or a group of one): :func:`world_size` is
1, :func:`my_batches` returns every batch, the reductions return their input. The engines call these helpers at
the few places where data-parallel work meets (:mod:`bayespose.core.assign.engine`: batches per process and the
per-particle results; :mod:`bayespose.core.refine`: the Fourier accumulators and statistics before each M-step;
:mod:`bayespose.core.deep.train`: DistributedDataParallel); the CLI calls :func:`init_from_env` once and lets
only the main process (:func:`is_main`) write outputs.

Work split: particles go by batch, batch ``b`` to process ``b mod world_size``, so every process scores exactly
the batches one process would (same batch composition, hence the same numbers), and the load stays balanced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "local_rank", "is_main",
           "my_batches", "all_reduce_sum", "combine_rows", "broadcast_object", "all_gather_objects", "barrier",
           "shutdown", "local_world_size", "main_first", "launched_by_torchrun",
           "processes_note", "my_slice", "data_parallel"]

_ENV_WORLD = "WORLD_SIZE"
_TIMEOUT = timedelta(hours=2)  # a process may wait this long for the others (an E-step of a large half set)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get(_ENV_WORLD, "1")) > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), once; returns whether the run is distributed.

    ``device``: the device the run computes on (None / "auto": CUDA when available): CUDA -> NCCL, each process on
    GPU ``LOCAL_RANK`` (modulo the visible GPUs); CPU -> gloo. Without torchrun's environment nothing happens.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun() or not dist.is_available():
        return False
    cuda = _wants_cuda(device)
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=_TIMEOUT)
    return dist.get_world_size() > 1


def _wants_cuda(device) -> bool:
    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda") and torch.cuda.is_available()


def is_distributed() -> bool:
    """Whether this process belongs to an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a plain run)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in a plain run)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 in a plain run)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 in a plain run): memory budgets are shared by
    them."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def is_main() -> bool:
    """Whether this is the process that writes outputs and logs (rank 0)."""
    return rank() == 0


def processes_note() -> str:
    """``" on N processes"`` in a distributed run (for summary lines), else ``""``."""
    return f" on {world_size()} processes" if is_distributed() else ""


def my_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """The particle indices of this process's batches: batches of ``batch_size`` over ``range(n)``, batch ``b`` to
    process ``b mod world_size`` (every batch in a plain run)."""
    starts = range(0, n, batch_size)
    return [np.arange(s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world_size() == rank()]


def my_slice(n: int) -> slice:
    """This process's contiguous part of ``n`` items (e.g. the samples of one training batch): the items split into
    ``world_size`` nearly equal parts in rank order (all of them in a plain run)."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel in a distributed run (gradients averaged over the processes;
    on CUDA its BatchNorm layers synchronised, so they normalise with the statistics of the whole batch; gloo on
    CPU has no synchronised BatchNorm: each process uses its slice's); ``model`` itself in a plain run. The
    wrapper shares ``model``'s parameters: save ``model.state_dict()``, not the wrapper's."""
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     and device.index is not None else None)


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value):
    """The sum over processes of ``value`` (a numpy array or a torch tensor, any shape; a tensor is summed in place
    and returned; a numpy array comes back as a new array of its dtype). In a plain run: ``value`` itself."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        comm = value if value.device == _comm_device() else value.to(_comm_device())
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
        if comm is not value:
            value.copy_(comm)
        return value
    array = np.asarray(value)
    dtype = np.int64 if array.dtype == bool else array.dtype
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().astype(array.dtype)


def combine_rows(arrays: Sequence[np.ndarray], mine: np.ndarray) -> list[np.ndarray]:
    """Per-particle arrays (N, ...) of which this process filled the rows ``mine`` (int indices): the arrays
    with every process's rows, on every process (exact: the other rows are zeroed and the arrays summed)."""
    if not is_distributed():
        return list(arrays)
    keep = np.zeros(len(arrays[0]) if len(arrays) else 0, dtype=bool)
    keep[np.asarray(mine, dtype=np.int64)] = True
    out = []
    for a in arrays:
        a = np.asarray(a)
        masked = np.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, np.zeros((), dtype=a.dtype))
        out.append(all_reduce_sum(masked))
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` on every process (any picklable object; a plain run returns ``obj``)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` in a plain run)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every process gets here (no-op in a plain run)."""
    if is_distributed():
        dist.barrier()


def main_first(fn: Callable[[], object]):
    """Run ``fn`` on the main process, then give its result to every process (e.g. a noise model estimated once
    from the whole data set, so that every process scores with the same one)."""
    return broadcast_object(fn() if is_main() else None)


def shutdown() -> None:
    """Leave the process group (end of a CLI command; no-op in a plain run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
