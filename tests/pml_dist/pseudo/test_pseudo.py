"""Pseudo-label targets as rules on the kept probabilities, against the dense procedure they replace
(re-implemented here from its description: N x L matrices, one target at a time), and their statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ffcv_data.sparse import DeviceRows, LabelRows
from pml_dist.pseudo.labels import (
    class_prior_target,
    statistics,
    target_names,
    targets_of,
    write_pseudo_stats,
)
from pml_dist.stored_probs import HIST_BINS, ScoreKeeper, StoredProbs, StoreRule

# -- the dense procedure: every target an N x L matrix ----------------------------------------------


def dense_hard(probs, observed, tau):
    labels = (probs > tau).astype(np.uint8)  # float16 against a Python float: compared in float16
    return _with_observed(labels, observed)


def dense_soft(probs, observed):
    return _with_observed(np.array(probs, dtype=np.float16), observed)


def dense_class_prior(probs, observed, k):
    n, num_classes = probs.shape
    seen = np.bincount(observed[observed >= 0], minlength=num_classes)
    prior = np.clip(seen / n * k, 1.0 / n, 1.0)
    labels = np.zeros((n, num_classes), np.uint8)
    thresholds = np.ones(num_classes)
    for c in range(num_classes):
        count = int(round(prior[c] * n))
        top = np.argsort(-probs[:, c].astype(np.float32), kind="stable")[:count]
        labels[top, c] = 1
        thresholds[c] = float(probs[top[-1], c]) if count else 1.0
    return _with_observed(labels, observed), thresholds


def _with_observed(labels, observed):
    rows = np.flatnonzero(observed >= 0)
    labels[rows, observed[rows]] = 1
    return labels


def dense_quality(targets, full):
    t, y = targets.astype(np.float64), full.astype(np.float64)
    tp, pred, true = (t * y).sum(axis=0), t.sum(axis=0), y.sum(axis=0)
    return {"mean_positives_per_image": t.sum(axis=1).mean(), "precision": tp.sum() / pred.sum(),
            "recall": tp.sum() / true.sum(), "per_class_recall": list(tp / true)}


# -- the kept probabilities, made by the inference code from dense scores ---------------------------


def stored_of(probs: np.ndarray, rule: StoreRule, batch: int = 37) -> StoredProbs:
    """What `pml-dist infer` keeps of these scores (one rank, batches of `batch`)."""
    keeper = ScoreKeeper(probs.shape[1], rule, "cpu")
    for start in range(0, len(probs), batch):
        part = torch.from_numpy(probs[start:start + batch].astype(np.float32))
        keeper.add(part, len(part))
    a = keeper.arrays()
    return StoredProbs(LabelRows(a["indptr"], a["classes"], probs.shape[1]), a["values"], a["hist"],
                       a["sums"], rule)


def student_targets(stored: StoredProbs, target, observed: np.ndarray) -> np.ndarray:
    """The targets of every row as a student's batches get them (pml_dist/training/targets.py)."""
    table = DeviceRows(stored.rows, None, stored.num_classes, values=stored.values)
    obs = DeviceRows(None, observed, stored.num_classes)
    index = torch.arange(len(stored))
    rows = [torch.maximum(table.labels(index[i:i + 50], target.on()), obs.observed(index[i:i + 50]))
            for i in range(0, len(stored), 50)]
    return torch.cat(rows).numpy()


@pytest.fixture
def teacher():
    rng = np.random.default_rng(0)
    n, num_classes = 400, 6
    full = (rng.random((n, num_classes)) < np.linspace(0.1, 0.6, num_classes)).astype(np.uint8)
    full[np.arange(n), rng.integers(num_classes, size=n)] = 1
    observed = np.array([rng.choice(np.flatnonzero(row)) for row in full])
    observed[:5] = -1  # (Cole et al.'s protocol: a row without a positive observes nothing)
    probs = np.clip(0.6 * full + rng.normal(0.2, 0.2, full.shape), 0, 1).astype(np.float16)
    probs[np.arange(5, n), observed[5:]] = np.minimum(probs[np.arange(5, n), observed[5:]],
                                                      np.float16(0.3))  # a doubtful teacher
    probs[::7] = np.round(probs[::7] * 8) / 8  # ties, for the class prior's order
    return probs, observed, full


def test_every_target_equals_the_dense_procedure_when_everything_is_kept(teacher):
    probs, observed, _ = teacher
    stored = stored_of(probs, StoreRule(0.0, None))
    assert np.array_equal(stored.dense(), probs)
    modes = ["hard", "soft", "class_prior"]
    targets = {t.name: t for t in targets_of(stored, observed, [0.3, 0.55, 0.75], modes, 2.5)}
    assert list(targets) == target_names([0.3, 0.55, 0.75], modes)
    for tau in (0.3, 0.55, 0.75):
        got = student_targets(stored, targets[f"tau-{tau}"], observed)
        assert np.array_equal(got, dense_hard(probs, observed, tau).astype(np.float32)), tau
    assert np.array_equal(student_targets(stored, targets["soft"], observed),
                          dense_soft(probs, observed).astype(np.float32))
    labels, thresholds = dense_class_prior(probs, observed, 2.5)
    prior = targets["class_prior"]
    assert np.array_equal(student_targets(stored, prior, observed), labels.astype(np.float32))
    assert prior.record()["thresholds"] == thresholds.tolist() and prior.extra["short_classes"] == {}


def test_the_smallest_tau_keeps_exactly_what_the_hard_targets_need(teacher):
    probs, observed, _ = teacher
    stored = stored_of(probs, StoreRule(0.3, None))
    assert len(stored.values) < probs.size and (stored.values >= np.float16(0.3)).all()
    assert len(stored.values) == (probs >= np.float16(0.3)).sum()
    for target in targets_of(stored, observed, [0.3, 0.5], ["hard"], 2.5):
        got = student_targets(stored, target, observed)
        assert np.array_equal(got, dense_hard(probs, observed, target.tau).astype(np.float32))
    # float16 at the edge: 0.3 is 0.30005 in float16; p == that is kept, and not above tau 0.3
    edge = stored_of(np.full((1, 2), np.float16(0.3)), StoreRule(0.3, None))
    assert len(edge.values) == 2
    (tau,) = targets_of(edge, np.array([-1]), [0.3], ["hard"], 2.5)
    assert student_targets(edge, tau, np.array([-1])).tolist() == [[0.0, 0.0]]


def test_a_soft_target_above_store_min_prob_loses_only_the_small_probabilities(teacher):
    probs, observed, _ = teacher
    stored = stored_of(probs, StoreRule(0.4, None))
    (soft,) = targets_of(stored, observed, [0.5], ["soft"], 2.5)
    want = dense_soft(np.where(probs >= np.float16(0.4), probs, 0).astype(np.float16), observed)
    assert np.array_equal(student_targets(stored, soft, observed), want.astype(np.float32))


def test_top_k_keeps_the_largest_probabilities_of_each_row(teacher):
    probs, _, _ = teacher
    stored = stored_of(probs, StoreRule(0.0, 2))
    assert (stored.rows.counts() == 2).all()
    dense = stored.dense().astype(np.float32)
    kept = np.sort(dense, axis=1)[:, -2:]
    assert np.array_equal(kept, np.sort(probs.astype(np.float32), axis=1)[:, -2:])


def test_the_class_prior_reports_classes_the_kept_probabilities_cannot_fill(teacher):
    probs, observed, _ = teacher
    stored = stored_of(probs, StoreRule(0.7, None))
    target = class_prior_target(stored, observed, 2.5)
    short = target.extra["short_classes"]
    assert short, "some class wants more rows than p >= 0.7 keeps"
    for c, numbers in short.items():
        assert numbers["kept"] == (probs[:, c] >= np.float16(0.7)).sum() < numbers["wanted"]
    labels = student_targets(stored, target, observed)
    for c in short:  # every kept row of the class is taken
        assert (labels[probs[:, c] >= np.float16(0.7), c] == 1).all()


def test_histograms_and_sums_cover_every_row_kept_or_not(teacher):
    probs, _, _ = teacher
    stored = stored_of(probs, StoreRule(0.9, None))
    assert stored.hist.shape == (6, HIST_BINS) and (stored.hist.sum(axis=1) == len(probs)).all()
    bins = np.clip(np.floor(probs.astype(np.float32) * HIST_BINS), 0, HIST_BINS - 1).astype(int)
    for c in range(6):
        assert np.array_equal(stored.hist[c], np.bincount(bins[:, c], minlength=HIST_BINS))
    np.testing.assert_allclose(stored.sums, probs.astype(np.float64).sum(axis=0), rtol=1e-12)


def test_statistics_equal_the_dense_formulas_block_by_block(teacher, monkeypatch):
    """One pass in row blocks (here 7 entries at a time) gives every target's statistics."""
    from pml_dist import stored_probs as stored_module
    from pml_dist.pseudo import labels as labels_module

    probs, observed, full = teacher
    stored = stored_of(probs, StoreRule(0.0, None))
    targets = targets_of(stored, observed, [0.3, 0.75], ["hard", "soft", "class_prior"], 2.5)
    blocks = stored_module.entry_blocks
    monkeypatch.setattr(labels_module, "entry_blocks", lambda indptr: blocks(indptr, entries=7))
    stats = statistics(stored, observed, targets, LabelRows.from_dense(full))
    dense = {"tau-0.3": dense_hard(probs, observed, 0.3), "tau-0.75": dense_hard(probs, observed, 0.75),
             "soft": dense_soft(probs, observed), "class_prior": dense_class_prior(probs, observed, 2.5)[0]}
    for name, matrix in dense.items():
        want, got = dense_quality(matrix, full), stats["targets"][name]
        for key in ("mean_positives_per_image", "precision", "recall"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), (name, key)
        assert got["per_class_recall"] == pytest.approx(want["per_class_recall"], rel=1e-12)
    teacher_want = dense_quality(probs, full)
    assert stats["teacher"]["recall"] == pytest.approx(teacher_want["recall"], rel=1e-12)
    assert stats["teacher"]["mean_positives_per_image"] == pytest.approx(
        teacher_want["mean_positives_per_image"], rel=1e-12)


def test_statistics_by_hand_with_verified_negatives():
    """Two images, three classes. Image 0: true {0}, verified negative {1}, observed 0;
    image 1: true {1}, observed nothing. tau 0.5 takes (0, 0), (0, 1), (1, 1), (1, 2)."""
    probs = np.array([[0.25, 0.75, 0.0], [0.0, 0.75, 0.75]], np.float16)
    stored = stored_of(probs, StoreRule(0.5, None))
    observed = np.array([0, -1])
    full = LabelRows.from_sets([[0], [1]], 3)
    negatives = LabelRows.from_sets([[1], []], 3)
    targets = targets_of(stored, observed, [0.5], ["hard"], 2.5)
    q = statistics(stored, observed, targets, full, negatives)["targets"]["tau-0.5"]
    assert q["mean_positives_per_image"] == 2.0
    assert q["precision"] == pytest.approx(2 / 4) and q["recall"] == 1.0
    assert q["per_class_precision"] == [1.0, 0.5, 0.0] and q["per_class_recall"] == [1.0, 1.0, None]
    assert q["verified_precision"] == pytest.approx(2 / 3)  # (1, 2) is unverified: not counted


def test_write_pseudo_stats_holds_every_rule(teacher, tmp_path):
    probs, observed, full = teacher
    stored = stored_of(probs, StoreRule(0.0, None))
    stats = write_pseudo_stats(stored, observed, tmp_path, [0.55, 0.75], ["hard", "soft", "class_prior"],
                               2.5, LabelRows.from_dense(full))
    assert list(stats["targets"]) == ["tau-0.55", "tau-0.75", "soft", "class_prior"]
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert stats["targets"]["tau-0.55"]["mode"] == "hard" and stats["targets"]["tau-0.55"]["tau"] == 0.55
    assert len(stats["targets"]["class_prior"]["thresholds"]) == 6
    assert stats["store"] == {"min_prob": 0.0, "top_k": None}
    only_hard = write_pseudo_stats(stored, observed, tmp_path / "h", [0.6], ["hard"], 2.9)
    assert list(only_hard["targets"]) == ["tau-0.6"] and "precision" not in only_hard["targets"]["tau-0.6"]
