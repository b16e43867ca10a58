"""The heavy step of a bayespose protocol as a job: ``python -m bayespose.protocols.job PROJECT DB ID METHOD``.

A protocol's compute step (:func:`bayespose.protocols._common.run_job`) runs this module through
``protocol.runJob(...)``, the way every Scipion plugin runs its programs, so that the host's configuration applies:
with ``QUEUE_FOR_JOBS`` in ``hosts.conf`` the job goes to the queue (Slurm, ...) through the submission template.
With N > 1 processes (the form's number of processes) the command is ``python -m torch.distributed.run
--standalone --nproc-per-node N -m bayespose.protocols.job ...``: each process loads the protocol from the
project database (read only), joins the process group (:func:`bayespose.core.parallel.init_from_env`: gloo on
CPU, NCCL with one GPU per process) and calls the protocol's job method (e.g. ``assignJob``), which runs the core
engine on its share of the particles; only the main process logs and writes files.
"""

from __future__ import annotations

import logging
import os
import sys

JOB_ENV = "BAYESPOSE_JOB"  # set in the job processes: the protocol computes on the GPUs it was given


def main(argv: list[str] | None = None) -> int:
    project, db_path, prot_id, method = (sys.argv[1:] if argv is None else argv)
    os.environ[JOB_ENV] = "1"
    if method in ("assignJob", "refineJob"):  # the MMSE search / refinement (core.openmp: measured), before torch
        from bayespose.core.openmp import openmp_waits_asleep

        openmp_waits_asleep()
    from bayespose.core import parallel

    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    logging.basicConfig(stream=sys.stdout, format="%(message)s",
                        level=logging.INFO if main_process else logging.WARNING, force=True)
    from pyworkflow.protocol import getProtocolFromDb

    protocol = getProtocolFromDb(project, db_path, int(prot_id), chdir=True)
    parallel.init_from_env("cuda" if protocol.usesGpu() else "cpu")
    try:
        getattr(protocol, method)()
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
