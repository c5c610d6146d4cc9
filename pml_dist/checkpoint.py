"""Checkpoint directories: `<stage>/ckpt/step-N/` with a completion marker written last.

DeepSpeed writes the files of a tag directly into its folder; a job killed part way leaves a folder
without `COMPLETE`, which resume ignores. Only rank 0 writes markers and deletes old checkpoints,
after a barrier, so no rank can see a half-deleted or half-written checkpoint as complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pml_dist.atomic import write_json

MARKER = "COMPLETE"
_TAG = re.compile(r"step-(\d+)$")


def tag(step: int) -> str:
    return f"step-{step}"


def write_marker(ckpt_root: Path, step: int, info: dict) -> None:
    write_json(ckpt_root / tag(step) / MARKER, {"step": step, **info})


def complete_steps(ckpt_root: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not ckpt_root.is_dir():
        return []
    steps = []
    for folder in ckpt_root.iterdir():
        match = _TAG.match(folder.name)
        if match and (folder / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(ckpt_root: Path) -> tuple[int, dict] | None:
    """(step, marker info) of the newest complete checkpoint, or None."""
    steps = complete_steps(ckpt_root)
    if not steps:
        return None
    step = steps[-1]
    return step, json.loads((ckpt_root / tag(step) / MARKER).read_text())


def prune(ckpt_root: Path, keep_last: int, protect: set[int] = frozenset()) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints (and any in `protect`), and
    incomplete folders older than the newest complete one. Returns the deleted steps."""
    steps = complete_steps(ckpt_root)
    keep = set(steps[-keep_last:]) | set(protect)
    newest = steps[-1] if steps else -1
    deleted = []
    for folder in sorted(ckpt_root.iterdir()) if ckpt_root.is_dir() else []:
        match = _TAG.match(folder.name)
        if not match:
            continue
        step = int(match.group(1))
        complete = (folder / MARKER).is_file()
        if (complete and step not in keep) or (not complete and step < newest):
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(step)
    return deleted
