"""Stopping on request (Slurm preemption, submitit's USR2, a user's SIGTERM) without saving in a
signal handler: the handler only sets a flag, the trainer reads it at optimizer-step boundaries
(every train.log_every steps and at epoch ends: the agreement waits for the device), all
ranks save together, and the process exits with `EXIT_STOPPED` so a scheduler can requeue it.

Until the handlers are installed a stop signal is deferred, not fatal: Slurm's jobs start Python as
`python -c DEFERRED_START ...` (the sbatch scripts, and submitit's jobs through executor.py), which
blocks SIGTERM and USR2 and then executes the real command; a blocked signal stays pending across
exec, and `StopFlag.install()` unblocks it once its handler is in place, so a preemption in the
job's first seconds stops it at the first step boundary (and requeues it) instead of killing it.
"""

from __future__ import annotations

import logging
import signal

EXIT_STOPPED = 3  # stopped at a checkpoint on request; rerunning resumes
STOPPED_FILE_ENV = "PML_DIST_STOPPED_FILE"  # `pml-dist train` writes this file once all ranks saved
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# `python -c DEFERRED_START ARGS...` is `python ARGS...` with the stop signals blocked from its first
# statement on (slurm/*.sbatch carry the same line): a signal sent meanwhile waits for install().
DEFERRED_START = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, "
                  "signal.SIGUSR2}); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
log = logging.getLogger(__name__)


def deferred_python(python: str) -> str:
    """The shell command that starts `python` with the stop signals deferred (submitit's `python`)."""
    import shlex

    return f"{python} -c {shlex.quote(DEFERRED_START)}"


def release_stop_signals() -> None:
    """Unblock the stop signals (a no-op where they were not deferred); a pending one is delivered
    to the handler in place now. Jobs that install no StopFlag call it once their scheduler's
    handlers are in (submitit's); StopFlag.install() calls it after its own."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Stopped(Exception):
    """All ranks saved a checkpoint after a stop request; rerun the same command to resume."""


class StopFlag:
    """Set from a signal handler; read only at step boundaries (never save inside a handler).

    The handlers it replaces (submitit's checkpoint-and-requeue on USR2, for one) are kept and
    called by `hand_over()` once every rank has saved.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self, signals=STOP_SIGNALS) -> None:
        """Handle `signals`, then release the deferred ones: one that arrived while this process
        was starting counts as a request now (read from the pending set, not left to the moment
        Python runs the handler), honoured at the first step boundary."""
        for sig in signals:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        pending = sorted(signal.sigpending() & set(signals))
        if pending:
            self.requested, self.signum = True, int(pending[-1])
            log.warning("%s arrived while this process was starting (deferred): stopping at the first "
                        "step boundary", " and ".join(signal.Signals(s).name for s in pending))
        release_stop_signals()

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def hand_over(self) -> None:
        """After the collective save: let the scheduler's own handler act. USR2's comes first
        (submitit checkpoints, requeues on rank 0 and exits; Slurm preempts with SIGTERM then USR2,
        and a rank may have stopped only because another rank was signalled); otherwise the
        received signal's. No-op where those are the default handlers (plain CLI: exit status 3)."""
        for signum in (signal.SIGUSR2, self.signum):
            previous = self.previous.get(signum)
            if callable(previous):
                previous(signum, None)
                return

    def agreed(self, device) -> bool:
        """True on every rank as soon as any rank was asked to stop (one tiny all-reduce)."""
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())
