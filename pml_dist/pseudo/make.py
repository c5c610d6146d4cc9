"""The pseudo-label stage (`pml-dist merge`): the shards of the current teacher -> pseudo/probs.npz
(pml_dist/pseudo/merge.py) -> every pseudo-label target's rule + statistics in pseudo/stats.json
(pml_dist/pseudo/labels.py) -> pseudo/merge.json, the stage's record, written last."""

from __future__ import annotations

import logging
import time

import numpy as np

from ffcv_data.atomic import write_json
from pml_dist.config import Config
from pml_dist.layout import RunLayout
from pml_dist.lock import Lock
from pml_dist.provenance import data_id, teacher_id
from pml_dist.pseudo.labels import target_names, write_pseudo_stats
from pml_dist.pseudo.merge import merge_shards
from pml_dist.stored_probs import read_stored_probs, store_rule

log = logging.getLogger(__name__)


def make_pseudo_labels(cfg: Config) -> dict:
    """Verify and merge the shards, then write every pseudo-label target; returns pseudo/stats.json
    with the merge record (pseudo/merge.json) under "merge"."""
    run = RunLayout.of(cfg)
    with Lock(run.pseudo.lock, f"stage {run.pseudo.dir}"):  # pml_dist/lock.py: one merge at a time
        return _make(cfg, run)


def _make(cfg: Config, run: RunLayout) -> dict:
    t0 = time.perf_counter()
    data = run.data.stats()
    n = data.images("train")
    inputs = pseudo_inputs(cfg, run)
    ids = {"teacher_id": inputs["teacher"], "data_id": inputs["data"]}  # what each shard must carry
    rule = store_rule(cfg.pseudo)
    record = merge_shards(run, n, data.num_classes, ids, cfg.pseudo.dup_tolerance, rule)
    log.info("merged %d shards: %d samples (%.1f kept probabilities each: %s), %d padding duplicates "
             "dropped", record["shards"], n, record["entries_per_row"], rule.describe(),
             record["padding_duplicates"])
    result = _write_targets(cfg, run)
    record["merge_seconds"] = time.perf_counter() - t0
    # The ids of what the labels were made from (pml_dist/provenance.py): a new teacher or new data
    # makes them stale. teacher_id and data_id stay at the top level too: provenance.training_inputs
    # reads teacher_id there, and pipeline/stage_list.py falls back to both for older records.
    record["inputs"] = inputs
    result["merge"] = record
    write_json(run.pseudo.record, record)  # the stage's completion record: never half-written
    return result


def pseudo_inputs(cfg: Config, run: RunLayout) -> dict:
    """What the stage is made from (pml_dist/provenance.py ids): a new teacher, new data, another
    store rule or other targets make its output stale."""
    targets = ", ".join(target_names(cfg.pseudo.taus, cfg.pseudo.modes))
    if "class_prior" in cfg.pseudo.modes:
        targets += f" (k {cfg.loss.expected_positives:g})"
    return {"teacher": teacher_id(run), "data": data_id(run), "store": store_rule(cfg.pseudo).describe(),
            "targets": targets}


def _write_targets(cfg: Config, run: RunLayout) -> dict:
    split = run.data.labels("train")
    observed = np.asarray(split.observed, dtype=np.int64)  # each image's observed class, -1: none
    # Full labels and verified negatives are used only for the statistics; a single-positive CSV's
    # labels are not full, and precision and recall against them would be wrong, so none are given.
    full = split.labels if run.data.stats().complete_labels("train") else None
    return write_pseudo_stats(read_stored_probs(run.pseudo.probs), observed, run.pseudo.dir,
                              cfg.pseudo.taus, cfg.pseudo.modes, cfg.loss.expected_positives,
                              full=full, negatives=split.negatives)
