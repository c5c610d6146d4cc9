"""Score a split on every rank (rank r takes indices r, r+W, ...) and gather the result on all ranks.

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
    """All ranks' shards, ordered by sample index (identity when there is no process group)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        parts: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, (indices, arrays))
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
             autocast: torch.dtype | None = None, keep_logits: bool = False) -> dict:
    """mAP (percent) of `model` over the whole split behind the per-rank `loader`; every rank
    returns the same result. targets: 'labels' (full) or 'observed'. autocast: as predict's.
    keep_logits: also return the (N, L) logits in index order under "logits"."""
    from pml_dist.training.metrics import mean_average_precision

    indices, arrays = gather(*predict(model, loader, device, num_classes, autocast=autocast,
                                      keep_logits=keep_logits))
    if not np.array_equal(indices, np.arange(len(indices))):
        raise RuntimeError("gathered indices are not 0..N-1: the ranks' shards do not cover the split")
    result = mean_average_precision(arrays["probs"], arrays[targets])
    result["targets"] = targets
    if keep_logits:
        result["logits"] = arrays["logits"]
    return result
