"""`pml-dist run --wait` on Slurm: follow every job to its end, then report each failure with its
log and the one command that retries what failed."""

from __future__ import annotations

import logging
import re
import time

from pml_dist.config import Config
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.pipeline.slurm import (
    REQUEUABLE,
    STUCK_REASONS,
    TERMINAL_BAD,
    TERMINAL_OK,
    SlurmUnreachable,
    pending_reasons,
    queue_state,
)

log = logging.getLogger(__name__)


def retry_command(cfg: Config, executor: str) -> str:
    return f"pml-dist run --executor {executor} --config {RunLayout.of(cfg).config}"


def cause_of(text: str) -> str | None:
    """The last `SomethingError: message` line of a traceback (submitit's or a log's)."""
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", ln)]
    return errors[-1] if errors else None


def wait_for(
    cfg: Config, jobs: dict, poll_s: float = 2.0, result_grace_s: float = 15.0, unknown_s: float = 300.0,
    stuck_s: float = 300.0, requeue_s: float = 60.0,
) -> None:
    """Wait until every Slurm job has ended, logging each state change, then report every failure.

    Nothing is waited on forever: a failed job's dependants are cancelled by Slurm
    (--kill-on-invalid-dep); a failed student or reference leaves the others running, since each
    can be retried alone; a job that ends COMPLETED without submitit's result file (killed after
    its last line, or by a node dying) is a failure once `result_grace_s` have passed (shared file
    systems can lag); a job that neither squeue nor sacct knows for `unknown_s` is reported. A job
    preempted, timed out or on a failed node is given `requeue_s` to come back under its id
    (PENDING again: requeued), and then followed on, not reported; one that then pends for
    `stuck_s` for a reason that waiting does not cure (its nodes are down or drained: a lost
    node) is."""
    states: dict[str, str] = {}
    first_seen: dict[str, float] = {}
    stuck_since: dict[str, float] = {}
    failed: dict[str, str] = {}
    cancelled: list[str] = []
    while True:
        now = time.time()
        stuck = _stuck({n: j for n, j in jobs.items() if n not in failed and n not in cancelled
                        and states.get(n) != "OK"})
        stuck_since = {name: stuck_since.get(name, now) for name in stuck}
        for name, why in stuck.items():
            if now - stuck_since[name] > stuck_s:
                failed[name] = (f"cannot start: {why} (for {stuck_s:.0f} s; `sinfo -R` lists nodes that "
                                f"are down or drained, and why)")
        for name, job in jobs.items():
            if name in failed or name in cancelled or states.get(name) == "OK":
                continue
            state = job.state.split()[0] if job.state else "UNKNOWN"
            if states.get(name) != state:
                states[name] = state
                first_seen[name] = now
                log.info("%-24s %s", name, state)
            if state in TERMINAL_OK:
                if job.paths.result_pickle.exists():
                    states[name] = "OK"
                elif now - first_seen[name] > result_grace_s:
                    failed[name] = "ended COMPLETED without a result (the job died after its last line)"
            elif state.startswith("CANCELLED") and not job.paths.result_pickle.exists():
                cancelled.append(name)
            elif state in REQUEUABLE and (now - first_seen[name] < requeue_s or _back_in_queue(job.job_id)):
                # preempted, timed out or its node failed: Slurm requeues within seconds (squeue
                # shows the job PREEMPTED or COMPLETING first), and then it runs again
                continue
            elif state in TERMINAL_BAD:
                cause = cause_of(_read(job.paths.stderr)) or "no Python error in the log"
                failed[name] = f"ended {state} ({cause})"
            elif state == "UNKNOWN" and now - first_seen[name] > unknown_s:
                failed[name] = f"unknown to Slurm (neither squeue nor sacct) for {unknown_s:.0f} s"
        if len(failed) + len(cancelled) + sum(v == "OK" for v in states.values()) == len(jobs):
            break
        time.sleep(poll_s)
    if failed or cancelled:
        lines = [
            f"{name} (job {jobs[name].job_id}) {why}; log: {jobs[name].paths.stderr}"
            for name, why in failed.items()
        ]
        if cancelled:
            named = ", ".join(f"{name} (job {jobs[name].job_id})" for name in cancelled)
            lines.append(f"cancelled (a job they depend on failed, or scancel): {named}")
        lines.append(
            "retry what failed (finished, queued and running jobs are not resubmitted): "
            + retry_command(cfg, "slurm")
        )
        raise PmlError("\n".join(lines))


def _stuck(jobs: dict) -> dict[str, str]:
    """name -> pending reason, for the jobs squeue has PENDING for a reason waiting does not cure.
    squeue itself, not submitit's state: that comes from sacct, which may still show the run
    before a requeue (NODE_FAIL) while the job already pends again."""
    pending = {str(job.job_id): name for name, job in jobs.items()}
    try:
        reasons = pending_reasons(list(pending))
    except SlurmUnreachable:
        return {}  # decide nothing on a controller that does not answer
    return {pending[j]: r for j, r in reasons.items() if j in pending and r.startswith(STUCK_REASONS)}


def _back_in_queue(job_id: str) -> bool:
    """Requeued: squeue has the job again. A squeue that does not answer decides nothing yet."""
    try:
        state = queue_state(job_id)
    except SlurmUnreachable:
        return True
    return state is not None and state not in (*TERMINAL_OK, *TERMINAL_BAD)


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
