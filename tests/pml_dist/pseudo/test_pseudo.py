from __future__ import annotations

import json

import numpy as np
import pytest

from pml_dist.pseudo.labels import (
    class_prior_labels,
    hard_labels,
    quality,
    soft_labels,
    target_names,
    write_pseudo_labels,
)


@pytest.fixture
def teacher():
    rng = np.random.default_rng(0)
    n, num_classes = 400, 6
    full = (rng.random((n, num_classes)) < np.linspace(0.1, 0.6, num_classes)).astype(np.uint8)
    full[np.arange(n), rng.integers(num_classes, size=n)] = 1
    observed = np.zeros_like(full)
    for i in range(n):
        observed[i, rng.choice(np.flatnonzero(full[i]))] = 1
    probs = np.clip(0.6 * full + rng.normal(0.2, 0.2, full.shape), 0, 1).astype(np.float16)
    probs[observed > 0] = np.minimum(probs[observed > 0], np.float16(0.3))  # a doubtful teacher
    return probs, observed, full


def _classes(observed: np.ndarray) -> np.ndarray:
    """One-hot observed rows as the (N,) classes the targets take (-1: nothing observed)."""
    return np.where(observed.any(axis=1), observed.argmax(axis=1), -1)


def test_a_row_without_an_observed_positive_keeps_only_the_teacher(teacher):
    probs, observed, _ = teacher
    classes = _classes(observed)
    classes[:5] = -1  # (Cole et al.'s protocol: a row without a positive observes nothing)
    labels, soft = hard_labels(probs, classes, 0.5), soft_labels(probs, classes)
    assert np.array_equal(labels[:5], (probs[:5] > 0.5).astype(np.uint8))
    assert np.array_equal(soft[:5], probs[:5]) and (soft[np.arange(5, 400), classes[5:]] == 1).all()


def test_hard_labels_threshold_and_keep_the_observed_positive(teacher):
    probs, observed, _ = teacher
    labels = hard_labels(probs, _classes(observed), 0.75)
    assert labels.dtype == np.uint8
    assert (labels[observed > 0] == 1).all()  # even where the teacher scored it below tau
    assert np.array_equal(labels[observed == 0], (probs > 0.75)[observed == 0])


def test_positives_per_image_fall_as_tau_rises(teacher):
    probs, observed, _ = teacher
    classes = _classes(observed)
    means = [hard_labels(probs, classes, t).sum(axis=1).mean() for t in (0.55, 0.65, 0.75, 0.85, 0.95)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    assert means[-1] >= 1.0


def test_soft_labels_are_the_probabilities_with_the_observed_positive_at_one(teacher):
    probs, observed, _ = teacher
    soft = soft_labels(probs, _classes(observed))
    assert soft.dtype == np.float16
    assert (soft[observed > 0] == 1).all()
    assert np.array_equal(soft[observed == 0], probs[observed == 0])


def test_class_prior_thresholds_match_the_estimated_prior(teacher):
    probs, observed, full = teacher
    k = full.sum(axis=1).mean()
    labels, thresholds = class_prior_labels(probs, _classes(observed), k)
    prior = observed.mean(axis=0) * k
    n = len(probs)
    for c in range(probs.shape[1]):
        count = round(prior[c] * n)
        positives = labels[:, c].sum()
        # the top round(prior x N) of the class, plus observed positives outside them
        assert count <= positives <= count + observed[:, c].sum()
        chosen = (labels[:, c] > 0) & (observed[:, c] == 0)
        assert probs[chosen, c].min() >= probs[labels[:, c] == 0, c].max()  # by rank, not at random
        assert probs[chosen, c].min() >= thresholds[c]
    assert (labels[observed > 0] == 1).all()
    # with the true k the estimated prior is close to the true one on this data
    assert np.abs(prior - full.mean(axis=0)).max() < 0.1


def test_quality_counts_by_hand():
    targets = np.array([[1, 1, 0], [0, 1, 1]], np.uint8)
    full = np.array([[1, 0, 0], [0, 1, 0]], np.uint8)
    q = quality(targets, full)
    assert q["mean_positives_per_image"] == 2.0
    assert q["precision"] == pytest.approx(2 / 4) and q["recall"] == pytest.approx(2 / 2)
    assert q["per_class_precision"] == [1.0, 0.5, 0.0]
    assert q["per_class_recall"] == [1.0, 1.0, None]
    soft = quality(np.array([[0.5, 0.0], [1.0, 0.25]]), np.array([[1, 0], [1, 1]]))
    assert soft["precision"] == pytest.approx(1.75 / 1.75) and soft["recall"] == pytest.approx(1.75 / 3)


def test_write_pseudo_labels_layout_and_stats(teacher, tmp_path):
    probs, observed, full = teacher
    stats = write_pseudo_labels(probs, _classes(observed), tmp_path, [0.55, 0.75],
                                ["hard", "soft", "class_prior"], 2.5, full)
    assert list(stats["targets"]) == target_names([0.55, 0.75], ["hard", "soft", "class_prior"]) == \
        ["tau-0.55", "tau-0.75", "soft", "class_prior"]
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    for name in stats["targets"]:
        assert np.load(tmp_path / name / "labels.npy").shape == probs.shape
    assert stats["targets"]["tau-0.55"]["mean_positives_per_image"] > \
        stats["targets"]["tau-0.75"]["mean_positives_per_image"]
    only_hard = write_pseudo_labels(probs, _classes(observed), tmp_path / "h", [0.6], ["hard"], 2.9)
    assert list(only_hard["targets"]) == ["tau-0.6"] and "precision" not in only_hard["targets"]["tau-0.6"]


def test_a_student_batch_carries_exactly_the_pseudo_labels_of_its_indices(synthetic_root, tmp_path):
    """The student's loader is the teacher's .beton; its targets are looked up by index."""
    from ffcv_data.loaders import train_loader
    from pml_dist.config import load_config
    from pml_dist.data_stage import prepare
    from pml_dist.layout import RunLayout
    from pml_dist.stages import Student
    from pml_dist.training.targets import training_targets

    cfg = load_config(None, [f"run.dir={tmp_path}", f"data.root={synthetic_root}", "data.max_resolution=48",
                             "data.write_workers=2"])
    prepare(cfg)
    n = 120
    labels = (np.random.default_rng(1).random((n, 20)) < 0.3).astype(np.uint8)
    (tmp_path / "pseudo" / "tau-0.75").mkdir(parents=True)
    np.save(tmp_path / "pseudo" / "tau-0.75" / "labels.npy", labels)
    source, targets_of = training_targets(cfg, RunLayout.of(cfg), Student("tau-0.75"), n)
    assert "pseudo labels" in source
    loader = train_loader(RunLayout.of(cfg).data.beton("train"), 16, 32, jit=False)
    for batch in loader:
        index = batch["index"].numpy()
        assert np.array_equal(targets_of(batch).numpy(), labels[index].astype(np.float32))
    with pytest.raises(Exception, match="run `pml-dist merge` first"):
        training_targets(cfg, RunLayout.of(cfg), Student("tau-0.95"), n)


def test_quality_block_by_block_equals_the_whole_split_at_once(teacher, monkeypatch):
    """Row blocks (here 7 rows) and sparse full labels give the statistics of the dense formula."""
    from ffcv_data.sparse import LabelRows
    from pml_dist.pseudo import labels as labels_module

    probs, observed, full = teacher
    t, y = probs.astype(np.float64), full.astype(np.float64)
    tp, pred, true = (t * y).sum(axis=0), t.sum(axis=0), y.sum(axis=0)
    monkeypatch.setattr(labels_module, "QUALITY_BLOCK", 7)
    q = quality(probs, LabelRows.from_dense(full))
    assert q["mean_positives_per_image"] == pytest.approx(t.sum(axis=1).mean(), rel=1e-12)
    assert q["precision"] == pytest.approx(tp.sum() / pred.sum(), rel=1e-12)
    assert q["recall"] == pytest.approx(tp.sum() / true.sum(), rel=1e-12)
    assert q["per_class_recall"] == pytest.approx(list(tp / true), rel=1e-12)
