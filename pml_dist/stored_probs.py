"""The teacher's probabilities as pml-dist keeps them: per training row, the classes whose float16
probability is at least `min_prob`, at most `top_k` of them, as CSR (ffcv_data.sparse.LabelRows for
the classes, float16 values beside them); and, over every row and class, whether kept or not, a
histogram of p per class and the sum of p per class. Memory and disk grow with the kept entries,
not with images x classes (OpenImages-size: 10M x 20k would be 400 GB of float16).

What is kept must decide every pseudo-label target exactly: a hard target p > tau needs every p >
tau, so the default `min_prob` is the smallest tau in use; the soft and class-prior targets use every
p, so with either of them the default keeps everything (min_prob 0). A user who sets
`pseudo.store_min_prob` above that trades those targets' small probabilities for memory: a soft
target is 0 where p was not kept, a class-prior class can take only kept rows (pml_dist/pseudo/labels.py
reports each class it could not fill).

Comparisons are in float16, as numpy and torch make them for a float16 array and a Python float:
p is kept when p >= float16(min_prob), and a hard target is p > float16(tau).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.prepared import mapped_npz
from ffcv_data.sparse import LabelRows, ranges
from pml_dist.errors import PmlError

HIST_BINS = 100  # per-class histogram of p: bin floor(p * 100), 0.01 wide (p = 1 in the last); 800 bytes
# per class and shard (20k classes: 16 MB)


@dataclass(frozen=True)
class StoreRule:
    """Which probabilities of a row are kept: p >= min_prob, the top_k largest (None: no cap)."""

    min_prob: float
    top_k: int | None

    def as_dict(self) -> dict:
        return {"min_prob": self.min_prob, "top_k": self.top_k}

    def describe(self) -> str:
        return f"p >= {self.min_prob:g}" + (f", top {self.top_k} per row" if self.top_k else "")


def store_rule(pseudo) -> StoreRule:
    """The rule of a config's `pseudo` section (its chain's taus and modes decide the default)."""
    if pseudo.store_min_prob is not None:
        min_prob = float(pseudo.store_min_prob)
    elif set(pseudo.modes) <= {"hard"}:
        min_prob = float(min(pseudo.taus))
    else:  # soft and class_prior targets use every probability
        min_prob = 0.0
    return StoreRule(min_prob, pseudo.store_top_k)


@dataclass(frozen=True)
class StoredProbs:
    rows: LabelRows  # the kept classes of each row (sorted)
    values: np.ndarray  # float16, aligned with rows.classes
    hist: np.ndarray  # int64 (L, HIST_BINS): every row's p per class
    sums: np.ndarray  # float64 (L,): the sum of every row's p per class
    rule: StoreRule

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return self.rows.num_classes

    def dense(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows `rows` (default: all) as float16 (len(rows), L), 0 where nothing was kept; for tests
        and small splits."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        part = self.rows.take(rows)
        out = np.zeros((len(rows), self.num_classes), dtype=np.float16)
        out[part.row_of_each_class(), part.classes] = self.values[entry_positions(self.rows.indptr, rows)]
        return out


def entry_blocks(indptr: np.ndarray, entries: int = 1 << 22, rows: int = 1 << 20):
    """(lo, hi) row ranges of a CSR, in order, each with at most `entries` entries (or one row)
    and at most `rows` rows: what a pass over the kept probabilities holds at a time."""
    n, lo = len(indptr) - 1, 0
    while lo < n:
        hi = int(np.searchsorted(indptr, indptr[lo] + entries, side="right")) - 1
        hi = min(n, lo + rows, max(hi, lo + 1))
        yield lo, hi
        lo = hi


def entry_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The positions in a CSR's entry arrays of rows `rows`, one after another (int64)."""
    starts = indptr[rows]
    counts = indptr[np.asarray(rows) + 1] - starts
    return ranges(starts, counts)


def float16_bins(values) -> np.ndarray:
    """The histogram bin of float16 probabilities (numpy), exactly as `ScoreKeeper` bins them."""
    bins = np.floor(np.asarray(values, np.float16).astype(np.float32) * np.float32(HIST_BINS))
    return np.clip(bins, 0, HIST_BINS - 1).astype(np.int64)


class ScoreKeeper:
    """Keeps a rank's scores batch by batch on the scoring device (no copy of a B x L batch to the
    host): the kept entries of each batch, and the histograms and sums over the rows marked real
    (not sampler padding, which another rank scores too)."""

    def __init__(self, num_classes: int, rule: StoreRule, device):
        import torch

        self.rule, self.num_classes = rule, num_classes
        self.min_prob = torch.tensor(rule.min_prob, dtype=torch.float16, device=device)
        self.hist = torch.zeros(num_classes * HIST_BINS, dtype=torch.int64, device=device)
        self.sums = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.counts, self.classes, self.values = [], [], []

    def add(self, probs, real: int) -> None:
        """One batch's (B, L) probabilities; its first `real` rows are not padding."""
        import torch

        p16 = probs.to(torch.float16)
        keep = p16 >= self.min_prob
        if self.rule.top_k is not None and self.rule.top_k < self.num_classes:
            top = torch.zeros_like(keep)
            top.scatter_(1, probs.topk(self.rule.top_k, dim=1).indices, True)
            keep &= top
        rows, cls = keep.nonzero(as_tuple=True)  # row-major: each row's classes ascending
        self.counts.append(keep.sum(dim=1))
        self.classes.append(cls.to(torch.int32))
        self.values.append(p16[rows, cls])
        real_rows = p16[:real]
        bins = (real_rows.float() * HIST_BINS).floor_().clamp_(0, HIST_BINS - 1).long()
        bins += torch.arange(self.num_classes, device=bins.device) * HIST_BINS
        self.hist += torch.bincount(bins.flatten(), minlength=self.num_classes * HIST_BINS)
        self.sums += real_rows.double().sum(dim=0)

    def arrays(self) -> dict[str, np.ndarray]:
        """indptr, classes, values, hist, sums on the host."""
        import torch

        counts = torch.cat(self.counts).cpu().numpy() if self.counts else np.zeros(0, np.int64)
        indptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return {
            "indptr": indptr,
            "classes": torch.cat(self.classes).cpu().numpy() if self.classes else np.zeros(0, np.int32),
            "values": torch.cat(self.values).cpu().numpy() if self.values else np.zeros(0, np.float16),
            "hist": self.hist.reshape(self.num_classes, HIST_BINS).cpu().numpy(),
            "sums": self.sums.cpu().numpy(),
        }


def read_stored_probs(path: Path) -> StoredProbs:
    """A merged pseudo/probs.npz (pml_dist/pseudo/merge.py writes it), memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise PmlError(f"no merged probabilities at {path} (run `pml-dist merge` first)")
    try:
        a = mapped_npz(path)
        num_classes, top_k = int(a["num_classes"]), int(a["top_k"])
        rows = LabelRows(a["indptr"], a["classes"], num_classes)
        return StoredProbs(rows, a["values"], a["hist"], a["sums"],
                           StoreRule(float(a["min_prob"]), top_k if top_k > 0 else None))
    except (OSError, ValueError, KeyError) as exc:
        raise PmlError(f"{path}: unreadable ({type(exc).__name__}: {exc}); run `pml-dist merge` "
                       "again") from None
