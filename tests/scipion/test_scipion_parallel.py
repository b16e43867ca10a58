"""The protocols' parallel section the Scipion way: the form's 'Processes' (numberOfMpi), 'Threads' and GPU list build
one job command that ``protocol.runJob`` runs (so hosts.conf's queue, with QUEUE_FOR_JOBS, can submit it): ``python
-m bayespose.protocols.job ...`` for one process, under ``torch.distributed.run --nproc-per-node N`` for N, with
``CUDA_VISIBLE_DEVICES=%(GPU)s`` (Scipion's GPU placeholder) when the GPU is used.

The README's Slurm ``hosts.conf`` example parses with pyworkflow's own reader, and its submission template filled
with a protocol's submit values holds the torchrun job on one node with processes x threads cores and the GPUs.

End to end: 'assign poses (MMSE)' with 2 processes (gloo, CPU) on 80 simulated particles (batches of 64: each process
scores one) gives the poses of the same protocol with 1 process (the same batches; tests/cli/test_data_parallel.py
checks the CLI's numbers at float precision), and the run log shows the torchrun command.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from pyworkflow.tests import BaseTest, setupTestProject

from tests.scipion.scipion_imports import import_relion_particles, import_volume, simulate_star

pytestmark = pytest.mark.scipion

PIXEL_SIZE = 4.4
README = Path(__file__).resolve().parents[2] / "README.md"


class TestParallelJobs(BaseTest):
    @classmethod
    def setUpClass(cls):
        from bayespose.core.imaging.synthetic_dataset import SimulationSpec
        from bayespose.data import fragment_map_path

        setupTestProject(cls, writeLocalConfig=True)
        star = simulate_star(cls.getOutputPath("sim"), fragment_map_path(),
                             SimulationSpec(n_particles=80, snr=0.3, ctf=True, max_shift_px=1.0, seed=2))
        cls.particles = import_relion_particles(cls, star, PIXEL_SIZE)
        cls.volume = import_volume(cls, fragment_map_path(), PIXEL_SIZE)

    def _assign(self, processes: int):
        from bayespose.protocols import ProtBayesposeAssignPoses

        prot = self.newProtocol(ProtBayesposeAssignPoses, inputParticles=self.particles, inputVolume=self.volume,
                                healpixOrder=1, refineLevels=2, shiftRange=1.0, shiftStep=1.0, numberOfThreads=1,
                                numberOfMpi=processes, useGpu=False)
        return prot

    def test_job_command_from_the_form(self):
        from bayespose.protocols._common import job_command

        prot = self._assign(3)
        self.saveProtocol(prot)
        program, args = job_command(prot, "assignJob")
        assert "OMP_NUM_THREADS=1" in program and "CUDA_VISIBLE_DEVICES" not in program
        assert args[:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
        assert args[4:6] == ["-m", "bayespose.protocols.job"] and args[-1] == "assignJob"
        assert args[-2] == str(prot.getObjId())
        one = self._assign(1)
        self.saveProtocol(one)
        program, args = job_command(one, "assignJob")
        assert args[:2] == ["-m", "bayespose.protocols.job"]  # one process: no launcher
        form = one.getDefinition()
        assert form.getParam("numberOfMpi").label.get() == "Processes"
        assert "torch" in form.getParam("numberOfMpi").help.get()

    def test_two_processes_assign_like_one(self):
        one, two = self._assign(1), self._assign(2)
        self.launchProtocol(one)
        self.launchProtocol(two)
        a, b = one.outputParticles, two.outputParticles
        assert a.getSize() == b.getSize() == 80
        ra = np.array([p.getTransform().getMatrix()[:3, :3] for p in a.iterItems(orderBy="id")])
        rb = np.array([p.getTransform().getMatrix()[:3, :3] for p in b.iterItems(orderBy="id")])
        cos = np.clip((np.einsum("nij,nij->n", ra, rb) - 1) / 2, -1, 1)
        assert np.degrees(np.arccos(cos)).max() < 1e-3
        log = ""
        for path in (two.getStdoutLog(), two.getStderrLog()):
            with open(path) as fh:
                log += fh.read()
        assert "torch.distributed.run" in log and "--nproc-per-node=2" in log


def test_readme_slurm_hosts_conf(tmp_path):
    from pyworkflow.protocol.hosts import HostConfig

    text = README.read_text()
    block = re.search(r"### Slurm `hosts.conf` example.*?```ini\n(.*?)```", text, re.S).group(1)
    (tmp_path / "hosts.conf").write_text(block)
    host = HostConfig.load(str(tmp_path / "hosts.conf"))["localhost"]
    queue = host.queueSystem
    assert queue.getName() == "SLURM" and set(queue.queues) == {"gpu", "cpu"}
    params = {name: default for name, default, *_ in queue.queues["gpu"]}
    assert params["QUEUE_FOR_JOBS"] == "Y"  # only the jobs go to the queue
    job = ('CUDA_VISIBLE_DEVICES=0,1 OMP_NUM_THREADS=3 python "-m" "torch.distributed.run" "--standalone" '
           '"--nproc-per-node=2" "-m" "bayespose.protocols.job" "/p" "Runs/1/logs/run.db" "1" "refineJob"')
    values = dict(JOB_NAME="1", JOB_QUEUE="gpu", JOB_NODES=2, JOB_THREADS=3, JOB_CORES=6, JOB_HOURS=72,
                  GPU_COUNT=2, JOB_LOGS="/p/logs/1", JOB_SCRIPT="/p/logs/1.job", JOB_COMMAND=job, **params)
    script = queue.getSubmitTemplate() % values
    assert "--cpus-per-task=6" in script and "--gres=gpu:2" in script and "--ntasks=1" in script
    assert script.rstrip().endswith(job)
