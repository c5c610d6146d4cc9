"""The whole pipeline through submitit's local executor, on a small generated data set: every stage
runs, the report and both figures appear, and a resubmission only redoes what is unfinished."""

from __future__ import annotations

import json
import shutil

import pytest

from pml_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def pipeline(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    overrides = [
        f"run.dir={run}", f"data.root={synthetic_root}", "data.image_size=32", "data.max_resolution=48",
        "data.jit=false", "model.width=16", "train.epochs=1", "train.micro_batch=16",
        "pseudo.taus=[0.5, 0.7]", "pseudo.modes=[hard, soft]", "report.references=[bce]",
        "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2",
    ]
    assert main(["run", "--executor", "local", *overrides]) == 0
    return run, overrides


def test_every_stage_ran_and_the_report_lists_them(pipeline, capsys):
    run, overrides = pipeline
    for path in ["data/stats.json", "teacher/result.json", "pseudo/probs.npy", "pseudo/stats.json",
                 "students/tau-0.5/result.json", "students/tau-0.7/result.json",
                 "students/soft/result.json", "references/bce/result.json", "report.md", "report.json"]:
        assert (run / path).is_file(), path
    teacher = json.loads((run / "teacher/result.json").read_text())
    assert teacher["world_size"] == 2 and len(set(teacher["rank_weight_digests"])) == 1
    shards = sorted(p.name for p in (run / "teacher/probs").glob("*.json"))
    assert shards == ["shard-00000-of-00002.json", "shard-00001-of-00002.json"]
    report = json.loads((run / "report.json").read_text())
    assert set(report["students"]) == {"tau-0.5", "tau-0.7", "soft"}
    assert set(report["references"]) == {"an", "bce"}
    assert all(s["test_map"] is not None for s in report["students"].values())
    a = report["students"]["tau-0.5"]["mean_positives_per_image"]
    b = report["students"]["tau-0.7"]["mean_positives_per_image"]
    assert a >= b >= 1.0
    for figure in ("figure1a.png", "figure1b.png"):
        assert (run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| student tau-0.5 |" in md and "| reference full BCE |" in md
    assert main(["status", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ["done"] * len(lines) and len(lines) == 6


def test_resubmission_redoes_only_what_is_unfinished(pipeline):
    run, overrides = pipeline
    shutil.rmtree(run / "students" / "tau-0.7")
    before = (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns
    assert main(["run", "--executor", "local", *overrides]) == 0
    jobs = json.loads((run / "jobs.json").read_text())["stages"]
    assert set(jobs) == {"students", "references", "report"}
    assert list(jobs["students"]) == ["tau-0.7"] and jobs["references"] == {}
    assert (run / "students" / "tau-0.7" / "result.json").is_file()
    assert (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns == before
