"""TensorBoard event files of one training stage (`StageFiles.tensorboard`), for watching a run;
metrics.jsonl stays the record. Rank 0 writes; every other rank holds a Board that does nothing, so
the trainer calls it unconditionally.

Tags: train/loss, train/lr, train/samples_per_s at each logged optimizer step; val/map per epoch;
test/map at the end; val_ap/<class name> (the best epoch's per-class validation AP; with more than
MAX_CLASS_TAGS classes one histogram `val_ap` of them instead: TensorBoard lists every tag, and an
Open Images label space would give it 20k) and, for a student, targets/positives_per_image (once,
at step 0). The global step is the optimizer step.

Resume: the writer appends a new event file to the same folder. SummaryWriter's purge_step T makes
TensorBoard's reader hide the earlier files' events at steps >= T, so what a stopped run wrote after
its checkpoint (and writes again now) is shown once.
"""

from __future__ import annotations

from pathlib import Path

MAX_CLASS_TAGS = 1000  # COCO 80, NUS-WIDE 81, CUB 312 get one tag per class

# metrics.jsonl record kind -> {its key: the tag}
_TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "samples_per_s": "train/samples_per_s"},
    "val": {"map": "val/map"},
    "test": {"map": "test/map"},
}


class Board:
    def __init__(self, folder: Path, enabled: bool, resume_step: int):
        """enabled: rank 0 only. resume_step: the checkpoint's step (0 without one)."""
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(folder)
        earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        # Records up to the checkpoint's step were written before it was saved (metrics.jsonl keeps
        # them too); later ones are trained again. Without a checkpoint everything is written again.
        purge = (resume_step + 1 if resume_step else 0) if earlier else None
        self.writer = SummaryWriter(str(folder), purge_step=purge)

    def record(self, record: dict) -> None:
        """The scalars of one metrics.jsonl record (kind train, val or test), at its step."""
        for key, tag in _TAGS.get(record["kind"], {}).items():
            self.scalar(tag, record[key], record["step"])

    def class_ap(self, prefix: str, names: list[str], ap: list[float | None], step: int) -> None:
        """<prefix>/<class name> per class, or beyond MAX_CLASS_TAGS classes one histogram <prefix>;
        a class without a positive (AP None) has no point."""
        if self.writer is None:
            return
        if len(names) > MAX_CLASS_TAGS:
            import numpy as np

            values = np.array([v for v in ap if v is not None], dtype=np.float64)
            if len(values):
                self.writer.add_histogram(prefix, values, global_step=step)
            return
        for name, value in zip(names, ap, strict=True):
            if value is not None:
                self.scalar(f"{prefix}/{name}", value, step)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
