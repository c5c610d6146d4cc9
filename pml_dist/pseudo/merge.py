"""Merge a run's inference shards (pml_dist/pseudo/shards.py) into one N x L float16 matrix,
`pseudo/probs.npy`, after proving that nothing was lost, duplicated inconsistently or mixed up.

Checks, each a PmlError naming the shard(s): every manifest parses; all have one world size W (the
one in their file names), ranks 0..W-1 each exactly once; one teacher id and one data id, equal to
the current teacher and data; every shard's arrays match its manifest (count, width, checksum);
indices lie in 0..N-1; a sample scored twice (sampler padding) has equal probabilities (within
`pseudo.dup_tolerance`); the union is exactly 0..N-1.

Streaming, under a temporary name that is renamed only when every check has passed (a failed merge
writes nothing). The usual shards (np.savez's uncompressed members; each shard's indices a few
increasing runs, as the padded DistributedSampler order gives) are merged block by block of output
rows (a few MiB): each shard's rows of the block are read straight from its file (os.preadv, no
np.load), their CRC-32 computed over the bytes as they arrive, gathered into output order with one
np.take, and the block written with sequential writes after the .npy header (no memory map: no page
fault per output page, and the output's pages never count as this process's memory). Memory: the
block buffers and one shard's indices, whatever N is (bench/bench_merge.py measures it). Other
shards go one at a time into a memory-mapped .npy (`_merge_by_shard`). Either way the result is an
ordinary .npy that np.load(mmap_mode="r") maps.
"""

from __future__ import annotations

import bisect
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.atomic import FULL, save_with
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.pseudo.shards import StoredRows, npz_of, open_shard, read_manifests, read_shard

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


# -- the arrays ------------------------------------------------------------------------------------

BLOCK_BYTES = 4 << 20  # output rows merged per block: a few MiB, so the buffers stay in cache
MAX_RUNS_PER_SHARD = 4  # more increasing runs than this (shuffled shards): merged shard by shard


def _merge_into(tmp: Path, shards: Shards, num_samples: int, num_classes: int, tolerance: float,
                folder: Path) -> int:
    """Fill the .npy at `tmp` from every shard; returns how many rows were scored more than once."""
    plan = _plan(shards, num_samples, num_classes)
    if plan is None:
        return _merge_by_shard(tmp, shards, num_samples, num_classes, tolerance, folder)
    try:
        return _merge_by_block(tmp, plan, shards, num_samples, num_classes, tolerance, folder)
    finally:
        _close(plan.readers)


def _header(tmp: Path, f, num_samples: int, num_classes: int) -> None:
    """The .npy header (padded so the rows start aligned, as np.save does), then every block of the
    file reserved: the disk's space is claimed before the merge fills it, so a full disk is one
    ENOSPC here (save_with makes it one line naming the file) and not a SIGBUS or a late error."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                             "fortran_order": False, "shape": (num_samples, num_classes)})
    _reserve(f, f.tell() + 2 * num_samples * num_classes)


def _reserve(f, size: int) -> None:
    """Allocate `size` bytes of the open file `f` (an ENOSPC/EDQUOT OSError on a full disk); where
    the file system or platform cannot, leave the file sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in FULL:
            raise


# -- block by block: each shard's rows read in place, the output written sequentially -------------

class _Rows:
    """One shard's probabilities, read straight from its .npz (`StoredRows`), with the member's
    CRC-32 computed over the bytes read in file order; `verify` reads whatever was not (rows read out
    of order, such as a padding row at the end of the shard that belongs to the first block)."""

    def __init__(self, npz: Path, stored: StoredRows):
        self.npz, self.stored = npz, stored
        self.fd = os.open(npz, os.O_RDONLY)
        self.crc, self.done = zlib.crc32(stored.header), len(stored.header)  # member bytes checked
        self.row_bytes = 2 * stored.shape[1]

    def read(self, row: int, out: np.ndarray) -> None:
        """Rows `row`, `row + 1`, ... into `out` (C-contiguous, len(out) rows)."""
        start = len(self.stored.header) + row * self.row_bytes
        self._pread(memoryview(out).cast("B"), start)
        if start == self.done:
            self.crc = zlib.crc32(out, self.crc)
            self.done += out.nbytes

    def verify(self) -> None:
        chunk = bytearray(min(BLOCK_BYTES, self.stored.size - self.done))
        while self.done < self.stored.size:
            view = memoryview(chunk)[:min(len(chunk), self.stored.size - self.done)]
            self._pread(view, self.done)
            self.crc, self.done = zlib.crc32(view, self.crc), self.done + len(view)
        if self.crc != self.stored.crc:
            raise PmlError(f"{self.npz}: unreadable shard (BadZipFile: Bad CRC-32 for file "
                           f"{self.stored.name!r})")

    def _pread(self, view: memoryview, start: int) -> None:
        offset = self.stored.offset + start
        while len(view):
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise PmlError(f"{self.npz}: unreadable shard (EOFError: the file ends inside "
                               f"{self.stored.name})")
            view, offset = view[got:], offset + got

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Run:
    """Rows `row`.. of one shard whose indices strictly increase: start, start + step, ... (step > 0)
    or, where they do not step evenly, `indices`. `cuts[b]`: the run's first row in block b."""

    rank: int
    rows: _Rows
    row: int
    start: int
    step: int
    indices: np.ndarray | None
    cuts: list[int]

    def positions(self, j0: int, j1: int, lo: int):
        """Where rows j0..j1-1 of the run go in the block starting at sample `lo`."""
        if self.indices is None:
            first = self.start + j0 * self.step - lo
            return slice(first, first + (j1 - j0 - 1) * self.step + 1, self.step)
        return self.indices[j0:j1] - lo


@dataclass
class _Plan:
    block: int
    edges: np.ndarray  # block b is samples edges[b]..edges[b+1]-1
    runs: list[_Run]  # by rank, then by row
    readers: list[_Rows]


def _plan(shards: Shards, num_samples: int, num_classes: int) -> _Plan | None:
    """Check every shard's indices and shape and cut them into increasing runs; None when a shard's
    rows cannot be read in place or are too shuffled for block-wise merging."""
    block = max(1, BLOCK_BYTES // (2 * max(1, num_classes)))
    edges = np.append(np.arange(0, num_samples, block, dtype=np.int64), num_samples)
    runs, readers = [], []
    try:
        for manifest, info in shards:
            npz = npz_of(manifest)
            indices, stored = open_shard(npz, info["checksum"])
            if stored is None:
                _close(readers)
                return None
            _check_shape(npz, info, indices, stored.shape, num_samples, num_classes)
            cut = _increasing_runs(indices)
            if len(cut) - 1 > MAX_RUNS_PER_SHARD:
                _close(readers)
                return None
            readers.append(_Rows(npz, stored))
            runs += [_run(info["rank"], readers[-1], indices, a, b, edges)
                     for a, b in zip(cut, cut[1:], strict=False) if b > a]
    except PmlError:
        try:
            _verify(readers)  # a damaged earlier shard is the cause to report, as in rank order
        finally:
            _close(readers)
        raise
    except BaseException:
        _close(readers)
        raise
    return _Plan(block, edges, runs, readers)


def _increasing_runs(indices: np.ndarray) -> list[int]:
    """Row numbers cutting `indices` into strictly increasing runs: [0, ..., len(indices)]."""
    return [0, *(np.flatnonzero(indices[1:] <= indices[:-1]) + 1).tolist(), len(indices)]


def _run(rank: int, rows: _Rows, indices: np.ndarray, a: int, b: int, edges: np.ndarray) -> _Run:
    seg = indices[a:b].astype(np.int64)
    step = int(seg[1] - seg[0]) if len(seg) > 1 else 1
    if len(seg) == 1 or (int(seg[-1] - seg[0]) == step * (len(seg) - 1) and (np.diff(seg) == step).all()):
        cuts = np.clip(-((int(seg[0]) - edges) // step), 0, len(seg))  # ceil((edge - start) / step)
        return _Run(rank, rows, a, int(seg[0]), step, None, cuts.tolist())
    return _Run(rank, rows, a, int(seg[0]), 0, seg, np.searchsorted(seg, edges).tolist())


def _merge_by_block(tmp: Path, plan: _Plan, shards: Shards, num_samples: int, num_classes: int,
                    tolerance: float, folder: Path) -> int:
    """Per block: every run's rows of it read one after another into `staged`, `source[k]` the
    staged row that output row k takes, one gather (np.take) into the block, one write."""
    out = np.empty((plan.block, num_classes), dtype=np.float16)
    staged = np.empty((plan.block + len(plan.runs), num_classes), dtype=np.float16)  # + padding rows
    source = np.empty(plan.block, dtype=np.intp)
    duplicates, missing, first_missing = 0, 0, []
    with open(tmp, "wb", buffering=0) as f:
        _header(tmp, f, num_samples, num_classes)
        try:
            for b in range(len(plan.edges) - 1):
                lo, hi = int(plan.edges[b]), int(plan.edges[b + 1])
                rows, src = out[:hi - lo], source[:hi - lo]
                src.fill(-1)
                pieces, used = [], 0  # (run, first staged row, its rows' places in the block)
                for run in plan.runs:
                    j0, j1 = run.cuts[b], run.cuts[b + 1]
                    if j1 <= j0:
                        continue
                    if used + j1 - j0 > len(staged):  # more repeats than padding makes: grow
                        staged = np.concatenate([staged, np.empty_like(staged)])
                    run.rows.read(run.row + j0, staged[used:used + j1 - j0])
                    pos = run.positions(j0, j1, lo)
                    src[pos] = np.arange(used, used + j1 - j0)
                    pieces.append((run, used, pos))
                    used += j1 - j0
                if used != len(rows) or (src < 0).any():  # repeats or gaps: resolve them in order
                    duplicates += _first_scores(pieces, used, staged, src, lo, shards, tolerance)
                    gaps = np.flatnonzero(src < 0)
                    missing += len(gaps)
                    first_missing += (gaps[:5 - len(first_missing)] + lo).tolist()
                if not missing:
                    np.take(staged[:used], src, axis=0, out=rows, mode="clip")
                    _write(f, rows)
        except PmlError:
            _verify(plan.readers)  # a damaged file is the cause to report, as reading it whole would have
            raise
        _verify(plan.readers)
    if missing:
        raise PmlError(f"{folder}: {missing} of {num_samples} samples are in no shard "
                       f"(first: {first_missing})")
    # No fsync: the rename publishes the complete file to every reader through the page cache,
    # and flushing 2 bytes x N x L to disk here would double the merge time.
    return duplicates


def _first_scores(pieces: list, used: int, staged: np.ndarray, src: np.ndarray, lo: int, shards: Shards,
                  tolerance: float) -> int:
    """`src` again with every sample's first score (by rank, then row), after checking that every
    later score of it agrees; returns how many later scores there were (sampler padding)."""
    src.fill(-1)
    starts = [first for _, first, _ in pieces]
    duplicates = 0
    for k, (run, first, pos) in enumerate(pieces):
        ids = np.arange(first, starts[k + 1] if k + 1 < len(pieces) else used)
        seen = src[pos] >= 0
        if not seen.any():
            src[pos] = ids
            continue
        places = np.arange(len(src))[pos]  # row numbers in the block
        old = src[places[seen]]
        diff = _max_diff(staged[old], staged[ids[seen]])
        bad = np.flatnonzero(diff > tolerance)
        if len(bad):
            row = int(places[seen][bad[0]]) + lo
            earlier = pieces[bisect.bisect_right(starts, int(old[bad[0]])) - 1][0]
            if earlier.rank == run.rank:
                raise PmlError(f"{run.rows.npz}: sample {row} appears twice with different probabilities")
            other = npz_of(shards[earlier.rank][0])  # shards are by rank: entry r is rank r's
            raise PmlError(f"{run.rows.npz} and {other}: sample {row} scored twice with different "
                           f"probabilities (max difference {diff[bad[0]]:.4g} > {tolerance})")
        src[places[~seen]] = ids[~seen]
        duplicates += int(seen.sum())
    return duplicates


def _write(f, rows: np.ndarray) -> None:
    view = memoryview(rows).cast("B")
    while len(view):
        view = view[f.write(view):]


def _verify(readers: list[_Rows]) -> None:
    """Every shard's CRC-32 over all its probs bytes (a PmlError naming the first that differs)."""
    for reader in readers:
        reader.verify()


def _close(readers: list[_Rows]) -> None:
    for reader in readers:
        reader.close()


# -- shard by shard, into a memory map: shards the block-wise merge does not take ------------------

def _merge_by_shard(tmp: Path, shards: Shards, num_samples: int, num_classes: int, tolerance: float,
                    folder: Path) -> int:
    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(num_samples, num_classes))
    # The file is sparse until written: reserve its blocks now (a SIGBUS on a full disk otherwise).
    with open(tmp, "r+b") as f:
        _reserve(f, os.fstat(f.fileno()).st_size)
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
    return duplicates


def _add_shard(manifest: Path, info: dict, merged: np.ndarray, owner: np.ndarray, shards: Shards,
               tolerance: float) -> int:
    """Copy one shard's rows into `merged`; returns the rows it repeats (its own or earlier ranks')."""
    npz = npz_of(manifest)
    indices, probs = read_shard(npz, info["checksum"])
    _check_shape(npz, info, indices, probs.shape, len(owner), merged.shape[1])
    indices, probs, repeats = _without_repeats(npz, indices, probs, tolerance)
    indices, probs, overlaps = _without_scored(npz, indices, probs, merged, owner, shards, tolerance)
    merged[indices] = probs
    owner[indices] = info["rank"]
    return repeats + overlaps


def _check_shape(npz: Path, info: dict, indices: np.ndarray, shape: tuple, num_samples: int,
                 num_classes: int) -> None:
    if len(indices) != info["count"] or tuple(shape) != (info["count"], num_classes):
        raise PmlError(f"{npz}: holds {len(indices)} x {tuple(shape[1:])} values, its manifest says "
                       f"{info['count']} x ({num_classes},)")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
        raise PmlError(f"{npz}: indices outside 0..{num_samples - 1}")


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
