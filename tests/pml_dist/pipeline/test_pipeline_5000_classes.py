"""The whole pipeline at a sparse label space: a generated set of 2,400 small images with 5,000
classes (the 20 drawn categories and 4,980 tags, about 4 labels per image) through `pml-dist run` on
the local executor: prepare, a 2-rank teacher, 2-rank inference keeping p >= 0.15 (at most 16 per
image), the merge, a hard and a class-prior student, the report. What it checks holds only where
every stage stays sparse and exact at L = 5,000."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ffcv_data.prepared import PreparedData
from pml_dist.cli import main
from pml_dist.config import load_config
from pml_dist.layout import RunLayout
from pml_dist.stages import Student
from pml_dist.stored_probs import read_stored_probs
from pml_dist.training.targets import training_targets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CLASSES = 5000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("sparse")
    run = base / "run"
    overrides = [
        f"run.dir={run}", f"data.root={base / 'generated'}", "data.synthetic=true",
        "data.synthetic_train=2000", "data.synthetic_test=400", f"data.synthetic_classes={CLASSES}",
        "data.image_size=32", "data.max_resolution=32", "data.jit=false", "model.width=8", "train.epochs=1",
        "train.micro_batch=32", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2",
        "pseudo.teachers=[]", "pseudo.taus=[0.2]", "pseudo.modes=[hard, class_prior]",
        "pseudo.store_min_prob=0.15", "pseudo.store_top_k=16", "report.references=[]",
    ]
    assert main(["run", "--executor", "local", *overrides]) == 0
    return run, overrides


def test_every_stage_ran_at_5000_classes(pipeline):
    run, _ = pipeline
    data = PreparedData(run / "data")
    assert data.stats().num_classes == CLASSES
    train = data.labels("train")
    assert 3.5 < train.labels.counts().mean() < 5  # 2.7 drawn + 1.5 tags
    assert (train.labels.per_class() > 0).sum() > 500  # a long tail: 1,600 images touch ~900 classes
    for path in ("teacher/result.json", "pseudo/probs.npz", "students/tau-0.2/result.json",
                 "students/class_prior/result.json", "report.md"):
        assert (run / path).is_file(), path
    stored = read_stored_probs(run / "pseudo" / "probs.npz")
    assert stored.rule.min_prob == 0.15 and stored.rule.top_k == 16
    assert stored.rows.counts().max() <= 16 and len(stored) == len(train)
    assert (stored.hist.sum(axis=1) == len(train)).all()  # every image once, kept or not


def test_the_test_mAP_leaves_out_exactly_the_classes_without_a_test_positive(pipeline):
    run, _ = pipeline
    test_labels = PreparedData(run / "data").labels("test").labels
    absent = np.flatnonzero(test_labels.per_class() == 0).tolist()
    assert len(absent) > CLASSES // 2
    for stage in ("teacher", "students/tau-0.2", "students/class_prior"):
        result = json.loads((run / stage / "result.json").read_text())
        assert result["test_classes_without_positives"] == absent, stage
        logits = np.load(run / stage / "test_logits.npy", mmap_mode="r")
        assert logits.shape == (len(test_labels), CLASSES) and logits.dtype == np.float16


def test_a_student_s_batches_are_its_rule_on_the_merged_probabilities(pipeline):
    """tau 0.2 from its description: p > 0.2 (in float16) among the kept probabilities, and the
    observed positive; the class prior: per class the recorded number of top images by p."""
    run, overrides = pipeline
    cfg = load_config(None, overrides)
    layout = RunLayout.of(cfg)
    split = layout.data.labels("train")
    probs = read_stored_probs(layout.pseudo.probs).dense().astype(np.float32)
    observed = np.zeros((len(split), CLASSES), np.float32)
    seen = np.flatnonzero(split.observed >= 0)
    observed[seen, split.observed[seen]] = 1
    index = torch.arange(len(split))
    batch = {"index": index, "observed": torch.from_numpy(observed)}
    _, hard = training_targets(cfg, layout, Student("tau-0.2"), len(split))
    want = np.maximum((probs > np.float32(np.float16(0.2))).astype(np.float32), observed)
    assert np.array_equal(hard(batch).numpy(), want)
    assert want.sum() > len(split) * 1.2  # the teacher adds positives: the rule is exercised
    _, prior = training_targets(cfg, layout, Student("class_prior"), len(split))
    got = prior(batch).numpy()
    stats = json.loads((run / "pseudo" / "stats.json").read_text())["targets"]["class_prior"]
    assert stats["mode"] == "class_prior" and stats["k"] == cfg.loss.expected_positives
    counts = np.round(np.clip(np.bincount(split.observed[seen], minlength=CLASSES) / len(split)
                              * stats["k"], 1 / len(split), 1) * len(split)).astype(int)
    for c in np.flatnonzero(np.bincount(split.observed[seen], minlength=CLASSES))[:50]:
        order = np.lexsort((np.arange(len(split)), -probs[:, c]))  # p descending, ties by index
        kept = order[:counts[c]][probs[order[:counts[c]], c] > 0]  # only kept rows can be taken
        expected = np.zeros(len(split), np.float32)
        expected[kept] = 1
        expected = np.maximum(expected, observed[:, c])
        if str(c) not in stats["short_classes"]:
            assert np.array_equal(got[:, c], expected), c
        else:  # fewer kept rows than wanted: every kept one is taken
            assert (got[probs[:, c] > 0, c] == 1).all(), c
