"""Runs inside a run: repeats over seeds, the other teachers' chains and self-training rounds.

    <run>/data/                     prepared once, shared by every run below
    <run>/seed-<s>/                 run.seeds > 1: the whole experiment with train.seed = s
    <run>[/seed-<s>]/chain-<loss>/  pseudo.teachers: the chain of a teacher trained with <loss>
                                    (EM), its pseudo labels (pseudo.teacher_taus/modes) and students
    <chain>/round-<k>/              pseudo.rounds: round k's chain, whose teacher is round k-1's
                                    best student (by validation mAP), installed by selection
    <run>/.../sweep/<stage>/lr-<lr>_mb-<b>/   sweep.losses: one grid point of a stage, which trains
                                    only that stage; the best one becomes the stage (sweep.py)

Each sub-run is an ordinary run directory with its own resolved config.yaml, so every stage, job
and resubmission rule applies to it unchanged; only `run.data_dir` points at the shared data.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pml_dist.config import Config, SweepSection, chain_losses
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


def chain_runs(cfg: Config) -> list[Config]:
    """The chains of pseudo.teachers other than loss.name's (which is `cfg` itself), each with its
    own taus and modes. A chain's teacher is also the reference of its loss (the same training)."""
    runs = []
    for loss in chain_losses(cfg)[1:]:
        sub = _derive(cfg, RunLayout.of(cfg).chain_run(loss))
        sub.loss.name = loss
        sub.pseudo.taus = list(cfg.pseudo.teacher_taus.get(loss, cfg.pseudo.taus))
        sub.pseudo.modes = list(cfg.pseudo.teacher_modes.get(loss, cfg.pseudo.modes))
        runs.append(_single_chain(sub))
    return runs


def round_runs(chain: Config) -> list[Config]:
    """Rounds 2..pseudo.rounds of one chain (`chain`: its round 1), each a sub-run of the chain."""
    runs = []
    for k in range(2, chain.pseudo.rounds + 1):
        sub = _derive(chain, RunLayout.of(chain).round_run(k))
        sub.pseudo.rounds = 1
        runs.append(_single_chain(sub))
    return runs


def _single_chain(sub: Config) -> Config:
    """A chain or round sub-run is one chain: no chains, references of its own (the run has them)."""
    sub.pseudo.teachers, sub.pseudo.teacher_taus, sub.pseudo.teacher_modes = [], {}, {}
    sub.report.references = []
    return sub


def references_to_train(cfg: Config) -> list[str]:
    """report.references this run trains as reference teachers: not a chain's teacher loss (that
    chain's teacher is the reference)."""
    return [loss for loss in cfg.report.references if loss not in chain_losses(cfg)]


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
