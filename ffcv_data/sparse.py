"""Label sets as CSR arrays: row i's classes are `classes[indptr[i]:indptr[i + 1]]`, sorted, unique.

Every stage from the reader to the loader keeps labels in this form, so memory grows with the number
of positives, not with images x classes (OpenImages: ~9M images x ~20k classes, ~9 positives per
image). A batch becomes B x L only where it is used, on the device (`DeviceRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelRows:
    indptr: np.ndarray  # int64 (N + 1,), indptr[0] == 0
    classes: np.ndarray  # int32 (indptr[-1],)
    num_classes: int

    @classmethod
    def from_sets(cls, sets, num_classes: int) -> LabelRows:
        """From an iterable of per-row class collections (any order, duplicates allowed)."""
        rows = [np.unique(np.asarray(s, dtype=np.int32)) for s in sets]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        classes = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        return cls(indptr, classes, num_classes)

    @classmethod
    def from_keys(cls, keys: np.ndarray, num_rows: int, num_classes: int) -> LabelRows:
        """From `row * num_classes + class` keys, ascending and unique (np.unique or np.setdiff1d of
        pairs gives them, np.flatnonzero of a dense matrix too)."""
        keys = np.asarray(keys, dtype=np.int64)
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // num_classes, minlength=num_rows), out=indptr[1:])
        return cls(indptr, (keys % num_classes).astype(np.int32), num_classes)

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> LabelRows:
        """From an (N, L) multi-hot matrix (nonzero = positive)."""
        return cls.from_keys(np.flatnonzero(np.ascontiguousarray(matrix)), *matrix.shape)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, i: int) -> np.ndarray:
        return self.classes[self.indptr[i]:self.indptr[i + 1]]

    def counts(self) -> np.ndarray:
        """Positives per row (int64)."""
        return np.diff(self.indptr)

    def row_of_each_class(self) -> np.ndarray:
        """The row of each stored class (int64, aligned with `classes`)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.counts())

    def per_class(self) -> np.ndarray:
        """Rows per class (int64, length L)."""
        return np.bincount(self.classes, minlength=self.num_classes).astype(np.int64)

    def take(self, rows: np.ndarray) -> LabelRows:
        """The rows `rows` (any order, repeats allowed), vectorised."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts()
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts[rows], out=indptr[1:])
        if len(rows) > 1 and (np.diff(rows) > 0).all():
            # a subset in order (a train/val part): one byte per stored class picks it, instead of
            # an 8-byte position per taken class (a 10M-row split: 30 MB of mask, not 200 MB)
            keep = np.zeros(len(self), dtype=bool)
            keep[rows] = True
            classes = self.classes[np.repeat(keep, counts)]
        else:
            classes = self.classes[ranges(self.indptr[rows], counts[rows])]
        return LabelRows(indptr, np.asarray(classes, dtype=np.int32), self.num_classes)

    def dense(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows `rows` (default: all) as a uint8 multi-hot (len(rows), L) matrix; for small splits
        and the stages that are still dense (pseudo labels, evaluation)."""
        part = self if rows is None else self.take(rows)
        out = np.zeros((len(part), self.num_classes), dtype=np.uint8)
        out[part.row_of_each_class(), part.classes] = 1
        return out

    def equals(self, other: LabelRows) -> bool:
        return (self.num_classes == other.num_classes and np.array_equal(self.indptr, other.indptr)
                and np.array_equal(self.classes, other.classes))


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[0], starts[0] + 1, ..., starts[0] + counts[0] - 1, starts[1], ...: vectorised (the
    positions of CSR rows' entries, one row after another)."""
    counts = np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts) + np.arange(
        ends[-1] if len(ends) else 0, dtype=np.int64)


class DeviceRows:
    """Label lookups by sample index on the batch's device: `labels(index)` gives the (B, L) float32
    multi-hot rows, `observed(index)` the one-hot observed positives. The tables are copied to the
    device once, as int64 (what the gathers index with: 8 bytes per row and per positive, e.g. COCO
    train 2.6 MB, OpenImages-size 10M x 3.1 positives 330 MB); a lookup is a few gathers and one
    scatter with no host synchronisation (rows are padded to the split's most positives per row
    instead of sized by a host-side count)."""

    def __init__(self, labels: LabelRows | None, observed: np.ndarray | None, num_classes: int, device=None,
                 values: np.ndarray | None = None):
        import torch

        self.num_classes = num_classes
        device = torch.device(device or "cpu")
        self._observed = (None if observed is None
                          else torch.as_tensor(np.array(observed, np.int64), device=device))
        self._indptr = self._classes = self._values = None
        if labels is not None:
            self._indptr = torch.as_tensor(np.array(labels.indptr, np.int64), device=device)
            self._classes = torch.as_tensor(np.array(labels.classes, np.int64), device=device)
            if values is not None:  # one value per stored class (kept probabilities), in its dtype
                self._values = torch.as_tensor(np.array(values), device=device)
            widest = int(labels.counts().max()) if len(labels) else 0
            self._offsets = torch.arange(widest, device=device)

    def labels(self, index, rule=None):
        """(B, L) float32 rows of `index`: 1 at each stored class; with values, `rule(values, rows,
        classes)` of them ((B, K) gathered values, (B, 1) sample indices, (B, K) classes -> float32;
        default: the values as float32), 0 elsewhere."""
        import torch

        index = index.to(self._indptr.device, torch.int64)
        starts = self._indptr[index]
        counts = self._indptr[index + 1] - starts
        positions = starts[:, None] + self._offsets[None, :]
        inside = self._offsets[None, :] < counts[:, None]
        # padding positions (outside the row) are clamped into the table and masked below
        positions.clamp_(max=max(len(self._classes) - 1, 0))
        cls = torch.where(inside, self._classes[positions], self.num_classes)
        if self._values is None:
            return self._scatter(len(index), cls, index.device)
        values = self._values[positions]
        values = rule(values, index[:, None], cls.clamp(max=self.num_classes - 1)) if rule else values.float()
        return self._scatter(len(index), cls, index.device, values)

    def observed(self, index):
        import torch

        index = index.to(self._observed.device, torch.int64)
        cls = self._observed[index]
        return self._scatter(len(index), torch.where(cls < 0, self.num_classes, cls)[:, None], index.device)

    def _scatter(self, rows: int, cls, device, values=None):
        """(rows, L) float32 with 1 (or `values`) at `cls` ((rows, K) class indices; L marks nothing)."""
        import torch

        out = torch.zeros(rows, self.num_classes + 1, dtype=torch.float32, device=device)
        if values is None:
            out.scatter_(1, cls, 1.0)
        else:
            out.scatter_(1, cls, values)
        return out[:, : self.num_classes]
