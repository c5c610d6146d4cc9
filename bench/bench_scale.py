"""Scale: the stages that need no pixels, at OpenImages-size label spaces, sparse against dense.

    .venv/bin/python bench/bench_scale.py [--rows 1000000,3000000,10000000] [--classes 20000]
                                          [--dense-rows 100000] [--dense-budget-gib 8]

A synthetic problem without images: N rows of labels over L classes with a realistic tail (1 +
Poisson(2.1) positives per row, 3.1 on average as in OpenImages' human labels; classes drawn with
probability ~ 1 / (rank + 10)^1.1). Each stage runs in its own process, so its peak RSS is its own
(os.wait4), on the same synthetic rows for both paths:

    prepare-labels         prepare's label path after the reader: the keyed observed draw, the
                           train/val split, and each part's labels file written (prepared.py)
    prepare-labels-dense   the same as the code before sparse storage did it: a dense uint8 N x L
                           matrix, the per-row generator draw, one-hot observed rows, np.savez
    target-lookup          a training batch's B x L targets looked up by index (sparse.DeviceRows),
                           over batches of 256 random rows; per million rows looked up (the median
                           of 5 passes)
    target-lookup-dense    the same from a dense float32 N x L table (targets.py before)

Every stage runs at `--rows` and `--dense-rows` (sizes where the dense path still fits, so the two
are compared side by side); a dense stage is skipped, with a line saying so, where its N x L arrays
exceed `--dense-budget-gib`. One line per stage and size:

    stage NAME rows N classes L: peak RSS X MiB, Y s per million rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEAN_EXTRA = 2.1  # positives per row: 1 + Poisson(2.1)
LOOKUP_ROWS = 1_000_000  # rows looked up per target-lookup pass
LOOKUP_PASSES = 5
BATCH = 256


def synthetic_rows(n: int, num_classes: int, seed: int = 0, chunk: int = 1_000_000):
    """(LabelRows, keys) of the synthetic problem, built a chunk of rows at a time."""
    from ffcv_data.sparse import LabelRows

    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(num_classes) + 10.0) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    chunks = []  # row * L + class keys, ascending chunk by chunk
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk), dtype=np.int64)
        k = 1 + rng.poisson(MEAN_EXTRA, len(rows))
        drawn = np.minimum(np.searchsorted(cdf, rng.random(int(k.sum()))), num_classes - 1)
        chunks.append(np.unique(np.repeat(rows, k) * num_classes + drawn))
    keys = rng.permutation(n * 4)[:n].astype(np.int64)  # ids as a data set has them: unique, unordered
    return LabelRows.from_keys(np.concatenate(chunks), n, num_classes), keys


# ------------------------------------------------------------------------------ the stages

# A stage returns None (timed around it) or its own (seconds, rows) when it times only part of itself.

def prepare_labels(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels, write_split_labels
    from ffcv_data.protocol import draw_observed, split_train_val

    split = read_split_labels(source)
    observed = draw_observed(split.labels, split.keys, 1200)
    train, val = split_train_val(split.keys, 0.2, 1200)
    for name, rows in (("train", train), ("val", val)):
        write_split_labels(out / f"{name}.labels.npz", split.keys[rows], split.labels.take(rows),
                           observed[rows], [f"{k}.jpg" for k in split.keys[rows]])


def prepare_labels_dense(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels
    from ffcv_data.protocol import one_hot, split_train_val

    split = read_split_labels(source)
    dense = split.labels.dense()
    observed = np.empty(len(split), dtype=np.int64)
    for row, key in enumerate(split.keys.tolist()):  # the per-row keyed draw the code had before
        classes = np.flatnonzero(dense[row])
        observed[row] = classes[np.random.default_rng([1200, key]).integers(len(classes))]
    train, val = split_train_val(split.keys, 0.2, 1200)
    for name, rows in (("train", train), ("val", val)):
        np.savez(out / f"{name}.meta.npz", image_ids=split.keys[rows],
                 files=np.asarray([f"{k}.jpg" for k in split.keys[rows]]), labels=dense[rows],
                 observed=one_hot(observed[rows], dense.shape[1]))


def target_lookup(source: Path, out: Path, dense: bool = False) -> tuple[float, int]:
    import torch

    from ffcv_data.prepared import read_split_labels
    from ffcv_data.sparse import DeviceRows

    split = read_split_labels(source)
    if dense:
        table = torch.from_numpy(split.labels.dense().astype(np.float32))

        def lookup(index):
            return table[index]
    else:
        lookup = DeviceRows(split.labels, None, split.num_classes).labels
    rng = np.random.default_rng(0)
    passes = []
    for _ in range(LOOKUP_PASSES):  # the median pass: a CPU's B x L allocations make single passes noisy
        batches = [torch.from_numpy(rng.integers(0, len(split), BATCH)) for _ in range(LOOKUP_ROWS // BATCH)]
        start = time.perf_counter()
        for index in batches:
            lookup(index)
        passes.append(time.perf_counter() - start)
    return float(np.median(passes)), LOOKUP_ROWS


STAGES = {
    "prepare-labels": (prepare_labels, None),
    "prepare-labels-dense": (prepare_labels_dense, 3),  # bytes per cell: dense labels + one-hot + copies
    "target-lookup": (target_lookup, None),
    "target-lookup-dense": (lambda s, o: target_lookup(s, o, dense=True), 5),  # uint8 + float32 table
}


def run_stage(name: str, source: Path, rows: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds per million rows) of one stage in a fresh process; the time is the
    stage's own, measured in that process (not its interpreter's start and imports)."""
    with tempfile.TemporaryDirectory(dir=source.parent) as out:
        proc = subprocess.Popen([sys.executable, __file__, "--one", name, str(source), out])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"bench_scale: stage {name} at {rows} rows failed (status {status})")
        seconds, per = json.loads((Path(out) / "timing.json").read_text())
    return usage.ru_maxrss / 1024, seconds / per * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000000,3000000,10000000")
    p.add_argument("--classes", type=int, default=20000)
    p.add_argument("--dense-rows", default="100000", help="extra sizes where the dense path fits")
    p.add_argument("--dense-budget-gib", type=float, default=8.0)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--json", type=Path, help="also write the lines as JSON here")
    p.add_argument("--one", nargs=3, metavar=("STAGE", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        name, source, out = args.one
        if name.startswith("target-lookup"):
            import torch  # noqa: F401  (imported before the clock starts, as a trainer has it)

        from ffcv_data.prepared import read_split_labels

        rows = len(read_split_labels(Path(source)))
        start = time.perf_counter()
        timing = STAGES[name][0](Path(source), Path(out))
        if timing is None:
            timing = time.perf_counter() - start, rows
        (Path(out) / "timing.json").write_text(json.dumps(timing))
        return

    from ffcv_data.prepared import write_split_labels

    sizes = sorted({int(r) for r in (args.rows + "," + args.dense_rows).split(",") if r})
    wanted = [s for s in args.stages.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as tmp:
        for n in sizes:
            labels, keys = synthetic_rows(n, args.classes)
            source = Path(tmp) / f"source-{n}.labels.npz"
            write_split_labels(source, keys, labels, np.full(n, -1), [""] * n)
            del labels, keys
            for name in wanted:
                cells = STAGES[name][1]
                if cells and n * args.classes * cells > args.dense_budget_gib * 2**30:
                    print(f"stage {name} rows {n} classes {args.classes}: skipped (its dense N x L arrays "
                          f"need ~{n * args.classes * cells / 2**30:.0f} GiB > {args.dense_budget_gib:g})",
                          flush=True)
                    continue
                rss, per_million = run_stage(name, source, n)
                results.append({"stage": name, "rows": n, "classes": args.classes, "peak_rss_mib": rss,
                                "seconds_per_million_rows": per_million})
                print(f"stage {name} rows {n} classes {args.classes}: peak RSS {rss:.0f} MiB, "
                      f"{per_million:.2f} s per million rows", flush=True)
            source.unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
