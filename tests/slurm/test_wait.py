"""`pml-dist run --wait` against submitit's failure modes on the real test cluster: arrays above
MaxArraySize are split, and a job that dies without a result, or that Slurm no longer knows, is
reported instead of waited on forever.

The jobs call builtins (len, os._exit, time.sleep) so that they unpickle without this test module.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time

import pytest
import submitit

from pml_dist.config import load_config
from pml_dist.errors import PmlError
from pml_dist.pipeline.executor import Resources
from pml_dist.pipeline.graph import Graph
from pml_dist.pipeline.slurm import max_array_size
from pml_dist.pipeline.stage_list import Entry
from pml_dist.pipeline.wait import wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        None, [f"run.dir={tmp_path / 'run'}", "slurm.student_tasks_per_node=1", "slurm.student_time_min=5"]
    )


def _entry(cfg, name, job, array="", arg=None):
    """A stage-list entry that is never done, running `job` (for an array task: job(arg))."""
    return Entry(name, "student", cfg, job, Resources(1, 1, 5), (), lambda: "not run", stage=arg, array=array)


def _submit(tmp_path, fn, *args):
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, tasks_per_node=1)
    return executor.submit(fn, *args)


def test_a_students_array_above_max_array_size_is_split(slurm_cluster, cfg, tmp_path):
    assert max_array_size() == 5  # start.sh's MaxArraySize
    refused = subprocess.run(
        ["sbatch", "--array=0-5", "--wrap", "true", "--output", "/dev/null"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "array" in refused.stderr.lower()
    targets = [f"t{'x' * i}" for i in range(7)]

    graph = Graph(cfg, "slurm")
    graph.submit_array([_entry(cfg, f"students/{t}", len, "students", t) for t in targets])
    ids = sorted({i for t in targets for i in graph.ids[f"students/{t}"]})

    assert len(ids) == 2  # 5 + 2 tasks
    jobs = [graph.jobs[f"students/{t}"] for t in targets]
    assert [j.result() for j in jobs] == [len(t) for t in targets]
    assert [j.job_id.split("_")[0] for j in jobs] == [ids[0]] * 5 + [ids[1]] * 2
    wait_for(cfg, graph.jobs, poll_s=0.5)  # all completed with their results: returns


def test_a_job_that_completes_without_a_result_is_reported(slurm_cluster, cfg, tmp_path):
    job = _submit(tmp_path, os._exit, 0)  # exit status 0, so Slurm says COMPLETED; no result file
    t0 = time.monotonic()
    with pytest.raises(PmlError, match=r"teacher \(job \d+\) ended COMPLETED without a result.*log: ") as err:
        wait_for(cfg, {"teacher": job}, poll_s=0.5, result_grace_s=2)
    assert time.monotonic() - t0 < 60
    assert "retry what failed" in str(err.value)


def test_a_killed_job_is_reported_with_its_log(slurm_cluster, cfg, tmp_path):
    job = _submit(tmp_path, time.sleep, 300)
    deadline = time.monotonic() + 60
    while slurm_cluster.squeue_states(job.job_id) != ["RUNNING"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # what the OOM killer or a dying node does: SIGKILL, no Python handler runs, no result
    subprocess.run(["scancel", "--signal=KILL", "--full", job.job_id], check=True)
    t0 = time.monotonic()
    with pytest.raises(PmlError, match=rf"pseudo.*{job.job_id}") as err:
        wait_for(cfg, {"pseudo": job}, poll_s=0.5, result_grace_s=2)
    assert time.monotonic() - t0 < 90
    assert str(job.paths.stderr) in str(err.value) or "cancelled" in str(err.value)


def test_a_job_slurm_does_not_know_is_reported(slurm_cluster, cfg, tmp_path):
    ghost = submitit.SlurmJob(tmp_path / "submitit", "999999")  # never submitted
    with pytest.raises(PmlError, match=r"report \(job 999999\) unknown to Slurm"):
        wait_for(cfg, {"report": ghost}, poll_s=0.5, unknown_s=3)


def test_a_job_still_queued_or_running_is_not_submitted_again(slurm_cluster, cfg):
    nap = functools.partial(time.sleep, 120)
    graph = Graph(cfg, "slurm")
    graph.submit(_entry(cfg, "teacher", nap))
    (first,) = graph.ids["teacher"]
    again = Graph(cfg, "slurm")
    again.submit(_entry(cfg, "teacher", nap))
    assert again.ids["teacher"] == [first]  # the same job
    assert again.jobs["teacher"].job_id == first  # --wait follows it
    subprocess.run(["scancel", first], check=True)
    deadline = time.monotonic() + 30
    while slurm_cluster.squeue_states(first) not in ([], ["CANCELLED"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    third = Graph(cfg, "slurm")
    third.submit(_entry(cfg, "teacher", nap))
    (second,) = third.ids["teacher"]
    assert second != first  # ended (here cancelled): submitted anew
    subprocess.run(["scancel", second], check=True)
