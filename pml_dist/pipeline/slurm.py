"""What this machine's Slurm says: whether it answers, its MaxArraySize, a job's state, elapsed time
and restarts; and what it is told: test-only submissions and cancellations. Every `squeue` /
`sacct` / `scontrol` / `sinfo` / `scancel` call of the pipeline is here.

A Slurm command that fails or times out is never read as an answer: it raises `SlurmUnreachable`,
so a busy controller can neither send a pipeline to the login node nor make a queued job look
gone (and be submitted a second time, two jobs then writing one checkpoint folder)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from pml_dist.errors import PmlError

TIMEOUT_S = 30  # a loaded controller answers slowly; far longer than that, and it is not answering
TERMINAL_OK = {"COMPLETED"}
TERMINAL_BAD = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Ends after which a --requeue job comes back (PENDING again, same id): final only once the queue
# no longer has the job.
REQUEUABLE = {"PREEMPTED", "NODE_FAIL", "REQUEUED", "TIMEOUT"}
NO_CONFIG = "Could not establish a configuration source"  # sinfo where no Slurm is configured at all


class SlurmUnreachable(PmlError):
    """A Slurm command failed or did not answer in time; the message says which and what it said."""


def _call(cmd: list[str], timeout: float = TIMEOUT_S) -> str:
    """stdout of a Slurm command; SlurmUnreachable with its own error line when it fails."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise SlurmUnreachable(f"`{cmd[0]}` cannot run: {exc}") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise SlurmUnreachable(f"`{' '.join(cmd)}` failed: {why}")
    return res.stdout


def default_executor() -> str:
    """slurm where Slurm is installed and configured, local where it is not. Installed and
    configured but not answering is an error: a pipeline silently run on a login node would be
    killed there, or slow everyone else down."""
    if not shutil.which("sbatch"):
        return "local"
    try:
        _call(["sinfo", "-h", "-o", "%P"])
    except SlurmUnreachable as exc:
        if NO_CONFIG in str(exc):
            return "local"
        raise SlurmUnreachable(f"Slurm is installed but its controller does not answer ({exc}); "
                               f"retry when it does, or run here with --executor local") from None
    return "slurm"


def require_slurm() -> None:
    try:
        _call(["sinfo", "-h", "-o", "%P"])
    except SlurmUnreachable as exc:
        raise SlurmUnreachable(f"--executor slurm: no working Slurm here ({exc}); "
                               f"use --executor local") from None


def max_array_size() -> int:
    """The cluster's MaxArraySize (an array may hold indices 0..MaxArraySize-1)."""
    for line in _call(["scontrol", "show", "config"]).splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=")[1])
    return 1001


def queue_state(job_id: str) -> str | None:
    """The job's state while squeue still has it pending, running or completing, else None.
    For an array, the first task's."""
    out = _call(["squeue", "-h", "-j", job_id, "-o", "%T"]).split()
    return out[0].upper() if out else None


# Pending reasons that do not resolve by waiting while the cluster stays as it is: a lost or drained
# node, a partition that is down or too small, constraints no node has. (Slurm prints some as codes,
# some as sentences: "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher
# priority partitions" is ReqNodeNotAvail.)
STUCK_REASONS = ("ReqNodeNotAvail", "Nodes required for job are DOWN", "NodeDown", "PartitionDown",
                 "PartitionInactive", "PartitionNodeLimit", "BadConstraints")


def pending_reasons(job_ids: list[str]) -> dict[str, str]:
    """Why each of these jobs (array tasks as ID_N) still pends, for those squeue has PENDING."""
    if not job_ids:
        return {}
    out = _call(["squeue", "-h", "-r", "-t", "PD", "-j", ",".join(job_ids), "-o", "%i|%r"])
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def slurm_state(job_id: str) -> str:
    """A job's state from squeue, else (it has left the queue) from sacct; UNKNOWN when neither has it."""
    state = queue_state(job_id)
    if state:
        return state
    out = _call(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]).split()
    return out[-1].upper() if out else "UNKNOWN"  # -X without -D: the latest run of the job


def is_active(job_id: str) -> bool:
    """Still queued or running (squeue knows it and it has not ended)."""
    state = queue_state(job_id)
    return state is not None and state not in (*TERMINAL_OK, *TERMINAL_BAD)


@dataclass(frozen=True)
class Accounting:
    state: str
    elapsed: str  # [D-]HH:MM:SS of its latest run
    restarts: int  # times it was requeued (preempted, timed out and resubmitted, node failure)


def accounting(job_ids: list[str]) -> dict[str, Accounting]:
    """sacct's view of jobs (array tasks as ID_N): latest state and elapsed time, and how often each
    ran before (sacct -D lists every run of a requeued job). Jobs sacct does not know are left out."""
    if not job_ids:
        return {}
    out = _call(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Elapsed"])
    runs: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        if line.count("|") == 2:
            jid, state, elapsed = line.split("|")
            runs.setdefault(jid, []).append((state.split()[0].upper() if state else "", elapsed))
    return {jid: Accounting(r[-1][0], r[-1][1], len(r) - 1) for jid, r in runs.items()}


def test_only(script: str, name: str) -> str:
    """`sbatch --test-only` of a job script: where and when it would start, or a SlurmUnreachable
    whose message is sbatch's own reason (bad account or QOS, time above the partition's limit)."""
    try:
        res = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnreachable(f"{name}: sbatch --test-only did not answer: {exc}") from None
    text = " ".join(res.stderr.split())
    if res.returncode != 0:
        raise SlurmUnreachable(f"{name}: Slurm refuses the job: {text.removeprefix('sbatch: error: ')}")
    return text


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _call(["scancel", *job_ids])
