"""The training stages as values: the CLI, the jobs and the trainer take one of these, never strings.

    Teacher()          the experiment's teacher: loss.name on the single observed positives
    Reference(loss)    a teacher trained with another loss (full BCE, EM, ...), for the report
    Student(target)    full BCE on one pseudo-label set (tau-0.75, soft, class_prior)

Each knows its folder in a run, its loss and what it trains against: `observed` (the single
positive the loader carries), `full` (the full labels, only for the bce upper bound) or `pseudo`
(its pseudo-label file).
"""

from __future__ import annotations

from dataclasses import dataclass

from pml_dist.layout import RunLayout, StageFiles


@dataclass(frozen=True)
class Teacher:
    kind = "teacher"
    target = None

    def files(self, run: RunLayout) -> StageFiles:
        return run.teacher

    def loss(self, cfg) -> str:
        return cfg.loss.name

    def trains_on(self, cfg) -> str:
        return "full" if self.loss(cfg) == "bce" else "observed"


@dataclass(frozen=True)
class Reference:
    loss_name: str
    kind = "reference"

    @property
    def target(self) -> str:
        return self.loss_name

    def files(self, run: RunLayout) -> StageFiles:
        return run.reference(self.loss_name)

    def loss(self, cfg) -> str:
        return self.loss_name

    def trains_on(self, cfg) -> str:
        return "full" if self.loss_name == "bce" else "observed"


@dataclass(frozen=True)
class Student:
    target: str  # a pseudo-label set: layout.tau_name(tau), 'soft' or 'class_prior'
    kind = "student"

    def files(self, run: RunLayout) -> StageFiles:
        return run.student(self.target)

    def loss(self, cfg) -> str:
        return "bce"  # students always train with full BCE on their pseudo labels

    def trains_on(self, cfg) -> str:
        return "pseudo"


Stage = Teacher | Reference | Student
