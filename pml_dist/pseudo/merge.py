"""Merge a run's inference shards (pml_dist/pseudo/shards.py) into one N x L float16 matrix,
`pseudo/probs.npy`, after proving that nothing was lost, duplicated inconsistently or mixed up.

Checks, each a PmlError naming the shard(s): every manifest parses; all have one world size W (the
one in their file names), ranks 0..W-1 each exactly once; one teacher id and one data id, equal to
the current teacher and data; every shard's arrays match its manifest (count, width, checksum);
indices lie in 0..N-1; a sample scored twice (sampler padding) has equal probabilities (within
`pseudo.dup_tolerance`); the union is exactly 0..N-1.

Streaming: one shard in memory at a time, written straight into a memory-mapped .npy under a
temporary name; renamed only when every check has passed, so a failed merge writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ffcv_data.atomic import FULL, save_with
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.pseudo.shards import npz_of, read_manifests, read_shard

Shards = list[tuple[Path, dict]]  # (manifest path, manifest), by rank


def merge_shards(run: RunLayout, num_samples: int, num_classes: int, expected_ids: dict | None = None,
                 dup_tolerance: float = 2e-3) -> dict:
    """Verify the shards of `run` and write the merged matrix to its `pseudo.probs`; returns a
    summary. `expected_ids`: the teacher_id and data_id every shard must carry (none: any, but one)."""
    expected_ids = expected_ids or {}
    shards = _checked_manifests(run, expected_ids)
    out = run.pseudo.probs
    out.parent.mkdir(parents=True, exist_ok=True)
    duplicates = 0

    def write(tmp: Path) -> None:
        nonlocal duplicates
        duplicates = _merge_into(tmp, shards, num_samples, num_classes, dup_tolerance, run.probs_dir)

    save_with(out, write)
    return _summary(shards, num_samples, duplicates, expected_ids)


def _summary(shards: Shards, num_samples: int, duplicates: int, expected_ids: dict) -> dict:
    seconds = [info.get("seconds") for _, info in shards]
    infer_s = max(seconds) if None not in seconds else None  # the slowest rank ends the job
    return {"shards": len(shards), "samples": num_samples, "padding_duplicates": duplicates,
            "world_size": len(shards), **expected_ids, "infer_seconds": infer_s,
            "infer_samples_per_s": num_samples / infer_s if infer_s else None}


# -- the manifests: one complete set of ranks, from one teacher and one data set -------------------

def _checked_manifests(run: RunLayout, expected_ids: dict) -> Shards:
    folder = run.probs_dir
    shards = read_manifests(run)
    if not shards:
        raise PmlError(f"{folder}: no shard manifests (run `pml-dist infer` on every rank first)")
    world = _one_world_size(folder, shards)
    _every_rank_once(folder, shards, world)
    for key in ("teacher_id", "data_id"):
        _one_input(folder, shards, key, expected_ids.get(key))
    return sorted(shards, key=lambda m: m[1]["rank"])


def _one_world_size(folder: Path, shards: Shards) -> int:
    worlds = {info["world_size"] for _, info in shards}
    if len(worlds) > 1:
        by_world = {w: [p.name for p, i in shards if i["world_size"] == w] for w in sorted(worlds)}
        raise PmlError(f"{folder}: shards from different world sizes {by_world}; "
                       "delete the shards of the older inference job")
    return worlds.pop()


def _every_rank_once(folder: Path, shards: Shards, world: int) -> None:
    ranks = sorted(info["rank"] for _, info in shards)
    if ranks != list(range(world)):
        absent = sorted(set(range(world)) - set(ranks))
        raise PmlError(f"{folder}: world size {world} but shards of rank(s) {absent} are missing")


def _one_input(folder: Path, shards: Shards, key: str, wanted: str | None) -> None:
    """All shards carry one value of `key` (teacher_id or data_id), equal to `wanted` when given."""
    values = {info.get(key) for _, info in shards}
    if len(values) > 1 or (wanted is not None and values != {wanted}):
        odd = [p.name for p, i in shards if i.get(key) != (wanted or shards[0][1].get(key))]
        what = "teacher" if key == "teacher_id" else "data"
        raise PmlError(f"{folder}: shard(s) {odd} come from another {what} ({key} differs"
                       + (f" from the current {wanted})" if wanted else ")"))


# -- the arrays: streamed into the memory-mapped result, one shard at a time -----------------------

def _merge_into(tmp: Path, shards: Shards, num_samples: int, num_classes: int, tolerance: float,
                folder: Path) -> int:
    """Fill the .npy at `tmp` from every shard; returns how many rows were scored more than once."""
    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(num_samples, num_classes))
    # The file is sparse until written: reserve its blocks now, so a full disk is an ENOSPC here
    # (save_with makes it one line naming the file) and not a SIGBUS on the first page it lacks.
    _reserve(tmp)
    owner = np.full(num_samples, -1, dtype=np.int32)  # which rank wrote each row
    duplicates = 0
    for manifest, info in shards:
        duplicates += _add_shard(manifest, info, merged, owner, shards, tolerance)
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        raise PmlError(
            f"{folder}: {len(missing)} of {num_samples} samples are in no shard "
            f"(first: {missing[:5].tolist()})"
        )
    # No msync: the rename publishes the complete file to every reader through the page cache,
    # and flushing 2 bytes x N x L to disk here would double the merge time.
    return duplicates


def _reserve(path: Path) -> None:
    """Allocate every block of `path` (an ENOSPC/EDQUOT OSError on a full disk); where the file
    system or platform cannot, leave the file sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno in FULL:
                raise


def _add_shard(manifest: Path, info: dict, merged: np.ndarray, owner: np.ndarray, shards: Shards,
               tolerance: float) -> int:
    """Copy one shard's rows into `merged`; returns the rows it repeats (its own or earlier ranks')."""
    npz = npz_of(manifest)
    indices, probs = _checked_arrays(npz, info, len(owner), merged.shape[1])
    indices, probs, repeats = _without_repeats(npz, indices, probs, tolerance)
    indices, probs, overlaps = _without_scored(npz, indices, probs, merged, owner, shards, tolerance)
    merged[indices] = probs
    owner[indices] = info["rank"]
    return repeats + overlaps


def _checked_arrays(npz: Path, info: dict, num_samples: int, num_classes: int):
    indices, probs = read_shard(npz, info["checksum"])
    if len(indices) != info["count"] or probs.shape != (info["count"], num_classes):
        raise PmlError(f"{npz}: holds {len(indices)} x {probs.shape[1:]} values, its manifest says "
                       f"{info['count']} x ({num_classes},)")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
        raise PmlError(f"{npz}: indices outside 0..{num_samples - 1}")
    return indices, probs


def _without_repeats(npz: Path, indices: np.ndarray, probs: np.ndarray, tolerance: float):
    """A shard's rows with each index once. Padding repeats a sample inside one shard when there
    are more ranks than samples; the repeats must agree."""
    if np.all(indices[1:] > indices[:-1]):  # strictly increasing, the usual case: nothing to do
        return indices, probs, 0
    unique, first, inverse = np.unique(indices, return_index=True, return_inverse=True)
    diff = _max_diff(probs[first][inverse], probs)
    if (diff > tolerance).any():
        raise PmlError(f"{npz}: sample {int(indices[np.argmax(diff)])} appears twice with "
                       "different probabilities")
    return unique, probs[first], len(indices) - len(unique)


def _without_scored(npz: Path, indices: np.ndarray, probs: np.ndarray, merged: np.ndarray,
                    owner: np.ndarray, shards: Shards, tolerance: float):
    """A shard's rows that no earlier rank wrote. Padding hands some samples to two ranks; the
    second score must agree with the one already merged."""
    seen = owner[indices] >= 0
    if not seen.any():
        return indices, probs, 0
    old_rows = indices[seen]
    diff = _max_diff(merged[old_rows], probs[seen])
    bad = np.flatnonzero(diff > tolerance)
    if len(bad):
        row = old_rows[bad[0]]
        other = npz_of(shards[int(owner[row])][0])  # shards are by rank: entry r is rank r's
        raise PmlError(f"{npz} and {other}: sample {row} scored twice with different "
                       f"probabilities (max difference {diff[bad[0]]:.4g} > {tolerance})")
    return indices[~seen], probs[~seen], int(seen.sum())


def _max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=1)
