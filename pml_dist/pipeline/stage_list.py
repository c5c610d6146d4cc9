"""The run's stages, in one list. Submission (graph.py), `pml-dist status` (status.py) and the report
(report.py) all iterate it; adding a stage is adding one entry here.

    data -> teacher -> teacher/probs (sharded inference) -> pseudo (merge + pseudo labels)
         -> students/<target> (one job array)
    data -> references/<loss>                 beside the chain: they need only the data
    data -> chain-<loss>/...                  pseudo.teachers: the same chain with another teacher,
                                              which is also the reference of that loss (trained once)
    <chain>/students -> <chain>/round-<k>/teacher (the best student, selected) -> ... the chain again
                                              pseudo.rounds: self-training, round k from round k-1
    run.seeds > 1: each seed's chain in seed-<s>/ with its own seed-<s>/report; then the report
    sweep.losses: a swept teacher or reference is its grid points (one job array, each point a
    sub-run in sweep/) and then the selection of the best, which fills the stage's own folder

Each entry knows whether its output is up to date (`outdated()`): its completion record exists and
the ids of the inputs it records equal the current ones (provenance.py), so anything downstream of
a changed input reruns, and `status` says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pml_dist.config import Config
from pml_dist.errors import USER_ERRORS
from pml_dist.layout import RunLayout
from pml_dist.pipeline.executor import Resources, resources
from pml_dist.pipeline.jobs import (
    InferJob,
    PrepareJob,
    PromoteJob,
    PseudoLabelsJob,
    ReportJob,
    SelectJob,
    TrainJob,
)
from pml_dist.pipeline.rounds import round_inputs
from pml_dist.pipeline.subruns import chain_runs, references_to_train, round_runs, seed_runs, sweep_runs
from pml_dist.provenance import file_id, stale, training_inputs
from pml_dist.stages import Reference, Stage, Student, Teacher


@dataclass
class Entry:
    name: str  # the job's name: the folder it fills, relative to the root run (`seed-1/pseudo`)
    role: str  # data, teacher, reference, sweep (a grid point), infer, pseudo, student, report
    run: Config  # the (sub-)run it belongs to
    job: Callable  # the submitit callable (pipeline/jobs.py)
    resources: Resources
    after: tuple[str, ...]  # names of the entries whose outputs it consumes
    outdated: Callable[[], str | None]  # None when its output is up to date, else why it must run
    stage: Stage | None = None  # training entries
    chain: str = ""  # the teacher loss of the chain it belongs to ("" for data, references, report)
    round: int = 1  # its self-training round in that chain
    array: str = ""  # entries with one array name go out as one Slurm job array (map_array)
    listed: bool = True  # a row of `status` (inference is shown through the merge it feeds)

    def is_done(self) -> bool:
        return self.outdated() is None

    @property
    def lock(self) -> Path | None:
        """The lock its process holds on its folder while it writes (pml_dist/lock.py); None for the
        report (the run's lock covers it)."""
        layout = RunLayout.of(self.run)
        if self.role == "data":
            return layout.data_lock
        if self.role == "infer":
            return layout.infer_lock(0)  # rank 0's stands for the job's
        if self.role == "pseudo":
            return layout.pseudo.lock
        return self.stage.files(layout).lock if self.stage is not None else None

    @property
    def task_args(self) -> tuple:
        """What an array task's callable is given: its stage; a sweep point, whose array's tasks
        are each another sub-run, also that run's resolved config."""
        if self.role == "sweep":
            return self.stage, str(RunLayout.of(self.run).config)
        return (self.stage,)


def stage_list(cfg: Config) -> list[Entry]:
    """Every stage of the experiment `cfg`, its seeds and chains, upstream before downstream."""
    root = RunLayout.of(cfg)
    data = Entry("data", "data", cfg, PrepareJob(str(root.config)), resources(cfg, "cpu"), (),
                 lambda: None if root.data.is_complete() else "not run")
    entries = [data]
    runs = seed_runs(cfg)
    seed_reports = []
    for run in runs:
        chain = experiment(cfg, run)
        entries += chain
        if len(runs) > 1:  # each seed's own report, then the summary over seeds
            seed_reports.append(_report(cfg, run, [data, *chain]))
            entries.append(seed_reports[-1])
    entries.append(_report(cfg, cfg, seed_reports or entries))
    return entries


def experiment(root: Config, run: Config) -> list[Entry]:
    """One seed's stages: its own chain, its references, then the other teachers' chains, each
    followed by its self-training rounds (named relative to `root`)."""
    entries = _chain_with_rounds(root, run)
    for loss in references_to_train(run):
        entries += _training(root, run, Reference(loss), "reference", resources(run, "teacher"))
    for sub in chain_runs(run):
        entries += _chain_with_rounds(root, sub)
    return entries


def _chain_with_rounds(root: Config, run: Config) -> list[Entry]:
    chain = run.loss.name
    entries = _training(root, run, Teacher(), "teacher", resources(run, "teacher"), chain=chain)
    entries += _labels_and_students(root, run, entries[-1], chain, 1)
    previous = run
    for k, sub in enumerate(round_runs(run), start=2):
        layout, students = RunLayout.of(sub), [e for e in entries if e.role == "student" and e.round == k - 1]
        teacher = Entry(_name(root, layout.teacher.dir), "teacher", sub,
                        PromoteJob(str(layout.config), previous=str(RunLayout.of(previous).config)),
                        resources(sub, "cpu"), tuple(e.name for e in students),
                        lambda sub=sub, previous=previous: _round_outdated(sub, previous),
                        stage=Teacher(), chain=chain, round=k)
        entries += [teacher, *_labels_and_students(root, sub, teacher, chain, k)]
        previous = sub
    return entries


def _labels_and_students(root: Config, run: Config, teacher: Entry, chain: str, k: int) -> list[Entry]:
    """inference -> merge -> one student per pseudo-label target, from `teacher`."""
    from pml_dist.pseudo.labels import target_names

    layout = RunLayout.of(run)
    resolved = str(layout.config)
    pseudo_name = _name(root, layout.pseudo.dir)
    infer = Entry(_name(root, layout.probs_dir), "infer", run, InferJob(resolved), resources(run, "infer"),
                  (teacher.name,), lambda: _pseudo_outdated(run), chain=chain, round=k, listed=False)
    pseudo = Entry(pseudo_name, "pseudo", run, PseudoLabelsJob(resolved), resources(run, "cpu"),
                   (infer.name,), lambda: _pseudo_outdated(run), chain=chain, round=k)
    students = [
        student
        for target in target_names(run.pseudo.taus, run.pseudo.modes)
        for student in _training(root, run, Student(target), "student", resources(run, "student"),
                                 after=(pseudo.name,), chain=chain, round=k,
                                 array=_name(root, layout.root / "students"))
    ]
    return [infer, pseudo, *students]


def _training(root: Config, run: Config, stage: Stage, role: str, res: Resources, after=("data",),
              chain: str = "", round: int = 1, array: str = "") -> list[Entry]:
    """The entry that trains `stage`; for a swept stage, its grid points (one array) and then the
    selection, which is the stage's entry (its name is the stage's folder, as downstream expects)."""
    layout = RunLayout.of(run)
    points = [_point(root, point, stage, res, after, chain) for point in sweep_runs(run, stage)]
    if points:
        return [*points, Entry(_name(root, stage.files(layout).dir), role, run,
                               SelectJob(str(layout.config), stage=stage), resources(run, "cpu"),
                               tuple(p.name for p in points), lambda: _training_outdated(layout, stage),
                               stage=stage, chain=chain)]
    # An array's tasks share one callable; map_array passes each its stage.
    job = TrainJob(str(layout.config), stage=None if array else stage)
    return [Entry(_name(root, stage.files(layout).dir), role, run, job, res, tuple(after),
                  lambda: _training_outdated(layout, stage), stage=stage, chain=chain, round=round,
                  array=array)]


def _point(root: Config, point: Config, stage: Stage, res: Resources, after, chain: str) -> Entry:
    """One grid point of a sweep: the stage trained in its own sub-run, a task of the sweep's array."""
    layout = RunLayout.of(point)
    folder = stage.files(layout).dir
    return Entry(_name(root, folder), "sweep", point, TrainJob(str(layout.config)), res, tuple(after),
                 lambda: _training_outdated(layout, stage), stage=stage, chain=chain,
                 array=_name(root, layout.root.parent))


def _report(root: Config, run: Config, consumed: list[Entry]) -> Entry:
    layout = RunLayout.of(run)
    name = _name(root, layout.report_json)
    return Entry(name.removesuffix(".json"), "report", run, ReportJob(str(layout.config)),
                 resources(run, "cpu"), tuple(e.name for e in consumed), lambda: _report_outdated(run))


def _name(root: Config, path: Path) -> str:
    return Path(path).relative_to(root.run_dir).as_posix()


# --------------------------------------------------------------------------- up to date or not


def _why(recorded: dict | None, current: Callable[[], dict]) -> str | None:
    try:
        inputs = current()
    except USER_ERRORS:  # an input is gone (deleted teacher, pseudo labels): rebuild from upstream
        return "stale: an input is missing"
    changed = stale(recorded, inputs)
    return f"stale: {changed}" if changed else None


def _training_outdated(layout: RunLayout, stage: Stage) -> str | None:
    result = stage.files(layout).read_result()
    if result is None:
        return "not run"
    return _why(result.inputs, lambda: training_inputs(layout, stage))


def _round_outdated(run: Config, previous: Config) -> str | None:
    result = RunLayout.of(run).teacher.read_result()
    if result is None:
        return "not run"
    return _why(result.inputs, lambda: round_inputs(previous))


def _pseudo_outdated(run: Config) -> str | None:
    from pml_dist.pseudo.make import pseudo_inputs

    layout = RunLayout.of(run)
    record = layout.pseudo.read_record()
    if record is None or not layout.pseudo.stats.is_file():
        return "not run"
    # records of versions before `inputs` carry the teacher and data ids under their own keys
    recorded = record.get("inputs") or {"teacher": record.get("teacher_id"), "data": record.get("data_id")}
    return _why(recorded, lambda: pseudo_inputs(run, layout))


def _report_outdated(run: Config) -> str | None:
    layout = RunLayout.of(run)
    if not layout.report_json.is_file():
        return "not run"
    recorded = json.loads(layout.report_json.read_text()).get("inputs") or {}
    return _why(recorded, lambda: report_inputs(run))


def report_inputs(run: Config) -> dict[str, str]:
    """What a report is made from: the id of every result it reads (of each seed's report, when it
    summarises seeds). Missing ones are left out, so a finished stage makes an older report stale."""
    runs = seed_runs(run)
    if len(runs) > 1:
        files = {_name(run, RunLayout.of(r).report_json): RunLayout.of(r).report_json for r in runs}
    else:
        files = {}
        for entry in experiment(run, run):
            layout = RunLayout.of(entry.run)
            path = entry.stage.files(layout).result if entry.stage else layout.pseudo.stats
            files[_name(run, path)] = path
    return {name: file_id(path) for name, path in files.items() if path.is_file()}
