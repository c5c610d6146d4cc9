"""A single-positive training CSV without a fully labelled validation split: no model selection by
validation mAP (config.DataSection.full_validation). The config refuses what selects by it, the
trainer keeps the last epoch (training/selection.py), and `run` / `train` say what that costs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pml_dist.cli import _warn_without_model_selection, main
from pml_dist.config import load_config
from pml_dist.errors import ConfigError
from pml_dist.training import selection

WITHOUT = ("without a fully labelled validation split (data.val_split; train.csv lists single "
           "positives)")


@pytest.fixture
def csv_root(tmp_path) -> Path:
    """A data root whose train.csv is single-positive; the probe reads only the header."""
    (tmp_path / "train.csv").write_text("file,label\na.jpg,cat\n")
    return tmp_path


def _overrides(root: Path, *extra: str) -> list[str]:
    # the demo preset's full-BCE reference is refused on single positives (test below)
    return [f"run.dir={root / 'run'}", "data.format=csv", f"data.root={root}", "report.references=[em]",
            *extra]


@pytest.mark.parametrize("override, message", [
    ("train.early_stop=[em]", f"config key 'train.early_stop' must be [] {WITHOUT}: early stopping "
                              "compares validation mAPs"),
    ("sweep.losses=[an] sweep.lr=[0.001] sweep.micro_batch=[16]",
     f"config key 'sweep.losses' must be [] {WITHOUT}: the grid's best point is chosen by validation mAP"),
    ("pseudo.rounds=2", f"config key 'pseudo.rounds' must be 1 {WITHOUT}: each round's teacher is the "
                        "best student by validation mAP"),
])
def test_what_selects_by_validation_map_is_refused(csv_root, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, _overrides(csv_root, *override.split()))
    assert str(err.value) == message


@pytest.mark.parametrize("override", ["train.early_stop=[em]", "pseudo.rounds=2"])
def test_a_fully_labelled_validation_split_allows_it(csv_root, override):
    cfg = load_config(None, _overrides(csv_root, "data.val_split=val", override))
    assert cfg.data.full_validation


@pytest.mark.parametrize("override, keys", [
    ("report.references=[bce,em]", "report.references"), ("loss.name=bce", "loss.name"),
    ("pseudo.teachers=[an,bce]", "pseudo.teachers")])
def test_full_label_bce_is_refused_on_single_positives(csv_root, override, keys):
    """Full BCE is the upper bound because it sees every label: on one per image it is not that,
    with or without a fully labelled validation split."""
    with pytest.raises(ConfigError) as err:
        load_config(None, _overrides(csv_root, "data.val_split=val", override))
    assert str(err.value) == (f"config key '{keys}' must not name bce, the full-label upper bound: "
                              "train.csv lists one positive per image, not every label")
    (csv_root / "train.csv").write_text("file,labels\na.jpg,cat|dog\n")  # label sets: allowed
    assert load_config(None, _overrides(csv_root, override)).data.full_training_labels


def test_full_validation_follows_the_csv_header_and_val_split(csv_root, tmp_path_factory):
    assert not load_config(None, _overrides(csv_root)).data.full_validation
    assert load_config(None, _overrides(csv_root, "data.val_split=val")).data.full_validation
    sets = tmp_path_factory.mktemp("sets")
    (sets / "train.csv").write_text("file,labels\na.jpg,cat|dog\n")
    assert load_config(None, _overrides(sets)).data.full_validation  # full label sets: validation too
    assert load_config(None, [f"run.dir={csv_root / 'run'}"]).data.full_validation  # not csv


def test_without_full_validation_the_last_epoch_is_kept():
    last = selection.model_selection(full_validation=False)
    assert last == "last epoch (no fully labelled validation split)"
    best = {"val_map": 50.0}
    assert selection.keeps(last, 10.0, best) and selection.keeps(last, None, best)
    assert selection.keeps(last, 10.0, None)


def test_with_full_validation_the_best_epoch_is_kept():
    by_val = selection.model_selection(full_validation=True)
    assert by_val == "best validation mAP"
    assert selection.keeps(by_val, 10.0, None)
    assert selection.keeps(by_val, 51.0, {"val_map": 50.0})
    assert not selection.keeps(by_val, 50.0, {"val_map": 50.0})  # a tie keeps the earlier epoch


def test_run_and_train_warn_once_what_it_costs(csv_root, caplog):
    with caplog.at_level(logging.WARNING, logger="pml_dist"):
        _warn_without_model_selection(load_config(None, _overrides(csv_root)))
        _warn_without_model_selection(load_config(None, _overrides(csv_root, "data.val_split=val")))
    assert [r.getMessage() for r in caplog.records] == [selection.NO_SELECTION_WARNING]
    assert "keeps its last epoch" in selection.NO_SELECTION_WARNING


def _csv_data(coco: Path, root: Path) -> None:
    """The generated COCO-layout set as a user's CSVs: train.csv single-positive (each image's first
    class by name), test.csv with every label."""
    root.mkdir()
    for split, header in (("train", "label"), ("test", "labels")):
        data = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        labels: dict[int, set[str]] = {}
        for a in data["annotations"]:
            labels.setdefault(a["image_id"], set()).add(names[a["category_id"]])
        rows = [f"file,{header}"]
        for image in data["images"]:
            present = sorted(labels.get(image["id"], ()))
            if present:
                rows.append(f"{coco / split / image['file_name']},"
                            f"{present[0] if header == 'label' else '|'.join(present)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stage_without_full_validation_keeps_its_last_epoch(synthetic_root, tmp_path):
    _csv_data(synthetic_root, tmp_path / "csv")
    overrides = [f"run.dir={tmp_path / 'run'}", "data.format=csv", f"data.root={tmp_path / 'csv'}",
                 "data.image_size=32", "data.max_resolution=32", "data.jit=false", "data.loader_workers=1",
                 "model.width=8", "train.micro_batch=16", "train.eval_batch=64", "train.epochs=3",
                 "report.references=[em]"]
    assert main(["prepare", *overrides]) == 0
    done = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count(selection.NO_SELECTION_WARNING) == 1
    teacher = tmp_path / "run" / "teacher"
    result = json.loads((teacher / "result.json").read_text())
    assert result["model_selection"] == selection.LAST_EPOCH
    assert result["best_epoch"] == json.loads((teacher / "best.json").read_text())["epoch"] == 2
    records = [json.loads(line) for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    val = [r["map"] for r in records if r["kind"] == "val"]
    assert len(val) == 3 and result["val_map"] == val[-1]  # validated every epoch, the last one kept
