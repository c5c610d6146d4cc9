"""Sharded inference: every rank scores its slice of the training split with the teacher and writes
one shard. No process group is needed, so any launcher and any world size works, independent of
the world size the teacher trained with.

    teacher/probs/shard-RRRRR-of-WWWWW.npz    indices (int64) and probs (float16, N_r x L)
    teacher/probs/shard-RRRRR-of-WWWWW.json   manifest: rank, world size, count, index range,
                                              checksum of the arrays, teacher id, data id

The .npz is written under a temporary name and renamed; the manifest is written (the same way)
after it, so a manifest means a complete shard. A rank whose complete shard exists skips its work:
rerunning after a crash computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pml_dist.config import Config
from pml_dist.errors import PmlError
from pml_dist.layout import probs_dir, teacher_dir

log = logging.getLogger(__name__)


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}"


def file_id(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def teacher_id(cfg: Config) -> str:
    path = teacher_dir(cfg.run_dir) / "best.pt"
    if not path.is_file():
        raise PmlError(f"no teacher weights at {path} (train the teacher first)")
    return file_id(path)


def data_id(cfg: Config) -> str:
    """Identifies the training split: its per-index metadata and the size of its .beton (hashing a
    COCO-sized .beton would take minutes; the metadata already changes with any re-preparation)."""
    meta = cfg.data_dir / "train.meta.npz"
    beton = cfg.data_dir / "train.beton"
    if not meta.is_file() or not beton.is_file():
        raise PmlError(f"no prepared training split in {cfg.data_dir} (run `pml-dist prepare`)")
    return f"{file_id(meta)}-{beton.stat().st_size}"


def npz_checksum(npz: Path) -> str:
    """The CRC-32 of each array as the .npz (a zip) records it, e.g. 'indices:1a2b3c4d,probs:...'.

    Costs nothing to compute (it is in the zip's directory) and nothing to verify: zipfile checks
    every member's CRC while np.load reads it, and a mismatch raises. Comparing it with the manifest
    also catches a whole shard replaced by another, valid one.
    """
    with zipfile.ZipFile(npz) as z:
        return ",".join(f"{i.filename.removesuffix('.npy')}:{i.CRC:08x}" for i in sorted(
            z.infolist(), key=lambda i: i.filename))


def read_shard(npz: Path, checksum: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probs) of one shard file, verified against `checksum` when given; a missing,
    truncated, corrupt or substituted file is a PmlError naming it."""
    try:
        if checksum is not None and npz_checksum(npz) != checksum:
            raise PmlError(f"{npz}: checksum does not match its manifest (corrupt or overwritten)")
        with np.load(npz) as data:
            return data["indices"], data["probs"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise PmlError(f"{npz}: unreadable shard ({type(exc).__name__}: {exc})") from None


def shard_is_complete(manifest: Path, expected: dict) -> bool:
    """A manifest that matches this job (same teacher, data, world size) and whose arrays check out."""
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
        if any(info.get(k) != v for k, v in expected.items()):
            return False
        read_shard(manifest.with_suffix(".npz"), info.get("checksum"))
    except (PmlError, json.JSONDecodeError):
        return False
    return True


def write_shard(folder: Path, rank: int, world: int, indices: np.ndarray, probs: np.ndarray,
                ids: dict, seconds: float | None = None) -> Path:
    """npz first, manifest last, each via a temporary name and an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    name = shard_name(rank, world)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    probs = np.ascontiguousarray(probs, dtype=np.float16)
    tmp = folder / f".{name}.tmp-{os.getpid()}.npz"
    np.savez(tmp, indices=indices, probs=probs)
    checksum = npz_checksum(tmp)
    os.replace(tmp, folder / f"{name}.npz")
    manifest = {
        "rank": rank, "world_size": world, "count": int(len(indices)),
        "index_min": int(indices.min()) if len(indices) else None,
        "index_max": int(indices.max()) if len(indices) else None,
        "num_classes": int(probs.shape[1]), "checksum": checksum, **ids,
        "seconds": seconds,  # scoring wall time, for the report
    }
    tmp_json = folder / f".{name}.tmp-{os.getpid()}.json"
    tmp_json.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_json, folder / f"{name}.json")
    return folder / f"{name}.npz"


def infer(cfg: Config) -> Path:
    """Score this rank's slice of the training split and write its shard; returns the shard path."""
    import torch

    from ffcv_data.loaders import eval_loader, threads_per_rank
    from ffcv_data.prepare import beton_path
    from pml_dist import dist
    from pml_dist.evaluate import predict
    from pml_dist.log import setup_logging
    from pml_dist.models import build_model

    info = dist.resolve()
    folder = probs_dir(cfg.run_dir)
    setup_logging(info.rank, folder.parent / "logs" / f"infer-rank-{info.rank}.log")
    ids = {"teacher_id": teacher_id(cfg), "data_id": data_id(cfg)}
    name = shard_name(info.rank, info.world_size)
    if shard_is_complete(folder / f"{name}.json", {**ids, "world_size": info.world_size, "rank": info.rank}):
        log.info("%s is complete, skipping", folder / f"{name}.npz")
        return folder / f"{name}.npz"

    torch.set_num_threads(threads_per_rank(cfg.data.loader_workers, info.local_world_size))
    device = (torch.device("cuda", info.local_rank % torch.cuda.device_count())
              if torch.cuda.is_available() else torch.device("cpu"))
    num_classes = json.loads((cfg.data_dir / "stats.json").read_text())["num_classes"]
    model = build_model(cfg.model.name, num_classes, width=cfg.model.width, norm=cfg.model.norm)
    state = torch.load(teacher_dir(cfg.run_dir) / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device)
    # Padded like DistributedSampler: every rank gets the same count; merge drops the repeats.
    loader = eval_loader(
        beton_path(cfg, "train"), cfg.infer.batch, cfg.data.image_size, rank=info.rank,
        world_size=info.world_size, with_labels=False, device=device, workers=cfg.data.loader_workers,
        local_world_size=info.local_world_size, padded=True, jit=cfg.data.jit,
    )
    log.info("rank %d/%d scoring %d training samples with teacher %s", info.rank, info.world_size,
             len(loader.loader.indices), ids["teacher_id"])
    t0 = time.perf_counter()
    indices, arrays = predict(model, loader, device, num_classes, hflip_tta=cfg.infer.hflip_tta,
                              progress="infer" if info.is_main else None)
    path = write_shard(folder, info.rank, info.world_size, indices, arrays["probs"], ids,
                       seconds=time.perf_counter() - t0)
    log.info("wrote %s (%d samples)", path, len(indices))
    return path

