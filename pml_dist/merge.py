"""Merge inference shards into one N x L float16 matrix, `pseudo/probs.npy`, after proving that
nothing was lost, duplicated inconsistently or mixed up.

Checks, each a PmlError naming the shard(s): every manifest parses; all have one world size W (the
one in their file names), ranks 0..W-1 each exactly once; one teacher id and one data id, equal to
the current teacher and data; every shard's arrays match its manifest (count, width, checksum);
indices lie in 0..N-1; a sample scored twice (sampler padding) has equal probabilities (within
`pseudo.dup_tolerance`); the union is exactly 0..N-1.

Streaming: one shard in memory at a time, written straight into a memory-mapped .npy under a
temporary name; renamed only when every check has passed, so a failed merge writes nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from pml_dist.errors import PmlError
from pml_dist.infer import read_shard

_MANIFEST = re.compile(r"shard-(\d{5})-of-(\d{5})\.json$")


def merge_shards(folder: Path, out: Path, num_samples: int, num_classes: int,
                 expected_ids: dict | None = None, dup_tolerance: float = 2e-3) -> dict:
    """Verify the shards in `folder` and write the merged matrix to `out`; returns a summary."""
    manifests = _read_manifests(folder, expected_ids or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    try:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                           shape=(num_samples, num_classes))
        owner = np.full(num_samples, -1, dtype=np.int32)  # which rank wrote each row
        duplicates = 0
        for rank, (path, info) in enumerate(manifests):
            duplicates += _add_shard(path, info, rank, merged, owner, num_samples, num_classes,
                                     dup_tolerance, folder)
        missing = np.flatnonzero(owner < 0)
        if len(missing):
            raise PmlError(
                f"{folder}: {len(missing)} of {num_samples} samples are in no shard "
                f"(first: {missing[:5].tolist()})"
            )
        # No msync: the rename publishes the complete file to every reader through the page cache,
        # and flushing 2 bytes x N x L to disk here would double the merge time.
        del merged
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    seconds = [info.get("seconds") for _, info in manifests]
    infer_s = max(seconds) if None not in seconds else None  # the slowest rank ends the job
    return {"shards": len(manifests), "samples": num_samples, "padding_duplicates": duplicates,
            "world_size": len(manifests), **(expected_ids or {}), "infer_seconds": infer_s,
            "infer_samples_per_s": num_samples / infer_s if infer_s else None}


def _read_manifests(folder: Path, expected_ids: dict) -> list[tuple[Path, dict]]:
    files = sorted(p for p in folder.glob("shard-*.json")) if folder.is_dir() else []
    if not files:
        raise PmlError(f"{folder}: no shard manifests (run `pml-dist infer` on every rank first)")
    manifests = []
    for path in files:
        match = _MANIFEST.match(path.name)
        if not match:
            raise PmlError(f"{path}: not a shard manifest name (shard-RRRRR-of-WWWWW.json)")
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PmlError(f"{path}: malformed manifest ({exc})") from None
        if (info.get("rank"), info.get("world_size")) != (int(match[1]), int(match[2])):
            raise PmlError(
                f"{path}: manifest says rank {info.get('rank')} of world size {info.get('world_size')}, "
                f"its name says rank {int(match[1])} of {int(match[2])}"
            )
        manifests.append((path, info))

    worlds = {info["world_size"] for _, info in manifests}
    if len(worlds) > 1:
        by_world = {w: [p.name for p, i in manifests if i["world_size"] == w] for w in sorted(worlds)}
        raise PmlError(f"{folder}: shards from different world sizes {by_world}; "
                       "delete the shards of the older inference job")
    world = worlds.pop()
    ranks = sorted(info["rank"] for _, info in manifests)
    if ranks != list(range(world)):
        absent = sorted(set(range(world)) - set(ranks))
        raise PmlError(f"{folder}: world size {world} but shards of rank(s) {absent} are missing")
    for key in ("teacher_id", "data_id"):
        values = {info.get(key) for _, info in manifests}
        wanted = expected_ids.get(key)
        if len(values) > 1 or (wanted is not None and values != {wanted}):
            odd = [p.name for p, i in manifests if i.get(key) != (wanted or manifests[0][1].get(key))]
            what = "teacher" if key == "teacher_id" else "data"
            raise PmlError(f"{folder}: shard(s) {odd} come from another {what} ({key} differs"
                           + (f" from the current {wanted})" if wanted else ")"))
    return sorted(manifests, key=lambda m: m[1]["rank"])


def _add_shard(manifest: Path, info: dict, rank: int, merged: np.ndarray, owner: np.ndarray,
               num_samples: int, num_classes: int, tolerance: float, folder: Path) -> int:
    npz = manifest.with_suffix(".npz")
    indices, probs = read_shard(npz, info["checksum"])
    if len(indices) != info["count"] or probs.shape != (info["count"], num_classes):
        raise PmlError(f"{npz}: holds {len(indices)} x {probs.shape[1:]} values, its manifest says "
                       f"{info['count']} x ({num_classes},)")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
        raise PmlError(f"{npz}: indices outside 0..{num_samples - 1}")
    repeats = 0
    if not np.all(indices[1:] > indices[:-1]):  # not strictly increasing: sort, and check repeats
        # (padding can repeat a sample inside one shard when there are more ranks than samples)
        unique, first, inverse = np.unique(indices, return_index=True, return_inverse=True)
        repeats = len(indices) - len(unique)
        diff = _max_diff(probs[first][inverse], probs)
        if (diff > tolerance).any():
            raise PmlError(f"{npz}: sample {int(indices[np.argmax(diff)])} appears twice with "
                           "different probabilities")
        indices, probs = unique, probs[first]
    seen = owner[indices] >= 0
    if seen.any():
        old_rows = indices[seen]
        diff = _max_diff(merged[old_rows], probs[seen])
        bad = np.flatnonzero(diff > tolerance)
        if len(bad):
            row = old_rows[bad[0]]
            other = folder / _shard_file(int(owner[row]), info["world_size"])
            raise PmlError(f"{npz} and {other}: sample {row} scored twice with different "
                           f"probabilities (max difference {diff[bad[0]]:.4g} > {tolerance})")
        indices, probs = indices[~seen], probs[~seen]
    merged[indices] = probs
    owner[indices] = rank
    return repeats + int(seen.sum())


def _max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=1)


def _shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.npz"
