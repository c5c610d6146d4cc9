"""Score a split on every rank (rank r takes indices r, r+W, ...) and compute its exact mAP without
gathering the scores: every rank keeps its own N/W x L, the ranks exchange only the positives' scores
and one sum of counts (pml_dist/training/metrics.py), and the test logits go to one file through a
file per rank, merged block by block.

No sampler padding: each sample is scored exactly once, so mAP is exact whatever the world size.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def scored_batches(model: torch.nn.Module, loader, device, hflip_tta: bool = False,
                   progress: str | None = None, autocast: torch.dtype | None = None):
    """(batch, fp32 logits) of every batch of `loader`, the model in eval mode meanwhile.
    progress: a label for a progress bar (None: no bar, e.g. on ranks other than 0).
    autocast: the forward passes' autocast dtype on CUDA (engine.autocast_dtype: bf16 when the
    model trains in bf16), None for fp32; logits are averaged in fp32 either way."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = torch.device(device)
    use_autocast = autocast is not None and device.type == "cuda"
    try:
        for batch in tqdm(loader, desc=progress, disable=progress is None, leave=False):
            images = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast, enabled=use_autocast):
                logits = model(images).float()
                if hflip_tta:
                    logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
            yield batch, logits
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device, num_classes: int,
            hflip_tta: bool = False, progress: str | None = None,
            autocast: torch.dtype | None = None, keep_logits: bool = False) -> tuple[np.ndarray, dict]:
    """(indices, {field: array}) for this rank's shard: 'probs' plus the loader's label fields.
    A rank whose shard is empty (more ranks than samples) returns empty arrays of the right width.
    progress, autocast: as scored_batches'. keep_logits: also return the logits, under 'logits'."""
    # Results stay where they were computed until the shard ends: one copy to the host then, not a
    # host sync per batch. Clones, since FFCV reuses its batch buffers.
    idx, probs, fields = [], [], {}
    for batch, logits in scored_batches(model, loader, device, hflip_tta, progress, autocast):
        probs.append(logits.sigmoid())
        if keep_logits:
            fields.setdefault("logits", []).append(logits)
        idx.append(batch["index"].clone())
        for name in loader.lookups:  # 0/1 (B, L) rows looked up for this batch: kept as uint8
            fields.setdefault(name, []).append(batch[name].to(torch.uint8))
    if not probs:
        empty = np.zeros((0, num_classes), np.float32)
        return np.zeros(0, np.int64), {"probs": empty, **{k: empty for k in loader.lookups},
                                       **({"logits": empty} if keep_logits else {})}
    out = {k: torch.cat(v).cpu().numpy() for k, v in {"probs": probs, **fields}.items()}
    return torch.cat(idx).cpu().numpy(), out


def gather(indices: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """All ranks' shards, ordered by sample index (identity when there is no process group). Only
    EM+APL's dense per-sample state needs this (losses.dense_state_problem bounds it)."""
    parts = _all_gather((indices, arrays))
    indices = np.concatenate([p[0] for p in parts])
    arrays = {k: np.concatenate([p[1][k] for p in parts]) for k in arrays}
    order = np.argsort(indices, kind="stable")
    return indices[order], {k: v[order] for k, v in arrays.items()}


def split_loader(cfg, split: str, info, device, label_fields: tuple[str, ...]):
    """An evaluation loader over this rank's shard of `split` whose batches carry `label_fields`
    ('labels', 'observed' or none); build once, iterate every epoch (each new FFCV loader compiles
    its pipeline again)."""
    from ffcv_data.loaders import eval_loader
    from pml_dist.layout import RunLayout

    return eval_loader(
        RunLayout.of(cfg).data.beton(split), cfg.train.eval_batch, cfg.data.image_size, rank=info.rank,
        world_size=info.world_size, label_fields=label_fields, transform=cfg.data.eval_transform,
        device=device, workers=cfg.data.loader_workers, local_world_size=info.local_world_size,
        jit=cfg.data.jit,
    )


def evaluate(model, loader, device, num_classes: int, targets: str = "labels",
             autocast: torch.dtype | None = None, keep_logits: bool = False,
             thresholds: bool = False) -> dict:
    """mAP (percent) of `model` over the whole split behind the per-rank `loader`; every rank
    returns the same result, equal to metrics.mean_average_precision of the gathered scores.
    targets: 'labels' (full) or 'observed'. autocast: as predict's. keep_logits: also return this
    rank's logits (samples r, r + W, ...) as float16 under "logits" (`write_rows` puts every rank's
    in one file). thresholds: also each class's F1-best decision threshold on this split, under
    "thresholds" (metrics.decision_thresholds)."""
    from pml_dist.training import metrics

    indices, probs, cells, logits = _scored_shard(model, loader, device, num_classes, targets, autocast,
                                                  keep_logits)
    rank, world = _rank_world()
    parts = _all_gather((len(indices), cells[1], probs[cells]))
    n = sum(p[0] for p in parts)
    if not np.array_equal(indices, np.arange(rank, n, world)):
        raise RuntimeError(f"rank {rank} scored other samples than {rank}, {rank} + {world}, ... of the "
                           f"{n}: the ranks' shards do not cover the split")
    classes, values = (np.concatenate([p[i] for p in parts]) for i in (1, 2))
    grid = metrics.THRESHOLD_GRID if thresholds else None  # every rank is asked the same
    at_queries, at_grid = metrics.negatives_at_or_above(probs, cells, classes, values, grid)
    counts = _all_reduce_sum(np.concatenate([at_queries, at_grid]))  # one reduction for both
    negatives, negatives_at_grid = counts[:len(at_queries)], counts[len(at_queries):]
    result = metrics.summary(metrics.average_precision_from_counts(classes, values, negatives, num_classes))
    result["targets"], result["num_samples"] = targets, n
    if thresholds:
        result["thresholds"] = metrics.decision_thresholds(classes, values, negatives, negatives_at_grid,
                                                           num_classes)
    if keep_logits:
        result["logits"] = logits
    return result


@torch.no_grad()
def _scored_shard(model, loader, device, num_classes: int, targets: str, autocast, keep_logits: bool):
    """(indices, probabilities (n, L) float32, (rows, classes) of the positive cells of `targets`,
    float16 logits or None) of this rank's shard, on the host.

    Memory: the shard's probabilities are the one n x L array on the host (4 bytes a cell, 2 more
    with the logits); the labels are never n x L there, only their positive cells. The batches stay
    on the device until the shard ends (no host sync per batch), then move one by one into arrays
    allocated once (on CPU the batches are freed as they are copied, so they are not held twice)."""
    idx, probs, labels, logits = [], [], [], []
    for batch, scored in scored_batches(model, loader, device, autocast=autocast):
        idx.append(batch["index"].clone())  # a clone: FFCV reuses its batch buffers
        probs.append(scored.sigmoid())
        labels.append(batch[targets].to(torch.uint8))
        if keep_logits:
            logits.append(scored.half())
    n = sum(len(i) for i in idx)
    out_probs = np.empty((n, num_classes), np.float32)
    out_logits = np.empty((n, num_classes), np.float16) if keep_logits else None
    rows, classes = [], []
    lo = 0
    for b in range(len(idx)):
        hi = lo + len(idx[b])
        out_probs[lo:hi] = probs[b].cpu().numpy()
        if keep_logits:
            out_logits[lo:hi] = logits[b].cpu().numpy()
            logits[b] = None
        r, c = torch.nonzero(labels[b]).cpu().numpy().T.astype(np.int64)
        rows.append(r + lo)
        classes.append(c)
        probs[b] = labels[b] = None
        lo = hi
    indices = torch.cat(idx).cpu().numpy() if idx else np.zeros(0, np.int64)
    cells = (np.concatenate(rows), np.concatenate(classes)) if rows else (np.zeros(0, np.int64),) * 2
    return indices, out_probs, cells, out_logits


def write_rows(path, rows: np.ndarray, num_samples: int) -> None:
    """Every rank's `rows` (rank r: samples r, r + W, ...) into one (N, L) float16 .npy at `path`,
    on rank 0: each rank writes its part beside it, then rank 0 merges them block by block (memory:
    a block) and removes them. Collective: every rank calls it."""
    from pathlib import Path

    from ffcv_data.atomic import save_with

    path = Path(path)
    rank, world = _rank_world()
    part_of = [path.with_name(f".{path.stem}.rank-{r}-of-{world}.npy") for r in range(world)]
    save_with(part_of[rank], lambda tmp: np.save(tmp, np.asarray(rows, np.float16)))
    barrier()
    if rank == 0:
        parts = [_mapped(part) for part in part_of]
        width = rows.shape[1]
        block = max(world, (4 << 20) // max(1, 2 * width) // world * world)  # rows, a multiple of W

        def write(tmp):
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                         "shape": (num_samples, width)})
                for lo in range(0, num_samples, block):
                    out = np.empty((min(block, num_samples - lo), width), np.float16)
                    for r, rows_r in enumerate(parts):
                        out[r::world] = rows_r[lo // world:lo // world + len(out[r::world])]
                    f.write(out.tobytes())

        save_with(path, write)
        for part in part_of:
            part.unlink()
    barrier()


def _mapped(path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty part (more ranks than samples): nothing to map
        return np.load(path)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        parts: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, obj)
        return parts
    return [obj]


def _all_reduce_sum(counts: np.ndarray) -> np.ndarray:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tensor = torch.from_numpy(np.ascontiguousarray(counts, np.int64))
        if tdist.get_backend() == "nccl":
            tensor = tensor.cuda()
        tdist.all_reduce(tensor)
        return tensor.cpu().numpy()
    return counts


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
