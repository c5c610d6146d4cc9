"""Scale: the stages that need no pixels, at OpenImages-size label spaces, sparse against dense.

    .venv/bin/python bench/bench_scale.py [--rows 1000000,3000000,10000000] [--classes 20000]
                                          [--dense-rows 100000] [--dense-budget-gib 8]
                                          [--eval-rows 10000,30000,100000] [--eval-dense-rows 2000]

A synthetic problem without images: N rows of labels over L classes with a realistic tail (1 +
Poisson(2.1) positives per row, 3.1 on average as in OpenImages' human labels; classes drawn with
probability ~ 1 / (rank + 10)^1.1). Each stage runs in its own process, so its peak RSS is its own
(os.wait4), on the same synthetic rows for both paths:

    read-coco              the COCO reader (ffcv_data/coco.py, streaming) on the rows written as a COCO
                           `instances` JSON (one annotation per label, with a box and an 8-point
                           polygon; 1 GB at 1M rows), the image-file check left out (no images)
    read-coco-dense        the reader before: json.load, pycocotools' index, a label set per image
    prepare-labels         prepare's label path after the reader: the keyed observed draw, the
                           train/val split, and each part's labels file written (prepared.py)
    prepare-labels-dense   the same as the code before sparse storage did it: a dense uint8 N x L
                           matrix, the per-row generator draw, one-hot observed rows, np.savez
    target-lookup          a training batch's B x L targets looked up by index (sparse.DeviceRows),
                           over batches of 256 random rows; per million rows looked up (the median
                           of 5 passes)
    target-lookup-dense    the same from a dense float32 N x L table (targets.py before)
    merge                  a teacher's kept probabilities (the true labels at p in [0.55, 1), 1 + Poisson(1)
                           false ones at p in [0.5, 0.8): `pseudo.store_min_prob` 0.5) in 16 shards padded
                           like DistributedSampler, merged with every check (pseudo/merge.py)
    merge-dense            the same shards into an N x L float16 .npy (the merge before sparse storage)
    pseudo-stats           every target's rule (taus 0.55-0.95, soft, class prior) and their statistics
                           against the full labels, in one blockwise pass (pseudo/labels.py)
    pseudo-stats-dense     the same as before: the N x L probabilities, each target an N x L matrix,
                           precision and recall row block by row block
    pseudo-lookup          a student's batch of targets (rule tau 0.75 on the kept probabilities, looked
                           up by index: training/targets.py), as target-lookup; target-lookup-dense is
                           the dense path of both (a float32 N x L table)

and, on a test split's sizes (`--eval-rows`, `--eval-dense-rows`: the whole split's scores are a
model's N x L output, so these sizes are a test set's, not a training set's), against the same
labels and a model's float32 probabilities (negatives U[0, 0.6), positives U[0.3, 1), in 1/4096 steps):

    evaluate               the evaluation reduction on one rank (training/evaluate.py with W = 1, the
                           worst case: W ranks hold N/W rows each): the positives' (class, score), the
                           negatives at or above each (metrics.negatives_at_or_above, a block of
                           classes at a time), AP from the counts; the scores' 4 bytes a cell count
    evaluate-dense         the same mAP as before: the gathered split, metrics.mean_average_precision
                           (float64 sorts and cumulative sums); where both run, the two mAPs must agree
    bootstrap              the report's interval of one model's mAP (pipeline/intervals.py), 100
                           resamples (the report draws 1000: 10x the time), on the float16 test logits
                           memory-mapped (their pages count) and sparse labels
    bootstrap-dense        the same code fed the inputs as before: a float64 (N, L) copy of the scores
                           and dense labels

Every other stage runs at `--rows` and `--dense-rows` (sizes where the dense path still fits, so the
two are compared side by side); a dense stage is skipped, with a line saying so, where its N x L arrays
exceed `--dense-budget-gib`. One line per stage and size:

    stage NAME rows N classes L: peak RSS X MiB, Y s per million rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
SHARDS = 16
IDS = {"teacher_id": "bench-teacher", "data_id": "bench-data"}
TAUS = [0.55, 0.65, 0.75, 0.85, 0.95]
BOOTSTRAP_RESAMPLES = 100  # the report draws 1000: its time is 10x this stage's


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

def write_coco_json(source: Path, chunk: int = 200_000) -> None:
    """The synthetic rows as a COCO-format `instances_train.json` beside `source` (coco_root), one
    annotation per label with a box and an 8-point polygon, as COCO's own files have; written a
    chunk of records at a time."""
    from ffcv_data.prepared import read_split_labels

    split = read_split_labels(source)
    path = coco_root(source) / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys, rows, classes = split.keys, split.labels.row_of_each_class(), np.asarray(split.labels.classes)
    polygon = "[[10.0,10.0,60.5,10.0,60.5,40.25,35.0,50.0,10.0,40.25]]"
    with open(path, "w") as f:
        f.write('{"info":{"description":"bench_scale"},"licenses":[],"images":[')
        for start in range(0, len(keys), chunk):
            f.write("," if start else "")
            f.write(",".join(f'{{"id":{k},"file_name":"{k:012d}.jpg","width":640,"height":480}}'
                             for k in keys[start:start + chunk].tolist()))
        f.write('],"annotations":[')
        for start in range(0, len(rows), chunk):
            f.write("," if start else "")
            f.write(",".join(
                f'{{"id":{start + i},"image_id":{k},"category_id":{c + 1},"iscrowd":0,"area":1250.5,'
                f'"bbox":[10.0,10.0,50.5,40.0],"segmentation":{polygon}}}'
                for i, (k, c) in enumerate(zip(keys[rows[start:start + chunk]].tolist(),
                                               classes[start:start + chunk].tolist(), strict=True))))
        f.write('],"categories":[')
        f.write(",".join(f'{{"id":{c + 1},"name":"class-{c}","supercategory":"bench"}}'
                         for c in range(split.num_classes)))
        f.write("]}")


def coco_root(source: Path) -> Path:
    return source.with_name(source.name.removesuffix(".labels.npz") + "-coco")


def read_coco(source: Path, out: Path) -> None:
    from ffcv_data import coco

    coco.check_images_exist = lambda split: None  # no images: the bench measures the labels
    coco.read_split(coco_root(source), "train")


def read_coco_dense(source: Path, out: Path) -> None:
    """The reader before it streamed: the whole JSON loaded, pycocotools' index, a label set per
    image (its record checks, which cost more again, left out)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with open(coco_root(source) / "annotations" / "instances_train.json") as f:
        dataset = json.load(f)
    index = COCO()
    index.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        index.createIndex()
    column = {c: i for i, c in enumerate(sorted(index.getCatIds()))}
    [sorted({column[a["category_id"]] for a in index.imgToAnns[i]}) for i in sorted(index.getImgIds())]


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
    return _timed_lookups(lookup, len(split))


def _timed_lookups(lookup, n: int) -> tuple[float, int]:
    import torch

    rng = np.random.default_rng(0)
    passes = []
    for _ in range(LOOKUP_PASSES):  # the median pass: a CPU's B x L allocations make single passes noisy
        batches = [torch.from_numpy(rng.integers(0, n, BATCH)) for _ in range(LOOKUP_ROWS // BATCH)]
        start = time.perf_counter()
        for index in batches:
            lookup(index)
        passes.append(time.perf_counter() - start)
    return float(np.median(passes)), LOOKUP_ROWS


def synthetic_teacher(labels, seed: int = 1, chunk: int = 1_000_000):
    """(LabelRows of kept classes, float16 values) of a teacher over `labels`: each true label at p in
    [0.55, 1), 1 + Poisson(1) false ones per row (the classes' frequencies) at p in [0.5, 0.8)."""
    from ffcv_data.sparse import LabelRows

    n, num_classes = len(labels), labels.num_classes
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.bincount(labels.classes, minlength=num_classes) + 1.0)
    cdf /= cdf[-1]
    keys, values = [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = labels.take(np.arange(start, stop))
        true = (part.row_of_each_class() + start) * num_classes + part.classes
        k = 1 + rng.poisson(1.0, stop - start)
        drawn = np.minimum(np.searchsorted(cdf, rng.random(int(k.sum()))), num_classes - 1)
        false = np.repeat(np.arange(start, stop), k) * num_classes + drawn
        both = np.unique(np.concatenate([true, false]))
        is_true = np.isin(both, true, assume_unique=True)
        u = rng.random(len(both))
        keys.append(both)
        values.append(np.where(is_true, 0.55 + 0.45 * u, 0.5 + 0.3 * u).astype(np.float16))
    return LabelRows.from_keys(np.concatenate(keys), n, num_classes), np.concatenate(values)


def write_teacher_shards(run_root: Path, labels) -> None:
    """What `pml-dist infer` would write for `synthetic_teacher` on SHARDS ranks (store rule p >= 0.5)."""
    from ffcv_data.loaders import per_rank_order
    from pml_dist.layout import RunLayout
    from pml_dist.pseudo.shards import write_shard
    from pml_dist.stored_probs import HIST_BINS, StoreRule, entry_positions, float16_bins

    kept, values = synthetic_teacher(labels)
    n, num_classes = len(labels), labels.num_classes
    run = RunLayout(run_root)
    for rank in range(SHARDS):
        idx = per_rank_order(n, 0, 0, rank, SHARDS, shuffle=False)
        part, vals = kept.take(idx), values[entry_positions(kept.indptr, idx)]
        real = len(range(rank, n, SHARDS))  # the rest is padding: out of the histograms
        real_part = part.take(np.arange(real))
        real_vals = vals[:real_part.indptr[-1]]
        hist = np.bincount(real_part.classes.astype(np.int64) * HIST_BINS + float16_bins(real_vals),
                           minlength=num_classes * HIST_BINS).reshape(num_classes, HIST_BINS)
        unkept = real - hist.sum(axis=1)
        hist[:, 10] += unkept  # the other rows' p: 0.1
        sums = np.bincount(real_part.classes, real_vals.astype(np.float64), minlength=num_classes)
        sums += 0.1 * unkept
        scores = {"indptr": part.indptr, "classes": part.classes, "values": vals, "hist": hist, "sums": sums}
        write_shard(run, rank, SHARDS, idx, scores, num_classes, StoreRule(0.5, None).as_dict(), IDS)


def teacher_of(source: Path) -> Path:
    """The synthetic teacher's run directory beside a source labels file."""
    return source.with_name(source.name.replace(".labels.npz", "-teacher"))


def merge(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels
    from pml_dist.layout import RunLayout
    from pml_dist.pseudo.merge import merge_shards

    split = read_split_labels(source)
    merge_shards(RunLayout(teacher_of(source)), len(split), split.num_classes, IDS)


def merge_dense(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels
    from pml_dist.layout import RunLayout
    from pml_dist.pseudo.shards import npz_of, read_manifests, read_shard
    from pml_dist.stored_probs import entry_positions

    split = read_split_labels(source)
    matrix = np.lib.format.open_memmap(out / "probs.npy", mode="w+", dtype=np.float16,
                                       shape=(len(split), split.num_classes))
    for manifest, info in read_manifests(RunLayout(teacher_of(source))):
        a = read_shard(npz_of(manifest), info["checksum"])
        indptr = np.asarray(a["indptr"])
        for lo in range(0, len(indptr) - 1, 65536):  # rows of one shard, densified a block at a time
            rows = np.arange(lo, min(len(indptr) - 1, lo + 65536))
            block = np.zeros((len(rows), split.num_classes), np.float16)
            counts = indptr[rows + 1] - indptr[rows]
            pos = entry_positions(indptr, rows)
            block[np.repeat(np.arange(len(rows)), counts), np.asarray(a["classes"])[pos]] = np.asarray(
                a["values"])[pos]
            matrix[np.asarray(a["indices"])[rows]] = block
    matrix.flush()


def _merged(source: Path):
    from pml_dist.layout import RunLayout
    from pml_dist.stored_probs import read_stored_probs

    return read_stored_probs(RunLayout(teacher_of(source)).pseudo.probs)


def pseudo_stats(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels
    from pml_dist.pseudo.labels import statistics, targets_of

    split, stored = read_split_labels(source), _merged(source)
    observed = np.asarray(split.observed, np.int64)
    targets = targets_of(stored, observed, TAUS, ["hard", "soft", "class_prior"], 2.9)
    statistics(stored, observed, targets, split.labels)


def pseudo_stats_dense(source: Path, out: Path) -> None:
    from ffcv_data.prepared import read_split_labels

    split = read_split_labels(source)
    probs = _merged(source).dense()
    observed = np.asarray(split.observed, np.int64)
    rows = np.flatnonzero(observed >= 0)
    for tau in TAUS:  # each hard target an N x L matrix, its statistics row block by row block
        labels = (probs > tau).astype(np.uint8)
        labels[rows, observed[rows]] = 1
        tp, pred = np.zeros(split.num_classes), np.zeros(split.num_classes)
        for lo in range(0, len(labels), 16384):
            t = labels[lo:lo + 16384].astype(np.float64)
            pred += t.sum(axis=0)
            tp += (t * split.labels.dense(np.arange(lo, min(len(labels), lo + 16384)))).sum(axis=0)
        del labels


def pseudo_lookup(source: Path, out: Path) -> tuple[float, int]:
    from ffcv_data.sparse import DeviceRows
    from pml_dist.training.targets import Target

    stored = _merged(source)
    table = DeviceRows(stored.rows, None, stored.num_classes, values=stored.values)
    rule = Target("tau-0.75", "hard", 0.75).on()
    return _timed_lookups(lambda index: table.labels(index, rule), len(stored))


def synthetic_scores(labels, out: np.ndarray, seed: int = 2, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """A model's probabilities (N, L) for `labels`, into `out` (float32, or a float16 memory map):
    negatives at U[0, 0.6), positives at U[0.3, 1) (so the classes' APs spread), rounded to 1/4096
    (ties, as a sigmoid's outputs have); built a block of rows at a time, the same for every stage."""
    n, num_classes = len(labels), labels.num_classes
    chunk = max(1, chunk_bytes // (4 * num_classes))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rng = np.random.default_rng([seed, start])
        block = rng.random((stop - start, num_classes), dtype=np.float32) * 0.6
        part = labels.take(np.arange(start, stop))
        rows, classes = part.row_of_each_class(), part.classes
        block[rows, classes] = 0.3 + 0.7 * rng.random(len(rows), dtype=np.float32)
        np.round(block * 4096, out=block)
        out[start:stop] = block / 4096
    return out


def evaluate(source: Path, out: Path, dense: bool = False) -> tuple[float, int]:
    """A rank's share of the evaluation reduction (training/evaluate.py with one rank: the worst
    case; W ranks hold N/W rows each): the positives' (class, score), the negatives at or above each,
    AP from the counts. The scores are the model's output (not timed, but their memory counts)."""
    from ffcv_data.prepared import read_split_labels
    from pml_dist.training import metrics

    labels = read_split_labels(source).labels
    scores = synthetic_scores(labels, np.empty((len(labels), labels.num_classes), np.float32))
    start = time.perf_counter()
    if dense:  # before issue 28: every rank gathers the whole split, float64 sort and cumsum
        result = metrics.mean_average_precision(scores, labels.dense())
    else:
        cells = labels.row_of_each_class(), np.asarray(labels.classes, np.int64)
        values = scores[cells]
        negatives, _ = metrics.negatives_at_or_above(scores, cells, cells[1], values)
        result = metrics.summary(metrics.average_precision_from_counts(cells[1], values, negatives,
                                                                       labels.num_classes))
    seconds = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps({"map": result["map"]}))
    return seconds, len(labels)


def bootstrap(source: Path, out: Path, dense: bool = False) -> tuple[float, int]:
    """The report's interval of one model's test mAP (pipeline/intervals.py, BOOTSTRAP_RESAMPLES
    resamples): the test logits memory-mapped from the float16 file the test stage writes, the
    labels sparse; dense: a float64 (N, L) copy of the scores and dense labels, as before."""
    from ffcv_data.prepared import read_split_labels
    from pml_dist.pipeline import intervals

    labels = read_split_labels(source).labels
    path = out / "test_logits.npy"
    shape = (len(labels), labels.num_classes)
    synthetic_scores(labels, np.lib.format.open_memmap(path, "w+", np.float16, shape))
    scores = np.load(path, mmap_mode="r")
    start = time.perf_counter()
    if dense:
        result = intervals.mean_ap_interval(np.asarray(scores, np.float64), labels.dense(),
                                            resamples=BOOTSTRAP_RESAMPLES)
    else:
        result = intervals.mean_ap_interval(scores, labels, resamples=BOOTSTRAP_RESAMPLES)
    seconds = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps({"map": result["map"]}))
    return seconds, len(labels)


STAGES = {
    "read-coco": (read_coco, None),
    "read-coco-dense": (read_coco_dense, 0.4),  # Python objects: ~7 kB an image, 0.4 B per cell at 20k
    "prepare-labels": (prepare_labels, None),
    "prepare-labels-dense": (prepare_labels_dense, 3),  # bytes per cell: dense labels + one-hot + copies
    "target-lookup": (target_lookup, None),
    "target-lookup-dense": (lambda s, o: target_lookup(s, o, dense=True), 5),  # uint8 + float32 table
    "merge": (merge, None),
    "merge-dense": (merge_dense, 2),  # the float16 output (memory-mapped: its pages count)
    "pseudo-stats": (pseudo_stats, None),
    "pseudo-stats-dense": (pseudo_stats_dense, 3),  # float16 probabilities + a uint8 target
    "pseudo-lookup": (pseudo_lookup, None),
    # on a test split's sizes (--eval-rows)
    "evaluate": (evaluate, None),
    "evaluate-dense": (lambda s, o: evaluate(s, o, dense=True), 90),  # float64 sorts, cumsums, copies
    "bootstrap": (bootstrap, None),
    "bootstrap-dense": (lambda s, o: bootstrap(s, o, dense=True), 9),  # float64 scores + uint8 labels
}
EVAL_STAGES = ("evaluate", "evaluate-dense", "bootstrap", "bootstrap-dense")


def run_stage(name: str, source: Path, rows: int) -> tuple[float, float, dict | None]:
    """(peak RSS in MiB, seconds per million rows, the stage's result.json if it wrote one) of one
    stage in a fresh process; the time is the stage's own, measured in that process (not its
    interpreter's start and imports)."""
    with tempfile.TemporaryDirectory(dir=source.parent) as out:
        proc = subprocess.Popen([sys.executable, __file__, "--one", name, str(source), out])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"bench_scale: stage {name} at {rows} rows failed (status {status})")
        seconds, per = json.loads((Path(out) / "timing.json").read_text())
        result = Path(out) / "result.json"
        result = json.loads(result.read_text()) if result.exists() else None
    return usage.ru_maxrss / 1024, seconds / per * 1e6, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000000,3000000,10000000")
    p.add_argument("--classes", type=int, default=20000)
    p.add_argument("--dense-rows", default="100000", help="extra sizes where the dense path fits")
    p.add_argument("--eval-rows", default="10000,30000,100000",
                   help="test-split sizes for the evaluation and bootstrap stages")
    p.add_argument("--eval-dense-rows", default="2000",
                   help="extra test-split sizes where the dense path fits")
    p.add_argument("--dense-budget-gib", type=float, default=8.0)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--json", type=Path, help="also write the lines as JSON here")
    p.add_argument("--one", nargs=3, metavar=("STAGE", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--teacher", nargs=2, metavar=("SOURCE", "MERGE"), help=argparse.SUPPRESS)
    p.add_argument("--coco", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.coco:
        write_coco_json(args.coco)
        return
    if args.teacher:
        from ffcv_data.prepared import read_split_labels

        source = Path(args.teacher[0])
        write_teacher_shards(teacher_of(source), read_split_labels(source).labels)
        if args.teacher[1]:  # the pseudo stages read the merged file
            merge(source, source.parent)
        return
    if args.one:
        name, source, out = args.one
        if "lookup" in name or name.startswith("pseudo"):
            import torch  # noqa: F401  (imported before the clock starts, as a trainer or merge has it)

        from ffcv_data.prepared import read_split_labels

        rows = len(read_split_labels(Path(source)))
        start = time.perf_counter()
        timing = STAGES[name][0](Path(source), Path(out))
        if timing is None:
            timing = time.perf_counter() - start, rows
        (Path(out) / "timing.json").write_text(json.dumps(timing))
        return

    from ffcv_data.prepared import write_split_labels
    from ffcv_data.protocol import draw_observed

    def sizes(*lists: str) -> list[int]:
        return sorted({int(r) for r in ",".join(lists).split(",") if r})

    chosen = [s for s in args.stages.split(",") if s]
    plan = {}  # rows -> the stages run at that size
    for n in sizes(args.rows, args.dense_rows):
        plan.setdefault(n, []).extend(s for s in chosen if s not in EVAL_STAGES)
    for n in sizes(args.eval_rows, args.eval_dense_rows):
        plan.setdefault(n, []).extend(s for s in chosen if s in EVAL_STAGES)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as tmp:
        for n, wanted in sorted(plan.items()):
            if not wanted:
                continue
            labels, keys = synthetic_rows(n, args.classes)
            source = Path(tmp) / f"source-{n}.labels.npz"
            write_split_labels(source, keys, labels, draw_observed(labels, keys, 1200), [""] * n)
            del labels, keys
            if any(w.startswith("read-coco") for w in wanted):
                subprocess.run([sys.executable, __file__, "--coco", str(source)], check=True)
            if any(w.startswith(("merge", "pseudo")) for w in wanted):
                # in a child: this process's peak RSS would count as every later child's (ru_maxrss
                # survives fork + exec), and the teacher's arrays are large
                subprocess.run([sys.executable, __file__, "--teacher", str(source),
                                "merge" if "merge" not in wanted else ""], check=True)
            for name in wanted:
                cells = STAGES[name][1]
                if cells and n * args.classes * cells > args.dense_budget_gib * 2**30:
                    print(f"stage {name} rows {n} classes {args.classes}: skipped (its dense N x L arrays "
                          f"need ~{n * args.classes * cells / 2**30:.0f} GiB > {args.dense_budget_gib:g})",
                          flush=True)
                    continue
                rss, per_million, result = run_stage(name, source, n)
                results.append({"stage": name, "rows": n, "classes": args.classes, "peak_rss_mib": rss,
                                "seconds_per_million_rows": per_million, "result": result})
                print(f"stage {name} rows {n} classes {args.classes}: peak RSS {rss:.0f} MiB, "
                      f"{per_million:.2f} s per million rows", flush=True)
                _compare(results[-1], results)
            source.unlink()
            shutil.rmtree(teacher_of(source), ignore_errors=True)
            shutil.rmtree(coco_root(source), ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _compare(new: dict, results: list[dict]) -> None:
    """Where a stage and its dense path both ran at one size, say whether their mAPs agree; exactly
    for evaluate (the same counts, in another order: 1e-9 points), 1e-6 points for the bootstrap's
    point estimate."""
    base = new["stage"].removesuffix("-dense")
    pair = [r for r in results if r["rows"] == new["rows"] and r["stage"] in (base, base + "-dense")]
    if new["result"] is None or len(pair) != 2:
        return
    a, b = (r["result"]["map"] for r in pair)
    same = abs(a - b) <= (1e-9 if base == "evaluate" else 1e-6)
    print(f"check {base} rows {new['rows']} classes {new['classes']}: mAP {a:.10f} sparse, {b:.10f} dense: "
          f"{'equal' if same else 'DIFFERENT'}", flush=True)
    if not same:
        raise SystemExit(f"bench_scale: {base} and {base}-dense disagree at {new['rows']} rows")


if __name__ == "__main__":
    main()
