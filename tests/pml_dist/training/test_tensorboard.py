"""TensorBoard event files of a training stage (pml_dist/training/board.py), read back with
TensorBoard's own reader: the same scalars as metrics.jsonl, the best epoch's per-class validation
AP as result.json has it; and result.json's environment. One tiny teacher trained once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pml_dist.cli import main
from pml_dist.training.board import Board

TINY = ["data.image_size=32", "data.max_resolution=32", "data.jit=false", "data.loader_workers=1",
        "model.width=8", "train.micro_batch=16", "train.eval_batch=64", "train.epochs=2",
        "train.log_every=2"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(values) -> list:
    """Event files hold float32 (simple_value)."""
    return [float(np.float32(v)) for v in values]


@pytest.fixture(scope="module")
def stage(synthetic_root, tmp_path_factory) -> Path:
    """A trained teacher's folder (2 epochs of 7 steps, a train record every 2 steps)."""
    run = tmp_path_factory.mktemp("tensorboard") / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY]
    assert main(["prepare", *overrides]) == 0
    done = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "teacher"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_board_holds_metrics_jsonl_s_scalars(stage):
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(stage / "tensorboard")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 7  # steps 2, 4, ..., 14
    for key in ("loss", "lr", "samples_per_s"):
        assert scalars[f"train/{key}"] == list(zip([r["step"] for r in train],
                                                   _f32(r[key] for r in train), strict=True))
    val = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1]
    assert scalars["val/map"] == list(zip([r["step"] for r in val], _f32(r["map"] for r in val), strict=True))
    (test,) = [r for r in records if r["kind"] == "test"]
    assert scalars["test/map"] == [(test["step"], *_f32([test["map"]]))]
    assert "targets/positives_per_image" not in scalars  # a teacher trains on its observed positives


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_board_holds_the_best_epoch_s_per_class_validation_ap(stage, synthetic_root):
    result = json.loads((stage / "result.json").read_text())
    names = json.loads((stage.parent / "data" / "stats.json").read_text())["category_names"]
    assert result["model_selection"] == "best validation mAP"
    ap = result["val_ap"]
    assert len(ap) == len(names) and any(v is not None for v in ap)
    # the best epoch's validation mAP is the mean of its scored classes' AP
    assert result["val_map"] == pytest.approx(np.mean([v for v in ap if v is not None]))
    scalars = _scalars(stage / "tensorboard")
    got = {tag.removeprefix("val_ap/"): points for tag, points in scalars.items()
           if tag.startswith("val_ap/")}
    assert got == {n: [(result["best_step"], *_f32([v]))] for n, v in zip(names, ap, strict=True)
                   if v is not None}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_result_json_records_what_can_move_the_numbers(stage):
    env = json.loads((stage / "result.json").read_text())["environment"]
    assert set(env) >= {"git", "python", "torch", "torchvision", "deepspeed", "numpy",
                        "torch_threads_per_rank", "device", "world_size", "local_world_size", "launcher",
                        "deterministic_algorithms", "cudnn_benchmark"}
    assert (env["device"], env["world_size"], env["local_world_size"], env["launcher"]) == (
        "cpu", 1, 1, "one process")
    assert env["torch_threads_per_rank"] >= 1 and env["numpy"] == np.__version__


def test_a_resumed_board_replaces_what_was_written_after_the_checkpoint(tmp_path):
    folder = tmp_path / "tensorboard"
    first = Board(folder, enabled=True, resume_step=0)
    first.scalar("targets/positives_per_image", 2.5, 0)
    for step in range(1, 11):  # stopped at step 10; its newest checkpoint is step 6's
        first.record({"kind": "train", "step": step, "loss": float(step), "lr": 0.1, "samples_per_s": 1.0})
    first.close()
    again = Board(folder, enabled=True, resume_step=6)
    for step in range(7, 13):
        again.record({"kind": "train", "step": step, "loss": 100.0 + step, "lr": 0.1, "samples_per_s": 1.0})
    again.close()
    scalars = _scalars(folder)
    replayed = [(s, 100.0 + s) for s in range(7, 13)]  # from the checkpoint on: the new values only
    assert scalars["train/loss"] == [(s, float(s)) for s in range(1, 7)] + replayed
    assert scalars["targets/positives_per_image"] == [(0, 2.5)]


def test_a_board_stopped_before_its_first_checkpoint_is_written_anew(tmp_path):
    folder = tmp_path / "tensorboard"
    first = Board(folder, enabled=True, resume_step=0)
    first.scalar("targets/positives_per_image", 2.5, 0)
    first.record({"kind": "val", "step": 3, "map": 10.0})
    first.close()
    again = Board(folder, enabled=True, resume_step=0)
    again.scalar("targets/positives_per_image", 2.5, 0)
    again.record({"kind": "val", "step": 3, "map": 11.0})
    again.close()
    assert _scalars(folder) == {"targets/positives_per_image": [(0, 2.5)], "val/map": [(3, 11.0)]}


def test_a_large_label_space_gets_one_histogram_of_class_aps_not_a_tag_per_class(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pml_dist.training.board import MAX_CLASS_TAGS

    folder = tmp_path / "tensorboard"
    board = Board(folder, enabled=True, resume_step=0)
    n = MAX_CLASS_TAGS + 1
    ap = [None if c % 10 == 0 else c / n for c in range(n)]
    board.class_ap("val_ap", [f"c{c}" for c in range(n)], ap, 7)
    board.class_ap("small", ["a", "b"], [0.25, None], 7)
    board.close()
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == ["small/a"]
    (event,) = acc.Histograms("val_ap")
    assert event.step == 7 and event.histogram_value.num == n - len(range(0, n, 10))
    assert event.histogram_value.max == max(v for v in ap if v is not None)


def test_only_rank_0_writes(tmp_path):
    board = Board(tmp_path / "tensorboard", enabled=False, resume_step=0)
    board.record({"kind": "val", "step": 3, "map": 10.0})
    board.class_ap("val_ap", ["a", "b"], [1.0, None], 3)
    board.flush()
    board.close()
    assert not (tmp_path / "tensorboard").exists()


def test_a_student_s_positives_per_image_come_from_its_target_s_statistics(tmp_path):
    from pml_dist.config import defaults
    from pml_dist.layout import RunLayout
    from pml_dist.stages import Student, Teacher
    from pml_dist.training.targets import positives_per_image

    run = RunLayout(tmp_path)
    run.pseudo.dir.mkdir()
    run.pseudo.stats.write_text(json.dumps({"targets": {"tau-0.5": {"mode": "hard", "tau": 0.5,
                                                                    "mean_positives_per_image": 1.75}}}))
    cfg = defaults()
    assert positives_per_image(cfg, run, Student("tau-0.5")) == 1.75
    assert positives_per_image(cfg, run, Teacher()) is None


def test_run_prints_the_tensorboard_command_once(monkeypatch, tmp_path, capsys):
    import pml_dist.pipeline.graph as graph
    from pml_dist.errors import PmlError

    def stop(*args, **kwargs):
        raise PmlError("stopped before any job")

    monkeypatch.setattr(graph, "run_pipeline", stop)
    assert main(["run", "--executor", "local", f"run.dir={tmp_path / 'run'}"]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "tensorboard" in line.lower()]
    assert lines == [f"TensorBoard: tensorboard --logdir {tmp_path / 'run'}"]
