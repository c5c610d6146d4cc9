from __future__ import annotations

import math

import numpy as np
import pytest

from pml_dist.training.metrics import (
    average_precision,
    average_precision_from_counts,
    mean_average_precision,
    negatives_at_or_above,
    summary,
)


def brute_force_ap(scores: list[float], labels: list[int]) -> float:
    """sum over distinct thresholds t_n (decreasing) of (R_n - R_{n-1}) P_n, for 'score >= t_n'.

    Straight from the definition sklearn.metrics.average_precision_score documents, ties included.
    """
    num_pos = sum(labels)
    if num_pos == 0:
        return math.nan
    ap, prev_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = [y for s, y in zip(scores, labels, strict=True) if s >= threshold]
        precision = sum(predicted) / len(predicted)
        recall = sum(predicted) / num_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def column(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=float)[:, None]


@pytest.mark.parametrize(("scores", "labels", "expected"), [
    # sklearn's documented example for average_precision_score
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.5 * 1.0 + 0.5 * (2 / 3)),
    ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 0.5 * 1.0 + 0.5 * (2 / 3)),
    # a tie is one threshold: {0.5, 0.5} -> P = 1/2, R = 1/2; then 0.2 -> P = 2/3, R = 1
    ([0.5, 0.5, 0.2], [1, 0, 1], 0.5 * 0.5 + 0.5 * (2 / 3)),
    # all tied: one threshold, AP = prevalence
    ([0.3, 0.3, 0.3, 0.3], [1, 0, 0, 1], 0.5),
    # the positive ranked last
    ([0.9, 0.8, 0.1], [0, 0, 1], 1 / 3),
])
def test_hand_computed_cases(scores, labels, expected):
    assert average_precision(column(scores), column(labels))[0] == pytest.approx(expected)
    assert brute_force_ap(scores, labels) == pytest.approx(expected)


def test_equals_brute_force_on_random_data_with_many_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, num_classes = int(rng.integers(1, 60)), int(rng.integers(1, 8))
        levels = int(rng.integers(1, 6))  # few distinct scores -> many ties
        scores = rng.integers(0, levels, size=(n, num_classes)) / max(levels - 1, 1)
        labels = (rng.random((n, num_classes)) < rng.random()).astype(int)
        got = average_precision(scores, labels)
        expected = [brute_force_ap(scores[:, c].tolist(), labels[:, c].tolist()) for c in range(num_classes)]
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=f"trial {trial}")


def test_continuous_scores_match_brute_force():
    rng = np.random.default_rng(1)
    scores, labels = rng.random((200, 5)), (rng.random((200, 5)) < 0.2).astype(int)
    expected = [brute_force_ap(scores[:, c].tolist(), labels[:, c].tolist()) for c in range(5)]
    np.testing.assert_allclose(average_precision(scores, labels), expected, rtol=1e-12)


def test_order_of_tied_samples_does_not_matter():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, size=(50, 4)).astype(float)
    labels = rng.integers(0, 2, size=(50, 4))
    perm = rng.permutation(50)
    shuffled = average_precision(scores[perm], labels[perm])
    np.testing.assert_allclose(average_precision(scores, labels), shuffled)


def test_perfect_ranking_gives_one():
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [0, 0]])
    scores = labels + 0.01 * np.arange(5)[:, None]  # every positive above every negative
    np.testing.assert_allclose(average_precision(scores, labels), [1.0, 1.0])
    assert mean_average_precision(scores, labels)["map"] == pytest.approx(100.0)


def test_classes_without_positives_are_reported_and_excluded_from_the_mean():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.3, 0.6, 0.7]])
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    ap = average_precision(scores, labels)
    assert ap[0] == pytest.approx(1.0) and np.isnan(ap[1]) and ap[2] == pytest.approx(1 / 3)
    result = mean_average_precision(scores, labels)
    assert result["map"] == pytest.approx(100 * (1.0 + 1 / 3) / 2)  # not / 3 with a zero for class 1
    assert result["ap"] == [pytest.approx(100.0), None, pytest.approx(100 / 3)]
    assert result["classes_without_positives"] == [1]
    assert result["num_classes_scored"] == 2


def test_no_class_with_positives_gives_no_map():
    result = mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2), dtype=int))
    assert result == {"map": None, "ap": [None, None], "classes_without_positives": [0, 1],
                      "num_classes_scored": 0}


@pytest.mark.parametrize(("scores", "labels", "match"), [
    (np.zeros((3, 2)), np.zeros((3, 3)), "must equal scores shape"),
    (np.zeros(3), np.zeros(3), "samples, classes"),
    (np.zeros((2, 2)), np.array([[1, -1], [0, 0]]), "0 or 1"),
    (np.zeros((2, 2)), np.array([[0.5, 0], [0, 1]]), "0 or 1"),
    (np.array([[np.nan, 0], [0, 1]]), np.ones((2, 2)), "NaN"),
])
def test_bad_inputs_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        average_precision(scores, labels)


def local_positives(scores: np.ndarray, labels: np.ndarray):
    """((rows, classes), scores) of the positive cells of a shard's (n, L) scores and 0/1 labels: what
    evaluate.py's scoring loop keeps of the labels."""
    rows, classes = np.nonzero(labels)
    return (rows, classes.astype(np.int64)), scores[rows, classes]


@pytest.mark.parametrize("world, block_bytes", [(1, 1), (2, 64 << 20), (3, 40), (7, 64 << 20)])
def test_ap_from_every_rank_s_counts_equals_ap_of_the_gathered_scores(world, block_bytes):
    """evaluate.py's path: each rank's own rows (r, r + W, ...), the positives' scores exchanged, the
    negatives at or above each counted per rank (a block of classes at a time: one class per block,
    a few, all) and summed. Ties (float16-like levels), a class without positives, and shards with no
    rows (more ranks than samples) included."""
    rng = np.random.default_rng(world)
    for trial in range(15):
        n, num_classes = int(rng.integers(1, 80)), int(rng.integers(1, 9))
        scores = rng.random((n, num_classes)).astype(np.float32)
        if trial % 2:
            scores = (np.round(scores * 6) / 6).astype(np.float32)
        labels = (rng.random((n, num_classes)) < 0.3).astype(np.uint8)
        labels[:, 0] = 0
        parts = [np.arange(rank, n, world) for rank in range(world)]
        positives = [local_positives(scores[rows], labels[rows]) for rows in parts]
        classes = np.concatenate([cells[1] for cells, _ in positives])
        values = np.concatenate([v for _, v in positives])
        negatives = sum(
            negatives_at_or_above(scores[rows], cells, classes, values, block_bytes=block_bytes)[0]
            for rows, (cells, _) in zip(parts, positives, strict=True))
        got = average_precision_from_counts(classes, values, negatives, num_classes)
        want = average_precision(scores, labels)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"trial {trial}")
        assert np.isnan(got[0])
        mine, whole = summary(got), mean_average_precision(scores, labels)  # equal up to float rounding
        for key in ("map", "ap"):
            a, b = np.array(mine[key], dtype=float), np.array(whole[key], dtype=float)  # None: NaN
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
        assert {k: v for k, v in mine.items() if k not in ("map", "ap")} == \
            {k: v for k, v in whole.items() if k not in ("map", "ap")}


def reference_thresholds(scores: np.ndarray, labels: np.ndarray) -> dict:
    """The rule re-implemented on the whole (N, L) matrix: per class, over the distinct scores of
    its positives as thresholds (p >= t), the one of highest F1 (the highest on a tie); over the
    0.00-1.00 grid in steps of 0.01, the one of highest micro F1 over every cell."""
    per_class = []
    for c in range(scores.shape[1]):
        s, y = scores[:, c], labels[:, c].astype(bool)
        best = None
        for t in sorted(set(s[y].tolist()), reverse=True):
            tp, fp = int((y & (s >= t)).sum()), int((~y & (s >= t)).sum())
            f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
            if best is None or f1 > best[1]:
                best = (t, f1, tp / (tp + fp), tp / y.sum())
        per_class.append(best)
    grid = [np.float32(k / 100) for k in range(101)]
    micro, positive = [], labels.astype(bool)
    for t in grid:
        tp, fp = int((positive & (scores >= t)).sum()), int((~positive & (scores >= t)).sum())
        micro.append(2 * tp / max(1, 2 * tp + fp + (labels.sum() - tp)))
    return {"per_class": per_class, "global": float(grid[int(np.argmax(micro))]), "global_f1": max(micro)}


@pytest.mark.parametrize("world", [1, 3])
def test_decision_thresholds_from_every_rank_s_counts_are_the_f1_best_ones(world):
    """evaluate.py's thresholds: from the same counts as AP (summed over ranks), each class's
    F1-best threshold among its positives' scores; a class without positives gets the global one."""
    from pml_dist.training.metrics import THRESHOLD_GRID, decision_thresholds

    rng = np.random.default_rng(10 + world)
    for trial in range(10):
        n, num_classes = int(rng.integers(5, 60)), int(rng.integers(2, 7))
        scores = (np.round(rng.random((n, num_classes)) * 20) / 20).astype(np.float32)  # ties
        labels = (rng.random((n, num_classes)) < 0.3).astype(np.uint8)
        labels[:, 0] = 0
        scores[labels > 0] = np.minimum(1, scores[labels > 0] + 0.2)
        parts = [np.arange(rank, n, world) for rank in range(world)]
        positives = [local_positives(scores[rows], labels[rows]) for rows in parts]
        classes = np.concatenate([cells[1] for cells, _ in positives])
        values = np.concatenate([v for _, v in positives])
        counts = [negatives_at_or_above(scores[rows], cells, classes, values, THRESHOLD_GRID)
                  for rows, (cells, _) in zip(parts, positives, strict=True)]
        got = decision_thresholds(classes, values, sum(c[0] for c in counts), sum(c[1] for c in counts),
                                  num_classes)
        want = reference_thresholds(scores, labels)
        assert got["classes_without_positives"] == [c for c in range(num_classes) if not labels[:, c].any()]
        assert got["global"]["threshold"] == pytest.approx(want["global"])
        assert got["global"]["f1"] == pytest.approx(want["global_f1"])
        for c, ref in enumerate(want["per_class"]):
            if ref is None:
                assert got["threshold"][c] == got["global"]["threshold"] and got["f1"][c] is None
            else:
                assert (got["threshold"][c], got["f1"][c], got["precision"][c], got["recall"][c]) == \
                    pytest.approx(ref), (trial, c)
