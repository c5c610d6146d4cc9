"""The pseudo-label stage (`pml-dist merge`): the shards of the current teacher -> pseudo/probs.npy
(pml_dist/pseudo/merge.py) -> every pseudo-label target + stats (pml_dist/pseudo/labels.py) ->
pseudo/merge.json, the stage's record, written last."""

from __future__ import annotations

import logging
import time

import numpy as np

from ffcv_data.atomic import write_json
from pml_dist.config import Config
from pml_dist.layout import RunLayout
from pml_dist.provenance import data_id, teacher_id
from pml_dist.pseudo.labels import write_pseudo_labels
from pml_dist.pseudo.merge import merge_shards

log = logging.getLogger(__name__)


def make_pseudo_labels(cfg: Config) -> dict:
    """Verify and merge the shards, then write every pseudo-label target; returns pseudo/stats.json
    with the merge record (pseudo/merge.json) under "merge"."""
    t0 = time.perf_counter()
    run = RunLayout.of(cfg)
    data = run.data.stats()
    n = data.images("train")
    inputs = {"teacher": teacher_id(run), "data": data_id(run)}
    ids = {"teacher_id": inputs["teacher"], "data_id": inputs["data"]}  # what each shard must carry
    record = merge_shards(run, n, data.num_classes, ids, cfg.pseudo.dup_tolerance)
    log.info("merged %d shards: %d samples, %d padding duplicates dropped", record["shards"], n,
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


def _write_targets(cfg: Config, run: RunLayout) -> dict:
    probs = np.load(run.pseudo.probs, mmap_mode="r")
    split = run.data.labels("train")
    observed = np.asarray(split.observed, dtype=np.int64)  # each image's observed class, -1: none
    # Full labels are used only for the statistics (every data set read here has them), sparse.
    full = split.labels
    return write_pseudo_labels(np.asarray(probs), observed, run.pseudo.dir, cfg.pseudo.taus,
                               cfg.pseudo.modes, cfg.loss.expected_positives, full=full)
