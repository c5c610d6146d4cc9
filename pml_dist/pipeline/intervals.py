"""Paired bootstrap confidence intervals for test mAP and for differences in test mAP between models.

Two models scored on the same test images are compared on those images: a resample draws N test images
with replacement (an image may appear several times, others not at all) and the SAME draw is used for
both models. That is the pairing: an image that is hard for one model is usually hard for the other, so
the image-to-image variation that both models share largely cancels in their difference, and the
interval of the difference is much narrower than what two independent intervals would suggest. What
remains is the uncertainty of "a beats b" that comes from having this finite test set.

With S training seeds per model (scores (S, N, L)), model a's seed s is paired with model b's seed s
(they share the seed's data order and initialisation), and a resample also draws S seeds with
replacement, each scored on the same image draw. The interval then covers both sources of chance, the
test images and the training run; a single seed can only speak for the test images.

The metric is exactly pml_dist.training.metrics: sklearn's average_precision_score per class (tied
scores form one threshold), mAP in percent over the classes with at least one positive. In a resample
that set is the classes with a positive among the drawn images (a class whose positives were all left
out has no AP there, as on a test set without them). The interval of a difference is the percentile
interval of the resampled differences; its point estimate is the difference on the full test set.

One model's mAP (mean_ap_interval) uses the same resamples but centres them on its estimate: low and
high are map + (the level's lower and upper percentiles - the median of the resampled mAPs), the
percentile interval's width and skew moved so that its median is the full-set mAP, which it therefore
always contains. Why: resampling by itself raises a model's mAP. A resample holds about 63% of the
distinct images, some of them several times; a positive drawn k times ties with itself, so the precision
at its threshold counts all k copies (one positive with r - 1 negatives above it: AP k / (k + the drawn
negatives above) instead of 1 / r), and a rare class whose positives were all left out drops out of the
mean. With classes of 1-3 positives (COCO's 80 classes on 80 test images) the resampled mAPs lie about
two of their standard deviations above the full-set mAP, and the percentile interval often wholly above
its own estimate ("10.83 [11.29, 16.18]"); on the demo's 3000 images their median is 0.25-0.31 above it.
That shift comes from the resampling, not from the test set (which holds no image twice), so it is taken
out. The bias-corrected (BC, BCa) and basic intervals do not repair it: like the percentile interval
they contain the estimate exactly when it lies within the central `level` of the resampled values (|z0|
<= z_(alpha/2)), and where it does not they put the interval wholly below it (BC then reads percentiles
too far out for 1000 resamples; BCa's jackknife would also cost N more weighted passes over the scores).
Simulated (the generative model of tests/pml_dist/pipeline/test_intervals.py, 2000 test sets of 300
images, 1000 resamples each) the centred interval covers the population mAP 95.0% of the time
(percentile 94.6%, BC 94.8%, basic 94.3%). With 1-3 positives per class the full-set mAP itself lies
above the mAP of an unlimited test set, by more than the interval is wide (a class's AP over so few
positives overstates it: +10.7 mAP for 80 images of 80 weak classes); no interval from these resamples
covers that. What the centred interval covers there is the mean mAP of test sets of this size: 95.8% of
2000 (the percentile interval 42.8%, and it held its own estimate in 26.2%).

A difference keeps the plain percentile interval: the two models gain about equally from the duplicates
and the shift cancels (the resampled differences' median is 0.05 below the estimate, of a 2.5 standard
deviation, on that generative model; the interval covers the population difference 94.9% of 2000 times,
missing 2.6% below and 2.5% above).

How it is fast (the report makes tens of comparisons, 1000 resamples each, on a few CPU cores): a
resample is a vector of multiplicities w (N,) (how often each image was drawn), not a new array of
images. For each class the scores are sorted once and the tie groups found once. AP only changes at the
thresholds that hold a positive, so what a resample needs, per class and per such threshold t, is the
weighted count of drawn images with score >= t and the weighted count of drawn positives with score >= t:
differences of one cumulative sum of w gathered in the presorted order, read at precomputed positions
(the ends of the tie groups). That runs on a block of resamples at once (a resamples x images array), for
a block of classes together, in integer arithmetic (exact counts). A model's resampled mAPs are memoised,
so a model compared with several others is computed once.

Memory: one block of classes at a time (_CLASS_BLOCK_BYTES of float64 scores), so the scores may be a
memory-mapped float16 file (a test set x 20k classes) and the labels sparse rows (ffcv_data.sparse's
LabelRows); the per-class APs of a resample are summed block by block. Cost per model: one sort of
each class's scores, then per resample a pass over every class's sorted prefix down to its lowest
positive (about N x L x 1000 integer additions at most; the report measures it, `pipeline/report.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ffcv_data.sparse import LabelRows
from pml_dist.training.metrics import average_precision

# Resamples are drawn in chunks of this many; fixed so that the draws depend only on (N, resamples, seed)
# and not on how many resamples the memory budget lets a block compute at once.
_DRAW_CHUNK = 100
# The working arrays of one block of resamples stay under about this many bytes (peak well under 1 GB).
_BLOCK_BYTES = 32 * 2**20
# The float64 scores of one block of classes stay under about this many bytes.
_CLASS_BLOCK_BYTES = 64 * 2**20
# resampled_map's memo: a row is `resamples` floats (8 kB for 1000); the oldest entries go first.
_MEMO: dict[tuple, np.ndarray] = {}
_MEMO_ENTRIES = 512


def verdict(low: float, high: float) -> str:
    """Does a beat b? "yes" when the whole interval of mAP(a) - mAP(b) is above 0, "no" when it is below."""
    if low > 0:
        return "yes"
    if high < 0:
        return "no"
    return "not resolved"


def paired_difference(a, b, labels, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """mAP(a) - mAP(b) in percent on the same test images, with its paired bootstrap interval.

    a, b: probabilities (N, L) of one training seed or (S, N, L) of S seeds, the images in the order
    of `labels` (N, L) 0/1; seed s of a is paired with seed s of b.
    Returns {"diff", "low", "high", "level", "resamples", "images", "seeds", "verdict"}; diff is the
    mean over seeds of the per-seed differences on the full test set.
    """
    a, b = _stacked(a, labels, "a"), _stacked(b, labels, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got a {a.shape} and b {b.shape}")
    _check_options(resamples, level)
    seeds, images = a.shape[0], a.shape[1]
    diff = float(np.mean([_full_map(a[s], labels) - _full_map(b[s], labels) for s in range(seeds)]))
    # the same image draws for both models (and every seed)
    maps = np.concatenate([_resampled(a, labels, resamples, seed), _resampled(b, labels, resamples, seed)])
    low, high = _percentile_interval(_seed_means(maps[:seeds] - maps[seeds:], resamples, seed), level)
    return {"diff": diff, "low": low, "high": high, "level": level, "resamples": resamples,
            "images": images, "seeds": seeds, "verdict": verdict(low, high)}


def mean_ap_interval(a, labels, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """One model's test mAP in percent (mean over seeds) with its bootstrap interval.

    The same resampling as paired_difference (with the same seed, the same image and seed draws); the
    interval is the percentile interval of the resampled mAPs centred on the full-set mAP (their median
    moved onto it: see the module docstring), so it always contains "map".
    Returns {"map", "low", "high", "level", "resamples", "images", "seeds", "method"}.
    """
    a = _stacked(a, labels, "a")
    _check_options(resamples, level)
    seeds, images = a.shape[0], a.shape[1]
    value = float(np.mean([_full_map(a[s], labels) for s in range(seeds)]))
    maps = _resampled(a, labels, resamples, seed)
    low, high = _centred_percentile_interval(_seed_means(maps, resamples, seed), value, level)
    return {"map": value, "low": low, "high": high, "level": level, "resamples": resamples,
            "images": images, "seeds": seeds, "method": "centred percentile"}


def resampled_map(scores, labels, *, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """mAP in percent of each score matrix (M, N, L) (or one (N, L)) in each image resample: (M, resamples).

    The image draws depend only on (N, resamples, seed), so calls with the same seed are paired. The
    rows are memoised by content: the report compares each model with several others, and a model's
    row is computed once. NaN in a resample where no class has a positive. labels: (N, L) 0/1 or
    LabelRows; scores may be memory-mapped (read a block of classes at a time).
    """
    scores = _stacked(scores, labels, "scores")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    return _resampled(scores, labels, resamples, seed)


def _resampled(scores: np.ndarray, labels, resamples: int, seed: int) -> np.ndarray:
    """resampled_map of scores already checked by _stacked (S, N, L)."""
    weights = None
    rows = []
    for x in scores:
        key = _key(x, labels, resamples, seed)
        row = _MEMO.get(key)
        if row is None:
            if weights is None:
                weights = _image_draws(x.shape[0], resamples, seed)
            total, scored = np.zeros(resamples), np.zeros(resamples, dtype=np.int64)
            for block, y in _class_blocks(x, labels):  # per-class APs summed block by block
                ap = _weighted_ap(_Layout.of(block, y), weights)
                total += np.where(np.isnan(ap), 0.0, ap).sum(axis=1)
                scored += (~np.isnan(ap)).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                row = 100.0 * total / np.where(scored > 0, scored, np.nan)
            row.flags.writeable = False
            _MEMO[key] = row
            while len(_MEMO) > _MEMO_ENTRIES:
                _MEMO.pop(next(iter(_MEMO)))
        rows.append(row)
    return np.stack(rows)


def _class_blocks(x: np.ndarray, labels):
    """(float64 scores (N, B), 0/1 labels (N, B)) of consecutive blocks of classes."""
    n, num_classes = x.shape
    width = max(1, _CLASS_BLOCK_BYTES // (8 * max(1, n)))
    for c0 in range(0, num_classes, width):
        c1 = min(num_classes, c0 + width)
        yield np.asarray(x[:, c0:c1], dtype=np.float64), _label_block(labels, c0, c1)


def _label_block(labels, c0: int, c1: int) -> np.ndarray:
    """Columns c0..c1-1 of the labels as a dense uint8 (N, c1 - c0) block."""
    if not isinstance(labels, LabelRows):
        return np.asarray(labels[:, c0:c1])
    classes = np.asarray(labels.classes)
    inside = (classes >= c0) & (classes < c1)
    out = np.zeros((len(labels), c1 - c0), dtype=np.uint8)
    out[labels.row_of_each_class()[inside], classes[inside] - c0] = 1
    return out


def weighted_average_precision(scores, labels, weights) -> np.ndarray:
    """AP per class of `scores` (N, L) when image i counts weights[i] times (weights (N,) or (R, N) of
    non-negative integers): (L,) or (R, L), NaN for a class without a positive of nonzero weight.

    Equal to metrics.average_precision on the images repeated by their weights (np.repeat).
    """
    scores, labels = _stacked(scores, labels, "scores"), _label_block(labels, 0, _shape(labels)[1])
    if scores.shape[0] != 1:
        raise ValueError(f"scores must be (N, L), got shape {scores.shape}")
    w = np.asarray(weights)
    if w.ndim not in (1, 2) or w.shape[-1] != scores.shape[1]:
        raise ValueError(f"weights must be (N,) or (R, N) with N = {scores.shape[1]}, got shape {w.shape}")
    if (w < 0).any() or (w != np.round(w)).any():
        raise ValueError("weights must be non-negative integers (how often each image was drawn)")
    layout = _Layout.of(np.asarray(scores[0], dtype=np.float64), labels)
    ap = np.full((1 if w.ndim == 1 else w.shape[0], scores.shape[2]), np.nan)
    ap[:, layout.classes] = _weighted_ap(layout, np.atleast_2d(w).astype(np.int64))
    return ap[0] if w.ndim == 1 else ap


# ---------------------------------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Layout:
    """What every resample needs from one score matrix (N, L), precomputed once (the only sorting).

    For each class that has a positive, the thresholds t_1 > ... > t_K are the distinct scores of its
    positives: only there does AP change (a threshold without a positive adds no recall). Segment k is
    the run of the class's presorted images with t_k <= score < t_(k-1) (segment 1: score >= t_1);
    images below t_K never count. Positive group k is the run of its presorted positives with score ==
    t_k. Under weights w, the drawn images with score >= t_k are the sum of w over the class's sorted
    prefix up to the end of segment k, the drawn positives with score >= t_k the sum of w over its
    sorted positives up to the end of group k: differences of one cumulative sum, read at these ends.
    """

    rows: np.ndarray  # image indices: every class's sorted prefix down to t_K, class after class
    row_end: np.ndarray  # (K,) one past the end of segment k in `rows` (K over all classes)
    row_begin: np.ndarray  # (K,) where the class of threshold k starts in `rows`
    positives: np.ndarray  # image indices: every class's positives in sorted order, class after class
    pos_end: np.ndarray  # (K,) one past the end of positive group k in `positives`
    pos_class_begin: np.ndarray  # (K,) where the class of threshold k starts in `positives`
    class_starts: np.ndarray  # (C,) the first threshold of each class in layout.classes
    classes: np.ndarray  # (C,) the classes with at least one positive

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> _Layout:
        positive = labels.astype(bool)
        classes = np.flatnonzero(positive.any(axis=0))
        x, y = scores[:, classes], positive[:, classes]
        # a stable sort keeps it deterministic; tied scores are grouped below, so their order is moot
        order = np.argsort(-x, axis=0, kind="stable")
        xs = np.take_along_axis(x, order, axis=0)
        ys = np.take_along_axis(y, order, axis=0)
        names = ("rows", "row_end", "row_begin", "positives", "pos_end", "pos_class_begin", "class_starts")
        parts: dict[str, list] = {name: [] for name in names}
        n_rows = n_pos = n_thresholds = 0
        for j in range(classes.size):
            s, hit = xs[:, j], ys[:, j]
            new_group = np.ones(s.size, dtype=bool)
            new_group[1:] = s[1:] != s[:-1]
            group = np.cumsum(new_group) - 1  # tie group of each sorted position
            group_end = np.append(np.flatnonzero(new_group)[1:], s.size)  # one past each group's end
            hits = np.flatnonzero(hit)  # sorted positions of the positives
            pos_group, pos_first = np.unique(group[hits], return_index=True)  # the groups with a positive
            ends = group_end[pos_group]  # segment k ends where positive group k ends
            k = ends.size
            parts["rows"].append(order[: ends[-1], j])
            parts["row_end"].append(n_rows + ends)
            parts["row_begin"].append(np.full(k, n_rows))
            parts["positives"].append(order[hits, j])
            parts["pos_end"].append(n_pos + np.append(pos_first[1:], hits.size))
            parts["pos_class_begin"].append(np.full(k, n_pos))
            parts["class_starts"].append([n_thresholds])
            n_rows, n_pos, n_thresholds = n_rows + ends[-1], n_pos + hits.size, n_thresholds + k
        joined = {name: np.concatenate(p).astype(np.intp) if p else np.zeros(0, dtype=np.intp)
                  for name, p in parts.items()}
        return cls(**joined, classes=classes)


def _weighted_ap(layout: _Layout, weights: np.ndarray) -> np.ndarray:
    """AP (R, C) of the classes with a positive (layout.classes) under integer weights (R, N)."""
    r_total, n = weights.shape
    c, k = layout.classes.size, layout.row_end.size
    ap = np.full((r_total, c), np.nan)
    if c == 0:
        return ap
    # The running sums of a block add up to at most block * c * (a resample's total weight, N for a
    # bootstrap draw): each class's prefix holds an image once. int32 is exact below 2**31, and integer
    # sums are much faster than float ones.
    per_block = c * max(1, int(weights.sum(axis=1).max()))
    acc, cap = (np.int32, (2**31 - 1) // per_block) if per_block <= 2**25 else (np.int64, r_total)
    weights = weights.astype(acc, copy=False)  # the gather and the cumsum then need no casting
    per_resample = 2 * np.dtype(acc).itemsize * (layout.rows.size + layout.positives.size) + 8 * 16 * k
    block = int(max(1, min(r_total, cap, _BLOCK_BYTES // per_resample)))
    images = _PrefixSums(layout.rows, (layout.row_end, layout.row_begin), block, acc)
    positives = _PrefixSums(layout.positives, (layout.pos_end, layout.pos_class_begin), block, acc)
    last = np.append(layout.class_starts[1:], k) - 1  # each class's last threshold
    for r0 in range(0, r_total, block):
        w = weights[r0 : r0 + block]
        end, begin = images.read(w)
        drawn = (end - begin).astype(np.float64)  # drawn images with score >= t_k
        end, class_begin = positives.read(w)
        true_pos = (end - class_begin).astype(np.float64)  # drawn positives with score >= t_k
        # drawn positives with score == t_k: group k starts where group k - 1 ends, also across a class
        # boundary (the groups of all classes lie end to end in `positives`)
        hits = end.astype(np.float64)
        hits[:, 1:] -= end[:, :-1]
        hits[:, 0] -= class_begin[:, 0]
        # AP = sum_k (recall step at t_k) * (precision at t_k) = sum_k hits_k * (tp_k / drawn_k) / P.
        # drawn_k = 0 only where tp_k = hits_k = 0 (nothing drawn down to t_k): that term is 0
        terms = hits * (true_pos / np.maximum(drawn, 1.0))
        summed = np.add.reduceat(terms, layout.class_starts, axis=1)  # (block, C)
        with np.errstate(invalid="ignore"):
            # 0/0: no positive of the class in this resample: NaN
            ap[r0 : r0 + block] = summed / true_pos[:, last]
    return ap


class _PrefixSums:
    """Sums of w[r, index[:e]] for a block of weight rows w (R, N), at fixed positions e.

    One cumulative sum over the gathered weights of all the block's resamples one after the other
    (flattened: much faster than numpy's per-row cumsum), read at r * len(index) + e; a leading 0 makes
    e = 0 the empty sum, and the difference of two reads is the sum over a run of `index`. The buffers
    and read positions are made once and reused by every block (fresh large arrays would page-fault).
    """

    def __init__(self, index: np.ndarray, positions: tuple[np.ndarray, ...], block: int, acc: type):
        self.index = index
        self.gathered = np.empty((block, index.size), dtype=acc)
        self.running = np.zeros(block * index.size + 1, dtype=acc)
        base = np.arange(block)[:, None] * index.size
        self.positions = [base + e for e in positions]

    def read(self, w: np.ndarray) -> list[np.ndarray]:
        r, m = w.shape[0], self.index.size
        gathered = self.gathered[:r]
        # mode="clip" skips the bounds check (the indices are valid by construction): twice as fast
        np.take(w, self.index, axis=1, out=gathered, mode="clip")
        np.cumsum(gathered.ravel(), out=self.running[1 : r * m + 1])
        return [np.take(self.running, p[:r], mode="clip") for p in self.positions]


def _key(x: np.ndarray, labels, resamples: int, seed: int) -> tuple:
    """A memo key for one score matrix: its content (float64 bytes), the labels', and the draw."""
    digest = hashlib.blake2b(digest_size=16)
    for block, y in _class_blocks(x, labels):
        digest.update(np.ascontiguousarray(block).tobytes())
        digest.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
    return x.shape, digest.hexdigest(), resamples, seed


def _image_draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """Multiplicities (resamples, N): each row the counts of N images drawn with replacement."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])  # stream 0: the images
    w = np.empty((resamples, n), dtype=np.int32)
    for r0 in range(0, resamples, _DRAW_CHUNK):
        m = min(_DRAW_CHUNK, resamples - r0)
        drawn = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]  # row r's images offset by r*n
        w[r0 : r0 + m] = np.bincount(drawn.ravel(), minlength=m * n).reshape(m, n)
    return w


def _seed_draws(seeds: int, resamples: int, seed: int) -> np.ndarray:
    """Multiplicities (resamples, S) of S seeds drawn with replacement; its own stream, so that the image
    draws do not depend on S (S = 1 draws nothing)."""
    if seeds == 1:
        return np.ones((resamples, 1), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])  # stream 1: the seeds
    drawn = rng.integers(0, seeds, size=(resamples, seeds)) + seeds * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * seeds).reshape(resamples, seeds)


def _seed_means(per_seed: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Each resample's mean over its drawn seeds of per_seed (S, resamples), each seed on the resample's
    image draw; resamples without any positive (NaN) are left out."""
    seeds = per_seed.shape[0]
    counts = _seed_draws(seeds, resamples, seed)
    values = np.einsum("rs,sr->r", counts, per_seed) / seeds
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("no resample has a positive label")
    return values


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` of the resampled values: their (1 - level) / 2 and (1 + level) / 2 quantiles."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _centred_percentile_interval(values: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """The percentile interval of the resampled values moved by estimate - their median: estimate +
    (lower percentile - median), estimate + (upper percentile - median). Contains the estimate."""
    low, high = _percentile_interval(values, level)
    middle = float(np.quantile(values, 0.5))
    return estimate + (low - middle), estimate + (high - middle)


def _full_map(scores: np.ndarray, labels) -> float:
    """metrics.mean_average_precision's mAP, a block of classes at a time."""
    ap = np.concatenate([average_precision(block, y) for block, y in _class_blocks(scores, labels)])
    if np.isnan(ap).all():
        raise ValueError("labels have no positive: mAP is undefined")
    return float(100.0 * np.nanmean(ap))


def _shape(labels) -> tuple:
    return (len(labels), labels.num_classes) if isinstance(labels, LabelRows) else np.shape(labels)


class Seeds:
    """S seeds' (N, L) scores used as one (S, N, L) array without stacking them (each may be a memory
    map, read a block of classes at a time): what the report passes for a model trained with S seeds."""

    def __init__(self, arrays):
        self.arrays = list(arrays)
        shapes = {np.shape(a) for a in self.arrays}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"seeds must be (N, L) arrays of one shape, got shapes {sorted(shapes)}")
        self.shape = (len(self.arrays), *shapes.pop())
        self.ndim = 3

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, s: int) -> np.ndarray:
        return self.arrays[s]

    def __iter__(self):
        return iter(self.arrays)


def _stacked(scores, labels, name: str):
    """scores as (S, N, L) (an array, or Seeds), as given (a memory map stays one; float16 ties stay
    ties when the blocks become float64), checked against labels (N, L), block by block of classes."""
    if not isinstance(scores, Seeds):
        scores = np.asarray(scores)
    labels_shape = _shape(labels)
    if scores.ndim not in (2, 3):
        raise ValueError(f"{name} must be (N, L) or (S, N, L), got shape {scores.shape}")
    if len(labels_shape) != 2 or scores.shape[-2:] != tuple(labels_shape):
        raise ValueError(f"labels shape {tuple(labels_shape)} must be the (N, L) of {name} shape "
                         f"{scores.shape}")
    if scores.shape[-2] == 0:
        raise ValueError(f"{name} has no images: shape {scores.shape}")
    scores = scores[None] if scores.ndim == 2 else scores
    for x in scores:
        for block, y in _class_blocks(x, labels):
            if np.isnan(block).any():
                raise ValueError(f"{name} contains NaN")
            if not np.isin(y, (0, 1)).all():
                raise ValueError("labels must be 0 or 1")
    return scores


def _check_options(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
