"""Sharded inference (`pml-dist infer`, run on every rank): each rank scores its slice of the
training split with the teacher and writes one shard (format: pml_dist/pseudo/shards.py) holding
what pml_dist/stored_probs.py keeps of each batch (the probabilities the targets need, histograms),
taken on the scoring device batch by batch: never the rank's N_r x L probabilities. No process
group is needed, so any launcher and any world size works, independent of the world size the
teacher trained with.

A rank whose complete shard exists (same teacher, data, rank and world size) skips its work:
rerunning after a crash computes only what is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pml_dist.config import Config
from pml_dist.layout import RunLayout
from pml_dist.lock import Lock
from pml_dist.provenance import data_id, teacher_id
from pml_dist.pseudo.shards import shard_is_complete, write_shard
from pml_dist.stored_probs import ScoreKeeper, store_rule

log = logging.getLogger(__name__)


def infer(cfg: Config) -> Path:
    """Score this rank's slice of the training split and write its shard; returns the shard path.
    Each rank holds its own lock (pml_dist/lock.py) meanwhile, as the ranks are independent: each
    rank of a second inference of the same teacher stops with one line naming the holder."""
    from pml_dist import dist
    from pml_dist.log import setup_logging

    info = dist.resolve()
    run = RunLayout.of(cfg)
    setup_logging(info.rank, run.teacher.log(info.rank, prefix="infer-rank"))
    with Lock(run.infer_lock(info.rank), f"inference rank {info.rank} of {run.probs_dir}"):
        return _infer(cfg, run, info)


def _infer(cfg: Config, run: RunLayout, info) -> Path:
    import torch

    from ffcv_data.loaders import threads_per_rank
    from pml_dist import dist
    from pml_dist.training.engine import autocast_dtype, configure_cuda
    from pml_dist.training.evaluate import scored_batches

    ids = {"teacher_id": teacher_id(run), "data_id": data_id(run)}
    shard = run.shard(info.rank, info.world_size)
    rule = store_rule(cfg.pseudo)
    expected = {**ids, "world_size": info.world_size, "rank": info.rank, "store": rule.as_dict()}
    if shard_is_complete(shard, expected):
        log.info("%s is complete, skipping", shard)
        return shard

    threads = threads_per_rank(cfg.data.loader_workers, info.local_world_size)
    torch.set_num_threads(threads)
    # The trainer's device choice. Made current before anything touches CUDA: otherwise every rank
    # opens a context on GPU 0 and FFCV's copy streams (created on the current device) live there.
    device = dist.compute_device(info, cfg.train.device, cfg.model.name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_cuda(device)
    log.info("%s", dist.rank_summary(info, device, threads, "none (independent shards)",
                                     [e.split("=")[0] for e in cfg.slurm.env]))
    num_classes = run.data.stats().num_classes
    model = _teacher(cfg, run, num_classes, device)
    loader = _loader(cfg, run, info, device)
    log.info("rank %d/%d scoring %d training samples with teacher %s", info.rank, info.world_size,
             len(loader.loader.indices), ids["teacher_id"])
    t0 = time.perf_counter()
    keeper = ScoreKeeper(num_classes, rule, device)
    n = run.data.stats().images("train")
    # The padded order gives rank r the samples at global positions r, r + W, ...: its rows past
    # position N - 1 repeat samples another rank scores, and stay out of the histograms.
    real, done, indices = len(range(info.rank, n, info.world_size)), 0, []
    for batch, logits in scored_batches(model, loader, device, cfg.infer.hflip_tta,
                                        "infer" if info.is_main else None, autocast_dtype(cfg, device)):
        keeper.add(logits.sigmoid(), max(0, min(len(logits), real - done)))
        indices.append(batch["index"].clone())  # FFCV reuses its batch buffers
        done += len(logits)
    indices = torch.cat(indices).cpu().numpy() if indices else np.zeros(0, np.int64)
    path = write_shard(run, info.rank, info.world_size, indices, keeper.arrays(), num_classes,
                       rule.as_dict(), ids, seconds=time.perf_counter() - t0)
    log.info("wrote %s (%d samples)", path, len(indices))
    return path


def _teacher(cfg: Config, run: RunLayout, num_classes: int, device):
    """The teacher's best weights (the ones `teacher_id` identifies) in a fresh model on `device`."""
    import torch

    from pml_dist.training.models import build_model, on_device

    model = build_model(cfg.model.name, num_classes, width=cfg.model.width, norm=cfg.model.norm)
    model.load_state_dict(torch.load(run.teacher.best_weights, map_location="cpu", weights_only=True))
    return on_device(model, device)


def _loader(cfg: Config, run: RunLayout, info, device):
    """This rank's slice of the training split; images and indices only (scoring needs no labels).
    Padded like DistributedSampler, so every rank gets the same count; the merge drops the repeats."""
    from ffcv_data.loaders import eval_loader

    return eval_loader(
        run.data.beton("train"), cfg.infer.batch, cfg.data.image_size, rank=info.rank,
        world_size=info.world_size, label_fields=(), transform=cfg.data.eval_transform, device=device,
        workers=cfg.data.loader_workers,
        local_world_size=info.local_world_size, padded=True, jit=cfg.data.jit,
    )
