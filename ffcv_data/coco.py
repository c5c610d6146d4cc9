"""Read a COCO-format `instances` file into label sets (source.py), with every input checked first.

COCO's category ids are not contiguous (1..90 with gaps); they are mapped to 0..L-1 in id order.
Images without annotations are dropped and counted, as Cole et al. 2021 do. Problems a user can fix
(malformed JSON, an id that is not a JSON integer or does not fit in 64 bits, two records with the same
id (or two images with the same file), unknown category, annotation of a missing image, missing image
file, empty split) raise `DataError` naming the file and record(s), before anything is written.

The file is read as a stream (json_stream.py), so that a COCO-format file at OpenImages size (9M images)
fits: of each record only its ids (int64 columns) and an image's file name (UTF-8 bytes) are kept, the
rest (polygons, boxes) is dropped as it is read. The checks then run on the columns, vectorised. Of a
file's several problems the one reported is the one a reader of the whole file, checking in this order,
meets first: the records of categories, images, annotations (wherever the file lists them), file name
types, repeated ids, then references.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ffcv_data import json_stream
from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist
from ffcv_data.sparse import LabelRows


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def read_split(root: str | Path, split: str, images: Path | None = None) -> SourceSplit:
    """Read `<root>/annotations/instances_<split>.json` and check `<root>/<split>/<file_name>` exist.
    Rows are the images with annotations, image ids ascending; Cole et al.'s scripts walk them with
    the ids sorted as strings, and number the classes in the order the file lists them."""
    root = Path(root)
    ann_file = annotation_path(root, split)
    cats, imgs, anns = _read(ann_file)
    files = imgs.files(root / split)
    _check_records(cats, imgs, files, anns, ann_file)

    category_ids = np.sort(cats.column("id"))
    image_order = np.argsort(imgs.column("id"), kind="stable")
    image_ids = imgs.column("id")[image_order]
    column = _positions(category_ids, anns.column("category_id"))  # -1: not in 'categories'
    rank = _positions(image_ids, anns.column("image_id"))  # position in image_ids, -1: not in 'images'
    _check_references(anns, column, rank, ann_file)
    if not len(category_ids):
        raise DataError(f"{ann_file}: 'categories' is empty")

    annotated = np.zeros(len(image_ids), dtype=bool)
    annotated[rank] = True
    kept = np.flatnonzero(annotated)
    if not len(kept):
        raise DataError(
            f"{ann_file}: split '{split}' is empty ({len(image_ids)} images read, none with annotations)"
        )
    row = np.cumsum(annotated) - 1  # position in image_ids -> row
    num_classes = len(category_ids)
    # a class labelled twice in one image is one label: np.unique keeps one key of the pair
    labels = LabelRows.from_keys(np.unique(row[rank] * num_classes + column), len(kept), num_classes)
    name_of = {rec["id"]: rec["name"] for rec in cats.records}
    keys = image_ids[kept]
    out = SourceSplit(
        name=split, source_file=ann_file, label_files=[ann_file], image_root=root / split,
        files=files.take(image_order[kept]),
        keys=keys, labels=labels, class_names=[name_of[c] for c in category_ids.tolist()],
        class_ids=category_ids.tolist(),
        reference_order=_decimal_string_order(keys),  # "100" before "25"
        reference_classes=np.searchsorted(category_ids, cats.column("id")).astype(np.int64),
        images_read=len(image_ids), dropped={"no_annotations": len(image_ids) - len(kept)},
    )
    check_images_exist(out)
    return out


class _Records:
    """One of the file's lists, taken record by record: its id fields (id, *_id) as int64 columns,
    and the first record that lacks a field or has an id that is not a JSON integer. That problem is
    raised once the whole file is read (a malformed file, or a problem of a list checked before this
    one, is reported first); after it, nothing more is kept."""

    def __init__(self, key: str, fields: tuple[str, ...]):
        self.key, self.fields, self._field_set = key, fields, set(fields)
        self.id_fields = tuple(f for f in fields if f == "id" or f.endswith("_id"))
        self._columns = {f: array("q") for f in self.id_fields}
        self._appends = [(f, self._columns[f].append) for f in self.id_fields]
        self.count = 0
        self.problem: str | None = None

    def add(self, rec) -> None:
        if self.problem is None:
            self.problem = self._take(rec, self.count)
        self.count += 1

    def column(self, field: str) -> np.ndarray:
        return np.frombuffer(self._columns[field], dtype=np.int64)

    def _take(self, rec, i: int) -> str | None:
        """Keep records[i]'s ids; else what is wrong with it. json gives exact types: `type(v) is int`
        refuses bool (a subclass of int), as the whole-file reader did."""
        if type(rec) is not dict or not self._field_set <= rec.keys():
            return f"{self.key}[{i}] lacks {' or '.join(repr(f) for f in self.fields)}"
        for f, append in self._appends:
            value = rec[f]
            if type(value) is not int:
                return (f"{self.key}[{i}]{self._which(rec, f)} has {f} {value!r} of type "
                        f"{type(value).__name__}; ids must be JSON integers")
            try:
                append(value)
            except OverflowError:
                return f"{self.key}[{i}]{self._which(rec, f)} has {f} {value!r}; ids must fit in 64 bits"
        return None

    @staticmethod
    def _which(rec: dict, field: str) -> str:
        return f" (id {rec['id']!r})" if field != "id" else ""


class _Images(_Records):
    """The images, with their file names as one UTF-8 buffer and end offsets (a 9M-image split: about
    30 bytes an image, not the ~70 of a str), and a hash of each for the duplicate check."""

    def __init__(self):
        super().__init__("images", ("id", "file_name"))
        self._names, self._ends, self._hashes = bytearray(), array("q"), array("q")
        self.name_problem: str | None = None  # a file_name that is not a string (checked after ids)

    def _take(self, rec, i: int) -> str | None:
        problem = super()._take(rec, i)
        if problem is None:
            name = rec["file_name"]
            if type(name) is str:
                # surrogatepass: JSON can spell a lone surrogate ("\ud800"), which strict UTF-8 refuses
                self._names += name.encode("utf-8", "surrogatepass")
                self._ends.append(len(self._names))
                self._hashes.append(hash(name))
            elif self.name_problem is None:
                self.name_problem = (f"images[{i}] (id {rec['id']}) has file_name {name!r} of type "
                                     f"{type(name).__name__}, not a string")
        return problem

    def files(self, root: Path) -> ImageFiles:
        """Every image's file under `root`, in file order (meaningful once the records passed their
        checks: a record with a problem and the ones after it have no name here)."""
        return ImageFiles(root, self._names, np.frombuffer(self._ends, dtype=np.int64))

    def name_hashes(self) -> np.ndarray:
        return np.frombuffer(self._hashes, dtype=np.int64)


class _Categories(_Records):
    """The categories, whole records too (a few hundred): their names, and the order the file lists them."""

    def __init__(self):
        super().__init__("categories", ("id", "name"))
        self.records: list[dict] = []

    def _take(self, rec, i: int) -> str | None:
        problem = super()._take(rec, i)
        if problem is None:
            self.records.append(rec)
        return problem


_LISTS: dict[str, Callable[[], _Records]] = {
    "images": _Images,
    "annotations": lambda: _Records("annotations", ("id", "image_id", "category_id")),
    "categories": _Categories,
}


def _read(path: Path) -> tuple[_Categories, _Images, _Records]:
    """Categories, images and annotations of `path`, read as a stream. A key listed twice counts
    once, the later one, as json.load keeps it."""
    try:
        stream = json_stream.members(path)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    found: dict[str, _Records | None] = {}  # None: the key's value is not a list
    try:
        for key, value in stream:
            if key not in _LISTS:
                continue  # info, licenses: read (and checked as JSON) by the stream, not kept
            found[key] = None
            if isinstance(value, Iterator):  # an array
                records = _LISTS[key]()
                for rec in value:
                    records.add(rec)
                found[key] = records
    except json_stream.NotAnObject:
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories") from None
    for key in ("images", "annotations", "categories"):
        if found.get(key) is None:
            raise DataError(f"{path}: missing or non-list '{key}'")
    return found["categories"], found["images"], found["annotations"]


def _check_records(cats: _Categories, imgs: _Images, files: ImageFiles, anns: _Records, path: Path) -> None:
    """The record checks, in the order the whole-file reader made them: fields and id types of each
    list, file name types, then ids (and file names, `files`) that two records share."""
    for records in (cats, imgs, anns):
        if records.problem is not None:
            raise DataError(f"{path}: {records.problem}")
    if imgs.name_problem is not None:
        raise DataError(f"{path}: {imgs.name_problem}")
    cat_ids, img_ids, ann_ids = cats.column("id"), imgs.column("id"), anns.column("id")
    _refuse_repeats(cats, "id", cat_ids, path, lambda j: f"name {cats.records[j]['name']!r}")
    _refuse_repeats(imgs, "id", img_ids, path, lambda j: f"file_name {files.name(j)!r}")
    _refuse_repeats(imgs, "file_name", imgs.name_hashes(), path, lambda j: f"id {img_ids[j]}",
                    show=files.name, same=lambda j, i: files.name(j) == files.name(i))
    image_ids = anns.column("image_id")
    _refuse_repeats(anns, "id", ann_ids, path, lambda j: f"image_id {image_ids[j]}")


def _refuse_repeats(records: _Records, field: str, values: np.ndarray, path: Path, describe, show=None,
                    same=None) -> None:
    """No two records share `field`, whose values (or hashes) are `values`; else an error naming records
    j and i, `describe`d, and the value (`show(i)`; default: values[i])."""
    pair = _first_repeat(values, same)
    if pair is not None:
        j, i = pair
        shown = show(i) if show else int(values[i])
        raise DataError(f"{path}: {records.key}[{j}] ({describe(j)}) and {records.key}[{i}] "
                        f"({describe(i)}) have the same {field} {shown!r}")


def _first_repeat(values: np.ndarray, same=None) -> tuple[int, int] | None:
    """(j, i): i the first record whose value an earlier record has, j the first record with it, as a
    dict of values filled in file order finds them; None if the values are unique. `same(j, i)` tells
    two records with one value from two values with one hash."""
    sorted_values = np.sort(values)
    if not (sorted_values[1:] == sorted_values[:-1]).any():
        return None
    order = np.argsort(values, kind="stable")  # each value's records in file order
    repeated = order[1:][values[order[1:]] == values[order[:-1]]]  # records an earlier one matches
    for i in np.sort(repeated).tolist():
        for j in np.flatnonzero(values[:i] == values[i]).tolist():
            if same is None or same(j, i):
                return j, i
    return None


def _decimal_string_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys.astype(str)) without the strings (84 bytes a key): the decimal digits padded
    on the right to 19 ("25" -> 2500...0 > "100" -> 1000...0), a shorter key first where one is a prefix
    of the other ("1" before "10"). Keys are unique; a negative one ('-' sorts first) takes the
    strings."""
    if len(keys) and keys.min() < 0:
        return np.argsort(keys.astype(str), kind="stable")
    digits = np.ones(len(keys), dtype=np.int64)
    for d in range(1, 19):
        digits += keys >= 10**d
    padded = keys.astype(np.uint64) * (np.uint64(10) ** (19 - digits).astype(np.uint64))
    return np.lexsort((digits, padded))


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The position of each of `ids` in `sorted_ids` (ascending, unique), -1 where it is not there."""
    if not len(sorted_ids):
        return np.full(len(ids), -1, dtype=np.int64)
    at = np.searchsorted(sorted_ids, ids)
    return np.where(sorted_ids[np.minimum(at, len(sorted_ids) - 1)] == ids, at, -1)


def _check_references(anns: _Records, column: np.ndarray, rank: np.ndarray, path: Path) -> None:
    """Each annotation's category and image are listed; else an error naming the first that is not
    (its category first)."""
    missing = (column < 0) | (rank < 0)
    if not missing.any():
        return
    i = int(np.argmax(missing))
    ann = f"annotations[{i}] (id {anns.column('id')[i]})"
    if column[i] < 0:
        raise DataError(f"{path}: {ann} has category_id {anns.column('category_id')[i]}, "
                        "which is not in 'categories'")
    raise DataError(f"{path}: {ann} refers to image_id {anns.column('image_id')[i]}, "
                    "which is not in 'images'")
