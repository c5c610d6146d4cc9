"""Your own data as CSV files (`data.format: csv`) -> label sets (source.py).

The CSV of split S is `<data.root>/<S>.csv`, `file` relative to `data.images` (default data.root).
Header `file,label`: a single-positive list, one row per image and its one observed positive by
class name. Header `file,labels`: every class present in the image, names separated by `|` (an empty
field: an image with no positive, kept here; prepare drops it under keyed and counts it, as for every
format). UTF-8 (a BOM is fine), quoted as the csv module reads it, so a file name may hold commas
and spaces; class names are compared without the spaces around them, and a name listed twice in one
labels field counts once (as an object annotated twice in COCO).

The classes: `data.classes` (`read_classes`: a text file, one name per line, in output order) or
else the names the training CSV uses, sorted; val and test are read with the training split's list,
so a class they name must be in it. Rows are in file order, keyed by their file name. The file is
read as a stream into compact arrays (names in one buffer, classes as CSR): no object per row.
"""

from __future__ import annotations

import csv
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import ImageFiles, SourceSplit, check_images_exist, string_key
from ffcv_data.sparse import LabelRows

SINGLE_POSITIVE = ("file", "label")
LABEL_SETS = ("file", "labels")
SEPARATOR = "|"  # between the class names of a labels field
HEADERS = "file,label (one observed positive per image) or file,labels (every class present, separated by |)"


def single_positive(path: Path) -> bool:
    """Whether `path` is a single-positive CSV (header file,label); False when it is not there or
    has another header (the reader then says what is wrong)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)  # as the reader reads it (a quoted header too)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(h.strip() for h in header or ()) == SINGLE_POSITIVE


def read_classes(path: Path) -> list[str]:
    """`data.classes`: one class name per line, in output order; blank lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path} not found: data.classes must be a text file of class names, one per line") \
            from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names: list[str] = []
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if SEPARATOR in name:
            raise DataError(f"{path}:{lineno}: class name {name!r} holds '|', which separates the names of "
                            f"a labels field")
        if name in line_of:
            raise DataError(f"{path}:{lineno}: class {name!r} is listed twice (first on line "
                            f"{line_of[name]})")
        line_of[name] = lineno
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names (one per line)")
    return names


def read_split(root: Path, split: str, images: Path | None = None,
               classes: Path | Sequence[str] | None = None) -> SourceSplit:
    """`classes`: a data.classes file (a Path), or the training split's class names (a list: how
    prepare reads val and test), or None (the names this file uses, sorted)."""
    path = Path(root) / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: data.format csv reads split '{split}' from "
                        f"<data.root>/{split}.csv")
    label_files = [path]
    fixed: list[str] | None = None
    outside: str | bool = True  # a name not in `fixed`: the end of its error message (True: none fixed)
    if isinstance(classes, (str, Path)):
        fixed, outside = read_classes(Path(classes)), f"not in data.classes ({classes})"
        label_files.append(Path(classes))  # its digest goes into inputs.json with the CSV's
    elif classes is not None:
        fixed = list(classes)
        outside = ("not among the training CSV's classes (list every class in data.classes to use one "
                   "the training split does not show)")
    rows = _read_rows(path, {name: c for c, name in enumerate(fixed or [])}, outside)
    if fixed is None:  # the names seen, sorted: provisional (first-seen) indices renumbered
        seen = list(rows.index)
        if not seen:
            raise DataError(f"{path}: no row names a class")
        fixed = sorted(seen)
        renumber = np.empty(len(seen), np.int32)
        renumber[sorted(range(len(seen)), key=seen.__getitem__)] = np.arange(len(seen), dtype=np.int32)
        rows.classes = renumber[rows.classes]
    n, num_classes = len(rows.keys), len(fixed)
    labels = _label_rows(rows.counts, rows.classes, num_classes)
    image_root = Path(images) if images else Path(root)
    files = ImageFiles(image_root, bytes(rows.names), np.cumsum(rows.lengths, dtype=np.int64))
    rows.names = bytearray()  # copied into `files`
    _check_repeats(path, rows, files, labels, fixed)
    out = SourceSplit(
        name=split, source_file=path, label_files=label_files, image_root=image_root, files=files,
        keys=rows.keys, labels=labels, class_names=fixed, class_ids=list(range(num_classes)),
        reference_order=np.arange(n), reference_classes=np.arange(num_classes), images_read=n,
        complete_labels=not rows.single,
    )
    check_images_exist(out)
    return out


class _Rows:
    """A CSV's rows as compact arrays, filled as it is read."""

    def __init__(self, index: dict[str, int]):
        self.index = index  # class name -> class index
        self.names = bytearray()  # the file names, UTF-8, one after another
        self.lengths, self.keys, self.lines = array("q"), array("q"), array("q")  # per row
        self.counts, self.classes = array("q"), array("i")  # per row its number of classes; the classes
        self.single = False

    def freeze(self) -> None:
        for name in ("lengths", "keys", "lines", "counts", "classes"):
            values = getattr(self, name)
            setattr(self, name, np.frombuffer(values, np.int32 if values.typecode == "i" else np.int64))


def _read_rows(path: Path, index: dict[str, int], outside: str | bool) -> _Rows:
    """`outside`: True adds every new class name; else the error text of a name not in `index`."""
    rows = _Rows(index)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not a field to the end
            rows.single = _header(path, next(reader, None))
            expected = ",".join(SINGLE_POSITIVE if rows.single else LABEL_SETS)
            for fields in reader:
                if not fields:  # a blank line
                    continue
                lineno = reader.line_num
                if len(fields) != 2:
                    raise DataError(f"{path}:{lineno}: expected 2 fields ({expected}), got {len(fields)}: "
                                    f"{','.join(fields)!r}")
                file, text = fields
                if not file.strip():
                    raise DataError(f"{path}:{lineno}: empty file name in {','.join(fields)!r}")
                names = [text.strip()] if rows.single else (
                    [name.strip() for name in text.split(SEPARATOR)] if text.strip() else [])
                for name in names:
                    c = index.get(name)
                    if c is None:
                        if not name:
                            raise DataError(f"{path}:{lineno}: empty class name in {','.join(fields)!r}")
                        if outside is not True:
                            raise DataError(f"{path}:{lineno}: class {name!r} is {outside}")
                        c = index[name] = len(index)
                    rows.classes.append(c)
                rows.counts.append(len(names))
                encoded = file.encode("utf-8", "surrogatepass")
                rows.names += encoded
                rows.lengths.append(len(encoded))
                rows.keys.append(string_key(file))
                rows.lines.append(lineno)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows.keys:
        raise DataError(f"{path}: no rows after the header")
    rows.freeze()
    return rows


def _label_rows(counts: np.ndarray, classes: np.ndarray, num_classes: int, block: int = 1 << 18) -> LabelRows:
    """The rows' classes sorted and unique (a class named twice in one field counts once), made
    `block` rows at a time: np.unique of the whole split's (row, class) keys at once takes about five
    times its labels' bytes in temporaries (1M rows x 3 labels: ~150 MB more)."""
    if not (counts > 1).any():  # one class or none per row (a single-positive CSV): already so
        return LabelRows(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), classes, num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts, sizes = [], []
    for lo in range(0, len(counts), block):
        hi = min(lo + block, len(counts))
        row = np.repeat(np.arange(hi - lo, dtype=np.int64), counts[lo:hi])
        keys = np.unique(row * num_classes + classes[starts[lo]:starts[hi]])
        parts.append((keys % num_classes).astype(np.int32))
        sizes.append(np.bincount(keys // num_classes, minlength=hi - lo))
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(sizes), out=indptr[1:])
    return LabelRows(indptr, np.concatenate(parts), num_classes)


def _header(path: Path, header: list[str] | None) -> bool:
    """Whether the header is file,label (single positive); file,labels is the other one accepted."""
    fields = tuple(h.strip() for h in header or ())
    if fields not in (SINGLE_POSITIVE, LABEL_SETS):
        raise DataError(f"{path}:1: expected the header {HEADERS}, got {','.join(header or [])!r}")
    return fields == SINGLE_POSITIVE


def _check_repeats(path: Path, rows: _Rows, files: ImageFiles, labels: LabelRows, names: list[str]) -> None:
    """Every image once: the first row whose key an earlier row has is one line naming both lines.
    Found after the stream by sorting the keys (no set of 1M names)."""
    order = np.argsort(rows.keys, kind="stable")
    ordered = rows.keys[order]
    repeats = order[np.flatnonzero(ordered[1:] == ordered[:-1]) + 1]
    if not len(repeats):
        return
    row = int(repeats.min())  # the repeat first in the file
    first = int(order[np.searchsorted(ordered, rows.keys[row])])
    line, first_line, file = int(rows.lines[row]), int(rows.lines[first]), files.name(row)
    if files.name(first) != file:  # two names of one 63-bit key: about never
        raise DataError(f"{path}:{line}: images {file!r} and {files.name(first)!r} (line {first_line}) have "
                        f"the same key; rename one")
    given, before = (SEPARATOR.join(names[c] for c in labels.row(r)) for r in (row, first))
    if given == before:
        raise DataError(f"{path}:{line}: duplicate row: {file!r} with {given!r} is already on line "
                        f"{first_line}")
    if rows.single:
        raise DataError(f"{path}:{line}: image {file!r} is listed again, with label {given!r} (line "
                        f"{first_line}: {before!r}): a single-positive CSV has one row per image; list the "
                        f"image once, or use header file,labels with every class present")
    raise DataError(f"{path}:{line}: image {file!r} is listed again, with labels {given!r} (line "
                    f"{first_line}: {before!r}): list each image once with all its classes")
