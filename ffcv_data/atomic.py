"""Files that appear under their final name only when complete: write a temporary sibling (same
directory, so the rename is atomic), then rename it over the target. A crash leaves at most a
hidden `.NAME.tmp-PID` file, never a half-written result. A full disk (or quota) is a DataError
naming the file: one line from the CLI, not a traceback."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
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
