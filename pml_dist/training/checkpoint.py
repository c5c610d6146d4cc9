"""Checkpoint directories: `<stage>/ckpt/step-N/` with a completion marker written last.

    step-N/                 DeepSpeed's files for tag step-N (weights, optimizer, scheduler, step)
    step-N/rng-rankR.pt     each rank's torch and numpy RNG state (and its GPU's, on CUDA)
    step-N/COMPLETE         step, epoch, position in it, world size, ZeRO stage; written last

DeepSpeed writes the files of a tag directly into its folder; a job killed part way leaves a folder
without `COMPLETE`, which resume ignores. A save that finds the disk full deletes its folder and
stops with one line naming it; a failed save never touches the newest complete checkpoint.
Only rank 0 writes markers and deletes old checkpoints, after a barrier, so no rank can see a
half-deleted or half-written checkpoint as complete. `Checkpointer` is the collective save / load
the trainer calls; the functions below it are the folder rules it uses.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

from ffcv_data.atomic import FULL, write_json
from ffcv_data.errors import DataError
from pml_dist.dist import is_collective_failure
from pml_dist.errors import PmlError

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_TAG = re.compile(r"step-(\d+)$")


class Checkpointer:
    """Saves and restores one stage's DeepSpeed engine, with each rank's RNG state, under `root`.

    `client_state` is the trainer's own resumable state (a dict with at least `epoch` and
    `epoch_samples`); DeepSpeed stores it inside its checkpoint and hands it back on load.
    """

    def __init__(self, root: Path, engine, info, keep_last: int, inputs: dict | None = None, device=None):
        self.root, self.engine, self.info, self.keep_last = Path(root), engine, info, keep_last
        self.inputs = inputs  # what the stage trains from (provenance.py), kept in every marker
        self.device = device  # the rank's device: a CUDA one's RNG state is saved too

    def save(self, client_state: dict, protect: set[int] = frozenset()) -> None:
        """Collective: every rank writes its part, then rank 0 marks the checkpoint complete and
        prunes old ones (never those in `protect`)."""
        step = self.engine.global_steps
        try:
            self.engine.save_checkpoint(str(self.root), tag=tag(step), client_state=client_state)
            _save_rng(self._rng_file(step), self.device)
            _barrier()
            if self.info.is_main:
                write_marker(self.root, step, {
                    "epoch": client_state["epoch"], "epoch_samples": client_state["epoch_samples"],
                    "world_size": self.info.world_size, "zero_stage": self.engine.zero_optimization_stage(),
                    "inputs": self.inputs,
                })
        except (OSError, RuntimeError, DataError) as exc:
            full = _disk_full(exc, self.root)
            if full is None:
                raise
            raise self._failed(step, full) from None
        if self.info.is_main:
            prune(self.root, self.keep_last, set(protect))
        _barrier()

    def _failed(self, step: int, why: str) -> PmlError:
        """The save of `step` ran out of space: delete its folder (it has no marker, and is not
        wanted half-written under its final name) and name what is left to resume from."""
        folder = self.root / tag(step)
        shutil.rmtree(folder, ignore_errors=True)
        found = latest(self.root)
        left = (f"the newest complete checkpoint, {self.root / tag(found[0])}, is intact and a rerun "
                f"resumes from it" if found else "there is no earlier complete checkpoint")
        return PmlError(f"{folder}: {why} while saving the checkpoint of step {step} (rank "
                        f"{self.info.rank}); its folder was deleted, {left}; free space on {self.root}")

    def load(self) -> dict | None:
        """Restore the newest complete checkpoint into the engine and this rank's RNGs; returns its
        client state with `step` set (checkpoints of older versions lack that key), or None when
        there is none."""
        found = latest(self.root)
        if found is None:
            return None
        step, marker = found
        self._check_world_size(step, marker)
        _, client = self.engine.load_checkpoint(str(self.root), tag=tag(step))
        _load_rng(self._rng_file(step), self.device)
        log.info("resumed from %s (epoch %d, %d samples into it)", self.root / tag(step),
                 client["epoch"], client["epoch_samples"])
        return {**client, "step": step}

    def _check_world_size(self, step: int, marker: dict) -> None:
        """ZeRO partitions optimizer state by rank, so such a checkpoint loads only on as many ranks."""
        if marker["world_size"] == self.info.world_size or marker["zero_stage"] == 0:
            return
        folder = self.root / tag(step)
        raise PmlError(
            f"{folder}: a ZeRO-{marker['zero_stage']} checkpoint from {marker['world_size']} ranks "
            f"cannot load on {self.info.world_size}. Convert it with `python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {folder} --output_folder "
            f"{folder}_universal --inject_missing_state`, or resume with {marker['world_size']} ranks"
        )

    def _rng_file(self, step: int) -> Path:
        return self.root / tag(step) / f"rng-rank{self.info.rank}.pt"


def _disk_full(exc: BaseException, folder: Path) -> str | None:
    """"No space left on device (ENOSPC)" when `exc` is a write that ran out of space, else None.
    torch.save reports a full disk as a RuntimeError without an errno ("unexpected pos ...", "file
    write failed"): that counts when the file system has (next to) nothing left. A collective that
    failed (another rank stopped: its own error says why, trainer.train) is never this rank's disk."""
    if is_collective_failure(exc):
        return None
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.errno in FULL:
            return f"{err.strerror or 'no space left'} ({errno.errorcode[err.errno]})"
        if isinstance(err, DataError) and ("(ENOSPC)" in str(err) or "(EDQUOT)" in str(err)):
            return "No space left on device (ENOSPC)"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if isinstance(exc, RuntimeError) and free < 16 * 2**20:
        return f"No space left on device (ENOSPC: {free} bytes free)"
    return None


def _on_cuda(device) -> bool:
    import torch

    return device is not None and torch.device(device).type == "cuda"


def _save_rng(path: Path, device=None) -> None:
    """CPU generators always; on CUDA also the generator of this rank's GPU (dropout, random ops on
    the device), which torch.get_rng_state does not cover."""
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if _on_cuda(device):
        state["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(state, path)


def _load_rng(path: Path, device=None) -> None:
    """Absent in a checkpoint from a rank that did not exist when it was written: keep this RNG.
    A checkpoint written on CPU has no GPU state: the GPU's generator is kept as seeded."""
    import numpy as np
    import torch

    if path.is_file():
        rng = torch.load(path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        if _on_cuda(device) and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


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
