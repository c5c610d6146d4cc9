"""Pseudo multi-labels: each target is a rule (pml_dist/training/targets.py `Target`) applied to the
teacher's kept probabilities (pml_dist/stored_probs.py) as a student's batch is built; here, the
rules' parameters and how good their labels are. No target is written out as an N x L matrix.

Targets (each becomes one student):
- hard, one per tau (`tau-0.75`): y = p > tau (Algorithm 1 of the paper);
- soft (`soft`): y = p, the probabilities themselves as BCE targets;
- class_prior (`class_prior`): per class c, the top round(prior_c x N) images by p_c are positive
  (ties by image index), with prior_c = (observed frequency of c) x k. Each image's observed positive
  is drawn uniformly from its true positives, so P(observed = c) ~ prior_c / (mean positives per
  image), and k is that mean (`loss.expected_positives`, EPR's assumption: 2.9 on COCO). As a rule:
  p > t_c, or p == t_c and index <= i_c, with (t_c, i_c) the last image taken; the per-class
  histograms say where t_c lies, so one pass over the kept entries near it finds it exactly.
In every target the observed positive stays 1. The paper's Algorithm 1 does not say so; a
confident teacher rarely scores its own training positive below tau, but nothing guarantees it.

Only probabilities and observed labels make the targets; full labels (and Open Images' verified
negatives), where the data set has them, are used for the statistics alone, which one blockwise pass
computes for every target at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffcv_data.atomic import write_json
from ffcv_data.sparse import LabelRows
from pml_dist.layout import PseudoFiles, tau_name
from pml_dist.stored_probs import StoredProbs, entry_blocks, float16_bins
from pml_dist.training.targets import Target


def target_names(taus: list[float], modes: list[str]) -> list[str]:
    names = [tau_name(t) for t in taus] if "hard" in modes else []
    return names + [m for m in ("soft", "class_prior") if m in modes]


# `observed` below: each image's observed class, (N,) int, -1 where none is observed (prepared.py's
# SplitLabels.observed), not an N x L one-hot matrix.


def targets_of(stored: StoredProbs, observed: np.ndarray, taus: list[float], modes: list[str],
               k: float) -> list[Target]:
    """Every target, in `target_names` order."""
    out = [Target(tau_name(t), "hard", t) for t in taus] if "hard" in modes else []
    if "soft" in modes:
        out.append(Target("soft", "soft"))
    if "class_prior" in modes:
        out.append(class_prior_target(stored, observed, k))
    return out


def class_prior_target(stored: StoredProbs, observed: np.ndarray, k: float) -> Target:
    """Each class's t_c and i_c: the round(prior_c x N)-th kept entry of the class by (p descending,
    index ascending). The histograms give the bin b_c it lies in; one pass counts each class's kept
    entries above b_c (all taken) and collects those in b_c, of which only the remaining ones
    are chosen by sorting (so the time is linear in the kept entries, plus one bin's sort)."""
    n, num_classes = len(stored), stored.num_classes
    seen = np.bincount(observed[observed >= 0], minlength=num_classes)
    prior = np.clip(seen / n * k, 1.0 / n, 1.0)
    count = np.round(prior * n).astype(np.int64)
    at_or_above = np.cumsum(stored.hist[:, ::-1], axis=1)[:, ::-1]  # rows with bin >= b, per class
    edge_bin = (at_or_above >= count[:, None]).sum(axis=1) - 1  # the bin of the count-th largest
    kept, above = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    rows, classes, values = [], [], []
    for lo, hi in entry_blocks(stored.rows.indptr):
        a, b = stored.rows.indptr[lo], stored.rows.indptr[hi]
        cls, val = np.asarray(stored.rows.classes[a:b]), np.asarray(stored.values[a:b])
        bins = float16_bins(val)  # as the histograms binned every row
        kept += np.bincount(cls, minlength=num_classes)
        above += np.bincount(cls[bins > edge_bin[cls]], minlength=num_classes)
        edge = bins == edge_bin[cls]
        rows.append(_block_rows(stored.rows.indptr, lo, hi)[edge])
        classes.append(cls[edge])
        values.append(val[edge])
    rows, classes, values = (np.concatenate(x) for x in (rows, classes, values))
    order = np.lexsort((rows, -values.astype(np.float32), classes))
    rows, classes, values = rows[order], classes[order], values[order]
    starts = np.searchsorted(classes, np.arange(num_classes))
    in_edge = np.searchsorted(classes, np.arange(num_classes), side="right") - starts
    # the histograms count every row, so fewer kept entries than rows lie above the edge bin
    wanted = count - above
    thresholds = np.ones(num_classes, dtype=np.float16)  # no positive: p > 1 never holds
    last_rows = np.full(num_classes, -1, dtype=np.int64)
    at = np.flatnonzero((wanted > 0) & (wanted <= in_edge))
    thresholds[at] = values[starts[at] + wanted[at] - 1]
    last_rows[at] = rows[starts[at] + wanted[at] - 1]
    short = np.flatnonzero(wanted > in_edge)  # the kept entries cannot fill it: every one is taken
    thresholds[short], last_rows[short] = 0.0, n
    extra = {"k": k, "short_classes": {int(c): {"wanted": int(count[c]), "kept": int(kept[c])}
                                        for c in short}}
    return Target("class_prior", "class_prior", None, thresholds, last_rows, extra)


# -- statistics: one pass over the kept entries for every target -----------------------------------

def statistics(stored: StoredProbs, observed: np.ndarray, targets: list[Target],
               full: LabelRows | None, negatives: LabelRows | None = None) -> dict:
    """{"targets": {name: quality}, "teacher": quality}. A quality: mean positives per image; with
    full labels, overall and per-class precision and recall (expected counts for soft targets); with
    verified negatives (Open Images), precision over verified labels only, as Open Images scores."""
    import torch

    n, num_classes = len(stored), stored.num_classes
    rules = [t.on("cpu") for t in targets]
    pred, tp, fp = (np.zeros((len(targets), num_classes)) for _ in range(3))
    teacher_tp = np.zeros(num_classes)
    verified = negatives is not None and len(negatives.classes) > 0
    for lo, hi in entry_blocks(stored.rows.indptr):
        block = _Block(stored, observed, lo, hi, full, negatives if verified else None)
        values = torch.from_numpy(np.array(block.values))  # a copy: the file is mapped read-only
        rows, classes = torch.from_numpy(block.rows), torch.from_numpy(block.classes.astype(np.int64))
        teacher_tp += np.bincount(block.classes, block.values.astype(np.float64) * block.true,
                                  minlength=num_classes)
        for j, rule in enumerate(rules):
            y = rule(values, rows, classes).numpy().astype(np.float64)
            y[block.observed] = 1.0
            pred[j] += np.bincount(block.classes, y, minlength=num_classes) + block.extra_count
            tp[j] += np.bincount(block.classes, y * block.true, minlength=num_classes) + block.extra_true
            if verified:
                fp[j] += np.bincount(block.classes, y * block.negative, minlength=num_classes) \
                    + block.extra_negative
    true = full.per_class().astype(np.float64) if full is not None else None
    out = {"targets": {t.name: _quality(pred[j], tp[j], fp[j] if verified else None, true, n)
                       for j, t in enumerate(targets)}}
    # The teacher's expected positives: every row's p (the sums); its true positives: the kept p.
    out["teacher"] = _quality(np.asarray(stored.sums, np.float64), teacher_tp, None, true, n)
    return out


class _Block:
    """Rows lo..hi-1: their kept entries (rows, classes, values), which of them are the observed
    positive, true labels, verified negatives; and per class the observed positives that were not
    kept (positive in every target), counted, with how many of those are true or verified negative."""

    def __init__(self, stored: StoredProbs, observed: np.ndarray, lo: int, hi: int,
                 full: LabelRows | None, negatives: LabelRows | None):
        num_classes = stored.num_classes
        a, b = stored.rows.indptr[lo], stored.rows.indptr[hi]
        self.rows = _block_rows(stored.rows.indptr, lo, hi)
        self.classes = np.asarray(stored.rows.classes[a:b])
        self.values = np.asarray(stored.values[a:b])
        keys = self.rows * num_classes + self.classes  # ascending: rows in order, classes sorted
        seen = np.asarray(observed[lo:hi])
        obs_rows = np.flatnonzero(seen >= 0) + lo
        obs_keys = obs_rows * num_classes + seen[obs_rows - lo]
        self.observed = _member(keys, obs_keys)
        unkept = obs_keys[~_member(obs_keys, keys)]
        self.extra_count = np.bincount(unkept % num_classes, minlength=num_classes)
        self.true = self.negative = np.zeros(len(keys))
        self.extra_true = self.extra_negative = 0
        if full is not None:
            true_keys = _keys(full, lo, hi)
            self.true = _member(keys, true_keys).astype(np.float64)
            self.extra_true = np.bincount(unkept % num_classes, _member(unkept, true_keys),
                                          minlength=num_classes)
        if negatives is not None:
            neg_keys = _keys(negatives, lo, hi)
            self.negative = _member(keys, neg_keys).astype(np.float64)
            self.extra_negative = np.bincount(unkept % num_classes, _member(unkept, neg_keys),
                                              minlength=num_classes)


def _keys(rows: LabelRows, lo: int, hi: int) -> np.ndarray:
    """row * L + class of rows lo..hi-1 of a CSR (ascending)."""
    a, b = rows.indptr[lo], rows.indptr[hi]
    return _block_rows(rows.indptr, lo, hi) * rows.num_classes + np.asarray(rows.classes[a:b])


def _block_rows(indptr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The row of each entry of rows lo..hi-1 of a CSR (int64)."""
    return np.repeat(np.arange(lo, hi), np.diff(indptr[lo:hi + 1]))


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of `keys` is in the ascending `sorted_keys`."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _quality(pred: np.ndarray, tp: np.ndarray, fp_verified: np.ndarray | None, true: np.ndarray | None,
             n: int) -> dict:
    out = {"mean_positives_per_image": float(pred.sum() / n) if n else 0.0}
    if true is None:
        return out
    out.update({
        "precision": float(tp.sum() / pred.sum()) if pred.sum() else None,
        "recall": float(tp.sum() / true.sum()) if true.sum() else None,
        "per_class_precision": [None if p == 0 else float(a / p) for a, p in zip(tp, pred, strict=True)],
        "per_class_recall": [None if r == 0 else float(a / r) for a, r in zip(tp, true, strict=True)],
    })
    if fp_verified is not None:
        judged = tp.sum() + fp_verified.sum()
        out["verified_precision"] = float(tp.sum() / judged) if judged else None
    return out


def write_pseudo_stats(stored: StoredProbs, observed: np.ndarray, out_dir: Path, taus: list[float],
                       modes: list[str], k: float, full: LabelRows | None = None,
                       negatives: LabelRows | None = None) -> dict:
    """Every target's rule and statistics in `out_dir`/stats.json (a run's `pseudo/`; the students
    read their rules there); returns what it wrote."""
    targets = targets_of(stored, observed, taus, modes, k)
    quality = statistics(stored, observed, targets, full, negatives)
    stats = {"num_samples": len(stored), "num_classes": stored.num_classes, "store": stored.rule.as_dict(),
             "targets": {t.name: {**t.record(), **quality["targets"][t.name]} for t in targets},
             "teacher": quality["teacher"]}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(PseudoFiles(Path(out_dir)).stats, stats)
    return stats
