"""The real Slurm test cluster itself: sbatch + sacct, two nodes, submitit, failures, dependencies.

The submitit jobs call builtins (pow, int, os._exit): they unpickle in the job without importing this
test module (which --import-mode=importlib registers under a name a job's Python may not import).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def _script(path, body: str) -> str:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    return str(path)


def test_sbatch_job_completes_in_sacct(slurm_cluster, tmp_path):
    script = _script(tmp_path / "job.sh", 'echo "hello from job $SLURM_JOB_ID on $SLURMD_NODENAME"\n')
    job_id = slurm_cluster.sbatch("--output", str(tmp_path / "out-%j.txt"), script, cwd=tmp_path)

    assert slurm_cluster.wait_for_job(job_id, timeout=60) == "COMPLETED"
    # the accounting database (slurmdbd + MariaDB) records it a moment later
    assert slurm_cluster.wait_for_job(job_id, timeout=30, source="sacct") == "COMPLETED"
    res = slurm_cluster.run("sacct", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", job_id)
    assert f"{job_id}|COMPLETED|0:0" in res.stdout.splitlines()
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert out.startswith(f"hello from job {job_id} on ")


def test_srun_spans_both_nodes(slurm_cluster, tmp_path):
    nodes = slurm_cluster.nodes
    assert len(nodes) == 2
    for name in nodes:  # MASTER_ADDR=<first node> must resolve for torch.distributed
        socket.gethostbyname(name)
    script = _script(tmp_path / "job.sh",
                     'srun --ntasks-per-node=1 bash -c \'echo "task $SLURM_PROCID $SLURMD_NODENAME '
                     '$(hostname)"\'\nscontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/^/host /"\n')
    job_id = slurm_cluster.sbatch("-N2", "--ntasks-per-node=1", "--output", str(tmp_path / "out.txt"), script,
                                  cwd=tmp_path)

    assert slurm_cluster.wait_for_job(job_id, timeout=60) == "COMPLETED"
    lines = (tmp_path / "out.txt").read_text().splitlines()
    tasks = sorted(line.split()[1:3] for line in lines if line.startswith("task "))
    assert [t[0] for t in tasks] == ["0", "1"]
    assert {t[1] for t in tasks} == set(nodes)
    assert {line.split()[1] for line in lines if line.startswith("host ")} == set(nodes)


def _executor(tmp_path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, slurm_partition="debug")
    return executor


def test_submitit_map_array(slurm_cluster, tmp_path):
    jobs = _executor(tmp_path).map_array(pow, [2, 3, 4], [2, 2, 2])

    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job
    assert [job.result() for job in jobs] == [4, 9, 16]
    for job in jobs:
        assert slurm_cluster.wait_for_job(job.job_id, timeout=30) == "COMPLETED"


def test_submitit_raising_job_gives_failed_job_error(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(int, "not a number")

    with pytest.raises(submitit.core.utils.FailedJobError, match="ValueError"):
        job.result()
    assert slurm_cluster.wait_for_job(job.job_id, timeout=30) == "FAILED"


def test_submitit_job_dying_without_result_is_seen_through_sacct(slurm_cluster, tmp_path):
    # No result pickle: only sacct (real accounting) tells submitit that the job is over.
    job = _executor(tmp_path).submit(os._exit, 3)

    deadline = time.monotonic() + 60
    while not job.done():  # sacct polled at 0, 2, 4, 8 s... after submission
        assert time.monotonic() < deadline, f"submitit did not notice the end of job {job.job_id}"
        time.sleep(0.5)
    assert job.state == "FAILED"
    assert submitit.SlurmJob.watcher.num_calls > 0
    job._results_timeout_s = 0  # else result() waits 15 s for a result file that cannot come
    with pytest.raises(submitit.core.utils.UncompletedJobError, match=r"state: FAILED") as info:
        job.result()
    assert not isinstance(info.value, submitit.core.utils.FailedJobError)


def test_afterok_dependency_on_failed_job_is_cancelled(slurm_cluster, tmp_path):
    # Slurm 22.05 keeps such a job PENDING (DependencyNeverSatisfied) forever unless
    # DependencyParameters=kill_invalid_depend, which start.sh sets: then it is cancelled at once.
    fail = slurm_cluster.sbatch("--output", "/dev/null", "--wrap", "exit 1", cwd=tmp_path)
    ok = slurm_cluster.sbatch("--output", "/dev/null", "--wrap", "true", cwd=tmp_path)
    after_fail = slurm_cluster.sbatch("--dependency", f"afterok:{fail}", "--output", "/dev/null",
                                      "--wrap", f"touch {tmp_path / 'after_fail_ran'}", cwd=tmp_path)
    after_ok = slurm_cluster.sbatch("--dependency", f"afterok:{ok}", "--output", "/dev/null",
                                    "--wrap", f"touch {tmp_path / 'after_ok_ran'}", cwd=tmp_path)

    assert slurm_cluster.wait_for_job(fail, timeout=60) == "FAILED"
    assert slurm_cluster.wait_for_job(after_fail, timeout=30) == "CANCELLED"
    reason = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", after_fail, "-o", "%r").stdout.strip()
    assert reason == "DependencyNeverSatisfied"
    assert slurm_cluster.wait_for_job(after_ok, timeout=60) == "COMPLETED"
    assert (tmp_path / "after_ok_ran").exists()
    assert not (tmp_path / "after_fail_ran").exists()
    assert slurm_cluster.wait_for_job(after_fail, timeout=30, source="sacct") == "CANCELLED"
    acct = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "NodeList,Elapsed", "-j", after_fail)
    assert acct.stdout.strip() == "None assigned|00:00:00"  # it never ran
