"""Merge speed: N x L teacher probabilities in W shards (padded like DistributedSampler), kept by a store
rule (default: every probability, what COCO's soft and class-prior targets keep), merged with every check
(coverage, padding duplicates, teacher, data and store rule, every byte's CRC-32), against np.load of
the same shard files. Goal: merge / np.load under 2x, the output a memory-mappable CSR .npz.

Alternating runs after one warm-up of each (page cache warm for all), several repetitions; median
and spread (min-max) of each time and of the paired ratio. Peak RSS (VmHWM) of one run of each in
its own child process.
--large adds 10M x 80 (about 5 GB of shards and as much output on the temporary folder's disk).

    .venv/bin/python bench/bench_merge.py [--samples 1000000] [--classes 80] [--shards 64] [--repeat 5]
                                          [--min-prob 0] [--large] [--large-samples 10000000] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pml_dist.layout import RunLayout
from pml_dist.pseudo.merge import merge_shards
from pml_dist.pseudo.shards import SHARD_ARRAYS, npz_of, write_shard
from pml_dist.stored_probs import ScoreKeeper, StoreRule, read_stored_probs

IDS = {"teacher_id": "bench-teacher", "data_id": "bench-data"}


def probs_of(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Deterministic float16 'probabilities' of samples `indices`: padding repeats agree across shards
    without holding the whole N x L matrix in memory."""
    x = indices.astype(np.uint64)[:, None] * np.uint64(2654435761) + np.arange(num_classes, dtype=np.uint64) \
        * np.uint64(40503)
    return ((x & np.uint64(0xFFFF)).astype(np.float32) / np.float32(65536)).astype(np.float16)


def make_shards(run: RunLayout, n: int, num_classes: int, world: int, rule: StoreRule) -> None:
    """What `pml-dist infer` writes for these scores: each rank's kept probabilities (ScoreKeeper)."""
    import torch  # not in the children measuring RSS

    from ffcv_data.loaders import per_rank_order

    for rank in range(world):
        idx = per_rank_order(n, 0, 0, rank, world, shuffle=False)
        keeper, real = ScoreKeeper(num_classes, rule, "cpu"), len(range(rank, n, world))  # the rest: padding
        for lo in range(0, len(idx), 65536):
            part = idx[lo:lo + 65536]
            keeper.add(torch.from_numpy(probs_of(part, num_classes).astype(np.float32)),
                       max(0, min(len(part), real - lo)))
        write_shard(run, rank, world, idx, keeper.arrays(), num_classes, rule.as_dict(), IDS)


def read_all(run: RunLayout) -> int:
    """The baseline: np.load of every shard's arrays (the bytes any merge has to read)."""
    total = 0
    for manifest in run.shard_manifests():
        with np.load(npz_of(manifest)) as data:
            total += sum(data[k].nbytes for k in SHARD_ARRAYS)
    return total


def merge(run: RunLayout, n: int, num_classes: int) -> dict:
    return merge_shards(run, n, num_classes, IDS)


def timed(fn, before=None) -> float:
    """Seconds of `fn()`; `before()` runs first, untimed (deleting the last output: a first merge, not
    a replacement, which ext4 flushes, and no unlink of a 160 MB file inside the time)."""
    if before is not None:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args) -> int:
    """One run of one contestant in this fresh process; prints its seconds and peak RSS as JSON."""
    run = RunLayout(Path(args.dir))
    fn = {"none": lambda: None, "load": lambda: read_all(run),
          "merge": lambda: merge(run, args.samples, args.classes)}[args.child]
    seconds = timed(fn, lambda: run.pseudo.probs.unlink(missing_ok=True))
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))
    return 0


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM where Linux has it: ru_maxrss survives fork + exec, so in a
    child it would report the parent's peak when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_run(what: str, run: RunLayout, n: int, num_classes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--dir", str(run.root), "--samples", str(n),
           "--classes", str(num_classes)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))}  ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench(n: int, num_classes: int, world: int, repeat: int, rule: StoreRule, tmp: Path) -> list[str]:
    run = RunLayout(tmp / f"run-{n}")
    t0 = time.perf_counter()
    make_shards(run, n, num_classes, world, rule)
    made = time.perf_counter() - t0
    contestants = {"load": (lambda: read_all(run), None),
                   "merge": (lambda: merge(run, n, num_classes),
                             lambda: run.pseudo.probs.unlink(missing_ok=True))}
    for fn, before in contestants.values():  # warm-up: page cache, allocator, first-call costs
        timed(fn, before)
    times: dict[str, list[float]] = {k: [] for k in contestants}
    order = list(contestants)
    for i in range(repeat):  # alternating order, so drift and other load hit every contestant alike
        for key in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(*contestants[key]))
    run.pseudo.probs.unlink()
    summary = merge(run, n, num_classes)
    assert summary["padding_duplicates"] == (-n) % world
    out = read_stored_probs(run.pseudo.probs)  # memory-mapped CSR
    assert isinstance(out.values, np.memmap) and len(out) == n and (out.hist.sum(axis=1) == n).all()
    rows = np.unique(np.linspace(0, n - 1, 1000).astype(np.int64))
    want = probs_of(rows, num_classes)
    assert np.array_equal(out.dense(rows), np.where(want >= np.float16(rule.min_prob), want, 0))
    out_mib, shard_mib = run.pseudo.probs.stat().st_size / 2**20, read_bytes(run) / 2**20
    del out
    run.pseudo.probs.unlink()
    rss = {k: child_run(k, run, n, num_classes) for k in ("none", "load", "merge")}
    ratios = [m / load for m, load in zip(times["merge"], times["load"], strict=True)]
    shutil.rmtree(run.root)
    return [
        f"{n} x {num_classes} kept by {rule.describe()} ({summary['entries_per_row']:.1f} per row) in "
        f"{world} shards: shards {shard_mib:.0f} MiB, output {out_mib:.0f} MiB; shards written in "
        f"{made:.1f} s; {repeat} alternating repetitions after a warm-up, median (min-max)",
        f"  np.load of the shards        {spread(times['load'])} s",
        f"  merge_shards, every check    {spread(times['merge'])} s",
        f"  ratio merge / np.load        {spread(ratios, '{:.2f}')}   (goal < 2)",
        "  output: memory-mapped CSR .npz (read_stored_probs), rows checked",
        f"  peak RSS, one run per child  merge {rss['merge']['peak_rss_mib']:.0f} MiB, np.load "
        f"{rss['load']['peak_rss_mib']:.0f} MiB, python + imports alone "
        f"{rss['none']['peak_rss_mib']:.0f} MiB; child times merge {rss['merge']['seconds']:.3f} s, "
        f"np.load {rss['load']['seconds']:.3f} s (cold processes)",
    ]


def read_bytes(run: RunLayout) -> int:
    return sum(npz_of(m).stat().st_size for m in run.shard_manifests())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--min-prob", type=float, default=0.0, help="store rule: keep p >= this")
    parser.add_argument("--large", action="store_true", help="also 10M x 80 (about 10 GB of disk)")
    parser.add_argument("--large-samples", type=int, default=10_000_000)
    parser.add_argument("--large-repeat", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the shards (default: the system's temp)")
    parser.add_argument("--child", choices=("none", "load", "merge"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        free = shutil.disk_usage(tmp).free
        print(f"merge bench on {len(os.sched_getaffinity(0))} usable cores, load average "
              f"{os.getloadavg()[0]:.2f}, {free / 2**30:.0f} GiB free at {tmp}")
        sizes = [(args.samples, args.repeat)]
        if args.large:
            need = 2 * args.large_samples * (8 + 6 * args.classes)
            if free < 1.2 * need:
                print(f"--large: skipped, needs about {need / 2**30:.1f} GiB free at {tmp}")
            else:
                sizes.append((args.large_samples, args.large_repeat))
        for n, repeat in sizes:
            print("\n".join(bench(n, args.classes, args.shards, repeat, StoreRule(args.min_prob, None),
                                   Path(tmp))))
        if not args.large:
            print(f"({args.large_samples} x {args.classes}: run with --large; left out of the default run "
                  "for time and disk)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; bench wall time "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
