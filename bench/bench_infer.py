"""Inference scaling: samples/s of the project's sharded inference at 1 and 2 ranks on the same data.

Each job is `pml-dist infer` started once per rank as the launchers start it (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the ranks are independent, no process group)
on a prepared generated data set with a teacher of seeded random weights (<run>/teacher/best.pt).
Every rank gets the same threads (--threads-per-rank, default 1), so 2 ranks need 2 free cores; 0
gives each rank cores / ranks, as the launchers do (1 rank x 2 threads against 2 ranks x 1 thread).

Two numbers per job: the loop rate, samples / the slowest rank's scoring loop (the `seconds` of its
shard manifest: model forward and data loading, no process start-up), and the wall rate, samples /
the job's wall time from starting the processes to the last exit (Python, torch and FFCV start-up,
loader set-up, the shard write). Jobs alternate after a warm-up of each; median and spread (min-max)
of each rate and of the paired ratios. Writing a shard is timed separately (write_shard, this run's
shard size and a --write-rows x 80 one: half of the merge bench's 1M x 80).

    .venv/bin/python bench/bench_infer.py [--train 2000] [--repeat 3] [--ranks 1,2]
                                          [--threads-per-rank 1] [--batch 128] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pml_dist.layout import RunLayout
from pml_dist.pseudo.shards import write_shard
from pml_dist.stored_probs import ScoreKeeper, StoreRule

GOAL = 1.8


def prepare(tmp: Path, args) -> tuple[Path, list[str], int, int]:
    """A generated data set, prepared, and a teacher with seeded random weights."""
    import torch

    from ffcv_data.synthetic import make_synthetic
    from pml_dist.cli import main
    from pml_dist.training.models import build_model

    root, run = tmp / "data", tmp / "run"
    make_synthetic(root, seed=0, n_train=args.train, n_test=20, image_size=args.max_resolution)
    overrides = [f"run.dir={run}", f"data.root={root}", f"data.image_size={args.image_size}",
                 f"data.max_resolution={args.max_resolution}", "data.jit=false",
                 f"data.loader_workers={args.threads_per_rank}", f"model.width={args.width}",
                 f"infer.batch={args.batch}", f"train.device={args.device}"]
    log = tmp / "prepare.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = main(["prepare", *overrides])
    if code != 0:
        raise SystemExit(f"bench_infer: pml-dist prepare failed:\n{log.read_text()[-3000:]}")
    stats = RunLayout(run).data.stats()
    torch.manual_seed(0)
    model = build_model("small_resnet", stats.num_classes, width=args.width)
    (run / "teacher").mkdir()
    torch.save(model.state_dict(), run / "teacher" / "best.pt")
    return run, overrides, stats.images("train"), stats.num_classes


def job(run: Path, overrides: list[str], world: int, threads: int, port: int) -> dict:
    """One inference job of `world` ranks, from scratch (earlier shards deleted, or they are kept)."""
    layout = RunLayout(run)
    shutil.rmtree(layout.probs_dir, ignore_errors=True)
    logs = run / "bench-logs"
    logs.mkdir(exist_ok=True)
    procs = []
    t0 = time.perf_counter()
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(logs / f"world-{world}-rank-{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "pml_dist", "infer", *overrides], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        tail = (logs / f"world-{world}-rank-{codes.index(next(c for c in codes if c))}.log").read_text()
        raise SystemExit(f"bench_infer: a rank of the {world}-rank job exited {codes}:\n{tail[-3000:]}")
    manifests = [json.loads(p.read_text()) for p in layout.shard_manifests()]
    assert sorted(m["rank"] for m in manifests) == list(range(world)), manifests
    loop = max(m["seconds"] for m in manifests)
    return {"wall": wall, "loop": loop, "rank_rates": [m["count"] / m["seconds"] for m in manifests]}


def shard_write_seconds(tmp: Path, rows: int, num_classes: int, repeat: int = 3) -> float:
    import torch

    rng = np.random.default_rng(0)
    rule = StoreRule(0.0, None)  # every probability kept: the largest shard of this size
    keeper = ScoreKeeper(num_classes, rule, "cpu")
    keeper.add(torch.from_numpy(rng.random((rows, num_classes), dtype=np.float32)), rows)
    scores = keeper.arrays()
    indices = np.arange(rows, dtype=np.int64)
    times = []
    for i in range(repeat):
        run = RunLayout(tmp / f"write-{rows}-{i}")
        t0 = time.perf_counter()
        write_shard(run, 0, 2, indices, scores, num_classes, rule.as_dict(),
                    {"teacher_id": "t", "data_id": "d"}, seconds=0.0)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(run.root)
    return statistics.median(times)


def busy_cores(seconds: float = 1.0) -> float:
    """Cores busy with other work just before the bench starts: /proc/stat over `seconds` (the load
    average lags by minutes); the 1-minute load average where there is no /proc/stat."""
    def times() -> list[int]:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]

    try:
        a = times()
        time.sleep(seconds)
        b = times()
    except (OSError, ValueError):
        return os.getloadavg()[0]
    delta = [y - x for x, y in zip(a, b, strict=True)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return os.cpu_count() * (1 - idle / max(1, sum(delta)))


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="generated training images (80%% scored)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="world sizes to compare, the first is the base")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="0: cores / ranks (the launchers')")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--max-resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-rows", type=int, default=500_000, help="rows of the x 80 shard timed alone")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    worlds = [int(w) for w in args.ranks.split(",")]
    cores = len(os.sched_getaffinity(0))
    busy = busy_cores()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        run, overrides, n, num_classes = prepare(tmp, args)
        setup = time.perf_counter() - t_start
        results: dict[int, list[dict]] = {w: [] for w in worlds}
        for w in worlds:  # warm-up: page cache of the .beton, Python's bytecode caches
            job(run, overrides, w, args.threads_per_rank, 29500 + w)
        for i in range(args.repeat):
            for w in worlds if i % 2 == 0 else worlds[::-1]:
                results[w].append(job(run, overrides, w, args.threads_per_rank, 29500 + w))
        write_small = shard_write_seconds(tmp, -(-n // 2), num_classes)
        write_large = shard_write_seconds(tmp, args.write_rows, 80)
    threads = (f"{args.threads_per_rank} thread(s) per rank" if args.threads_per_rank > 0
               else "cores / ranks threads per rank (the launchers' default)")
    print(f"sharded inference: {n} training samples x {num_classes} classes, small_resnet width "
          f"{args.width}, {args.image_size} px, batch {args.batch}, {args.device}, {threads}; {cores} usable "
          f"cores, {busy:.1f} busy with other work at the start; {args.repeat} alternating repetitions "
          "after a warm-up, median (min-max)")
    print(f"{'ranks':>5}  {'loop samples/s':>22}  {'per-rank loop samples/s':>24}  {'wall s':>18}  "
          f"{'wall samples/s':>20}")
    for w in worlds:
        rs = results[w]
        per_rank = [statistics.fmean(r["rank_rates"]) for r in rs]
        loop, wall = [n / r["loop"] for r in rs], [r["wall"] for r in rs]
        print(f"{w:>5}  {spread(loop, '{:.0f}'):>22}  {spread(per_rank, '{:.0f}'):>24}  "
              f"{spread(wall, '{:.2f}'):>18}  {spread([n / t for t in wall], '{:.0f}'):>20}")
    base = worlds[0]
    for w in worlds[1:]:
        loop = [b["loop"] / r["loop"] for b, r in zip(results[base], results[w], strict=True)]
        wall = [b["wall"] / r["wall"] for b, r in zip(results[base], results[w], strict=True)]
        need = w * max(1, args.threads_per_rank)
        note = (f"goal >= {GOAL}x" if cores >= need else
                f"goal >= {GOAL}x needs {need} cores, this machine has {cores}")
        if cores >= need and busy > cores - need + 0.3:  # others' work, before this bench's own
            note += (f"; but {busy:.1f} of {cores} cores were busy with other work at the start: "
                     f"fewer than the {need} free cores the goal assumes")
        print(f"speed-up {w} ranks / {base}: loop {spread(loop, '{:.2f}')}x ({note}); "
              f"wall, start-up included {spread(wall, '{:.2f}')}x")
    print("start-up, loader set-up and shard write per job (wall - slowest loop), median: "
          + ", ".join(f"{w} rank(s) {statistics.median([r['wall'] - r['loop'] for r in results[w]]):.2f} s"
                      for w in worlds))
    print(f"shard write (write_shard, timed alone, median of 3): {-(-n // 2)} x {num_classes} "
          f"{write_small * 1e3:.1f} ms; {args.write_rows} x 80 {write_large * 1e3:.0f} ms")
    print(f"set-up (generate + prepare + teacher) {setup:.1f} s; bench wall time "
          f"{time.perf_counter() - t_start:.1f} s; load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
