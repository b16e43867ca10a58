"""Helpers shared by the bayespose Scipion protocols (assign poses, refine, train / predict with a pose network):
the GPU parameters, the compute device and thread count, the particles-vs-volume geometry checks of ``_validate``,
the creation of the output particle set, number formatting for summaries and the citation used in help texts.

Units: boxes in px, pixel sizes in Å/px; poses are RELION ``A`` matrices (see :mod:`bayespose.core.geometry.rotations`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pyworkflow.protocol.params as params

from bayespose.convert import SCIPION_ID, fill_set_of_particles
from bayespose.core.geometry.symmetry import symmetry_group
from bayespose.core.imaging.particles import ParticleSet

PIXEL_SIZE_RTOL = 0.01  # particles and map must agree within 1 %
NO_GPU_WARNING = "A GPU was requested but torch sees no CUDA device: "
#: How form help texts cite the paper behind the Bayesian pose assignment, the priors and the EM refinement.
BAYES_PAPER = ("Xu, Balanov, Singer & Bendory (2026), \"Bayesian perspective for orientation determination in "
               "cryo-EM with application to structural heterogeneity analysis\", Acta Cryst. D 82, "
               "https://journals.iucr.org/d/issues/2026/04/00/bar5003/ (preprint arXiv:2412.03723)")


# ------------------------------------------------------------------------------------------------- form / device
def cuda_available() -> bool:
    """Whether torch sees a CUDA device on this machine."""
    import torch

    return bool(torch.cuda.is_available())


def add_gpu_params(form, use_help: str) -> None:
    """The hidden GPU parameters Scipion's GUI and queue system read: ``useGpu`` (help ``use_help``), which defaults
    to Yes exactly when torch sees a CUDA device here (so a CPU machine never asks about a missing GPU), and
    ``gpuList``."""
    form.addHidden(params.USE_GPU, params.BooleanParam, default=cuda_available(), label="Use GPU?",
                   help=use_help + " Default: Yes when this machine has a CUDA GPU that torch sees, else No.")
    form.addHidden(params.GPU_LIST, params.StringParam, default="0", label="GPU id",
                   help="Which GPU to use (CUDA device index; only the first one listed is used).")


def gpu_device(protocol) -> str:
    """``cuda:<first GPU id>`` when the protocol allows the GPU and torch sees one, else ``cpu``. Inside a job
    (:func:`run_job`) the GPUs of the list are the visible ones (``CUDA_VISIBLE_DEVICES``) and each process uses
    its own (``cuda``: the current device, ``LOCAL_RANK``)."""
    import torch

    from bayespose.protocols.job import JOB_ENV

    if protocol.usesGpu() and torch.cuda.is_available():
        if os.environ.get(JOB_ENV):
            return "cuda"
        gpus = protocol.getGpuList()
        return f"cuda:{gpus[0] if gpus else 0}"
    return "cpu"


def n_threads(protocol) -> int:
    """The protocol's number of threads (at least 1; per process in a multi-process job)."""
    return max(int(protocol.numberOfThreads.get() or 1), 1)


def n_processes(protocol) -> int:
    """The protocol's number of data-parallel processes (the form's 'MPIs'; at least 1)."""
    return max(int(protocol.numberOfMpi.get() or 1), 1)


PROCESSES_HELP = ("Data-parallel processes: the particles are split among them (torch.distributed, launched with "
                  "torchrun; with 'Use GPU' one GPU of the GPU list per process, else CPU processes of "
                  "'Threads' threads each) and the results combined: the same outputs as one process. The job "
                  "goes through Scipion's host configuration: with QUEUE_FOR_JOBS in hosts.conf it is submitted "
                  "to the queue (e.g. Slurm) with this number of processes.")


def add_parallel_params(form, threads: int = 2) -> None:
    """The standard parallel section: threads per process and the number of processes ('MPIs', see
    :data:`PROCESSES_HELP`; the job runs under torchrun, not mpirun)."""
    form.addParallelSection(threads=threads, mpi=1)
    form.getParam("numberOfMpi").help.set(PROCESSES_HELP)
    form.getParam("numberOfMpi").label.set("Processes")


def job_command(protocol, method: str) -> tuple[str, list[str]]:
    """``(program, arguments)`` of the job running ``protocol.<method>()`` in :func:`n_processes` processes:
    ``python -m bayespose.protocols.job PROJECT DB ID METHOD``, under ``python -m torch.distributed.run
    --standalone --nproc-per-node N`` for N > 1, with ``CUDA_VISIBLE_DEVICES`` set to the GPU list when the GPU
    is used (Scipion substitutes ``%(GPU)s``; a queue renumbers the GPUs it grants)."""
    args = ["-m", "bayespose.protocols.job", os.path.abspath(protocol.getProject().path), protocol.getDbPath(),
            str(protocol.getObjId()), method]
    n = n_processes(protocol)
    if n > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    program = f"OMP_NUM_THREADS={n_threads(protocol)} {sys.executable}"  # threads per process
    if protocol.usesGpu() and cuda_available():
        program = f"CUDA_VISIBLE_DEVICES=%(GPU)s {program}"
    return program, args


def run_job(protocol, method: str) -> None:
    """Run ``protocol.<method>()`` as a job through ``protocol.runJob`` (:func:`job_command`): Scipion's host
    configuration and queue apply; one launcher command, whose processes torchrun starts (so the job is not
    wrapped in the host's mpirun)."""
    program, args = job_command(protocol, method)
    protocol.runJob(program, args, numberOfMpi=1, numberOfThreads=n_threads(protocol))


def no_gpu_warnings(protocol, consequence: str = "the run will use the CPU.") -> list[str]:
    """``[warning]`` when the user set 'Use GPU' to Yes but torch sees no CUDA device (``consequence`` ends the
    sentence), else ``[]``. Scipion shows ``_warnings()`` as a question before the run; with the default of
    :func:`add_gpu_params` a machine without a GPU asks nothing."""
    if protocol.usesGpu() and not cuda_available():
        return [NO_GPU_WARNING + consequence]
    return []


def decile_logger(protocol, message: Callable[[int, int], str]) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs ``message(done, total)`` to the protocol's log once per 10 %."""
    reported = set()

    def progress(done: int, total: int) -> None:
        decile = 10 * done // max(total, 1)
        if decile not in reported:
            reported.add(decile)
            protocol.info(message(done, total))

    return progress


def describe_particles(particles: ParticleSet, noun: str = "particles") -> str:
    """``"<N> <noun> (<box> px, <pixel size> Å/px), CTF: yes|no"`` for the run log."""
    return (f"{len(particles)} {noun} ({particles.box} px, {particles.pixel_size:.4f} Å/px), CTF: "
            f"{'yes' if particles.has_ctf else 'no'}")


def number(value, digits: int = 4) -> str:
    """A float for summaries without float32 noise: ``2.70000004768372`` -> ``"2.7"`` (``digits`` significant
    digits, trailing zeros dropped); None -> ``"?"``."""
    return "?" if value is None else f"{float(value):.{digits}g}"


# ------------------------------------------------------------------------------------------------------ validate
def symmetry_errors(symmetry: str) -> list[str]:
    """``["Symmetry: <reason>"]`` when ``symmetry`` is not a RELION point group, else ``[]``."""
    try:
        symmetry_group(symmetry)
    except ValueError as exc:
        return [f"Symmetry: {exc}"]
    return []


def geometry_errors(parts, volume, noun: str, mask=None, require_pixel_size: bool = True) -> list[str]:
    """The errors of a Scipion particle set ``parts`` against a volume ``volume`` called ``noun`` in the messages
    (e.g. ``"reference map"``, ``"initial volume"``; its last word is the short name): the volume box must be cubic
    and equal to the particle box (px); the pixel sizes (Å/px) must agree within :data:`PIXEL_SIZE_RTOL` (a missing
    one is an error only with ``require_pixel_size``); an optional ``mask`` (VolumeMask) must have the volume's
    dimensions."""
    short = noun.split()[-1]
    errors = []
    vdim, pdim = volume.getDim(), parts.getDim()
    if vdim is None or len(set(vdim)) != 1:
        errors.append(f"The {noun} must be a cubic box, got dimensions {vdim}.")
    elif pdim is not None and pdim[0] != vdim[0]:
        errors.append(f"The box of the particles ({pdim[0]} px) differs from the box of the {noun} "
                      f"({vdim[0]} px); resize one of them.")
    p_px, v_px = parts.getSamplingRate(), volume.getSamplingRate()
    if not p_px or not v_px:
        if require_pixel_size:
            errors.append(f"Missing pixel size: particles {p_px} Å/px, {short} {v_px} Å/px.")
    elif abs(p_px - v_px) > PIXEL_SIZE_RTOL * p_px:
        errors.append(f"The pixel size of the particles ({p_px:.4f} Å/px) differs from the {noun}'s "
                      f"({v_px:.4f} Å/px) by more than 1 %; rescale the {short}.")
    if mask is not None and vdim is not None and mask.getDim() != vdim:
        errors.append(f"The mask box {mask.getDim()} differs from the {noun} box {vdim}.")
    return errors


# ------------------------------------------------------------------------------------------------------- outputs
def output_particles(protocol, poses: ParticleSet, scipion_ids: np.ndarray,
                     attributes: dict[str, np.ndarray]):
    """A new SetOfParticles of ``protocol``: its ``inputParticles`` with the projection alignment of ``poses``
    (RELION ``A``, origins Å), matched by ``scipion_ids``, and the ``_bp<name>`` ``attributes``."""
    poses = replace(poses, extra={SCIPION_ID: np.asarray(scipion_ids, dtype=np.int64)})
    output = protocol._createSetOfParticles()
    fill_set_of_particles(output, poses, template_set=protocol.inputParticles.get(), attributes=attributes)
    return output


def define_output_particles(protocol, output) -> None:
    """Register ``output`` as ``outputParticles``, transformed from the protocol's ``inputParticles``."""
    protocol._defineOutputs(outputParticles=output)
    protocol._defineTransformRelation(protocol.inputParticles, output)
