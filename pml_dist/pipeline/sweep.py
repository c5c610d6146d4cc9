"""Cole et al.'s model selection: a swept stage (sweep.losses) is trained at every grid point, each
in its own sub-run (subruns.sweep_runs); `select` picks the point with the best validation mAP and
installs it as the stage itself, so inference, students, status and the report read it where an
unswept stage would be.

    <run>/sweep/<stage>/lr-<lr>_mb-<b>/<stage>/   each point's stage folder (one array task each)
    <run>/<stage>/best.pt, best.json, derived.json, metrics.jsonl, test_logits.npy   copied from the
                                chosen point
    <run>/<stage>/result.json   the chosen point's, with this run's inputs and a "sweep" record:
                                the grid (lr, micro batch, val and test mAP of each) and the choice
"""

from __future__ import annotations

import logging
import shutil

from ffcv_data.atomic import save_with, write_json
from pml_dist.config import Config
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout, StageFiles
from pml_dist.lock import Lock
from pml_dist.pipeline.subruns import sweep_runs
from pml_dist.provenance import training_inputs

log = logging.getLogger(__name__)


def grid(stage, runs: list[Config]) -> list[dict]:
    """Every point of the stage's grid (`runs`: its sub-runs, subruns.sweep_runs) with its result
    (None where it has not finished)."""
    points = []
    for point in runs:
        files = stage.files(RunLayout.of(point))
        result = files.read_result()
        points.append({
            "lr": point.optim.lr, "micro_batch": point.train.micro_batch, "dir": str(files.dir),
            "val_map": result.val_map if result else None, "test_map": result.test_map if result else None,
            "best_epoch": result.raw["best_epoch"] if result else None,
        })
    return points


def best_point(points: list[dict]) -> int:
    """The index of the highest validation mAP (the first such point in grid order on a tie)."""
    return max(range(len(points)), key=lambda i: (points[i]["val_map"], -i))


def install(src: StageFiles, dst: StageFiles, record: dict) -> dict:
    """Copy a trained stage's files into another stage folder; its result.json, updated with
    `record` (the inputs of the new place, how it was chosen), is written last, as the completion
    record. Returns that result. Also how a self-training round gets its teacher (rounds.py)."""
    dst.dir.mkdir(parents=True, exist_ok=True)
    for name in ("best_weights", "best_record", "derived", "metrics", "test_logits"):
        origin, target = getattr(src, name), getattr(dst, name)
        if origin.is_file():
            save_with(target, lambda tmp, origin=origin: shutil.copyfile(origin, tmp))
    result = {**src.read_result().raw, **record}
    write_json(dst.result, result)
    return result


def select(cfg: Config, stage) -> dict:
    """Install the best grid point as `stage` of run `cfg`; returns its result.json content."""
    runs = sweep_runs(cfg, stage)
    points = grid(stage, runs)
    missing = [p["dir"] for p in points if p["val_map"] is None]
    if not points or missing:
        raise PmlError(f"sweep of {stage.files(RunLayout.of(cfg)).dir}: grid point(s) not trained: "
                       f"{', '.join(missing) or 'none defined'}")
    chosen = best_point(points)
    dst = stage.files(RunLayout.of(cfg))
    with Lock(dst.lock, f"stage {dst.dir}"):  # pml_dist/lock.py: one process fills the folder
        result = install(stage.files(RunLayout.of(runs[chosen])), dst, {
            "inputs": training_inputs(RunLayout.of(cfg), stage), "sweep": {"grid": points, "chosen": chosen}})
    p = points[chosen]
    log.info("%s: chose lr %g, micro batch %d (val mAP %.2f) of %d grid points", dst.dir, p["lr"],
             p["micro_batch"], p["val_map"], len(points))
    return result
