"""Two `pml-dist run --executor slurm` on one run directory at once, on the real test cluster: the
second stops with one line naming the first (which owns the run while it submits), a third after
it finds every job queued and submits nothing; each stage is submitted once. The jobs are held
(slurm.cpu_extra=[hold]: nothing runs) and cancelled at the end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pml_dist.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
STAGES = {"data", "teacher", "teacher/probs", "pseudo", "students/tau-0.5", "report"}


def test_two_concurrent_submissions_submit_every_stage_once(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", "pseudo.taus=[0.5]", "pseudo.modes=[hard]", "report.references=[]",
                 "pseudo.teachers=[]", "slurm.cpu_extra=[hold]"]
    command = [sys.executable, "-m", "pml_dist", "run", "--executor", "slurm", *overrides]
    env = slurm_cluster.subprocess_env()
    # A slow controller for the first submission (each sbatch 1 s longer): the second comes while
    # the first still submits.
    slow = tmp_path / "slow-controller"
    slow.mkdir()
    sbatch = shutil.which("sbatch", path=env["PATH"])
    (slow / "sbatch").write_text(f'#!/bin/sh\nsleep 1\nexec {sbatch} "$@"\n')
    (slow / "sbatch").chmod(0o755)
    known = slurm_cluster.job_ids()
    try:
        first = subprocess.Popen(command, env={**env, "PATH": f"{slow}{os.pathsep}{env['PATH']}"}, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (run / "logs" / "run.lock").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                                check=False)
        assert first.poll() is None, "the first submission ended before the second came: no overlap"
        assert second.returncode == 2, second.stderr
        error = second.stderr.strip().splitlines()
        assert len(error) == 1
        assert error[0].startswith(f"pml-dist run: error: run directory {run} is in use by `")
        assert f"(pid {first.pid} on {socket.gethostname()}, since " in error[0]

        _, err = first.communicate(timeout=200)
        assert first.returncode == 0, err[-3000:]
        jobs = json.loads((run / "jobs.json").read_text())["jobs"]
        assert set(jobs) == STAGES

        third = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                               check=False)
        assert third.returncode == 0, third.stderr
        kept = {ln.split()[0] for ln in third.stdout.splitlines() if "still queued or running" in ln}
        assert kept == STAGES
        assert json.loads((run / "jobs.json").read_text())["jobs"] == jobs

        # one sbatch per stage (the students are a one-task array): no job of this run but these
        new = {job_id.split("_")[0] for job_id in slurm_cluster.job_ids() - known}
        assert new == {job["job_id"].split("_")[0] for job in jobs.values()} and len(new) == len(STAGES)
        assert not (run / "logs" / "run.lock").exists()
    finally:
        main(["cancel", *overrides])
