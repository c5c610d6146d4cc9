"""Files that appear under their final name only when complete: write a temporary sibling (same
directory, so the rename is atomic), then rename it over the target. A crash leaves at most a
hidden `.NAME.tmp-PID` file, never a half-written result."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def save_with(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the file (np.save, torch.save, ...); the temporary name keeps the
    target's suffix, so savers that append one (np.save: .npy) write exactly where told."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return save_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2))
