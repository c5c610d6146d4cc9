"""Stopping on request (Slurm preemption, submitit's USR2, a user's SIGTERM) without saving in a
signal handler: the handler only sets a flag, the trainer reads it at optimizer-step boundaries
(every train.log_every steps and at epoch ends: the agreement waits for the device), all
ranks save together, and the process exits with `EXIT_STOPPED` so a scheduler can requeue it.
"""

from __future__ import annotations

import signal

EXIT_STOPPED = 3  # stopped at a checkpoint on request; rerunning resumes
STOPPED_FILE_ENV = "PML_DIST_STOPPED_FILE"  # `pml-dist train` writes this file once all ranks saved


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

    def install(self, signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
        for sig in signals:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

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
