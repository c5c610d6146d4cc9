"""Any split size works: splits whose size leaves a last batch of one image in training (dropped),
validation, testing and inference, and a validation split so small that most classes have no
positive (left out of its mAP, and every record says which)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ffcv_data.prepared import PreparedData
from pml_dist.cli import main
from pml_dist.config import load_config
from pml_dist.pseudo.infer import infer
from pml_dist.pseudo.make import make_pseudo_labels
from pml_dist.stored_probs import read_stored_probs

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]
# 150 generated images, 6% to validation: 141 train, 9 val; 17 test. Batches of 20 leave one of the
# 141 (training drops it, inference scores it); batches of 8 leave one of 9 and one of 17.
TINY = ["data.image_size=32", "data.max_resolution=32", "data.jit=false", "data.loader_workers=1",
        "data.write_workers=1", "data.val_fraction=0.06", "model.width=8", "train.epochs=1",
        "train.micro_batch=20", "train.eval_batch=8", "infer.batch=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ffcv_data.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("sizes")
    make_synthetic(base / "coco", seed=0, n_train=150, n_test=17, image_size=32)
    overrides = [f"run.dir={base / 'run'}", f"data.root={base / 'coco'}", *TINY]
    assert main(["prepare", *overrides]) == 0
    stats = json.loads((base / "run" / "data" / "stats.json").read_text())
    assert {n: s["images"] for n, s in stats["splits"].items()} == {"train": 141, "val": 9, "test": 17}
    done = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "run", overrides


def _without_positives(data, split) -> list[int]:
    return [int(i) for i in np.flatnonzero(PreparedData(data).labels(split).labels.per_class() == 0)]


def test_training_and_evaluation_with_a_last_batch_of_one(run):
    folder, _ = run
    result = json.loads((folder / "teacher" / "result.json").read_text())
    assert result["epochs_trained"] == 1 and result["test_map"] is not None
    derived = json.loads((folder / "teacher" / "derived.json").read_text())
    assert derived["steps_per_epoch"] == 7  # 141 // 20: the last sample of one is dropped
    logits = np.load(folder / "teacher" / "test_logits.npy")
    assert logits.shape == (17, 20)  # every test image scored, the last batch of one too


def test_val_classes_without_positives_are_recorded_everywhere(run):
    folder, _ = run
    left_out = _without_positives(folder / "data", "val")
    assert 0 < len(left_out) < 20  # 9 images: most classes have no positive there
    result = json.loads((folder / "teacher" / "result.json").read_text())
    assert result["val_classes_without_positives"] == left_out
    assert result["test_classes_without_positives"] == _without_positives(folder / "data", "test")
    best = json.loads((folder / "teacher" / "best.json").read_text())
    assert best["val_classes_without_positives"] == left_out
    records = [json.loads(line) for line in (folder / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["classes_without_positives"] for r in records if r["kind"] == "val"] == [left_out]


def test_inference_scores_a_last_batch_of_one_as_a_single_batch_does(run, monkeypatch):
    folder, overrides = run
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    infer(load_config(None, overrides))  # 141 = 7 x 20 + 1
    assert main(["merge", *overrides]) == 0
    probs = read_stored_probs(folder / "pseudo" / "probs.npz").dense()  # the demo's taus: p >= 0.2 kept
    assert probs.shape == (141, 20)
    other = [o if not o.startswith("run.dir=") else f"run.dir={folder.parent / 'one-batch'}"
             for o in overrides]
    (folder.parent / "one-batch" / "teacher").mkdir(parents=True)
    shutil.copy(folder / "teacher" / "best.pt", folder.parent / "one-batch" / "teacher" / "best.pt")
    cfg = load_config(None, [*other, f"run.data_dir={folder / 'data'}", "infer.batch=141"])
    infer(cfg)
    make_pseudo_labels(cfg)
    single = read_stored_probs(folder.parent / "one-batch" / "pseudo" / "probs.npz").dense()
    both = (single > 0) & (probs > 0)
    np.testing.assert_allclose(single[both].astype(np.float32), probs[both].astype(np.float32), atol=2e-3)
    assert both.sum() > 1000 and np.maximum(single, probs)[~both].max(initial=0) < 0.2 + 2e-3
