"""Merge a run's inference shards (pml_dist/pseudo/shards.py) into `pseudo/probs.npz`: the kept
probabilities of every training sample in sample order, as CSR (pml_dist/stored_probs.py reads it),
with the shards' histograms and sums added up, after proving that nothing was lost, duplicated
inconsistently or mixed up.

Checks, each a PmlError naming the shard(s): every manifest parses; all have one world size W (the
one in their file names), ranks 0..W-1 each exactly once; one teacher id, one data id and one store
rule, equal to the current teacher, data and config; every byte of every shard against its CRC-32 and
the manifest's checksum; its arrays' shapes against the manifest; indices in 0..N-1, classes in
0..L-1; a sample scored twice (sampler padding) has equal probabilities (within
`pseudo.dup_tolerance`; a probability one score did not keep counts as the least it could have
been); the union is exactly 0..N-1.

Streaming, with bounded memory: the shards are memory-mapped; the first score of each sample (by
rank, then row) is found from their indices; then the output's entries are gathered block by block
(stored.entry_blocks) into the members of the output .npz, written under a temporary name that is
renamed only when every check has passed (a failed merge writes nothing). Memory: 20 bytes per
sample (which shard and entries hold its first score, the output's indptr) and one block, whatever
L and the number of kept entries.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with
from ffcv_data.sparse import ranges
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.pseudo.shards import npz_of, read_manifests, read_shard
from pml_dist.stored_probs import HIST_BINS, StoreRule, entry_blocks

Shards = list[tuple[Path, dict]]  # (manifest path, manifest), by rank
COMPARE_ROWS = 1024  # repeated rows compared per dense block


def merge_shards(run: RunLayout, num_samples: int, num_classes: int, expected_ids: dict | None = None,
                 dup_tolerance: float = 2e-3, store: StoreRule | None = None) -> dict:
    """Verify the shards of `run` and write the merged file to its `pseudo.probs`; returns a summary.
    `expected_ids`: the teacher_id and data_id every shard must carry (none: any, but one); `store`:
    the rule they must have kept by (none: any, but one)."""
    expected_ids = expected_ids or {}
    shards = _checked_manifests(run, expected_ids, store)
    rule = StoreRule(**shards[0][1]["store"])
    arrays = [_checked_arrays(npz_of(m), info, num_samples, num_classes) for m, info in shards]
    first = _first_scores(shards, arrays, num_samples, num_classes, rule, dup_tolerance, run.probs_dir)
    out = run.pseudo.probs
    out.parent.mkdir(parents=True, exist_ok=True)
    save_with(out, lambda tmp: _write(tmp, arrays, first, num_classes, rule))
    entries = int(first.indptr[-1])
    return {**_summary(shards, num_samples, first.duplicates, expected_ids), "entries": entries,
            "entries_per_row": entries / num_samples if num_samples else 0.0, "store": rule.as_dict()}


def _summary(shards: Shards, num_samples: int, duplicates: int, expected_ids: dict) -> dict:
    seconds = [info.get("seconds") for _, info in shards]
    infer_s = max(seconds) if None not in seconds else None  # the slowest rank ends the job
    return {"shards": len(shards), "samples": num_samples, "padding_duplicates": duplicates,
            "world_size": len(shards), **expected_ids, "infer_seconds": infer_s,
            "infer_samples_per_s": num_samples / infer_s if infer_s else None}


# -- the manifests: one complete set of ranks, from one teacher, one data set, one store rule ------

def _checked_manifests(run: RunLayout, expected_ids: dict, store: StoreRule | None) -> Shards:
    folder = run.probs_dir
    shards = read_manifests(run)
    if not shards:
        raise PmlError(f"{folder}: no shard manifests (run `pml-dist infer` on every rank first)")
    world = _one_world_size(folder, shards)
    _every_rank_once(folder, shards, world)
    for key in ("teacher_id", "data_id"):
        _one_input(folder, shards, key, expected_ids.get(key))
    _one_input(folder, shards, "store", store.as_dict() if store else None)
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


_WHAT = {"teacher_id": "teacher", "data_id": "data", "store": "store rule (pseudo.store_min_prob, "
         "pseudo.store_top_k or the taus)"}


def _one_input(folder: Path, shards: Shards, key: str, wanted) -> None:
    """All shards carry one value of `key` (teacher_id, data_id, store), equal to `wanted` when given."""
    values = [info.get(key) for _, info in shards]
    reference = wanted if wanted is not None else values[0]
    odd = [p.name for p, info in shards if info.get(key) != reference]
    if odd:
        raise PmlError(f"{folder}: shard(s) {odd} come from another {_WHAT[key]} ({key} differs"
                       + (f" from the current {wanted})" if wanted is not None else ")"))


def _checked_arrays(npz: Path, info: dict, num_samples: int, num_classes: int) -> dict[str, np.ndarray]:
    a = read_shard(npz, info["checksum"])
    count, entries = info["count"], len(a["values"])
    shapes_ok = (len(a["indices"]) == count and a["indptr"].shape == (count + 1,)
                 and a["classes"].shape == (entries,) and int(a["indptr"][-1]) == entries
                 and a["hist"].shape == (num_classes, HIST_BINS) and a["sums"].shape == (num_classes,)
                 and a["values"].dtype == np.float16 and entries == info.get("entries", entries))
    if not shapes_ok or info.get("num_classes") != num_classes:
        raise PmlError(f"{npz}: holds {len(a['indices'])} rows and {entries} entries of "
                       f"{a['hist'].shape[0]} classes, its manifest says {count} rows and "
                       f"{info.get('entries')} entries of {info.get('num_classes')}; the split has "
                       f"{num_classes} classes")
    if count and (a["indices"].min() < 0 or a["indices"].max() >= num_samples):
        raise PmlError(f"{npz}: indices outside 0..{num_samples - 1}")
    if entries and (a["classes"].min() < 0 or a["classes"].max() >= num_classes):
        raise PmlError(f"{npz}: classes outside 0..{num_classes - 1}")
    return a


# -- which score of each sample is merged: the first, by rank then row; the others must agree -------

class _First:
    """Per sample: the rank whose shard holds its first score, where that row's entries start in
    the shard, how many there are; the output's indptr; the number of later scores (padding)."""

    def __init__(self, num_samples: int):
        self.rank = np.full(num_samples, -1, dtype=np.int32)
        self.start = np.zeros(num_samples, dtype=np.int64)
        self.count = np.zeros(num_samples, dtype=np.int64)
        self.indptr = np.zeros(num_samples + 1, dtype=np.int64)
        self.duplicates = 0


def _first_scores(shards: Shards, arrays: list[dict], num_samples: int, num_classes: int,
                  rule: StoreRule, tolerance: float, folder: Path) -> _First:
    first = _First(num_samples)
    for k, a in enumerate(arrays):
        idx = np.asarray(a["indices"])
        indptr = np.asarray(a["indptr"])
        if np.all(idx[1:] > idx[:-1]):  # strictly increasing, the usual case
            once = np.arange(len(idx))
        else:
            once = np.unique(idx, return_index=True)[1]
        once = once[first.rank[idx[once]] < 0]  # rows whose sample no earlier rank scored
        first.rank[idx[once]] = k
        first.start[idx[once]] = indptr[once]
        first.count[idx[once]] = indptr[once + 1] - indptr[once]
        later = np.setdiff1d(np.arange(len(idx)), once, assume_unique=True)
        for chunk in range(0, len(later), COMPARE_ROWS):
            _check_repeats(shards, arrays, k, later[chunk:chunk + COMPARE_ROWS], first, num_classes,
                           rule, tolerance)
        first.duplicates += len(later)
    missing = np.flatnonzero(first.rank < 0)
    if len(missing):
        raise PmlError(f"{folder}: {len(missing)} of {num_samples} samples are in no shard "
                       f"(first: {missing[:5].tolist()})")
    np.cumsum(first.count, out=first.indptr[1:])
    return first


def _check_repeats(shards: Shards, arrays: list[dict], k: int, rows: np.ndarray, first: _First,
                   num_classes: int, rule: StoreRule, tolerance: float) -> None:
    """Rows `rows` of shard k score samples already merged: each must agree with the merged score."""
    a, idx = arrays[k], np.asarray(arrays[k]["indices"])[rows]
    indptr = np.asarray(a["indptr"])
    mine = _dense(a, indptr[rows], indptr[rows + 1] - indptr[rows], num_classes, rule)
    owners = first.rank[idx]
    diff = np.zeros(len(rows))
    for owner in np.unique(owners):
        at = owners == owner
        theirs = _dense(arrays[owner], first.start[idx[at]], first.count[idx[at]], num_classes, rule)
        diff[at] = _max_diff(mine[0][at], mine[1][at], theirs[0], theirs[1])
    bad = np.flatnonzero(diff > tolerance)
    if len(bad):
        sample, owner = int(idx[bad[0]]), int(owners[bad[0]])
        npz = npz_of(shards[k][0])
        if owner == k:
            raise PmlError(f"{npz}: sample {sample} appears twice with different probabilities")
        raise PmlError(f"{npz} and {npz_of(shards[owner][0])}: sample {sample} scored twice with "
                       f"different probabilities (max difference {diff[bad[0]]:.4g} > {tolerance})")


def _dense(a: dict, starts: np.ndarray, counts: np.ndarray, num_classes: int,
           rule: StoreRule) -> tuple[np.ndarray, np.ndarray]:
    """(values, floor) of a few rows: float32 (m, L), NaN where nothing was kept; and per row the
    floor of what it kept (min_prob, or its smallest kept value where top_k filled the row): a
    probability it did not keep lies below that floor."""
    values = np.full((len(starts), num_classes), np.nan, dtype=np.float32)
    pos = ranges(starts, counts)
    values[np.repeat(np.arange(len(starts)), counts), np.asarray(a["classes"])[pos]] = \
        np.asarray(a["values"])[pos]
    floor = np.full(len(starts), np.float32(np.float16(rule.min_prob)))
    if rule.top_k is not None:
        full = counts >= rule.top_k
        if full.any():
            floor[full] = np.nanmin(values[full], axis=1)
    return values, floor


def _max_diff(a: np.ndarray, fa: np.ndarray, b: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Per row, the least |difference| the two scores can have: where one kept a value v and the
    other did not, the other's lies below its floor, so they differ by at least v - floor."""
    kept_a, kept_b = ~np.isnan(a), ~np.isnan(b)
    diff = np.where(kept_a & kept_b, np.abs(a - b), 0)
    diff = np.maximum(diff, np.where(kept_a & ~kept_b, a - fb[:, None], 0))
    diff = np.maximum(diff, np.where(kept_b & ~kept_a, b - fa[:, None], 0))
    return diff.max(axis=1) if diff.shape[1] else np.zeros(len(a))


# -- the output: small members whole, the entries streamed block by block --------------------------

def _write(tmp: Path, arrays: list[dict], first: _First, num_classes: int, rule: StoreRule) -> None:
    hist = np.zeros((num_classes, HIST_BINS), dtype=np.int64)
    sums = np.zeros(num_classes, dtype=np.float64)
    for a in arrays:
        hist += a["hist"]
        sums += a["sums"]
    small = {"indptr": first.indptr, "num_classes": np.int64(num_classes), "hist": hist, "sums": sums,
             "min_prob": np.float64(rule.min_prob), "top_k": np.int64(rule.top_k or 0)}
    entries = int(first.indptr[-1])
    _write_npz(tmp, small, [
        ("classes", np.dtype(np.int32), entries, lambda: _gathered(arrays, first, "classes", np.int32)),
        ("values", np.dtype(np.float16), entries, lambda: _gathered(arrays, first, "values", np.float16)),
    ])


def _gathered(arrays: list[dict], first: _First, name: str, dtype) -> Iterator[np.ndarray]:
    """The output's `name` entries, block by block, each sample's from the shard holding its first
    score. The rows of one rank in a block are usually consecutive rows of its shard (one region of
    its file, read as a slice), and where every row of the block keeps as many entries (everything
    kept, or top_k full) they are copied row by row, not entry by entry."""
    for lo, hi in entry_blocks(first.indptr):
        base = first.indptr[lo]
        out = np.empty(int(first.indptr[hi] - base), dtype=dtype)
        ranks, counts = first.rank[lo:hi], first.count[lo:hi]
        width = int(counts[0]) if len(counts) and (counts == counts[0]).all() else 0
        for k in np.unique(ranks):
            rows = np.flatnonzero(ranks == k)
            starts, sizes = first.start[rows + lo], counts[rows]
            entries = np.asarray(arrays[k][name])
            if (starts[1:] == starts[:-1] + sizes[:-1]).all():  # consecutive in the shard
                src = entries[starts[0]:starts[-1] + sizes[-1]]
            else:
                src = entries[ranges(starts, sizes)]
            if width:
                out.reshape(-1, width)[rows] = src.reshape(-1, width)
            else:
                out[ranges(first.indptr[rows + lo] - base, sizes)] = src
        yield out


def _write_npz(path: Path, small: dict[str, np.ndarray],
               streamed: list[tuple[str, np.dtype, int, Callable[[], Iterator[np.ndarray]]]]) -> None:
    """An uncompressed .npz, as np.savez writes it (so ffcv_data.prepared.mapped_npz maps it), whose
    `streamed` members (name, dtype, length, blocks) are written block by block."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in small.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        for name, dtype, length, blocks in streamed:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)})
                written = 0
                for block in blocks():
                    f.write(memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B"))
                    written += len(block)
                if written != length:
                    raise RuntimeError(f"{path}: wrote {written} of {length} {name}")
