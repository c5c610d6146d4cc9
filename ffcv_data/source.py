"""What every data-set reader gives `prepare`: one split as rows of (image file, label set), sparse.

A reader (coco.py, voc.py, cub.py, cole.py, openimages.py, csv_lists.py; `formats.py` picks one by
`data.format`) checks its own files and raises `DataError` naming the file and line or record of the
first problem, before anything is written. Rows come in the reader's own order; `reference_order`
says in which order Cole et al.'s scripts walk them (their observed-label draw and validation split
depend on it), and `reference_classes` which of our classes is their class k.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ffcv_data.sparse import LabelRows, ranges


class ImageFiles(Sequence):
    """A split's image files, `root / name` for each row, the names kept as one UTF-8 buffer with end
    offsets: about 30 bytes an image where a list of Path objects takes ~400 (Open Images' 9M
    images: 0.3 GB, not 4). Items are Paths, made when asked for. (surrogatepass: a JSON file name
    may spell a lone surrogate, which strict UTF-8 refuses.)"""

    def __init__(self, root: str | Path, buffer: bytes, ends: np.ndarray):
        self.root, self.buffer, self.ends = Path(root), bytes(buffer), np.asarray(ends, np.int64)

    @classmethod
    def of(cls, root: str | Path, names: Iterable[str]) -> ImageFiles:
        encoded = [name.encode("utf-8", "surrogatepass") for name in names]
        return cls(root, b"".join(encoded), np.cumsum([len(e) for e in encoded], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.root / self.name(i)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # mutable-looking sequences are unhashable, as a list is

    def name(self, i: int) -> str:
        """Row i's file relative to root."""
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        start = int(self.ends[i - 1]) if i else 0
        return self.buffer[start:int(self.ends[i])].decode("utf-8", "surrogatepass")

    def take(self, rows: np.ndarray, block: int = 1 << 16) -> ImageFiles:
        """The rows `rows`, in that order; gathered `block` rows at a time (the byte positions of
        a gather are 8 bytes per byte of name: all at once, 10M names would take ~1.3 GB more)."""
        rows = np.asarray(rows, np.int64)
        source = np.frombuffer(self.buffer, np.uint8)
        parts, lengths = [], []
        for lo in range(0, len(rows), block):
            part = rows[lo:lo + block]
            ends = self.ends[part]
            starts = np.where(part > 0, self.ends[np.maximum(part - 1, 0)], 0)
            parts.append(source[ranges(starts, ends - starts)].tobytes())
            lengths.append(ends - starts)
        ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, np.int64)
        return ImageFiles(self.root, b"".join(parts), ends)


@dataclass
class SourceSplit:
    name: str
    source_file: Path  # the file named in errors and stats (annotation file, list file)
    label_files: list[Path]  # every file the labels are read from (their digests go into inputs.json)
    image_root: Path  # `files` relative to it are what `pml-dist labels` prints
    files: ImageFiles  # image_root / each row's name
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
    # whether each row holds every class of its image (False: a single-positive list, csv_lists.py,
    # whose rows show one positive each and so cannot score a model on its validation part)
    complete_labels: bool = True

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
        return replace(self, files=self.files.take(rows), keys=self.keys[rows],
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
