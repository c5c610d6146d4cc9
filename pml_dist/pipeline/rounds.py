"""Self-training rounds (pseudo.rounds): round k's teacher is the student of round k-1 with the
best validation mAP, installed as `<chain>/round-<k>/teacher` (the way a sweep installs its best
point, sweep.install), so inference, pseudo labels and students run on it unchanged.

    <chain>/round-<k>/teacher/result.json   the chosen student's result, with a "round" record:
                                            every candidate's val and test mAP and the choice
"""

from __future__ import annotations

import logging

from pml_dist.config import Config
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.lock import Lock
from pml_dist.pipeline.sweep import install
from pml_dist.provenance import file_id
from pml_dist.stages import Student, Teacher

log = logging.getLogger(__name__)


def _students(previous: Config) -> list[Student]:
    from pml_dist.pseudo.labels import target_names

    return [Student(t) for t in target_names(previous.pseudo.taus, previous.pseudo.modes)]


def round_inputs(previous: Config) -> dict[str, str]:
    """A round's teacher is made from every student of the round before (their results' ids): a
    retrained student may change the choice."""
    layout = RunLayout.of(previous)
    return {f"student {s.target}": file_id(s.files(layout).result) for s in _students(previous)}


def promote(run: Config, previous: Config) -> dict:
    """Install the best student of round `previous` as the teacher of round `run`."""
    layout = RunLayout.of(previous)
    candidates = [(s, s.files(layout).read_result()) for s in _students(previous)]
    missing = [str(s.files(layout).dir) for s, r in candidates if r is None]
    if missing:
        raise PmlError(f"round teacher {RunLayout.of(run).teacher.dir}: student(s) not trained: "
                       f"{', '.join(missing)}")
    chosen = max(range(len(candidates)), key=lambda i: (candidates[i][1].val_map, -i))
    student, result = candidates[chosen]
    record = {"inputs": round_inputs(previous), "round": {
        "from": str(layout.root), "chosen": student.target,
        "candidates": [{"target": s.target, "val_map": r.val_map, "test_map": r.test_map}
                       for s, r in candidates]}}
    teacher = Teacher().files(RunLayout.of(run))
    with Lock(teacher.lock, f"stage {teacher.dir}"):  # pml_dist/lock.py: one process fills the folder
        out = install(student.files(layout), teacher, record)
    log.info("%s: student %s of %s (val mAP %.2f) is the next round's teacher", RunLayout.of(run).teacher.dir,
             student.target, layout.root, result.val_map)
    return out
