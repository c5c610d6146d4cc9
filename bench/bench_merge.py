"""Merge speed: N x L float16 probabilities in W shards (padded like DistributedSampler), merged with
every check (coverage, padding duplicates, teacher and data ids, checksums), against np.load of the
same shard files; beside them the previous merge (shard by shard into a memory-mapped output, still
the path for shards the block-wise merge does not take) and the sequential write of the output's bytes
alone, the floor of any merge that writes a new file. Goal: merge / np.load under 2x, the output
still a memory-mappable .npy.

Alternating runs after one warm-up of each (page cache warm for all), several repetitions; median
and spread (min-max) of each time and of the paired ratio. Peak RSS (ru_maxrss) of one run of each
in its own child process (VmHWM: the memory-mapped output's pages count as resident, the written
blocks of the streaming merge do not).
--large adds 10M x 80 (1.6 GB of shards + 1.6 GB of output on the temporary folder's disk).

    .venv/bin/python bench/bench_merge.py [--samples 1000000] [--classes 80] [--shards 64] [--repeat 5]
                                          [--large] [--large-samples 10000000] [--tmp DIR]
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
from pml_dist.pseudo import merge as merge_module
from pml_dist.pseudo.merge import merge_shards
from pml_dist.pseudo.shards import npz_of, write_shard

IDS = {"teacher_id": "bench-teacher", "data_id": "bench-data"}


def probs_of(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Deterministic float16 'probabilities' of samples `indices`: padding repeats agree across shards
    without holding the whole N x L matrix in memory."""
    x = indices.astype(np.uint64)[:, None] * np.uint64(2654435761) + np.arange(num_classes, dtype=np.uint64) \
        * np.uint64(40503)
    return ((x & np.uint64(0xFFFF)).astype(np.float32) / np.float32(65536)).astype(np.float16)


def make_shards(run: RunLayout, n: int, num_classes: int, world: int) -> None:
    from ffcv_data.loaders import per_rank_order  # imports torch: not in the children measuring RSS

    for rank in range(world):
        idx = per_rank_order(n, 0, 0, rank, world, shuffle=False)
        write_shard(run, rank, world, idx, probs_of(idx, num_classes), IDS)


def read_all(run: RunLayout) -> int:
    """The baseline: np.load of every shard's arrays (the bytes any merge has to read)."""
    total = 0
    for manifest in run.shard_manifests():
        with np.load(npz_of(manifest)) as data:
            total += data["indices"].nbytes + data["probs"].nbytes
    return total


def write_floor(path: Path, n: int, num_classes: int) -> None:
    """The output's bytes written as the merge writes them (header, reserved blocks, one block
    buffer again and again), without reading or checking anything."""
    block = np.zeros((max(1, merge_module.BLOCK_BYTES // (2 * num_classes)), num_classes), np.float16)
    with open(path, "wb", buffering=0) as f:
        merge_module._header(path, f, n, num_classes)
        for lo in range(0, n, len(block)):
            merge_module._write(f, block[:min(len(block), n - lo)])


def merge(run: RunLayout, n: int, num_classes: int) -> dict:
    return merge_shards(run, n, num_classes, IDS)


def merge_by_shard(run: RunLayout, n: int, num_classes: int) -> dict:
    """The same checks, shard by shard into a memory-mapped output: the merge before the block-wise
    one, still the path for shards that one does not take."""
    plan = merge_module._plan
    merge_module._plan = lambda *args: None
    try:
        return merge_shards(run, n, num_classes, IDS)
    finally:
        merge_module._plan = plan


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
          "merge": lambda: merge(run, args.samples, args.classes),
          "mmap": lambda: merge_by_shard(run, args.samples, args.classes)}[args.child]
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


def bench(n: int, num_classes: int, world: int, repeat: int, tmp: Path) -> list[str]:
    run = RunLayout(tmp / f"run-{n}")
    t0 = time.perf_counter()
    make_shards(run, n, num_classes, world)
    made = time.perf_counter() - t0
    floor_path = tmp / "floor.npy"
    contestants = {"load": (lambda: read_all(run), None),
                   "merge": (lambda: merge(run, n, num_classes),
                             lambda: run.pseudo.probs.unlink(missing_ok=True)),
                   "mmap": (lambda: merge_by_shard(run, n, num_classes),
                            lambda: run.pseudo.probs.unlink(missing_ok=True)),
                   "write": (lambda: write_floor(floor_path, n, num_classes),
                             lambda: floor_path.unlink(missing_ok=True))}
    for fn, before in contestants.values():  # warm-up: page cache, allocator, first-call costs
        timed(fn, before)
    times: dict[str, list[float]] = {k: [] for k in contestants}
    order = list(contestants)
    for i in range(repeat):  # alternating order, so drift and other load hit every contestant alike
        for key in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(*contestants[key]))
    floor_path.unlink()
    run.pseudo.probs.unlink()
    summary = merge(run, n, num_classes)
    assert summary["padding_duplicates"] == (-n) % world
    out = np.load(run.pseudo.probs, mmap_mode="r")  # the output is a memory-mappable .npy
    assert isinstance(out, np.memmap) and out.shape == (n, num_classes) and out.dtype == np.float16
    rows = np.unique(np.linspace(0, n - 1, 1000).astype(np.int64))
    assert np.array_equal(out[rows], probs_of(rows, num_classes))
    offset, nbytes = out.offset, out.nbytes
    del out
    reserve = timed(lambda: _reserve_only(tmp / "reserve.npy", nbytes))
    run.pseudo.probs.unlink()
    rss = {k: child_run(k, run, n, num_classes) for k in ("none", "load", "merge", "mmap")}
    shard_mib = 2 * num_classes * -(-n // world) / 2**20
    ratios = [m / load for m, load in zip(times["merge"], times["load"], strict=True)]
    write_ratios = [w / load for w, load in zip(times["write"], times["load"], strict=True)]
    mmap_ratios = [m / load for m, load in zip(times["mmap"], times["load"], strict=True)]
    shutil.rmtree(run.root)
    return [
        f"{n} x {num_classes} float16 in {world} shards: shards {read_bytes(n, num_classes) / 2**20:.0f} "
        f"MiB, "
        f"output {nbytes / 2**20:.0f} MiB (one shard {shard_mib:.1f} MiB); shards written in {made:.1f} s; "
        f"{repeat} alternating repetitions after a warm-up, median (min-max)",
        f"  np.load of the shards        {spread(times['load'])} s",
        f"  merge_shards, every check    {spread(times['merge'])} s",
        f"  merge into a memory map      {spread(times['mmap'])} s   (the previous merge, same checks)",
        f"  write of the output only     {spread(times['write'])} s   (header, reserve, sequential writes)",
        f"  of which posix_fallocate     {reserve:.3f} s   (timed alone, one run)",
        f"  ratio merge / np.load        {spread(ratios, '{:.2f}')}   (goal < 2)",
        f"  ratio memory map / np.load   {spread(mmap_ratios, '{:.2f}')}",
        f"  ratio write-only / np.load   {spread(write_ratios, '{:.2f}')}",
        f"  output: memory-mappable .npy (np.load mmap_mode='r', data at byte {offset}), rows checked",
        f"  peak RSS, one run per child  merge {rss['merge']['peak_rss_mib']:.0f} MiB, memory map "
        f"{rss['mmap']['peak_rss_mib']:.0f} MiB, np.load "
        f"{rss['load']['peak_rss_mib']:.0f} MiB, python + imports alone "
        f"{rss['none']['peak_rss_mib']:.0f} MiB "
        f"(output {nbytes / 2**20:.0f} MiB); child times merge {rss['merge']['seconds']:.3f} s, "
        f"np.load {rss['load']['seconds']:.3f} s (cold processes)",
    ]


def _reserve_only(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        merge_module._reserve(f, size)
    path.unlink()


def read_bytes(n: int, num_classes: int) -> int:
    return n * (8 + 2 * num_classes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="also 10M x 80 (about 3.3 GB of disk)")
    parser.add_argument("--large-samples", type=int, default=10_000_000)
    parser.add_argument("--large-repeat", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the shards (default: the system's temp)")
    parser.add_argument("--child", choices=("none", "load", "merge", "mmap"), help=argparse.SUPPRESS)
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
            need = 2 * read_bytes(args.large_samples, args.classes)
            if free < 1.2 * need:
                print(f"--large: skipped, needs about {need / 2**30:.1f} GiB free at {tmp}")
            else:
                sizes.append((args.large_samples, args.large_repeat))
        for n, repeat in sizes:
            print("\n".join(bench(n, args.classes, args.shards, repeat, Path(tmp))))
        if not args.large:
            print(f"({args.large_samples} x {args.classes}: run with --large; left out of the default run "
                  "for time and disk)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; bench wall time "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
