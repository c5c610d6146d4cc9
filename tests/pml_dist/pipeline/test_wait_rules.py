"""wait_for's rules on states Slurm reports, with stand-in jobs (the real cluster's versions are in
tests/slurm): requeued jobs are followed, a job pending for nodes that are gone is reported, and a
squeue that does not answer decides nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pml_dist.config import load_config
from pml_dist.errors import PmlError
from pml_dist.pipeline import wait
from pml_dist.pipeline.slurm import SlurmUnreachable


@dataclass
class Paths:
    result_pickle: Path
    stderr: Path


class Job:
    """A submitit job whose state follows a script: one state per poll, the last one repeated."""

    def __init__(self, tmp_path: Path, states: list[str], job_id: str = "41"):
        self.job_id, self._states = job_id, list(states)
        self.paths = Paths(tmp_path / "result.pkl", tmp_path / "log.err")

    @property
    def state(self) -> str:
        state = self._states.pop(0) if len(self._states) > 1 else self._states[0]
        if state == "COMPLETED":
            self.paths.result_pickle.write_bytes(b"done")
        return state


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.dir={tmp_path / 'run'}"])


def test_a_preempted_job_that_slurm_requeued_is_followed_to_its_end(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(wait, "queue_state", lambda job_id: "PENDING")  # back in the queue
    monkeypatch.setattr(wait, "pending_reasons", lambda ids: {i: "BeginTime" for i in ids})
    job = Job(tmp_path, ["RUNNING", "PREEMPTED", "PENDING", "RUNNING", "COMPLETED"])
    wait.wait_for(cfg, {"teacher": job}, poll_s=0)  # returns: nothing failed


def test_a_job_pending_for_nodes_that_are_gone_is_reported(cfg, tmp_path, monkeypatch):
    reason = "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"
    monkeypatch.setattr(wait, "pending_reasons", lambda ids: {i: reason for i in ids})
    job = Job(tmp_path, ["PENDING"])
    with pytest.raises(PmlError, match=r"teacher \(job 41\) cannot start: Nodes required for job are DOWN"):
        wait.wait_for(cfg, {"teacher": job}, poll_s=0.01, stuck_s=0.05)


def test_a_reason_that_clears_by_waiting_is_waited_on(cfg, tmp_path, monkeypatch):
    reasons = iter(["Priority", "Resources", "Dependency"] * 20)
    monkeypatch.setattr(wait, "pending_reasons", lambda ids: {i: next(reasons) for i in ids})
    job = Job(tmp_path, ["PENDING"] * 30 + ["RUNNING", "COMPLETED"])
    wait.wait_for(cfg, {"teacher": job}, poll_s=0, stuck_s=0)


def test_a_squeue_that_does_not_answer_decides_nothing(cfg, tmp_path, monkeypatch):
    def unreachable(*_):
        raise SlurmUnreachable("`squeue` did not answer within 30 s")

    monkeypatch.setattr(wait, "queue_state", unreachable)
    monkeypatch.setattr(wait, "pending_reasons", unreachable)
    job = Job(tmp_path, ["RUNNING", "NODE_FAIL", "PENDING", "COMPLETED"])  # requeued after its node died
    wait.wait_for(cfg, {"teacher": job}, poll_s=0, stuck_s=0)


def test_a_preempted_job_that_does_not_come_back_is_reported(cfg, tmp_path, monkeypatch):
    """Without --requeue (slurm.requeue=false) a preempted job stays PREEMPTED and leaves the queue."""
    monkeypatch.setattr(wait, "queue_state", lambda job_id: None)
    monkeypatch.setattr(wait, "pending_reasons", lambda ids: {})
    job = Job(tmp_path, ["RUNNING", "PREEMPTED"])
    with pytest.raises(PmlError, match=r"teacher \(job 41\) ended PREEMPTED"):
        wait.wait_for(cfg, {"teacher": job}, poll_s=0.01, requeue_s=0.05)
