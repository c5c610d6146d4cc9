"""The whole pipeline through submitit's local executor, on a small generated data set: every stage
runs, the report and both figures appear, and a resubmission only redoes what is unfinished; the
EM teacher's chain reuses its teacher as the EM reference; --seeds repeats the experiment, and
pseudo.rounds makes a round's best student the next round's teacher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ffcv_data.prepared import PreparedData
from pml_dist.cli import main
from pml_dist.training.metrics import mean_average_precision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TINY = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "model.width=16", "train.epochs=1",
        "train.micro_batch=16", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2"]


@pytest.fixture(scope="module")
def pipeline(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    overrides = [
        f"run.dir={run}", f"data.root={synthetic_root}", *TINY, "pseudo.taus=[0.5, 0.7]",
        "pseudo.modes=[hard, soft]", "report.references=[bce, em]", "pseudo.teachers=[an, em]",
        "pseudo.teacher_modes={em: [soft]}",
    ]
    assert main(["run", "--executor", "local", *overrides]) == 0
    return run, overrides


def test_every_stage_ran_and_the_report_lists_them(pipeline, capsys):
    run, overrides = pipeline
    for path in ["data/stats.json", "teacher/result.json", "pseudo/probs.npz", "pseudo/stats.json",
                 "students/tau-0.5/result.json", "students/tau-0.7/result.json",
                 "students/soft/result.json", "references/bce/result.json", "report.md", "report.json",
                 "chain-em/teacher/result.json", "chain-em/students/soft/result.json"]:
        assert (run / path).is_file(), path
    assert not (run / "references" / "em").exists()  # the EM chain's teacher is the EM reference
    assert not (run / "chain-em" / "data").exists()  # it reads the run's prepared data
    teacher = json.loads((run / "teacher/result.json").read_text())
    assert teacher["world_size"] == 2 and len(set(teacher["rank_weight_digests"])) == 1
    shards = sorted(p.name for p in (run / "teacher/probs").glob("*.json"))
    assert shards == ["shard-00000-of-00002.json", "shard-00001-of-00002.json"]
    test_labels = PreparedData(run / "data").labels("test").labels.dense()
    logits = np.load(run / "students/soft/test_logits.npy")  # what the report's intervals compare
    assert logits.dtype == np.float16 and logits.shape == test_labels.shape
    student = json.loads((run / "students/soft/result.json").read_text())
    # equal up to float16's ties: these 1-epoch models score all images nearly alike
    assert mean_average_precision(logits, test_labels)["map"] == pytest.approx(student["test_map"], abs=0.5)

    report = json.loads((run / "report.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == [
        "AN teacher", "EM teacher", "reference full BCE", "AN -> tau-0.5", "AN -> tau-0.7", "AN -> soft",
        "EM -> soft"]
    em = json.loads((run / "chain-em/teacher/result.json").read_text())["test_map"]
    assert rows["chain-em/teacher"]["test_map"] == em
    for row in report["rows"]:
        assert row["test_map_low"] <= row["test_map"] <= row["test_map_high"], row
    assert rows["students/tau-0.5"]["positives"] >= rows["students/tau-0.7"]["positives"] >= 1.0
    # every student against its own teacher and the AN, EM and full-BCE teachers (not itself)
    pairs = {(c["a"], c["against"]): c for c in report["comparisons"]}
    assert set(pairs) == {(s, against) for s in ("students/tau-0.5", "students/tau-0.7", "students/soft")
                          for against in ("teacher", "em", "bce")} | {
        ("chain-em/students/soft", against) for against in ("teacher", "an", "bce")}
    own = pairs[("chain-em/students/soft", "teacher")]
    assert own["b"] == "chain-em/teacher" and own["low"] <= own["diff"] <= own["high"]
    maps = {stage: mean_average_precision(np.load(run / stage / "test_logits.npy"), test_labels)["map"]
            for stage in ("chain-em/students/soft", "chain-em/teacher")}
    assert own["diff"] == pytest.approx(maps["chain-em/students/soft"] - maps["chain-em/teacher"], abs=1e-9)
    assert own["verdict"] == ("yes" if own["low"] > 0 else "no" if own["high"] < 0 else "not resolved")
    claims = {(f["chain"], f["claim"]) for f in report["findings"]}
    assert ("an", "every tau's student beats its AN teacher") in claims
    assert ("an", "mean positives per image fall as tau rises") in claims
    assert all(r["test_map"] is not None for r in report["rows"])
    assert all(report["stages"][k] > 0 for k in ("prepare_seconds", "teacher_seconds", "infer_seconds",
                                                 "merge_seconds", "students_seconds", "infer_samples_per_s"))
    for figure in ("figure1a.png", "figure1b.png"):
        assert (run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| AN -> tau-0.5 |" in md and "| reference full BCE |" in md and "beyond the paper" in md
    # classes without a positive in a split are named (by the data's category names)
    names = json.loads((run / "data/stats.json").read_text())["category_names"]
    for split in ("val", "test"):
        left_out = teacher[f"{split}_classes_without_positives"]
        assert report["classes_left_out"][split] == [names[i] for i in left_out]
    assert ("Classes without a positive, left out" in md) == any(report["classes_left_out"].values())
    assert main(["status", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [
        "data", "teacher", "pseudo", "students/tau-0.5", "students/tau-0.7", "students/soft",
        "references/bce", "chain-em/teacher", "chain-em/pseudo", "chain-em/students/soft", "report"]
    assert {ln.split()[1] for ln in lines} == {"done"}


def test_resubmission_redoes_only_what_is_unfinished(pipeline):
    run, overrides = pipeline
    before = json.loads((run / "jobs.json").read_text())["jobs"]
    shutil.rmtree(run / "students" / "tau-0.7")
    mtime = (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns
    assert main(["run", "--executor", "local", *overrides]) == 0
    after = json.loads((run / "jobs.json").read_text())["jobs"]
    assert {name for name, job in after.items() if before.get(name) != job} == {"students/tau-0.7", "report"}
    assert (run / "students" / "tau-0.7" / "result.json").is_file()
    assert (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns == mtime


def test_a_retrained_teacher_reruns_exactly_what_it_feeds(pipeline, capsys):
    """Provenance: a new teacher makes the merge, its students and the report stale (`status` says
    why) and `run` redoes exactly those, with the inference feeding the merge; the references and
    the EM chain, which never read this teacher, are left alone."""
    run, overrides = pipeline
    before = json.loads((run / "jobs.json").read_text())["jobs"]
    old_weights = (run / "teacher" / "best.pt").read_bytes()
    shutil.rmtree(run / "teacher")
    # in its own process, as users run it (training in-process leaves torch.distributed set up)
    train = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                           capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "teacher" / "best.pt").read_bytes() != old_weights

    capsys.readouterr()
    assert main(["status", *overrides]) == 0
    rows = {ln.split()[0]: ln.split(None, 2)[1:] for ln in capsys.readouterr().out.splitlines()}
    assert rows["teacher"][0] == "done" and rows["teacher"][1].startswith("test mAP ")  # its result
    assert rows["pseudo"] == ["stale", "teacher changed"]
    assert rows["report"][0] == "stale" and "teacher/result.json" in rows["report"][1]
    assert rows["students/soft"][0] == "done"  # still consistent with the pseudo labels there now
    assert rows["references/bce"][0] == "done" and rows["chain-em/students/soft"][0] == "done"
    assert "retry" in rows

    assert main(["run", "--executor", "local", *overrides]) == 0
    after = json.loads((run / "jobs.json").read_text())["jobs"]
    assert {name for name, job in after.items() if before.get(name) != job} == {
        "teacher/probs", "pseudo", "students/tau-0.5", "students/tau-0.7", "students/soft", "report"}
    merged = json.loads((run / "pseudo" / "merge.json").read_text())
    student = json.loads((run / "students" / "soft" / "result.json").read_text())
    assert student["inputs"]["teacher"] == merged["inputs"]["teacher"] == merged["teacher_id"]


def test_seeds_and_rounds_repeat_the_experiment_and_report_over_both(synthetic_root, tmp_path):
    """Two seeds, each with two self-training rounds: round 2's teacher is round 1's best student,
    and the intervals of the summary resample the seeds too."""
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY, "pseudo.taus=[0.3, 0.5]",
                 "pseudo.modes=[hard]", "report.references=[]", "train.seed=4", "pseudo.rounds=2",
                 "pseudo.teachers=[]"]
    assert main(["run", "--executor", "local", "--seeds", "2", *overrides]) == 0
    per_seed = [json.loads((run / f"seed-{s}" / "report.json").read_text()) for s in (4, 5)]
    assert not (run / "seed-4" / "data").exists()  # one prepared data set for every seed
    maps = [{r["id"]: r["test_map"] for r in rep["rows"]} for rep in per_seed]
    assert maps[0] != maps[1]  # different seeds train different models
    for s, rep in zip((4, 5), per_seed, strict=True):
        promoted = json.loads((run / f"seed-{s}/round-2/teacher/result.json").read_text())
        candidates = {c["target"]: c["val_map"] for c in promoted["round"]["candidates"]}
        assert set(candidates) == {"tau-0.3", "tau-0.5"}
        best = max(candidates, key=candidates.get)
        assert promoted["round"]["chosen"] == best
        assert (run / f"seed-{s}/round-2/teacher/best.pt").read_bytes() == \
            (run / f"seed-{s}/students/{best}/best.pt").read_bytes()
        assert (run / f"seed-{s}/round-2/students/tau-0.5/result.json").is_file()
        assert {(c["a"], c["against"]) for c in rep["comparisons"]} >= {
            ("round-2/teacher", "previous round"), ("round-2/students/tau-0.3", "teacher")}
    summary = json.loads((run / "report.json").read_text())
    assert summary["seeds"] == [4, 5] and summary["interval"]["seeds"] == 2
    for row in summary["rows"]:
        values = [m[row["id"]] for m in maps]
        assert row["test_map"] == pytest.approx(sum(values) / 2)
        assert row["test_map_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert all(c["seeds"] == 2 for c in summary["comparisons"])
    md = (run / "report.md").read_text()
    assert "means over 2 seeds" in md and "AN chain, round 2" in md
    # round 2's teacher, like round 1's, shows its probabilities' expected positives, not targets
    for teacher in ("| AN teacher |", "| AN round 2 teacher (student "):
        (row,) = [line for line in md.splitlines() if line.startswith(teacher)]
        assert row.split("|")[4].strip().endswith(" (expected)"), row  # positives / image
    assert " ± " in md.split("| AN -> tau-0.5 |")[1].splitlines()[0]
