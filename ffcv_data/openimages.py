"""Open Images (V6/V7) image-level labels -> label sets with verified negatives (source.py).

`data.root` holds the release's files under their own names:

- split S's labels: the one file whose name ends in `S-annotations-human-imagelabels.csv` (V6's
  `validation-...`, V7's `oidv7-val-...`; `train` must match only one), columns
  `ImageID,Source,LabelName,Confidence`: confidence 1 is a verified positive, 0 a verified negative
  (an image-class pair listed with both, by two sources, is a positive);
- the classes: the one `*class-descriptions.csv` (`LabelName,DisplayName`, with its header), narrowed
  to those of a `*classes-trainable.txt` when there is one (labels of the other classes are left out
  and counted);
- images: `<root>/<S>/<ImageID>.jpg`.

Rows are the images with a label of a kept class, ImageIDs ascending. The file is read as a stream
(one line at a time, compact arrays): OpenImages' train split has ~9M images and ~80M rows.
"""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist, string_key
from ffcv_data.sparse import LabelRows

LABELS_SUFFIX = "-annotations-human-imagelabels.csv"
HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
CONFIDENCE = {"1": 1, "0": 0, "1.0": 1, "0.0": 0}


def read_split(root: Path, split: str, images: Path | None = None) -> SourceSplit:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} not found: data.root must be the folder holding the Open Images files")
    cl = _classes(root)
    suffix = f"{split}{LABELS_SUFFIX}"
    labels_file = _one(root, f"*{suffix}", f"the labels of split '{split}'",
                       accept=lambda p: p.name == suffix or p.name.endswith(f"-{suffix}"))
    row_of: dict[str, int] = {}  # ImageID -> position in file order
    rows, classes, positive = array("q"), array("i"), array("b")
    outside = 0
    with open(labels_file, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != HEADER:
            raise DataError(f"{labels_file}:1: expected the header {','.join(HEADER)}, got {header}")
        for lineno, fields in enumerate(reader, 2):
            if len(fields) != 4 or not fields[0] or fields[3] not in CONFIDENCE:
                raise DataError(f"{labels_file}:{lineno}: expected ImageID,Source,LabelName,Confidence with "
                                f"confidence 1 or 0, got {','.join(fields)!r}")
            c = cl.index.get(fields[2])
            if c is None:
                if fields[2] not in cl.outside:
                    raise DataError(f"{labels_file}:{lineno}: class {fields[2]!r} is not in {cl.source}")
                outside += 1
                continue
            rows.append(row_of.setdefault(fields[0], len(row_of)))
            classes.append(c)
            positive.append(CONFIDENCE[fields[3]])
    if not row_of:
        raise DataError(f"{labels_file}: split '{split}' is empty (no label of a kept class)")

    ids = np.array(list(row_of), dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")  # file-order row -> ImageIDs ascending
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    n, num_classes = len(order), len(cl.names)
    key = rank[np.frombuffer(rows, dtype=np.int64)] * num_classes + np.frombuffer(classes, dtype=np.int32)
    pos = np.frombuffer(positive, dtype=np.int8)
    positive_keys = np.unique(key[pos == 1])  # a pair listed twice (two sources) once
    positives = LabelRows.from_keys(positive_keys, n, num_classes)
    # a pair that two sources disagree on is a positive: left out of the negatives
    negatives = LabelRows.from_keys(np.setdiff1d(key[pos == 0], positive_keys), n, num_classes)
    sorted_ids = ids[order].tolist()
    out = SourceSplit(
        name=split, source_file=labels_file, label_files=[cl.source, labels_file, *cl.narrowed_by],
        image_root=root / split, files=ImageFiles.of(root / split, (f"{i}.jpg" for i in sorted_ids)),
        keys=np.fromiter((string_key(i) for i in sorted_ids), dtype=np.int64, count=len(sorted_ids)),
        labels=positives, negatives=negatives, class_names=cl.names, class_ids=list(range(len(cl.names))),
        reference_order=np.arange(len(sorted_ids)), reference_classes=np.arange(len(cl.names)),
        images_read=len(sorted_ids), dropped={}, labels_left_out={"class_not_trainable": outside},
    )
    check_images_exist(out)
    return out


@dataclass
class _ClassList:
    index: dict[str, int]  # LabelName -> class index
    names: list[str]  # DisplayName by class index
    source: Path  # the class descriptions file
    narrowed_by: list[Path]  # the trainable-classes file, if any
    outside: set[str]  # LabelNames described but narrowed away


def _classes(root: Path) -> _ClassList:
    path = _one(root, "*class-descriptions.csv", "the class descriptions")
    listed: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["LabelName", "DisplayName"]:
            raise DataError(f"{path}:1: expected the header LabelName,DisplayName, got {header}")
        for lineno, fields in enumerate(reader, 2):
            if len(fields) != 2 or not fields[0]:
                raise DataError(f"{path}:{lineno}: expected LabelName,DisplayName, got {','.join(fields)!r}")
            if fields[0] in seen:
                raise DataError(f"{path}:{lineno}: class {fields[0]} is listed twice (first on line "
                                f"{seen[fields[0]]})")
            seen[fields[0]] = lineno
            listed.append((fields[0], fields[1]))
    narrowed_by: list[Path] = []
    if list(root.glob("*classes-trainable.txt")):
        keep_file = _one(root, "*classes-trainable.txt", "the trainable classes")
        keep = {line.strip() for line in keep_file.read_text().splitlines() if line.strip()}
        unknown = sorted(keep - set(seen))
        if unknown:
            raise DataError(f"{keep_file}: class {unknown[0]!r} is not in {path}")
        narrowed_by = [keep_file]
        listed = [(mid, name) for mid, name in listed if mid in keep]
    if not listed:
        raise DataError(f"{path}: no classes")
    index = {mid: i for i, (mid, _) in enumerate(listed)}
    return _ClassList(index, [name for _, name in listed], path, narrowed_by, set(seen) - set(index))


def _one(root: Path, pattern: str, what: str, accept=None) -> Path:
    """The one file of `root` matching `pattern` (and `accept`, where given)."""
    found = [p for p in sorted(root.glob(pattern)) if accept is None or accept(p)]
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) if found else "none"
        raise DataError(f"{root}: {what} must be exactly one file matching {pattern} (found: {listed})")
    return found[0]
