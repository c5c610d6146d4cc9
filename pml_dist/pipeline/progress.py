"""A local job's progress, echoed while it runs, and its end: the result or one error line that names
the stage and its log."""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time

from pml_dist.errors import PmlError
from pml_dist.pipeline.wait import cause_of

log = logging.getLogger(__name__)


def wait_local(name: str, job) -> None:
    """Wait for a local job and turn its failure into an error that names the stage and the log."""
    follow_progress(name, job)
    try:
        results = job.results()  # one result per task (multi-task jobs refuse .result())
    except Exception as exc:  # submitit wraps the job's traceback: name its last exception line
        cause = cause_of(str(exc)) or type(exc).__name__
        raise PmlError(f"{name} (job {job.job_id}) failed: {cause}; log: {job.paths.stderr}") from None
    log.info("%-24s done: %s", name, results[0])


def follow_progress(name: str, job, poll_s: float = 1.0, every_s: float = 30.0) -> None:
    """A local job's progress bars go to its log file: show the newest one here while it runs, as one
    updating line on a terminal, else as a log line every `every_s` seconds."""
    tty = sys.stderr.isatty()
    shown, last = "", 0.0
    while not job.done():
        time.sleep(poll_s)
        line = last_progress_line(job.paths.stderr)
        if not line or line == shown or (not tty and time.time() - last < every_s):
            continue
        shown, last = line, time.time()
        if tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write(f"\r\033[K{name}: {line}"[: width + 4])
            sys.stderr.flush()
        else:
            log.info("%-24s %s", name, line)
    if tty and shown:
        sys.stderr.write("\r\033[K")


def last_progress_line(path) -> str:
    """The newest tqdm bar (`desc: 40%|####  | 10/25 [...]`) at the end of a log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    bars = [part.strip() for part in re.split(r"[\r\n]", tail) if "%|" in part]
    return bars[-1] if bars else ""
