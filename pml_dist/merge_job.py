"""`pml-dist merge`: the shards of the current teacher -> pseudo/probs.npy -> pseudo labels + stats."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from pml_dist import layout
from pml_dist.atomic import write_json
from pml_dist.config import Config
from pml_dist.infer import data_id, teacher_id
from pml_dist.merge import merge_shards
from pml_dist.pseudo import write_pseudo_labels

log = logging.getLogger(__name__)


def merge(cfg: Config) -> dict:
    """Verify and merge the shards, then write every pseudo-label target; returns pseudo/stats.json."""
    t0 = time.perf_counter()
    stats = json.loads((cfg.data_dir / "stats.json").read_text())
    n, num_classes = stats["splits"]["train"]["images"], stats["num_classes"]
    out = layout.pseudo_dir(cfg.run_dir)
    ids = {"teacher_id": teacher_id(cfg), "data_id": data_id(cfg)}
    summary = merge_shards(layout.probs_dir(cfg.run_dir), out / "probs.npy", n, num_classes, ids,
                           cfg.pseudo.dup_tolerance)
    log.info("merged %d shards: %d samples, %d padding duplicates dropped", summary["shards"], n,
             summary["padding_duplicates"])
    probs = np.load(out / "probs.npy", mmap_mode="r")
    meta = np.load(cfg.data_dir / "train.meta.npz")
    # Full labels are used only for the statistics (every COCO-format set here has them).
    result = write_pseudo_labels(np.asarray(probs), meta["observed"], out, cfg.pseudo.taus,
                                 cfg.pseudo.modes, cfg.loss.expected_positives, full=meta["labels"])
    summary["merge_seconds"] = time.perf_counter() - t0
    result["merge"] = summary
    write_json(out / "merge.json", summary)  # `done("merge")` reads it: never half-written
    return result
