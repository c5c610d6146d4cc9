"""Mean average precision, defined as sklearn.metrics.average_precision_score (the metric of Cole et al.).

AP of one class = sum over distinct score thresholds t_n, taken in decreasing order, of
(R_n - R_{n-1}) * P_n, where P_n and R_n are precision and recall of "score >= t_n" and R_0 = 0.
Tied scores form one threshold (as in sklearn), so AP does not depend on the order of tied samples.
There is no interpolation (unlike the VOC 11-point AP).

One deliberate difference from Cole et al.'s metrics.py: they set AP = 0 for a class with no positive
and average it in; here such classes get NaN, are listed, and are left out of the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP per class (column) of `scores` (N, L) against 0/1 `labels` (N, L); NaN where no positives."""
    scores, labels = _checked(scores, labels)
    n = scores.shape[0]
    # sort each column by decreasing score; a stable sort keeps it deterministic, ties are grouped anyway
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    hits = np.take_along_axis(labels, order, axis=0)
    true_pos = np.cumsum(hits, axis=0)  # (N, L): positives among the top j+1
    # position j closes a threshold when the next score differs (sklearn's distinct_value_indices)
    closes = np.ones_like(sorted_scores, dtype=bool)
    closes[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    # true positives at the previous threshold: the running max over earlier closing positions
    # (true_pos never decreases), shifted by one row
    tp_at_close = np.where(closes, true_pos, 0.0)
    tp_before = np.zeros_like(tp_at_close)
    tp_before[1:] = np.maximum.accumulate(tp_at_close, axis=0)[:-1]
    precision = true_pos / np.arange(1, n + 1, dtype=np.float64)[:, None]
    num_pos = true_pos[-1] if n else np.zeros(scores.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall_step = np.where(closes, true_pos - tp_before, 0.0) / num_pos
        ap = np.sum(recall_step * precision, axis=0)
    return np.where(num_pos > 0, ap, np.nan)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """mAP as the papers' tables report it: in percent, over the classes that have a positive.

    Returns {"map": percent or None when no class has a positive, "ap": per-class percent (None for
    classes without positives), "classes_without_positives": their indices, "num_classes_scored": int}.
    """
    return summary(average_precision(scores, labels))


def summary(ap: np.ndarray) -> dict[str, Any]:
    """mean_average_precision's dict from AP per class (NaN: no positive)."""
    scored = ~np.isnan(ap)
    return {
        "map": float(100.0 * ap[scored].mean()) if scored.any() else None,
        "ap": [float(100.0 * v) if ok else None for v, ok in zip(ap, scored, strict=True)],
        "classes_without_positives": [int(i) for i in np.flatnonzero(~scored)],
        "num_classes_scored": int(scored.sum()),
    }


# -- the same AP from shards: each rank holds its own rows, nothing N x L is gathered --------------
#
# Only thresholds where a positive sits change AP (a threshold of negatives alone adds no recall), so
# AP_c = sum over the positives of class c of P(s), P(s) = TP(s) / (TP(s) + FP(s)) with TP(s), FP(s)
# the positives and negatives scoring >= s (ties form one threshold: every tied positive sees
# them all). The positives' scores are few (sparse labels), so every rank gets all of them; each
# rank counts its own negatives at or above each of them; one sum over ranks gives FP, and every
# rank then computes the same AP as `average_precision` on the gathered matrix.


Cells = tuple[np.ndarray, np.ndarray]  # (rows, classes) of some cells of an (n, L) array


# The thresholds at which every class's negatives are counted too (for a global decision threshold);
# float32, as the probabilities are compared with them
THRESHOLD_GRID = np.linspace(0.0, 1.0, 101).astype(np.float32)


def negatives_at_or_above(scores: np.ndarray, positives: Cells, classes: np.ndarray, values: np.ndarray,
                          grid: np.ndarray | None = None,
                          block_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """(for each (class, score) query: how many of this shard's negatives of that class score >= it;
    for each threshold of `grid` (e.g. THRESHOLD_GRID; none when None): how many of its negatives of
    any class do), int64. positives: (rows, classes) of this shard's positive cells. Each class's
    scores are sorted once, the positives pushed below every score, a block of classes (about
    `block_bytes`) at a time: memory beyond the scores is one block. Without a grid, classes that no
    query asks about are not sorted."""
    scores = np.asarray(scores)
    n, num_classes = scores.shape
    counts = np.zeros(len(classes), dtype=np.int64)
    at_grid = np.zeros(0 if grid is None else len(grid), dtype=np.int64)
    if not n:
        return counts, at_grid
    pos_rows, pos_classes = (np.asarray(a, np.int64) for a in positives)
    order = np.argsort(classes, kind="stable")
    bounds = np.searchsorted(classes[order], np.arange(num_classes + 1))
    pos_order = np.argsort(pos_classes, kind="stable")
    pos_bounds = np.searchsorted(pos_classes[pos_order], np.arange(num_classes + 1))
    width = max(1, block_bytes // (scores.itemsize * n))
    if grid is not None:
        grid = np.asarray(grid).astype(scores.dtype)  # THRESHOLD_GRID, float32 probabilities: same values
    for c0 in range(0, num_classes, width):
        c1 = min(num_classes, c0 + width)
        if grid is None and bounds[c0] == bounds[c1]:
            continue  # no query in these classes
        block = np.ascontiguousarray(scores[:, c0:c1].T)  # (B, n): a class's scores in one row
        mine = pos_order[pos_bounds[c0]:pos_bounds[c1]]
        block[pos_classes[mine] - c0, pos_rows[mine]] = -np.inf
        block.sort(axis=1)
        for c in range(c0, c1):
            row = block[c - c0]
            if grid is not None:
                at_grid += n - np.searchsorted(row, grid, "left")
            at = order[bounds[c]:bounds[c + 1]]
            if len(at):
                counts[at] = n - np.searchsorted(row, values[at].astype(scores.dtype), "left")
    return counts, at_grid


def average_precision_from_counts(classes: np.ndarray, values: np.ndarray, negatives_above: np.ndarray,
                                  num_classes: int) -> np.ndarray:
    """AP per class from every positive (class, score) of the split and the negatives scoring >=
    each (summed over shards); NaN where a class has no positive. Equals `average_precision` (up to
    the order of a float sum: 1e-14 here)."""
    classes, _, tp, fp, num_pos = _positive_thresholds(classes, values, negatives_above, num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(classes, tp / (tp + fp), minlength=num_classes) / num_pos
    return np.where(num_pos > 0, ap, np.nan)


def _positive_thresholds(classes: np.ndarray, values: np.ndarray, negatives_above: np.ndarray,
                         num_classes: int) -> tuple[np.ndarray, ...]:
    """The positives sorted by (class, score descending), as (classes, float64 scores, TP, FP, each
    class's positives (L,)): TP and FP of the threshold at each positive's score (its class's
    positives up to the last one tied with it, and the negatives at or above it)."""
    values = np.asarray(values, np.float64)
    order = np.lexsort((-values, classes))
    classes, values, fp = classes[order], values[order], np.asarray(negatives_above)[order]
    n = len(classes)
    last = np.ones(n, dtype=bool)  # ties form one threshold
    last[:-1] = (classes[:-1] != classes[1:]) | (values[:-1] != values[1:])
    end = np.minimum.accumulate(np.where(last, np.arange(n), n)[::-1])[::-1]  # index of its run's end
    start = np.searchsorted(classes, classes)  # first positive of its class
    tp = (end - start + 1).astype(np.float64)
    num_pos = np.bincount(classes, minlength=num_classes).astype(np.float64)
    return classes, values, tp, fp, num_pos


def decision_thresholds(classes: np.ndarray, values: np.ndarray, negatives_above: np.ndarray,
                        negatives_at_grid: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class decision thresholds (predict the class when p >= its threshold) from the same
    counts as `average_precision_from_counts`: each class's threshold is the score of one of its
    positives (F1 changes only there), the one of highest F1 (the highest such score on a tie). A class
    without a positive gets the global threshold: the one of THRESHOLD_GRID with the highest micro F1
    over every class (`negatives_at_grid`: negatives of any class at or above each grid threshold).
    Returns {"threshold": [L], "f1", "precision", "recall": [L] (None where the class has no
    positive), "global": {"threshold", "f1", "precision", "recall"}, "classes_without_positives"}."""
    classes, values, tp, fp, num_pos = _positive_thresholds(classes, values, negatives_above, num_classes)
    n = len(classes)
    f1 = 2 * tp / (2 * tp + fp + (num_pos[classes] - tp))
    # per class, the first (highest-score) positive of greatest F1: sort by (class, -F1, -score)
    best = np.lexsort((-values, -f1, classes))
    first = best[np.r_[True, classes[best][1:] != classes[best][:-1]]] if n else best
    # positives at or above each grid threshold, compared as the negatives were (float32 probabilities)
    grid = THRESHOLD_GRID.astype(np.float64)
    grid_tp = n - np.searchsorted(np.sort(values), grid, "left").astype(np.float64)
    grid_f1 = 2 * grid_tp / np.maximum(2 * grid_tp + negatives_at_grid + (n - grid_tp), 1)
    g = int(np.argmax(grid_f1))
    grid_fp = float(negatives_at_grid[g])
    global_ = {"threshold": float(THRESHOLD_GRID[g]), "f1": float(grid_f1[g]),
               "precision": float(grid_tp[g] / (grid_tp[g] + grid_fp)) if grid_tp[g] + grid_fp else None,
               "recall": float(grid_tp[g] / n) if n else None}
    out = {"threshold": [global_["threshold"]] * num_classes, "f1": [None] * num_classes,
           "precision": [None] * num_classes, "recall": [None] * num_classes}
    for i in first.tolist():
        c = int(classes[i])
        out["threshold"][c] = float(values[i])
        out["f1"][c] = float(f1[i])
        out["precision"][c] = float(tp[i] / (tp[i] + fp[i]))
        out["recall"][c] = float(tp[i] / num_pos[c])
    out["global"] = global_
    out["classes_without_positives"] = [int(c) for c in np.flatnonzero(num_pos == 0)]
    return out


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (samples, classes), got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels shape {labels.shape} must equal scores shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (full ground truth, not observed -1/0/1 or soft labels)")
    return scores, labels.astype(np.float64)
