"""Pseudo multi-labels from the teacher's merged probabilities, and how good they are.

Targets (each becomes one student, in `pseudo/<name>/labels.npy`):
- hard, one per tau (`tau-0.75`): y = p > tau (Algorithm 1 of the paper);
- soft (`soft`): y = p, the probabilities themselves as BCE targets;
- class_prior (`class_prior`): per class c, the top round(prior_c x N) images by p_c are positive,
  with prior_c = (observed frequency of c) x k. Each image's observed positive is drawn uniformly
  from its true positives, so P(observed = c) ~ prior_c / (mean positives per image), and k is
  that mean (`loss.expected_positives`, EPR's assumption: 2.9 on COCO).
In every target the observed positive stays 1. The paper's Algorithm 1 does not say so; a
confident teacher rarely scores its own training positive below tau, but nothing guarantees it.

Only probabilities and observed labels make the targets; full labels, where the data set has them,
are used for the statistics alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with, write_json
from ffcv_data.protocol import one_hot
from ffcv_data.sparse import LabelRows
from pml_dist.layout import PseudoFiles, tau_name


def target_names(taus: list[float], modes: list[str]) -> list[str]:
    names = [tau_name(t) for t in taus] if "hard" in modes else []
    return names + [m for m in ("soft", "class_prior") if m in modes]


# `observed` below: each image's observed class, (N,) int, -1 where none is observed (prepared.py's
# SplitLabels.observed), not an N x L one-hot matrix.


def hard_labels(probs: np.ndarray, observed: np.ndarray, tau: float) -> np.ndarray:
    return _with_observed((probs > tau).astype(np.uint8), observed)


def soft_labels(probs: np.ndarray, observed: np.ndarray) -> np.ndarray:
    return _with_observed(np.array(probs, dtype=np.float16), observed)


def class_prior_labels(probs: np.ndarray, observed: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, per-class threshold): each class gets its estimated prior share of positives."""
    n, num_classes = probs.shape
    seen = np.bincount(observed[observed >= 0], minlength=num_classes)
    prior = np.clip(seen / n * k, 1.0 / n, 1.0)
    labels = one_hot(observed, num_classes)
    thresholds = np.ones(num_classes, dtype=np.float64)
    for c in range(num_classes):
        count = int(round(prior[c] * n))
        top = np.argsort(-probs[:, c].astype(np.float32), kind="stable")[:count]
        labels[top, c] = 1
        thresholds[c] = float(probs[top[-1], c]) if count else 1.0
    return labels, thresholds


def _with_observed(labels: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """`labels` with each image's observed positive set to 1 (in place)."""
    rows = np.flatnonzero(observed >= 0)
    labels[rows, observed[rows]] = 1
    return labels


QUALITY_BLOCK = 16384  # rows per block of quality(): float64 copies of a block, not of the split


def quality(targets: np.ndarray, full: np.ndarray | LabelRows | None) -> dict:
    """Mean positives per image; with full labels (dense 0/1 rows or sparse LabelRows), overall and
    per-class precision and recall (expected counts for soft targets). Row block by row block, so
    the float64 arithmetic holds one block of N x L, never the split."""
    n, num_classes = targets.shape
    if isinstance(full, np.ndarray):
        full = LabelRows.from_dense(full)
    positives, pred, tp = 0.0, np.zeros(num_classes), np.zeros(num_classes)
    for start in range(0, n, QUALITY_BLOCK):
        stop = min(n, start + QUALITY_BLOCK)
        t = np.asarray(targets[start:stop], dtype=np.float64)
        positives += t.sum()
        pred += t.sum(axis=0)
        if full is not None:
            tp += (t * full.dense(np.arange(start, stop))).sum(axis=0)
    out = {"mean_positives_per_image": positives / n}
    if full is None:
        return out
    true = full.per_class().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out.update({
            "precision": float(tp.sum() / pred.sum()) if pred.sum() else None,
            "recall": float(tp.sum() / true.sum()) if true.sum() else None,
            "per_class_precision": [None if p == 0 else float(a / p) for a, p in zip(tp, pred, strict=True)],
            "per_class_recall": [None if r == 0 else float(a / r) for a, r in zip(tp, true, strict=True)],
        })
    return out


def write_pseudo_labels(probs: np.ndarray, observed: np.ndarray, out_dir: Path, taus: list[float],
                        modes: list[str], k: float, full: np.ndarray | LabelRows | None = None) -> dict:
    """Write every target's labels.npy into `out_dir` (a run's `pseudo/`, file names from
    pml_dist/layout.py `PseudoFiles`), then stats.json (last: it marks the step complete)."""
    files = PseudoFiles(Path(out_dir))
    stats: dict = {"num_samples": int(probs.shape[0]), "num_classes": int(probs.shape[1]),
                   "targets": {}}
    for name, labels, record in _targets(probs, observed, taus, modes, k):
        _save(files.labels(name), labels)
        stats["targets"][name] = {**record, **quality(labels, full)}
    stats["teacher"] = quality(probs, full)  # the teacher's own expected positives per image
    write_json(files.stats, stats)
    return stats


def _targets(probs: np.ndarray, observed: np.ndarray, taus: list[float], modes: list[str],
             k: float) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(name, labels, what made them) of every target, in `target_names` order; one at a time, so
    only one target's labels are in memory."""
    if "hard" in modes:
        for tau in taus:
            yield tau_name(tau), hard_labels(probs, observed, tau), {"mode": "hard", "tau": tau}
    if "soft" in modes:
        yield "soft", soft_labels(probs, observed), {"mode": "soft"}
    if "class_prior" in modes:
        labels, thresholds = class_prior_labels(probs, observed, k)
        yield "class_prior", labels, {"mode": "class_prior", "k": k, "thresholds": thresholds.tolist()}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with(path, lambda tmp: np.save(tmp, array))
