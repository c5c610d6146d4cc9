"""A user's own single-positive data, end to end (docs/your-data.md): the built-in data set written as
CSV files (one positive per training image, full labels for val and test), `pml-dist run` over them,
TensorBoard's scalars read back with TensorBoard's own reader, `predict` on a folder, `export` used
in an interpreter without pml_dist, and a new unlabelled pool labelled by the teacher training a
student. One chain trained once, shared by every test here."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffcv_data.prepared import PreparedData
from pml_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PML = [sys.executable, "-m", "pml_dist"]
TINY = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "model.width=16", "train.epochs=2",
        "train.micro_batch=16", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2"]


def _csv_data(root: Path, seed: int) -> Path:
    subprocess.run([*PML, "make-synthetic", str(root), "--layout", "csv", "--seed", str(seed),
                    "--train", "200", "--test", "100", "--size", "48"], check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The AN chain (teacher, inference, pseudo labels, one student) on the CSV data set."""
    tmp = tmp_path_factory.mktemp("your-data")
    mine = _csv_data(tmp / "mine", seed=0)
    run = tmp / "run"
    overrides = [f"run.dir={run}", "data.format=csv", f"data.root={mine}", "data.val_split=val",
                 f"data.classes={mine / 'classes.txt'}", *TINY, "pseudo.teachers=[an]", "pseudo.taus=[0.3]",
                 "pseudo.modes=[hard]", "report.references=[]"]
    done = subprocess.run([*PML, "run", "--executor", "local", *overrides], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, mine, run, done.stdout


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_chain_trains_on_csv_data_and_tensorboard_shows_it(chain):
    tmp, mine, run, stdout = chain
    assert f"TensorBoard: tensorboard --logdir {run}" in stdout
    stats = json.loads((run / "data/stats.json").read_text())
    assert stats["complete_labels"] == {"train": False, "val": True, "test": True}
    assert stats["splits"]["val"]["images"] == len((mine / "val.csv").read_text().splitlines()) - 1
    names = (mine / "classes.txt").read_text().splitlines()
    for stage in ("teacher", "students/tau-0.3"):
        result = json.loads((run / stage / "result.json").read_text())
        assert result["model_selection"] == "best validation mAP"
        assert (run / stage / "thresholds.json").is_file()
        board = _scalars(run / stage / "tensorboard")
        # the scalars mirror metrics.jsonl (float32 in the event file)
        records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        val = [(r["step"], r["map"]) for r in records if r["kind"] == "val"]
        assert [s for s, _ in board["val/map"]] == [s for s, _ in val]
        np.testing.assert_allclose([v for _, v in board["val/map"]], [v for _, v in val], rtol=1e-6)
        assert board["test/map"][-1][1] == pytest.approx(result["test_map"], rel=1e-6)
        assert {"train/loss", "train/lr", "train/samples_per_s"} <= board.keys()
        per_class = {tag.split("/", 1)[1] for tag in board if tag.startswith("val_ap/")}
        assert per_class and per_class <= set(names)
    student = _scalars(run / "students/tau-0.3/tensorboard")
    pseudo = json.loads((run / "pseudo/stats.json").read_text())["targets"]["tau-0.3"]
    assert student["targets/positives_per_image"][0][1] == pytest.approx(pseudo["mean_positives_per_image"])
    # precision and recall against one positive per image would mean nothing: none are given
    assert "precision" not in pseudo
    report = json.loads((run / "report.json").read_text())
    assert report["true_labels_per_image"] is None


def test_predict_scores_a_folder_and_export_agrees_without_pml_dist(chain):
    tmp, mine, run, _ = chain
    config = str(run / "config.yaml")  # the run's resolved config names everything predict needs
    out = tmp / "scores.jsonl"
    subprocess.run([*PML, "predict", "--config", config, "--stage", "teacher", "--top-k", "0", "--out",
                    str(out), str(mine / "images")], check=True, capture_output=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    files = sorted(p.name for p in (mine / "images").iterdir())
    assert [r["file"] for r in lines] == files
    thresholds = json.loads((run / "teacher/thresholds.json").read_text())
    names = (mine / "classes.txt").read_text().splitlines()
    assert all(len(r["scores"]) == len(names) for r in lines)

    export = tmp / "export"
    subprocess.run([*PML, "export", "--config", config, "--stage", "teacher", "--out", str(export)],
                   check=True, capture_output=True)
    assert json.loads((export / "classes.json").read_text()) == names
    assert json.loads((export / "thresholds.json").read_text()) == thresholds
    model = json.loads((export / "model.json").read_text())
    assert model["test_map"] == json.loads((run / "teacher/result.json").read_text())["test_map"]
    code = f"""
import json, sys
import numpy as np, torch
from PIL import Image
model = torch.jit.load({str(export / 'model.pt')!r})
files = {files!r}
x = [torch.from_numpy(np.array(Image.open({str(mine / 'images')!r} + '/' + f).convert('RGB')))
     .permute(2, 0, 1).float() / 255 for f in files[:8]]
with torch.no_grad():
    probs = model(torch.stack(x)).tolist()
assert 'pml_dist' not in sys.modules and 'ffcv_data' not in sys.modules
print(json.dumps(probs))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = np.array(json.loads(done.stdout))
    predicted = np.array([[r["scores"][n] for n in names] for r in lines[:8]])
    np.testing.assert_allclose(exported, predicted, atol=1e-4)


def test_a_pool_labelled_by_the_teacher_trains_a_student(chain):
    tmp, mine, run, _ = chain
    # a new collection nobody labelled (another generated set's images), and the same test split
    pool_source = _csv_data(tmp / "pool-source", seed=1)
    data = tmp / "pool"
    shutil.copytree(pool_source / "images", data / "pool")
    labels = data / "train.csv"
    done = subprocess.run([*PML, "predict", "--config", str(run / "config.yaml"), "--stage", "teacher",
                           "--format", "labels", "--out", str(labels), str(data)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(labels, newline="") as f:
        pooled = {row["file"]: row["labels"] for row in csv.DictReader(f)}
    assert len(pooled) == len(list((data / "pool").iterdir())) and all(f.startswith("pool/") for f in pooled)
    shutil.copytree(mine / "images", data / "images")
    shutil.copy(mine / "test.csv", data / "test.csv")

    # the pool's labels are label sets (header file,labels): full BCE on them is the student
    student = tmp / "pool-run"
    overrides = [f"run.dir={student}", "data.format=csv", f"data.root={data}",
                 f"data.classes={mine / 'classes.txt'}", *TINY]
    assert main(["prepare", *overrides]) == 0
    prepared = PreparedData(student / "data")
    stats = prepared.stats().raw
    assert stats["complete_labels"] == {"train": True, "val": True, "test": True}
    names = (mine / "classes.txt").read_text().splitlines()
    kept = {f: sorted(names.index(n) for n in v.split("|")) for f, v in pooled.items() if v}
    for split in ("train", "val"):
        rows = prepared.labels(split)
        for i in range(len(rows)):
            assert sorted(rows.labels.row(i).tolist()) == kept[rows.file(i)]
    assert stats["splits"]["train"]["images"] + stats["splits"]["val"]["images"] == len(kept)
    # its own process, as a user starts it: a training exports torch.distributed's variables and
    # holds its port, which must not leak into the tests that train after this one
    done = subprocess.run([*PML, "train", "--stage", "reference", "--loss", "bce", *overrides],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((student / "references/bce/result.json").read_text())
    assert result["model_selection"] == "best validation mAP" and 0 < result["test_map"] <= 100
