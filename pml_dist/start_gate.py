"""Rank 0's word, before any collective, on whether a multi-rank job goes on.

Only rank 0 takes a stage's lock (pml_dist/lock.py) and judges the folder. Before this gate the
other ranks went straight to the rendezvous, so a rank 0 refused by a lock left them waiting there
for a peer that never came, until their launcher or `dist.timeout_s` ended them, with a traceback
and no word of why. Now every other rank first waits here for rank 0's verdict, over the launch's
rendezvous store (the same store the process group is then built on): "go", or rank 0's one-line
error, which each of them stops with as `rank R: stopped because rank 0 failed: <line>`.

The store is the launch's own (rank 0 serves it on MASTER_ADDR:MASTER_PORT, or torchrun's agent
does), so a verdict can never be an earlier attempt's, as a file on the shared disk could be.
A one-process job has no store: its `go()` only runs `on_go`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time

from pml_dist.dist import RankInfo, stopped_because
from pml_dist.errors import PmlError

VERDICT, READ = "pml_dist/start/verdict", "pml_dist/start/read"  # keys beside the process group's own
GO, STOP = "go", "stop "
STOP_WAIT_S = 60.0  # how long a refused rank 0 keeps its store up for late ranks to read why


class StartGate:
    """`with gate.decided_by_rank0(errors, on_go):` around what rank 0 does before the ranks meet:
    the other ranks wait at the `with` for its verdict; on rank 0, `go()` lets them on, and an error
    of type `errors` leaving the block before `go()` stops them with its line. `on_go` runs on every
    rank once the verdict is "go", before it is told (rank 0) or acknowledged (the others): so when
    rank 0's `go()` returns, every rank has run it."""

    def __init__(self, info: RankInfo, timeout_s: float):
        self.info, self.timeout_s = info, timeout_s
        self.told = False
        self.on_go = None
        self.store = None
        if info.world_size > 1:
            try:
                self.store = _launch_store(info, timeout_s)
            except RuntimeError as exc:  # rank 0: the port is taken; another rank: nobody served it
                raise PmlError(f"rank {info.rank}: {_meeting(info, exc)}") from None

    @contextlib.contextmanager
    def decided_by_rank0(self, errors: tuple[type[BaseException], ...], on_go=None):
        self.on_go = on_go
        if not self.info.is_main:
            self._wait()
        try:
            yield self
        except errors as exc:
            self.stop(str(exc))
            raise

    def go(self) -> None:
        """Rank 0: the others go on. Returns once all of them have read it, so a rank 0 that then
        finds nothing to do and exits never takes the store away from a rank still reading."""
        if not self.info.is_main or self.told:
            return
        self.told = True
        if self.on_go is not None:
            self.on_go()
        if self.store is None:
            return
        self.store.set(VERDICT, GO)
        missing = self._await_readers(self.timeout_s)
        if missing:
            raise PmlError(f"rank 0: {missing} of the other {self.info.world_size - 1} ranks did not reach "
                           f"the start within dist.timeout_s={self.timeout_s:g} s (see their logs)")

    def stop(self, line: str) -> None:
        """Rank 0, before `go()`: the others stop with `line`. Waits up to STOP_WAIT_S for them to
        read it (a rank that never started cannot)."""
        if self.store is None or not self.info.is_main or self.told:
            return
        self.told = True
        try:
            self.store.set(VERDICT, STOP + " ".join(line.split()))
            self._await_readers(min(STOP_WAIT_S, self.timeout_s))
        except RuntimeError:  # a store failing now must not hide rank 0's own error
            pass

    def _wait(self) -> None:
        """Another rank: rank 0's verdict (then on_go), or a one-line error."""
        rank = self.info.rank
        try:
            verdict = self.store.get(VERDICT).decode()  # another rank: world_size > 1, a store
            if verdict == GO and self.on_go is not None:
                self.on_go()
            self.store.add(READ, 1)
        except RuntimeError as exc:  # rank 0 ended before it said
            raise PmlError(f"rank {rank}: stopped because rank 0 ended before the start: "
                           f"{_meeting(self.info, exc)}; rank 0's log says why") from None
        if verdict.startswith(STOP):
            raise PmlError(stopped_because(rank, 0, verdict[len(STOP):]))

    def _await_readers(self, timeout_s: float) -> int:
        """How many other ranks have not read the verdict after up to `timeout_s`."""
        others, deadline = self.info.world_size - 1, time.monotonic() + timeout_s
        while True:
            missing = others - self.store.add(READ, 0)
            if missing <= 0 or time.monotonic() >= deadline:
                return max(missing, 0)
            time.sleep(0.05)


def _meeting(info: RankInfo, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"the rendezvous store at {info.master_addr}:{info.master_port} failed: {first}"


def _launch_store(info: RankInfo, timeout_s: float):
    """The launch's rendezvous store, as torch's env:// rendezvous makes it: served by rank 0, or,
    under torchrun, by its agent where the agent says so (TORCHELASTIC_USE_AGENT_STORE) for this
    address, in which case every rank is a client."""
    import torch.distributed as tdist

    agent = (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
             and os.environ.get("MASTER_ADDR") == info.master_addr
             and os.environ.get("MASTER_PORT") == str(info.master_port))
    serve = info.is_main and not agent
    return tdist.TCPStore(info.master_addr, info.master_port, info.world_size, serve,
                          datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True)
