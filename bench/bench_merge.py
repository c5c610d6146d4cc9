"""Merge speed: 1M x 80 float16 probabilities in 64 shards (padded like DistributedSampler), merged
with every check, against just reading the same shard files with np.load. Goal: under 2x.

    .venv/bin/python bench/bench_merge.py [--samples 1000000] [--classes 80] [--shards 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ffcv_data.loaders import per_rank_order
from pml_dist.layout import RunLayout
from pml_dist.pseudo.merge import merge_shards
from pml_dist.pseudo.shards import npz_of, write_shard

IDS = {"teacher_id": "bench-teacher", "data_id": "bench-data"}


def make_shards(run: RunLayout, n: int, num_classes: int, world: int) -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((n, num_classes), dtype=np.float32).astype(np.float16)
    for rank in range(world):
        idx = per_rank_order(n, 0, 0, rank, world, shuffle=False)
        write_shard(run, rank, world, idx, probs[idx], IDS)


def read_all(run: RunLayout) -> int:
    """The baseline: np.load of every shard's arrays (the bytes any merge has to read)."""
    total = 0
    for manifest in run.shard_manifests():
        with np.load(npz_of(manifest)) as data:
            total += data["indices"].nbytes + data["probs"].nbytes
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunLayout(Path(tmp))
        out = run.pseudo.probs
        make_shards(run, args.samples, args.classes, args.shards)
        read_all(run)  # warm the page cache for both contestants
        load_times, merge_times = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine state
            t0 = time.perf_counter()
            nbytes = read_all(run)
            load_times.append(time.perf_counter() - t0)
            out.unlink(missing_ok=True)  # a first merge, not a replacement (ext4 flushes on those)
            t0 = time.perf_counter()
            summary = merge_shards(run, args.samples, args.classes, IDS)
            merge_times.append(time.perf_counter() - t0)
        assert summary["padding_duplicates"] == (-args.samples) % args.shards
    load, merge = min(load_times), min(merge_times)
    print(f"{args.samples} x {args.classes} float16 in {args.shards} shards ({nbytes / 2**20:.0f} MiB); "
          f"best of {args.repeat}")
    print(f"np.load of the shards  {load:7.3f} s")
    print(f"merge_shards           {merge:7.3f} s   (checks + memory-mapped write)")
    print(f"ratio merge / np.load  {merge / load:7.2f}   (goal < 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
