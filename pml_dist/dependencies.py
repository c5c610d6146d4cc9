"""Which settings each output of a run directory depends on: the one table that decides which config
change a run directory holding outputs accepts (config.write_resolved), and which settings a
training stage's record identifies (provenance.training_inputs).

    output                      where (in the run and in every sub-run)      depends on
    the prepared data           data/                                        PREPARED_DATA: the data.*
                                                                             keys `prepare` reads
    a trained stage             teacher/ (not probs/), references/<loss>/,   the data section,
                                sweep/                                       run.data_dir, model, loss,
                                                                             optim, train, dist, sweep
    pseudo labels and students  teacher/probs/, pseudo/, students/<target>/, a trained stage's, and
                                round-<k>/ (its teacher is a student)       infer, pseudo (its labels)
    records                     jobs.json, report.md/json, figures           nothing (the report is
                                                                             made again from results)
    anything else               (not a file the pipeline writes)             what any output does

minus NOT_CONTENT (keys that change how fast or where an output is made, not what it holds). Keys
that no output depends on at all: run.dir (moving a run directory), run.seeds, pseudo.teachers and
pseudo.rounds (they add or leave out sub-runs; nothing existing changes), slurm.* (resources,
partition), report.* (the report is regenerated), and NOT_CONTENT.

A section stands for each of its keys, so a key added to a section is depended upon like its
neighbours until this table says otherwise; the prepared data's keys are listed one by one (tests
check that ffcv_data.prepare.CONTENT_KEYS are among them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# What `pml-dist prepare` reads (pml_dist/data_stage.py: the PrepareSpec and, for a generated data
# set, make_synthetic's arguments), but data.write_workers (NOT_CONTENT).
PREPARED_DATA = tuple(f"data.{k}" for k in (
    "root", "format", "images", "train_split", "test_split", "val_split", "classes",
    "observed_seed", "observed_protocol", "val_fraction", "val_seed", "max_resolution", "jpeg_quality",
    "keep_original_jpegs", "synthetic", "synthetic_seed", "synthetic_train", "synthetic_test",
    "synthetic_classes"))

# How fast or where an output is made, not what it holds: no output depends on these. Honestly:
NOT_CONTENT = frozenset({
    # Where training and inference run. A finished stage is kept; a half-trained one resumes from its
    # checkpoint on the new device. Its numbers after the switch are the new device's (with
    # dist.precision auto also another precision: bf16 autocast on a GPU, fp32 on the CPU), so it
    # equals an undisturbed run on neither device; result.json's `environment` names the device that
    # finished it.
    "train.device",
    # FFCV's decoding threads per rank, and each rank's torch threads (threads_per_rank). On the CPU
    # another thread count changes the order of float reductions, so a stage resumed with another
    # count is not bit-identical to an undisturbed one. The default (0: the rank's cores) varies the
    # same way with the node a job lands on, so thread counts were never part of what a result is
    # made from.
    "data.loader_workers",
    # Processes encoding a .beton: the same records and index order with any count.
    "data.write_workers",
    # numba-compiles FFCV's pipelines: the same operations, compiled or not.
    "data.jit",
    # How long a collective waits for a dead rank.
    "dist.timeout_s",
    # When metrics are logged and stop requests checked, when checkpoints are saved and how many are
    # kept: a resumed stage equals an undisturbed one at any of these (a stage resumed with another
    # log_every has metrics.jsonl records at both spacings).
    "train.log_every", "train.ckpt_every", "train.keep_last",
})

TRAINING = ("data", "run.data_dir", "model", "loss", "optim", "train", "dist", "sweep")
PSEUDO_LABELS = (*TRAINING, "infer", "pseudo.taus", "pseudo.modes", "pseudo.dup_tolerance",
                 "pseudo.store_min_prob", "pseudo.store_top_k", "pseudo.teacher_taus", "pseudo.teacher_modes")


@dataclass(frozen=True)
class Output:
    """A kind of output and the settings (sections or section.key) it depends on."""

    name: str
    depends_on: tuple[str, ...]

    def depends(self, key: str) -> bool:
        return key not in NOT_CONTENT and any(key == p or key.startswith(p + ".") for p in self.depends_on)


PREPARED = Output("the prepared data", PREPARED_DATA)
TRAINED = Output("a trained stage", TRAINING)
STUDENTS = Output("pseudo labels or a stage trained on them", PSEUDO_LABELS)
RECORDS = Output("a record of jobs or the report", ())
# (PSEUDO_LABELS holds every key any output depends on)
UNKNOWN = Output("a file the pipeline does not write, taken to depend on what any output does", PSEUDO_LABELS)

_SUB_RUN = re.compile(r"seed-\d+|chain-\w+")
_ROUND = re.compile(r"round-\d+")
_RECORDS = re.compile(r"jobs\.json|report\.(md|json)|figure\w*\.png")


def output_of(relative: Path) -> Output:
    """The output a file belongs to, by its path relative to the run directory (sub-runs included:
    seed-<s>/, chain-<loss>/ and round-<k>/ hold the same layout)."""
    parts = list(Path(relative).parts)
    in_round = False
    while len(parts) > 1 and (_SUB_RUN.fullmatch(parts[0]) or _ROUND.fullmatch(parts[0])):
        in_round = in_round or bool(_ROUND.fullmatch(parts.pop(0)))
    if len(parts) == 1:
        return RECORDS if _RECORDS.fullmatch(parts[0]) else UNKNOWN
    top = parts[0]
    if top == "data":
        return PREPARED
    if in_round or top in ("pseudo", "students") or parts[:2] == ["teacher", "probs"]:
        return STUDENTS
    if top in ("teacher", "references", "sweep"):
        return TRAINED
    return UNKNOWN


def outputs(run_dir: Path) -> Iterable[tuple[Path, Output]]:
    """Every file a command produced in `run_dir` (not the resolved configs of the run and its
    sub-runs, nor logs: config.first_artefact's rule) with its output, in path order."""
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "logs")
        for name in sorted(filenames):
            if name != "config.yaml":
                path = Path(dirpath) / name
                yield path, output_of(path.relative_to(run_dir))


def depended_upon(run_dir: Path, keys: Iterable[str]) -> tuple[Path, Output, list[str]] | None:
    """The first file in `run_dir` whose output depends on one of `keys`, with that output and the
    keys it depends on; None when no output there depends on any of them."""
    keys = sorted(keys)
    seen: set[tuple[Path, Output]] = set()  # a folder's files belong to one output: check it once
    for path, output in outputs(run_dir):
        if (path.parent, output) in seen:
            continue
        seen.add((path.parent, output))
        hit = [k for k in keys if output.depends(k)]
        if hit:
            return path, output, hit
    return None
