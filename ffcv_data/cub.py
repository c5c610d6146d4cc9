"""CUB-200-2011's 312 binary attributes -> label sets (source.py), as Cole et al.'s
`preproc/format_cub.py` reads them.

`data.root` is the folder the official tarball unpacks into: `attributes.txt` beside `CUB_200_2011/`,
which holds `images.txt` (`<image id> <path>`), `train_test_split.txt` (`<image id> <is_train>`),
`attributes/image_attribute_labels.txt` (`<image id> <attribute id> <is_present> <certainty id>
<time>`) and `images/`. Cole et al.'s copy nests it once more (`CUB_200_2011/CUB_200_2011/`, with
`attributes.txt` in the outer one); both are accepted. Split `train` is is_train 1, `test` is_train 0.
A label is `is_present`, whatever its certainty. Rows in `images.txt` order (the reference's);
classes are the attributes in id order. The reference asserts 11,788 images x 312 attributes; other
counts (a subset, a test fixture) are read and reported in stats.json. Every (image, attribute) pair
must be listed exactly once. Lines of the attribute file may carry more fields than five (some of the
official file's do; the reference reads the first four by position): those are read the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist
from ffcv_data.sparse import LabelRows

SPLITS = {"train": 1, "test": 0}


def read_split(root: Path, split: str, images: Path | None = None) -> SourceSplit:
    if split not in SPLITS:
        raise DataError(f"CUB has the splits train and test, not {split!r} "
                        f"(data.train_split / data.test_split)")
    cub = _folder(Path(root))
    attributes = _rows(cub.parent / "attributes.txt", 2)
    _check_ids([i for i, _ in attributes], cub.parent / "attributes.txt", "attribute")
    names = [name for _, name in attributes]
    image_rows = _rows(cub / "images.txt", 2)
    image_ids = [i for i, _ in image_rows]
    position = _unique_ids(image_ids, cub / "images.txt")
    is_train = _flags(cub / "train_test_split.txt", position, "is_train")

    labels_file = cub / "attributes" / "image_attribute_labels.txt"
    present = _present(labels_file, position, len(names))
    rows = [r for r in range(len(image_rows)) if is_train[r] == SPLITS[split]]
    if not rows:
        raise DataError(f"{cub / 'train_test_split.txt'}: split '{split}' is empty")
    out = SourceSplit(
        name=split, source_file=labels_file,
        label_files=[cub.parent / "attributes.txt", cub / "images.txt", cub / "train_test_split.txt",
                     labels_file],
        image_root=cub / "images", files=ImageFiles.of(cub / "images", (image_rows[r][1] for r in rows)),
        keys=np.asarray([image_ids[r] for r in rows], dtype=np.int64),
        labels=LabelRows.from_sets((present[r] for r in rows), len(names)), class_names=names,
        class_ids=list(range(1, len(names) + 1)), reference_order=np.arange(len(rows)),
        reference_classes=np.arange(len(names)), images_read=len(rows), dropped={},
    )
    check_images_exist(out)
    return out


def _folder(root: Path) -> Path:
    """The folder holding images.txt: <root>/CUB_200_2011, or Cole et al.'s doubly nested
    <root>/CUB_200_2011/CUB_200_2011."""
    for cub in (root / "CUB_200_2011", root / "CUB_200_2011" / "CUB_200_2011"):
        if (cub / "images.txt").is_file():
            return cub
    raise DataError(f"{root / 'CUB_200_2011' / 'images.txt'} not found: data.root must be the folder the "
                    f"CUB_200_2011 tarball unpacks into (attributes.txt beside CUB_200_2011/)")


def _lines(path: Path):
    """(line number, fields) of each non-empty line."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield lineno, fields


def _int(text: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} {text!r} is not a whole number") from None


def _rows(path: Path, width: int) -> list[tuple[int, str]]:
    """(id, the rest of the line) of a '<id> <text>' file (image paths and attribute names have no spaces)."""
    rows = []
    for lineno, fields in _lines(path):
        if len(fields) != width:
            raise DataError(f"{path}:{lineno}: expected '<id> <name>', got {' '.join(fields)!r}")
        rows.append((_int(fields[0], path, lineno, "id"), fields[1]))
    return rows


def _check_ids(ids: list[int], path: Path, what: str) -> None:
    """Attribute ids must be 1..L in order: they are the label columns."""
    for k, i in enumerate(ids):
        if i != k + 1:
            raise DataError(f"{path}: {what} ids must run 1, 2, ... in order; entry {k + 1} has id {i}")
    if not ids:
        raise DataError(f"{path}: no {what}s listed")


def _unique_ids(ids: list[int], path: Path) -> dict[int, int]:
    position: dict[int, int] = {}
    for r, i in enumerate(ids):
        if position.setdefault(i, r) != r:
            raise DataError(f"{path}: image id {i} is listed twice (rows {position[i] + 1} and {r + 1})")
    return position


def _flags(path: Path, position: dict[int, int], what: str) -> list[int]:
    flags = [-1] * len(position)
    for lineno, fields in _lines(path):
        if len(fields) != 2:
            raise DataError(f"{path}:{lineno}: expected '<image id> <{what}>', got {' '.join(fields)!r}")
        image, flag = (_int(x, path, lineno, w) for x, w in zip(fields, ("image id", what), strict=True))
        if image not in position:
            raise DataError(f"{path}:{lineno}: image id {image} is not in images.txt")
        if flag not in (0, 1):
            raise DataError(f"{path}:{lineno}: {what} must be 0 or 1, got {flag}")
        if flags[position[image]] != -1:
            raise DataError(f"{path}:{lineno}: image id {image} is listed twice")
        flags[position[image]] = flag
    if -1 in flags:
        image = next(i for i, r in position.items() if flags[r] == -1)
        raise DataError(f"{path}: image id {image} of images.txt has no {what}")
    return flags


def _present(path: Path, position: dict[int, int], num_attributes: int) -> list[list[int]]:
    """Each image's present attributes (0-based), every (image, attribute) pair listed exactly once."""
    present: list[list[int]] = [[] for _ in position]
    listed = np.zeros((len(position), num_attributes), dtype=bool)
    for lineno, fields in _lines(path):
        if len(fields) < 3:
            raise DataError(f"{path}:{lineno}: expected '<image id> <attribute id> <is_present> ...', "
                            f"got {' '.join(fields)!r}")
        what = ("image id", "attribute id", "is_present")
        image, attribute, is_present = (_int(fields[k], path, lineno, what[k]) for k in range(3))
        if image not in position:
            raise DataError(f"{path}:{lineno}: image id {image} is not in images.txt")
        if not 1 <= attribute <= num_attributes:
            raise DataError(f"{path}:{lineno}: attribute id {attribute} is outside 1..{num_attributes} "
                            f"(attributes.txt)")
        if is_present not in (0, 1):
            raise DataError(f"{path}:{lineno}: is_present must be 0 or 1, got {is_present}")
        r = position[image]
        if listed[r, attribute - 1]:
            raise DataError(f"{path}:{lineno}: image {image}, attribute {attribute} is listed twice")
        listed[r, attribute - 1] = True
        if is_present:
            present[r].append(attribute - 1)
    if not listed.all():
        r, a = np.argwhere(~listed)[0]
        image = next(i for i, row in position.items() if row == r)
        raise DataError(f"{path}: image {image}, attribute {a + 1} is not listed "
                        f"({int((~listed).sum())} pairs missing)")
    return present
