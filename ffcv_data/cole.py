"""Cole et al.'s formatted folder -> label sets (source.py): the form every SPML code base reads, and
the only one NUS-WIDE is distributed in (its image URLs are dead).

`data.root` holds `formatted_<split>_images.npy` (image paths, one per row, relative to `data.images`:
VOC's `VOCdevkit/VOC2012/JPEGImages`, COCO's root, NUS-WIDE's `Flickr/`, CUB's `CUB_200_2011/images`)
and `formatted_<split>_labels.npy` (N x L of 0 and 1). Splits `train` and `val` ("val" is the test
set). Rows and classes in the files' order, which is the reference's. An observed-label file
(`formatted_<split>_labels_obs.npy`) is not read: `data.observed_protocol: cole` draws the same
positives from the full labels. The folder holds no class names: classes are named by their index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist, string_key
from ffcv_data.sparse import LabelRows


def read_split(root: Path, split: str, images: Path | None = None) -> SourceSplit:
    if images is None:
        raise DataError("data.images must name the folder the formatted lists' image paths are relative to "
                        "(data.format: cole)")
    paths_file = Path(root) / f"formatted_{split}_images.npy"
    labels_file = Path(root) / f"formatted_{split}_labels.npy"
    paths = _load(paths_file)
    labels = _load(labels_file)
    if paths.ndim != 1 or paths.dtype.kind not in "US":
        raise DataError(f"{paths_file}: expected a 1-d array of image paths, got {paths.dtype} {paths.shape}")
    if labels.ndim != 2 or len(labels) != len(paths):
        raise DataError(f"{labels_file}: expected {len(paths)} rows (one per image of {paths_file.name}) "
                        f"by L classes, got shape {labels.shape}")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{labels_file}: expected numbers, got {labels.dtype}")
    bad = np.argwhere((labels != 0) & (labels != 1))
    if len(bad):
        row, column = bad[0]
        raise DataError(f"{labels_file}: row {row}, class {column} is {labels[row, column]!r}: labels "
                        f"must be 0 or 1 ({len(bad)} entries are not)")
    if len(paths) == 0:
        raise DataError(f"{paths_file}: split '{split}' is empty")
    names = [str(p) for p in paths]
    first: dict[str, int] = {}
    for row, name in enumerate(names):
        if first.setdefault(name, row) != row:
            raise DataError(f"{paths_file}: rows {first[name]} and {row} are the same image {name!r}")
    num_classes = labels.shape[1]
    out = SourceSplit(
        name=split, source_file=labels_file, label_files=[paths_file, labels_file], image_root=Path(images),
        files=ImageFiles.of(images, names),
        keys=np.asarray([string_key(name) for name in names], dtype=np.int64),
        labels=LabelRows.from_dense(labels),
        class_names=[str(k) for k in range(num_classes)], class_ids=list(range(num_classes)),
        reference_order=np.arange(len(names)), reference_classes=np.arange(num_classes),
        images_read=len(names), dropped={},
    )
    check_images_exist(out)
    return out


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:  # an object array, a truncated or foreign file
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
