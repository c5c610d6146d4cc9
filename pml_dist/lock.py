"""One owner per folder of a run, on a shared file system (NFS, Lustre) as on a local disk.

    <run>/logs/run.lock           `pml-dist run` while it submits (Slurm) or runs (local); jobs.json is
                                  read and written under it
    <stage>/logs/stage.lock       a training stage's rank 0 while it trains (teacher, references,
                                  students); pseudo/logs/stage.lock the merge
    <teacher>/logs/infer-rank-R.lock   each inference rank (the ranks are independent processes)
    <data>/logs/prepare.lock      `prepare`

(in logs/ folders, so a lock is never taken for a result: config.first_artefact skips them).

A lock is a file created with O_CREAT | O_EXCL (atomic on local file systems, NFSv3 and later and
Lustre, where flock/fcntl locks may not reach the server at all) holding JSON: what it guards, host,
PID (and the PID's start time, against PID reuse), command, start time, heartbeat interval, the
Slurm job id and restart count, and a random token. Its heartbeat is the file's modification
time: a daemon thread touches it through the holder's open descriptor every HEARTBEAT_S (15 s), so
a refresh only ever touches the holder's own file, never one that replaced it. Both can be changed
through the environment: PML_DIST_LOCK_HEARTBEAT_S, PML_DIST_LOCK_TIMEOUT_S.

A lock whose holder is provably gone is taken over, and nothing else is:
  - same host, and its PID no longer runs (or is a zombie, or another process with that PID);
  - the same Slurm job id and an earlier restart count: a requeued job's previous incarnation
    (Slurm ends it before requeueing);
  - a heartbeat older than TIMEOUT_S (120 s): a host that died, a process frozen or partitioned.
A live holder on another host (the heartbeat fresh) is never taken over. A takeover is itself
race-free: one contender at a time (the maker of `<lock>.takeover`, O_EXCL too) renames the stale
file to a name of its own and goes on only if what it moved is still the file it judged stale (else
it puts that file back); the lock is then created with O_EXCL as always, so of several contenders
exactly one holds it.

Otherwise `LockHeld` (a PmlError: one line, exit 2) names the holder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ffcv_data.atomic import host_name, owner, pid_alive  # this host as temporaries' names spell it
from pml_dist.errors import PmlError

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # the holder touches its lock file this often
TIMEOUT_S = 120.0  # a lock whose heartbeat is older than this is taken over, from any host
TAKEOVER_S = 30.0  # a takeover in progress (`<lock>.takeover`) older than this was abandoned
WRITING_S = 2.0  # how long a lock without content yet (its maker is writing it) is read again
HEARTBEAT_ENV, TIMEOUT_ENV = "PML_DIST_LOCK_HEARTBEAT_S", "PML_DIST_LOCK_TIMEOUT_S"


def heartbeat_s() -> float:
    return _seconds(HEARTBEAT_ENV, HEARTBEAT_S)


def timeout_s() -> float:
    return _seconds(TIMEOUT_ENV, TIMEOUT_S)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise PmlError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise PmlError(f"{name}={text!r} must be > 0")
    return value


def _reason(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the style of the project's other disk-full lines."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc} ({name})" if name else str(exc.strerror or exc)


class LockHeld(PmlError):
    """The folder is in use by a live holder (`holder`)."""

    def __init__(self, message: str, holder: Holder):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """What a lock file says about its holder, and its heartbeat (the file's modification time)."""

    path: Path
    what: str
    host: str
    pid: int | None
    command: str
    started: float | None
    heartbeat: float  # the file's mtime
    slurm_job_id: str
    slurm_restart_count: int
    pid_start: str
    token: str
    ino: tuple[int, int]  # (st_dev, st_ino): the file itself, across renames

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The lock at `path`, None when there is none. A file still being written (created, its
        content not yet there) reads with empty fields: held, until its heartbeat times out."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            d = json.loads(raw)
            d = d if isinstance(d, dict) else {}
        except ValueError:
            d = {}
        pid = d.get("pid")
        return cls(path=Path(path), what=str(d.get("what", "")), host=str(d.get("host", "")),
                   pid=pid if isinstance(pid, int) else None, command=str(d.get("command", "")),
                   started=d.get("started") if isinstance(d.get("started"), int | float) else None,
                   heartbeat=st.st_mtime, slurm_job_id=str(d.get("slurm_job_id") or ""),
                   slurm_restart_count=int(d.get("slurm_restart_count") or 0),
                   pid_start=str(d.get("pid_start") or ""), token=str(d.get("token", "")),
                   ino=(st.st_dev, st.st_ino))

    @property
    def age(self) -> float:
        """Seconds since its last heartbeat (never negative: clocks of hosts differ a little)."""
        return max(0.0, time.time() - self.heartbeat)

    def gone(self, timeout: float | None = None) -> str | None:
        """Why the holder is provably gone (its lock may be taken over), or None."""
        timeout = timeout_s() if timeout is None else timeout
        if self.host == host_name() and self.pid is not None and not _runs(self.pid, self.pid_start):
            return f"its process {self.pid} on {self.host} no longer runs"
        job, restarts = os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if self.slurm_job_id and self.slurm_job_id == job and self.slurm_restart_count < restarts:
            return f"it is an earlier run of Slurm job {job}, which was requeued"
        if self.age > timeout:
            return f"no heartbeat for {self.age:.0f} s (timeout {timeout:.0f} s)"
        return None

    def describe(self) -> str:
        """`<command>` (pid P on HOST, Slurm job J, since T, heartbeat N s ago), on one line."""
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "a process still writing its lock"
        if self.slurm_job_id:
            who += f", Slurm job {self.slurm_job_id}"
        if self.started:
            who += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"
        who += f", heartbeat {self.age:.0f} s ago"
        command = " ".join(self.command.split())
        if len(command) > 160:
            command = command[:157] + "..."
        return f"`{command}` ({who})" if command else who


class Lock:
    """`with Lock(path, what):` owns `path` (see the module docstring) or raises LockHeld.

    `acquire(wait=True)` waits for a live holder to release it instead, calling `waiting(holder)`
    every `poll_s` seconds."""

    def __init__(self, path: Path | str, what: str):
        self.path, self.what = Path(path), what
        self.token = secrets.token_hex(8)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[Path] = []  # folders this lock created (removed again when left empty)
        self.took_over: str | None = None  # why the previous holder was gone, when taken over

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, poll_s: float = 1.0,
                waiting: Callable[[Holder], None] | None = None) -> Lock:
        while True:
            holder = self._try()
            if holder is None:
                return self
            if not wait:
                raise LockHeld(f"{self.what} is in use by {holder.describe()}", holder)
            if waiting is not None:
                waiting(holder)
            time.sleep(poll_s)

    def _try(self) -> Holder | None:
        """Take the lock (None), or return its live holder."""
        # a lock created a moment ago may not hold its content yet: read it again for a while, so a
        # refusal names its holder rather than "a process still writing its lock"
        empty_since: float | None = None
        while True:
            self._make_parent()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                continue  # its folder was removed in between (a releasing holder's cleanup)
            except FileExistsError:
                holder = Holder.read(self.path)
                if holder is None:
                    continue  # released in between: try again
                why = holder.gone()
                if why is None and holder.pid is None:  # patience from the first sight of it empty
                    empty_since = empty_since or time.monotonic()
                    if time.monotonic() - empty_since < WRITING_S:
                        time.sleep(0.02)
                        continue
                if why is None:
                    return holder
                if self._set_aside(holder):
                    self.took_over = why
                    log.warning("%s: taking over its lock %s from %s: %s", self.what, self.path,
                                holder.describe(), why)
                continue
            except OSError as exc:
                raise PmlError(f"{self.what}: cannot create its lock {self.path}: {_reason(exc)}") from None
            try:
                os.write(fd, json.dumps(self._content()).encode())
                os.fsync(fd)
            except BaseException as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                self._remove_made()
                if isinstance(exc, OSError):  # a full disk or quota: one line
                    raise PmlError(f"{self.what}: cannot write its lock {self.path}: "
                                   f"{_reason(exc)}") from None
                raise
            self._fd = fd
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path}", daemon=True)
            self._thread.start()
            return None

    def _make_parent(self) -> None:
        missing = []
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PmlError(f"{self.what}: cannot create {self.path.parent} for its lock: {exc}") from None
        self._made = self._made or missing

    def _remove_made(self) -> None:
        """Remove the folders this lock created, as far as they are empty (an otherwise untouched
        folder looks as before: commands that fail early leave nothing behind)."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def _content(self) -> dict:
        pid = os.getpid()
        return {"what": self.what, "host": host_name(), "pid": pid, "pid_start": _start_time(pid),
                "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable,
                "started": time.time(), "heartbeat_every_s": heartbeat_s(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "token": self.token}

    def _set_aside(self, stale: Holder) -> bool:
        """Move the stale lock out of the way; True only when what was moved is `stale` itself.

        One contender at a time does this: the one that created `<lock>.takeover` (O_EXCL; removed
        when done, or by the next contender once its maker is gone or TAKEOVER_S old). It renames
        the lock to a name of its own and checks that it moved the file it judged stale; a lock
        someone created in its place meanwhile (its stale holder came back and released it) is put
        back. Creating the new lock is then the plain O_EXCL race, which one process wins."""
        mutex = self.path.with_name(f"{self.path.name}.takeover")
        try:
            fd = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            other = Holder.read(mutex)
            if other is not None and other.gone(TAKEOVER_S) is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(mutex)  # its maker died (or hangs) in the middle of a takeover
            else:
                time.sleep(0.05)  # another contender is taking it over: see what it leaves
            return False
        try:
            try:
                os.write(fd, json.dumps(self._content()).encode())
            finally:
                os.close(fd)
            return self._move_if(stale)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mutex)

    def _move_if(self, stale: Holder) -> bool:
        # Judged stale before this process held the mutex: another contender may have taken it over
        # meanwhile and created its own lock there. Moving that one aside (and back, below) would
        # leave the name free for a moment, for a third contender to take: two owners (seen in CI,
        # 6 contenders on 2 cores). So it must still be the very file judged stale (inode and token:
        # a new file may get the freed inode number).
        current = Holder.read(self.path)
        if current is None or current.ino != stale.ino or current.token != stale.token:
            return False
        aside = self.path.with_name(f"{self.path.name}.stale-{owner()}-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # released meanwhile
        moved = Holder.read(aside)
        if moved is not None and moved.ino == stale.ino and moved.token == stale.token:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)  # put it back, unless the name was taken meanwhile
        except FileExistsError:
            log.error("%s: the lock %s changed hands while it was taken over; %s and the lock now there "
                      "both believe they own it", self.what, self.path, moved.describe() if moved else "?")
        except OSError:  # a file system without hard links: rename, when nothing is there
            if not self.path.exists():
                os.rename(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def _beat(self) -> None:
        every = heartbeat_s()
        while not self._stop.wait(every):
            fd = self._fd
            if fd is None:
                return
            with contextlib.suppress(OSError):
                os.utime(fd)  # this file, whatever name it has now

    def release(self) -> None:
        """Remove the lock file if it is still ours (a lock taken over from us is left alone)."""
        if self._fd is None:
            return
        self._stop.set()
        fd, self._fd = self._fd, None
        try:
            mine = os.fstat(fd)
            now = os.stat(self.path)
            ours = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            ours = False
        finally:
            os.close(fd)  # before unlinking: NFS keeps an open unlinked file as .nfsXXXX
        if ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._remove_made()
        else:
            log.warning("%s: %s is no longer this process's lock (taken over); left as it is",
                        self.what, self.path)


def holder_of(path: Path) -> Holder | None:
    """Who holds the lock at `path` (live or not: see Holder.gone), None when nobody does."""
    return Holder.read(Path(path))


@contextlib.contextmanager
def stage_lock(path: Path, what: str, take: bool = True):
    """A stage's lock around what writes its folder, held by one process (`take`: the rank that owns
    the stage, rank 0; the other ranks of the job go on without it)."""
    if not take:
        yield None
        return
    with Lock(path, what) as lock:
        yield lock


# ------------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (the command name may hold spaces), None if absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def _runs(pid: int, start: str = "") -> bool:
    """Whether process `pid` of this host runs: it exists, is no zombie, and (when `start` is known)
    started when the lock's holder did, so it is not a later process that got its PID."""
    if not pid_alive(pid):
        return False
    fields = _stat_fields(pid)
    if fields is None:
        return sys.platform != "linux"  # no /proc: trust kill
    if fields[0] in ("Z", "X"):
        return False
    return not start or not fields[19:20] or fields[19] == start
