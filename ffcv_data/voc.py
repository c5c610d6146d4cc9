"""PASCAL VOC 2012 classification lists -> label sets (source.py), as Cole et al.'s
`preproc/format_pascal.py` reads them.

`data.root` holds `VOCdevkit/VOC2012/`. Split S (train or val) is the 20 files
`ImageSets/Main/<class>_<S>.txt`, lines `<image id> <label>`: only label 1 is a positive (0, "difficult",
and -1 count as absent), and an image is a row only if it has a positive in some class (the others
are counted as dropped). Rows are the file names `<id>.jpg` sorted as strings, the order the reference
walks; classes in its (alphabetical) order. Images: `JPEGImages/<id>.jpg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist, string_key
from ffcv_data.sparse import LabelRows

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor")
LABELS = {"1": 1, "0": 0, "-1": -1}


def read_split(root: Path, split: str, images: Path | None = None) -> SourceSplit:
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Main"
    if not lists.is_dir():
        raise DataError(f"{lists} not found: data.root must be the folder holding VOCdevkit/VOC2012/")
    positives: dict[str, list[int]] = {}
    listed: set[str] = set()
    files = [lists / f"{name}_{split}.txt" for name in CLASSES]
    for c, path in enumerate(files):
        if not path.is_file():
            raise DataError(f"class list not found: {path} (VOC 2012 has one per class and split)")
        seen: set[str] = set()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in LABELS:
                raise DataError(f"{path}:{lineno}: expected '<image id> <label>' with label 1, 0 or -1, "
                                f"got {line.strip()!r}")
            image_id = fields[0]
            if image_id in seen:
                raise DataError(f"{path}:{lineno}: image {image_id} is listed twice")
            seen.add(image_id)
            listed.add(image_id)
            if LABELS[fields[1]] == 1:
                positives.setdefault(image_id, []).append(c)
    if not positives:
        raise DataError(f"{lists}: split '{split}' is empty ({len(listed)} images listed, none with a "
                        f"positive)")
    names = sorted(f"{image_id}.jpg" for image_id in positives)  # as the reference: file names as strings
    ids = [name[: -len(".jpg")] for name in names]
    out = SourceSplit(
        name=split, source_file=lists / f"<class>_{split}.txt", label_files=files,
        image_root=voc / "JPEGImages", files=ImageFiles.of(voc / "JPEGImages", names),
        keys=np.asarray([string_key(i) for i in ids], dtype=np.int64),
        labels=LabelRows.from_sets((positives[i] for i in ids), len(CLASSES)), class_names=list(CLASSES),
        class_ids=list(range(len(CLASSES))), reference_order=np.arange(len(ids)),
        reference_classes=np.arange(len(CLASSES)), images_read=len(listed),
        dropped={"no_positive": len(listed) - len(ids)},
    )
    check_images_exist(out)
    return out
