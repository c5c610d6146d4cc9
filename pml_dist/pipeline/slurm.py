"""What this machine's Slurm says: whether it answers, its MaxArraySize, a job's state. Every
`squeue` / `sacct` / `scontrol` / `sinfo` call of the pipeline is here."""

from __future__ import annotations

import shutil
import subprocess

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


def slurm_available() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_executor() -> str:
    return "slurm" if slurm_available() else "local"


def max_array_size() -> int:
    """The cluster's MaxArraySize (an array may hold indices 0..MaxArraySize-1)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=")[1])
    return 1001


def slurm_state(job_id: str, queue_only: bool = False) -> str:
    """A job's state from squeue, else (it has left the queue) from sacct; UNKNOWN when neither has it."""
    cmds = [
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
    ]
    for cmd in cmds[:1] if queue_only else cmds:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[0].upper()
    return "UNKNOWN"


def is_active(job_id: str) -> bool:
    """Still queued or running (squeue knows it and it has not ended)."""
    state = slurm_state(job_id, queue_only=True)
    return state not in ("UNKNOWN", *TERMINAL_OK, *TERMINAL_BAD)
