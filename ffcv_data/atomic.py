"""Files that appear under their final name only when complete: write a temporary sibling (same
directory, so the rename is atomic), then rename it over the target. A crash leaves at most a
hidden `.NAME.tmp-HOST-PID` file, never a half-written result. A full disk (or quota) is a DataError
naming the file: one line from the CLI, not a traceback.

Every file or folder named after the process that writes it (temporaries, beton.py's error log,
export's and make-synthetic's folders) is named here, with the host name and the PID: a folder on a
shared file system (NFS, Lustre) is written by processes of several hosts, and a PID says whether a
process still runs only on its own host. `stale_temporary` decides what a sweep may delete."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ffcv_data.errors import DataError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; disk quota exceeded


def disk_full(path: Path, exc: OSError) -> DataError:
    """The one-line error for a write to `path` that ran out of space (`exc`: its ENOSPC/EDQUOT)."""
    return DataError(f"{path}: {os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}) while writing it; "
                     f"nothing was written under that name (an earlier {Path(path).name} is unchanged); "
                     f"free space on {Path(path).parent} and rerun")


def save_with(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the file (np.save, torch.save, ...); the temporary name keeps the
    target's suffix, so savers that append one (np.save: .npy) write exactly where told."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in FULL:
            raise disk_full(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return save_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


# ------------------------------------------------------------------ names owned by a host and a PID


def host_name() -> str:
    """This host's name as a file name may hold it: socket.gethostname() with every character but
    letters, digits, '_', '.' and '-' replaced by '_' ("localhost" when it is empty)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def owner() -> str:
    """`HOST-PID` of this process: the part of a name that says who writes it."""
    return f"{host_name()}-{os.getpid()}"


def temporary_path(path: Path, keep_suffix: bool = True) -> Path:
    """The hidden sibling `path` is written to before the rename: `.NAME.tmp-HOST-PID[.SUFFIX]`
    (the target's suffix kept, for savers that append one; a folder: keep_suffix=False)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{owner()}{path.suffix if keep_suffix else ''}")


def side_path(path: Path, what: str) -> Path:
    """A file a writer of `path` keeps beside it while writing: `NAME.WHAT-HOST-PID`."""
    path = Path(path)
    return path.with_name(f"{path.name}.{what}-{owner()}")


# `.NAME.tmp-[HOST-]PID[.SUFFIX]` and `NAME.errors-[HOST-]PID` (beton.py's error log); names without
# the host part were written by versions before it (on this host, as far as anyone can tell).
_OWNED = re.compile(r"^\.(?P<target>.+)\.tmp-(?:(?P<host>[A-Za-z0-9_.-]+)-)?(?P<pid>\d+)(\.\w+)?$"
                    r"|^(?P<log>.+)\.errors-(?:(?P<log_host>[A-Za-z0-9_.-]+)-)?(?P<log_pid>\d+)$")


@dataclass(frozen=True)
class Owned:
    """What a temporary's name says: the file it is written for, and the writer's host and PID."""

    target: str
    host: str | None  # None: written before names carried the host (taken as this host's)
    pid: int

    @property
    def foreign(self) -> bool:
        """Whether another host wrote it: whether its process runs cannot be seen from here."""
        return self.host is not None and self.host != host_name()


def owned(name: str) -> Owned | None:
    """The owner of a temporary named `name` (None: not a temporary's name)."""
    m = _OWNED.match(name)
    if m is None:
        return None
    if m["target"] is not None:
        return Owned(m["target"], m["host"], int(m["pid"]))
    return Owned(m["log"], m["log_host"], int(m["log_pid"]))


def stale_temporary(found: Owned) -> bool:
    """Whether a sweep may delete it: written on this host (or before names carried one) by a
    process that no longer runs. Another host's is never stale from here (its PID means nothing
    on this host): only a sweep on that host removes it."""
    return not found.foreign and not pid_alive(found.pid)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
