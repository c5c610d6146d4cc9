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
    ap = average_precision(scores, labels)
    scored = ~np.isnan(ap)
    return {
        "map": float(100.0 * ap[scored].mean()) if scored.any() else None,
        "ap": [float(100.0 * v) if ok else None for v, ok in zip(ap, scored, strict=True)],
        "classes_without_positives": [int(i) for i in np.flatnonzero(~scored)],
        "num_classes_scored": int(scored.sum()),
    }


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
