"""Pieces of the scheduler that need no cluster."""

from __future__ import annotations

from pml_dist.pipeline.progress import last_progress_line
from pml_dist.pipeline.wait import cause_of


def test_the_newest_progress_bar_is_read_from_a_job_log(tmp_path):
    log = tmp_path / "job.err"
    log.write_bytes(
        b"INFO loading\n" + b"x" * 5000 + b"\nteacher epoch 1:  40%|####  | 10/25 [00:01<00:02]"
        b"\rteacher epoch 1:  44%|####4 | 11/25 [00:01<00:02]\r\nINFO evaluating\n"
    )
    assert last_progress_line(log) == "teacher epoch 1:  44%|####4 | 11/25 [00:01<00:02]"
    log.write_text("INFO no bar yet\n")
    assert last_progress_line(log) == ""
    assert last_progress_line(tmp_path / "not-there.err") == ""


def test_the_cause_of_a_failure_is_the_last_exception_line():
    trace = (
        'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: first\n\nDuring handling...\n'
        "pml_dist.errors.PmlError: no teacher weights at /r/teacher/best.pt\nsrun: error: task 0 exited\n"
    )
    assert cause_of(trace) == "pml_dist.errors.PmlError: no teacher weights at /r/teacher/best.pt"
    assert cause_of("srun: error: node failure\n") is None
