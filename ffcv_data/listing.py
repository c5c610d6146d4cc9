"""A prepared split as CSV, one row per image in the prepared order (`pml-dist labels`):
`row,file,observed,labels` with `file` relative to the image root, `observed` the observed class (empty
when none) and `labels` the classes, space-separated; with names, class names separated by `|`
(COCO's names hold spaces). Written row by row, so a large split streams."""

from __future__ import annotations

import csv
from typing import TextIO

from ffcv_data.prepared import PreparedData

HEADER = ("row", "file", "observed", "labels")


def write_labels_csv(data: PreparedData, split: str, out: TextIO, names: bool = False) -> int:
    """Write `split`'s rows to `out`; returns how many."""
    class_names = data.stats().raw["category_names"]
    rows = data.labels(split)

    def show(classes) -> str:
        return "|".join(class_names[c] for c in classes) if names else " ".join(str(c) for c in classes)

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for row in range(len(rows)):
        observed = rows.observed[row]
        writer.writerow((row, rows.file(row), show([observed] if observed >= 0 else []),
                         show(rows.labels.row(row))))
    return len(rows)
