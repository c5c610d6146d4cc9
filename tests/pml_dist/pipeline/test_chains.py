"""Teacher chains (pseudo.teachers, each with its own taus and modes) and self-training rounds
(pseudo.rounds) in the stage list, and a round's teacher chosen from the round before: no training
here, the result files a trained stage leaves are written by hand."""

from __future__ import annotations

import json

import pytest

from pml_dist.config import load_config
from pml_dist.errors import ConfigError
from pml_dist.layout import RunLayout
from pml_dist.pipeline.rounds import promote
from pml_dist.pipeline.stage_list import stage_list
from pml_dist.pipeline.subruns import chain_runs, references_to_train, round_runs


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", *overrides])


def test_each_chain_is_a_sub_run_with_its_own_taus_and_modes(tmp_path):
    cfg = _cfg(tmp_path, "pseudo.teachers=[an, em, ll_r]", "pseudo.taus=[0.2, 0.3]", "pseudo.modes=[hard]",
               "pseudo.teacher_taus={em: [0.55, 0.95]}", "pseudo.teacher_modes={em: [hard, soft]}",
               "report.references=[bce, em]")
    chains = {c.loss.name: c for c in chain_runs(cfg)}
    assert set(chains) == {"em", "ll_r"}
    assert chains["em"].run_dir == cfg.run_dir / "chain-em" and chains["em"].data_dir == cfg.data_dir
    assert (chains["em"].pseudo.taus, chains["em"].pseudo.modes) == ([0.55, 0.95], ["hard", "soft"])
    assert (chains["ll_r"].pseudo.taus, chains["ll_r"].pseudo.modes) == ([0.2, 0.3], ["hard"])  # the defaults
    assert (cfg.pseudo.taus, cfg.pseudo.modes) == ([0.2, 0.3], ["hard"])  # the run's own chain
    assert references_to_train(cfg) == ["bce"]  # the EM chain's teacher is the EM reference
    names = [e.name for e in stage_list(cfg)]
    assert {"teacher", "students/tau-0.3", "chain-em/teacher", "chain-em/students/tau-0.95",
            "chain-em/students/soft", "chain-ll_r/students/tau-0.2", "references/bce"} <= set(names)
    assert "references/em" not in names and "chain-em/students/tau-0.2" not in names
    arrays = {e.array for e in stage_list(cfg) if e.role == "student"}
    assert arrays == {"students", "chain-em/students", "chain-ll_r/students"}  # one array per chain


@pytest.mark.parametrize("overrides, message", [
    (["pseudo.teachers=[an, em, em]"], "lists a loss twice"),
    (["pseudo.teachers=[an, emm]"], "must list losses among"),
    (["pseudo.teacher_taus={emm: [0.5]}"], "must be keyed by losses"),
    (["pseudo.teacher_taus={em: [1.5]}"], r"pseudo.teacher_taus.em': 1.5 is outside"),
    (["pseudo.teacher_taus={em: []}"], "values must not be empty"),
    (["pseudo.teacher_modes={em: [hardd]}"], "values must be non-empty lists of"),
    (["pseudo.teacher_taus=[0.5]"], "expects a mapping of str to a list of float"),
    (["pseudo.rounds=0"], "must be >= 1"),
])
def test_bad_chain_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, *overrides)


def test_a_chain_turned_off_leaves_its_taus_unused(tmp_path):
    """The demo preset lists the EM chain's taus; a run with only the AN chain is still valid."""
    cfg = _cfg(tmp_path, "pseudo.teachers=[]")
    assert chain_runs(cfg) == [] and "em" in cfg.pseudo.teacher_taus


def test_the_runs_own_teacher_is_always_a_chain(tmp_path):
    """`loss.name=ll_ct` with the demo's [an, em]: the LL-Ct chain is the run, AN and EM sub-runs."""
    cfg = _cfg(tmp_path, "loss.name=ll_ct")
    assert [c.loss.name for c in chain_runs(cfg)] == ["an", "em"]
    assert chain_runs(cfg)[1].pseudo.taus == cfg.pseudo.teacher_taus["em"]


def test_round_k_starts_from_every_student_of_round_k_minus_1(tmp_path):
    cfg = _cfg(tmp_path, "pseudo.teachers=[]", "pseudo.taus=[0.3, 0.5]", "pseudo.modes=[hard]",
               "pseudo.rounds=3", "report.references=[]")
    entries = {e.name: e for e in stage_list(cfg)}
    assert [r.run_dir for r in round_runs(cfg)] == [cfg.run_dir / "round-2", cfg.run_dir / "round-3"]
    assert entries["round-2/teacher"].after == ("students/tau-0.3", "students/tau-0.5")
    assert entries["round-3/teacher"].after == ("round-2/students/tau-0.3", "round-2/students/tau-0.5")
    assert entries["round-3/students/tau-0.5"].after == ("round-3/pseudo",)
    assert not entries["round-2/teacher"].resources.gpus  # a selection: a CPU job
    assert [e.name for e in stage_list(cfg)][-1] == "report"


def _trained(files, val_map: float, weights: bytes) -> None:
    files.dir.mkdir(parents=True, exist_ok=True)
    files.best_weights.write_bytes(weights)
    files.test_logits.write_bytes(b"probs " + weights)
    files.result.write_text(json.dumps({"val_map": val_map, "test_map": val_map - 1, "inputs": {}}))


def test_the_best_student_by_validation_becomes_the_next_teacher(tmp_path):
    cfg = _cfg(tmp_path, "pseudo.teachers=[]", "pseudo.taus=[0.3, 0.5]", "pseudo.modes=[hard, soft]",
               "pseudo.rounds=2", "report.references=[]")
    round1, (round2,) = RunLayout.of(cfg), round_runs(cfg)
    entry = {e.name: e for e in stage_list(cfg)}["round-2/teacher"]
    assert entry.outdated() == "not run"
    with pytest.raises(Exception, match="student.s. not trained"):
        promote(round2, cfg)
    for target, val_map in (("tau-0.3", 40.0), ("tau-0.5", 42.5), ("soft", 41.0)):
        _trained(round1.student(target), val_map, target.encode())
    result = promote(round2, cfg)
    teacher = RunLayout.of(round2).teacher
    assert result["round"]["chosen"] == "tau-0.5" and result["val_map"] == 42.5
    assert teacher.best_weights.read_bytes() == b"tau-0.5"
    assert teacher.test_logits.read_bytes() == b"probs tau-0.5"  # the report compares it as it is
    assert [c["target"] for c in result["round"]["candidates"]] == ["tau-0.3", "tau-0.5", "soft"]
    assert entry.outdated() is None
    _trained(round1.student("soft"), 43.0, b"soft, retrained")  # a student changed: choose again
    assert entry.outdated() == "stale: student soft changed"
    assert promote(round2, cfg)["round"]["chosen"] == "soft"
