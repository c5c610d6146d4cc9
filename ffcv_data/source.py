"""What every data-set reader gives `prepare`: one split as rows of (image file, label set), sparse.

A reader (coco.py, voc.py, cub.py, cole.py; `formats.py` picks one by `data.format`) checks its own
files and raises `DataError` naming the file and line or record of the first problem, before
anything is written. Rows come in the reader's own order; `reference_order` says in which order
Cole et al.'s scripts walk them (their observed-label draw and validation split depend on it), and
`reference_classes` which of our classes is their class k.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ffcv_data.sparse import LabelRows


@dataclass
class SourceSplit:
    name: str
    source_file: Path  # the file named in errors and stats (annotation file, list file)
    label_files: list[Path]  # every file the labels are read from (their digests go into inputs.json)
    image_root: Path  # `files` relative to it are what `pml-dist labels` prints
    files: list[Path]
    keys: np.ndarray  # int64, unique: the image's id, which the keyed draw is keyed by
    labels: LabelRows  # per row, its classes (sparse.py; a row may be empty)
    class_names: list[str]
    class_ids: list[int]  # the source's own id of each class (COCO's category ids), else 0..L-1
    reference_order: np.ndarray  # row positions in the order Cole et al.'s scripts walk the rows
    reference_classes: np.ndarray  # reference_classes[k] = our class index of their class k
    images_read: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count of images left out
    negatives: LabelRows | None = None  # per row, its verified negatives (openimages), else unknown
    labels_left_out: dict[str, int] = field(default_factory=dict)  # reason -> count of labels left out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, rows: np.ndarray, dropped: dict[str, int]) -> SourceSplit:
        """The rows `rows` (ascending positions), with `dropped` added to the counts of dropped rows."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.full(len(self), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        kept = position[self.reference_order]
        return replace(self, files=[self.files[i] for i in rows], keys=self.keys[rows],
                       labels=self.labels.take(rows),
                       negatives=None if self.negatives is None else self.negatives.take(rows),
                       reference_order=kept[kept >= 0],
                       dropped={**self.dropped, **dropped})


def string_key(text: str) -> int:
    """A stable 63-bit integer for an image known by a name (VOC's 2008_000008, a relative path): the
    keyed draw is keyed by it, the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_images_exist(split: SourceSplit) -> None:
    """Every row's image file exists; else one error naming the source file and the first three."""
    from ffcv_data.errors import DataError

    missing = [str(f) for f in split.files if not f.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{split.source_file}: image file(s) missing: {', '.join(missing[:3])}{more}")
