"""Runs inside a run: repeats over seeds and the beyond-the-paper teacher chain.

    <run>/data/                     prepared once, shared by every run below
    <run>/seed-<s>/                 run.seeds > 1: the whole experiment with train.seed = s
    <run>[/seed-<s>]/beyond-<loss>/ pseudo.beyond_teacher: a teacher trained with <loss> (EM), its
                                    pseudo labels (pseudo.beyond_modes) and their students
    <run>/.../sweep/<stage>/lr-<lr>_mb-<b>/   sweep.losses: one grid point of a stage, which trains
                                    only that stage; the best one becomes the stage (sweep.py)

Each sub-run is an ordinary run directory with its own resolved config.yaml, so every stage, job
and resubmission rule applies to it unchanged; only `run.data_dir` points at the shared data.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pml_dist.config import Config, SweepSection
from pml_dist.layout import RunLayout


def seed_runs(cfg: Config) -> list[Config]:
    """The experiment once per seed: [cfg] itself for run.seeds = 1."""
    if cfg.run.seeds == 1:
        return [cfg]
    runs = []
    for seed in range(cfg.train.seed, cfg.train.seed + cfg.run.seeds):
        sub = _derive(cfg, RunLayout.of(cfg).seed_run(seed))
        sub.train.seed = seed
        runs.append(sub)
    return runs


def beyond_run(cfg: Config) -> Config | None:
    """The chain whose teacher uses pseudo.beyond_teacher, or None when it is off. Its teacher is
    also the reference of that loss (it is the same training): see stage_list.py."""
    loss = cfg.pseudo.beyond_teacher
    if not loss:
        return None
    sub = _derive(cfg, RunLayout.of(cfg).beyond_run(loss))
    sub.loss.name = loss
    sub.pseudo.modes = list(cfg.pseudo.beyond_modes)
    sub.pseudo.beyond_teacher = ""
    sub.report.references = []
    return sub


def references_to_train(cfg: Config) -> list[str]:
    """report.references this run trains as reference teachers: not its own teacher's loss, and not
    the beyond chain's (that chain's teacher is the reference)."""
    return [loss for loss in cfg.report.references if loss not in (cfg.loss.name, cfg.pseudo.beyond_teacher)]


def sweep_runs(cfg: Config, stage) -> list[Config]:
    """The grid points of `stage` (pml_dist.stages), in Cole et al.'s order (batch, then lr); []
    when its loss is not swept. Students are never swept."""
    if stage.kind == "student" or stage.loss(cfg) not in cfg.sweep.losses:
        return []
    layout = RunLayout.of(cfg)
    runs = []
    for micro_batch in cfg.sweep.micro_batch:
        for lr in cfg.sweep.lr:
            sub = _derive(cfg, layout.sweep_run(stage.files(layout).dir, lr, micro_batch))
            sub.optim.lr, sub.optim.lr_scaling, sub.train.micro_batch = lr, "none", micro_batch
            sub.sweep = SweepSection()  # a point trains its stage; it sweeps nothing itself
            runs.append(sub)
    return runs


def _derive(cfg: Config, run_dir: Path) -> Config:
    sub = copy.deepcopy(cfg)
    sub.run.dir = str(run_dir)
    sub.run.seeds = 1
    sub.run.data_dir = str(cfg.data_dir)
    return sub
