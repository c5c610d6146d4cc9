"""`pml-dist status`: one row per entry of the stage list, from the run directory and, for what is
not done, the job record and Slurm."""

from __future__ import annotations

from pml_dist.config import Config
from pml_dist.pipeline.graph import load_jobs_record
from pml_dist.pipeline.slurm import TERMINAL_BAD, TERMINAL_OK, slurm_state
from pml_dist.pipeline.stage_list import stage_list
from pml_dist.pipeline.wait import retry_command


def status(cfg: Config) -> list[tuple[str, str, str]]:
    """(job name, state, detail) rows: done; stale with why (an input changed since it ran); not
    submitted; pending/running; failed with its log. When something failed or is stale, a last row
    with the command that reruns just that."""
    record = load_jobs_record(cfg)
    jobs = record.get("jobs", {})
    rows, rerun = [], False
    for entry in stage_list(cfg):
        if not entry.listed:
            continue
        why = entry.outdated()
        job = jobs.get(entry.name)
        stale = why is not None and why.startswith("stale")
        if why is None:
            rows.append((entry.name, "done", ""))
            continue
        state = "NOT DONE"  # a local job that ended without its output
        if job is not None and record.get("executor") == "slurm":
            state = slurm_state(job["job_id"])
        if job is not None and state not in (*TERMINAL_OK, *TERMINAL_BAD, "NOT DONE", "UNKNOWN"):
            rows.append((entry.name, state, f"job {job['job_id']}"))  # pending or running
        elif stale:
            rerun = True
            rows.append((entry.name, "stale", why.removeprefix("stale: ")))
        elif job is None:
            rows.append((entry.name, "not submitted", ""))
        else:
            rerun = True
            rows.append((entry.name, state.lower() if state in TERMINAL_BAD else "not done",
                         f"job {job['job_id']}, log {job['stderr']}"))
    if rerun:
        rows.append(("retry", "", retry_command(cfg, record.get("executor", "local"))))
    return rows
