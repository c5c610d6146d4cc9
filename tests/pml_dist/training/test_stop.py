"""Stop signals deferred from a process's first statement until its StopFlag handles them (the
start of every Slurm training task: slurm/*.sbatch, submitit's jobs through executor.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pml_dist.training.stop import DEFERRED_START, deferred_python

REPO = Path(__file__).resolve().parents[3]
# What a training task does after Python started: slow imports, then the StopFlag, then training
# (here: report whether a stop was requested, and by which signal).
LATER = ("import time; time.sleep(1.5); from pml_dist.training.stop import StopFlag; "
         "stop = StopFlag(); stop.install(); print('requested', stop.requested, stop.signum, flush=True)")


def _blocked(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16) & (1 << (sig - 1)))


@pytest.mark.faults
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_sent_while_starting_is_neither_fatal_nor_lost(sig):
    """The signal arrives once the first statement has blocked it, long before the handler exists
    (as a preemption in a job's first second): the process lives, and its StopFlag takes the signal
    as a stop request (honoured at the first step boundary)."""
    proc = subprocess.Popen([sys.executable, "-c", DEFERRED_START, "-c", LATER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 30
    while not _blocked(proc.pid, sig):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["requested", "True", str(int(sig))]
    assert f"{signal.Signals(sig).name} arrived while this process was starting" in err


def test_without_a_signal_nothing_is_requested_and_the_signals_are_unblocked_after_install():
    code = (LATER.replace("time.sleep(1.5); ", "") +
            "; import signal; print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))")
    done = subprocess.run([sys.executable, "-c", DEFERRED_START, "-c", code], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=True)
    assert done.stdout.split("\n")[:2] == ["requested False None", "[]"]


def test_the_sbatch_scripts_and_submitit_start_python_with_the_same_deferral():
    for name in ("teacher", "students"):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        assert f"DEFER='{DEFERRED_START}'" in text, name
        assert re.search(r'srun .*"\$PYTHON" -c "\$DEFER" -m pml_dist train', text), name
    assert deferred_python("/x/python").startswith("/x/python -c 'import os, signal, sys;")
