"""Paired bootstrap intervals of mAP differences and of one model's mAP (pml_dist/pipeline/intervals.py).

The fast weighted AP is checked against the project's metric on explicitly materialised resamples; the
intervals against cases with a known answer and against a generative model whose population mAP (and
mAP difference) is computed exactly."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from pml_dist.pipeline import intervals
from pml_dist.pipeline.intervals import (
    mean_ap_interval,
    paired_difference,
    resampled_map,
    verdict,
    weighted_average_precision,
)
from pml_dist.training.metrics import average_precision, mean_average_precision


def random_case(rng, n: int, classes: int, rounding: str):
    """Scores with ties (float16, or rounded coarser), labels with rare classes and one without any."""
    prevalence = np.linspace(0.02, 0.5, classes)
    labels = (rng.random((n, classes)) < prevalence).astype(np.int8)
    labels[:, 1] = 0
    labels[:, 0] = 0
    labels[[3, 17], 0] = 1  # two positives only: many resamples draw neither
    labels[:, 2] = 0  # no positive at all: never scored
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=(n, classes)) + 1.5 * labels)))
    if rounding == "float16":
        scores = scores.astype(np.float16)
    elif rounding == "eighths":
        scores = np.round(scores * 8) / 8
    else:  # three values: nearly everything ties
        scores = np.round(scores * 2) / 2
    return scores, labels


@pytest.mark.parametrize("rounding", ["float16", "eighths", "halves"])
def test_the_weighted_ap_of_a_resample_is_the_metric_on_the_repeated_images(rounding):
    rng = np.random.default_rng(7)
    n = 150
    scores, labels = random_case(rng, n, 9, rounding)
    weights = intervals._image_draws(n, 40, seed=3)
    assert (weights.sum(axis=1) == n).all()  # each resample draws N images
    weights[0] = 1  # the full test set
    weights[1, [3, 17]] = 0  # class 0 loses its positives
    ap = weighted_average_precision(scores, labels, weights)
    for w, row in zip(weights, ap, strict=True):
        drawn = np.repeat(np.arange(n), w)
        expected = average_precision(scores[drawn].astype(np.float64), labels[drawn])
        np.testing.assert_array_equal(np.isnan(row), np.isnan(expected))
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-12)
    assert np.isnan(ap[:, 2]).all() and np.isnan(ap[1, 0])
    assert np.isnan(ap[:, 0]).sum() > 5  # the case really has resamples without class 0's positives


@pytest.mark.parametrize("rounding", ["float16", "halves"])
def test_the_resampled_map_is_the_metric_on_the_repeated_images(rounding):
    """resampled_map's own draws: the mAP over the classes with a positive in each resample."""
    rng = np.random.default_rng(8)
    n = 150
    scores, labels = random_case(rng, n, 9, rounding)
    maps = resampled_map(scores, labels, resamples=40, seed=3)
    assert maps.shape == (1, 40)
    for w, value in zip(intervals._image_draws(n, 40, seed=3), maps[0], strict=True):
        drawn = np.repeat(np.arange(n), w)
        assert value == pytest.approx(
            mean_average_precision(scores[drawn].astype(np.float64), labels[drawn])["map"], abs=1e-10)


def test_a_hand_computed_weighted_ap_with_a_tie():
    # images: 0.9 (pos, drawn once), 0.8 (neg, twice), 0.8 (pos, once), 0.3 (neg, never)
    scores = np.array([[0.9], [0.8], [0.8], [0.3]])
    labels = np.array([[1], [0], [1], [0]])
    # threshold 0.9: P = 1/1, R = 1/2; threshold 0.8 (one tie group of 3 drawn): P = 2/4, R = 2/2
    ap = weighted_average_precision(scores, labels, np.array([1, 2, 1, 0]))
    assert ap[0] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5, abs=1e-15)
    assert np.isnan(weighted_average_precision(scores, labels, np.array([0, 2, 0, 1]))[0])


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    scores, labels = random_case(rng, 200, 6, "float16")
    for a in (scores, np.stack([scores, scores[::-1], scores])):  # also with seeds
        r = paired_difference(a, a.copy(), labels, resamples=200)
        assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
        assert r["verdict"] == "not resolved"


def test_perfect_scores_beat_reversed_ones_and_the_swapped_call_negates():
    rng = np.random.default_rng(2)
    labels = (rng.random((120, 5)) < 0.3).astype(int)
    perfect = labels.astype(np.float16)  # every positive above every negative: AP 1 in every resample
    reversed_ = (1 - labels).astype(np.float16)
    r = paired_difference(perfect, reversed_, labels, resamples=300, seed=5)
    assert r["verdict"] == "yes" and 0 < r["low"] <= r["diff"] <= r["high"]
    expected = 100.0 - mean_average_precision(1 - labels, labels)["map"]
    assert r["diff"] == pytest.approx(expected, abs=1e-12)
    swapped = paired_difference(reversed_, perfect, labels, resamples=300, seed=5)
    assert swapped["verdict"] == "no"
    assert swapped["diff"] == pytest.approx(-r["diff"], abs=1e-12)
    assert swapped["low"] == pytest.approx(-r["high"], abs=1e-9)
    assert swapped["high"] == pytest.approx(-r["low"], abs=1e-9)


def test_two_models_that_differ_on_one_class_by_a_hand_computed_ap():
    rng = np.random.default_rng(3)
    n, classes = 40, 4
    labels = (rng.random((n, classes)) < 0.4).astype(int)
    shared = rng.random((n, classes)).astype(np.float16)
    a, b = shared.copy(), shared.copy()
    # class 0: positives at images 0 and 2 only, images 4.. all below (0.05)
    labels[:, 0] = 0
    labels[[0, 2], 0] = 1
    a[:, 0] = b[:, 0] = 0.05
    a[:4, 0] = [0.9, 0.1, 0.8, 0.2]  # both positives on top: AP 1
    b[:4, 0] = [0.9, 0.8, 0.7, 0.6]  # pos, neg, pos: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    r = paired_difference(a, b, labels, resamples=300)
    assert r["diff"] == pytest.approx(100 * (1 - 5 / 6) / classes, abs=1e-12)
    # a's class-0 AP is 1 in every resample, b's at most 1: no resample favours b
    assert r["low"] >= 0 and r["high"] > 0
    assert r["verdict"] in ("yes", "not resolved")
    assert {key: r[key] for key in ("level", "resamples", "images", "seeds")} == {
        "level": 0.95, "resamples": 300, "images": n, "seeds": 1}


# ----------------------------------------------------------------------- coverage on a generative model
# Five score levels (so ties everywhere); per image and class a difficulty z shared by both models (what
# the pairing cancels) and each model's own noise: score = level of (y * mu + z + e), z, e ~ N(0, 1).
EDGES = (0.0, 0.75, 1.5, 2.25)
PREVALENCE = np.array([0.3, 0.2, 0.4])
MU_A, MU_B = np.array([1.6, 1.2, 2.0]), np.array([1.2, 1.2, 1.6])


def population_ap(mu: float, prevalence: float, edges: tuple = EDGES) -> float:
    """AP of infinitely many images: the sum over the levels t (top first) of P(level t | positive) times
    the precision of score >= t."""
    cut = (-math.inf, *edges, math.inf)

    def cdf(x: float) -> float:  # N(0, 2): z + e
        return 0.5 * (1 + math.erf(x / 2)) if math.isfinite(x) else float(x > 0)

    levels = len(cut) - 1
    pos = np.array([cdf(cut[j + 1] - mu) - cdf(cut[j] - mu) for j in range(levels)])[::-1]
    neg = np.array([cdf(cut[j + 1]) - cdf(cut[j]) for j in range(levels)])[::-1]
    tp, fp = prevalence * np.cumsum(pos), (1 - prevalence) * np.cumsum(neg)
    return float(np.sum(pos * tp / (tp + fp)))


def generated(rng, n: int):
    labels = (rng.random((n, 3)) < PREVALENCE).astype(np.int8)
    difficulty = rng.normal(size=(n, 3))
    a = np.digitize(labels * MU_A + difficulty + rng.normal(size=(n, 3)), EDGES) / 4
    b = np.digitize(labels * MU_B + difficulty + rng.normal(size=(n, 3)), EDGES) / 4
    return a, b, labels


def test_the_population_difference_is_what_a_very_large_sample_gives():
    """The closed form below is the limit of the sample mAP (checks the generator and the formula)."""
    a, b, labels = generated(np.random.default_rng(0), 200_000)
    true = 100 * np.mean([population_ap(MU_A[j], PREVALENCE[j]) - population_ap(MU_B[j], PREVALENCE[j])
                          for j in range(3)])
    sample = mean_average_precision(a, labels)["map"] - mean_average_precision(b, labels)["map"]
    assert true == pytest.approx(4.7547, abs=1e-3)
    assert sample == pytest.approx(true, abs=0.3)  # its standard error is about 0.1


def test_the_95_percent_interval_covers_the_population_difference_about_95_percent_of_the_time():
    true = 100 * np.mean([population_ap(MU_A[j], PREVALENCE[j]) - population_ap(MU_B[j], PREVALENCE[j])
                          for j in range(3)])
    covered = 0
    for draw in range(200):  # independent test sets of 300 images
        a, b, labels = generated(np.random.default_rng(1000 + draw), 300)
        r = paired_difference(a, b, labels, resamples=300, seed=draw)
        covered += r["low"] <= true <= r["high"]
    # 192 of 200 here. A band still generous for 95% (a 3-4 standard-error margin below) that an 85%
    # interval (176 of 200 on these draws) does not pass
    assert 180 <= covered <= 200


def test_one_models_95_percent_interval_covers_its_population_map_about_95_percent_of_the_time():
    """The centred percentile interval of model a's mAP on the same generative model; it holds its own
    estimate in every test set (by construction: the median of the resampled mAPs is moved onto it)."""
    true = 100 * np.mean([population_ap(MU_A[j], PREVALENCE[j]) for j in range(3)])
    covered = 0
    for draw in range(500):  # independent test sets of 300 images
        a, _, labels = generated(np.random.default_rng(1000 + draw), 300)
        r = mean_ap_interval(a, labels, resamples=400, seed=draw)
        assert r["low"] < r["map"] < r["high"], (draw, r)
        covered += r["low"] <= true <= r["high"]
    # 479 of 500 here (the percentile interval: 474; 95.0% of 2000 test sets with 1000 resamples in a
    # longer simulation). The band is about 3.5 binomial standard errors (4.9) either side of 475; an 85%
    # interval (420 of 500 on these draws) fails it
    assert 458 <= covered <= 492


# Rare classes, as COCO's 80 classes on 80 test images: most classes have 0-3 positives, a weak model.
RARE_EDGES = tuple(np.linspace(-1.5, 4.5, 25))
RARE_PREVALENCE = np.clip(0.55 / np.arange(1, 81) ** 0.9, 0.006, None)


def rare_classes(rng, n: int = 80):
    labels = (rng.random((n, 80)) < RARE_PREVALENCE).astype(np.int8)
    latent = labels * 1.0 + rng.normal(size=(n, 80)) + rng.normal(size=(n, 80))  # mu 1, z + e
    return np.digitize(latent, RARE_EDGES) / len(RARE_EDGES), labels


def test_with_rare_classes_the_interval_still_contains_its_estimate():
    """The issue's case: on few images with rare classes the resampled mAPs lie well above the full-set
    mAP (duplicated positives tie with themselves; rare classes drop out), and the percentile interval
    lies wholly above its own estimate in most test sets. The centred interval contains its estimate
    in every one, and covers the mean mAP of test sets of this size about 95% of the time. (Nothing
    built from these resamples covers the population mAP here: the full-set mAP itself overstates it,
    by more than the interval is wide, since a class's AP over 1-3 positives overstates its own.)"""
    rows = []
    for draw in range(300):
        scores, labels = rare_classes(np.random.default_rng(3000 + draw))
        r = mean_ap_interval(scores, labels, resamples=300, seed=draw)
        low, high = np.quantile(resampled_map(scores, labels, resamples=300, seed=draw)[0], [0.025, 0.975])
        rows.append((r["map"], r["low"], r["high"], low, high))
    estimate, low, high, percentile_low, percentile_high = np.array(rows).T
    assert ((low < estimate) & (estimate < high)).all()
    assert np.mean(percentile_low > estimate) > 0.6  # 0.74 here: the interval wholly above its estimate
    mean = estimate.mean()  # the mean mAP of test sets of 80 images (standard error 0.13)
    # 284 of 300 here (95.8% of 2000 test sets with 1000 resamples in a longer simulation); the
    # percentile interval 124 (42.8% of 2000)
    assert 270 <= np.sum((low <= mean) & (mean <= high)) <= 299
    assert np.sum((percentile_low <= mean) & (mean <= percentile_high)) < 200
    population = 100 * np.mean([population_ap(1.0, p, RARE_EDGES) for p in RARE_PREVALENCE])
    assert mean - population > np.mean(high - low)  # 19.0 against 8.2, width 8.6


def test_the_centred_percentile_interval_by_hand():
    values = np.array([10.0, 0.0, 1.0, 2.0, 1.0])
    # level 0.5: the 0.25 and 0.75 quantiles 1 and 2 (positions 1 and 3 of 0 1 1 2 10), the median 1
    assert intervals._percentile_interval(values, 0.5) == (1.0, 2.0)  # excludes an estimate of 0
    assert intervals._centred_percentile_interval(values, 0.0, 0.5) == (0.0, 1.0)  # 0 + (1 - 1), 0 + (2 - 1)
    # 0..10 at level 0.8: quantiles 1 and 9, median 5; an estimate of 3 gives 3 - 4 and 3 + 4
    assert intervals._centred_percentile_interval(np.arange(11.0), 3.0, 0.8) == (-1.0, 7.0)
    # one seed: the resamples without a positive (NaN) are left out
    np.testing.assert_array_equal(intervals._seed_means(np.array([[1.0, np.nan, 3.0]]), 3, 0), [1.0, 3.0])


def test_one_models_interval_is_centred_on_the_resampled_maps_the_difference_uses():
    """With S seeds: the same image and seed draws as paired_difference, the per-resample mean over the
    drawn seeds, its percentile interval moved by the estimate minus its median."""
    rng = np.random.default_rng(12)
    a, b, labels = generated(rng, 250)
    a2, b2, _ = generated(rng, 250)
    a, b = np.stack([a, a2]), np.stack([b, b2])  # two seeds (a2, b2 on other images: any scores will do)
    r = mean_ap_interval(a, labels, resamples=200, seed=4)
    d = paired_difference(a, b, labels, resamples=200, seed=4)
    rows_a, rows_b = (resampled_map(x, labels, resamples=200, seed=4) for x in (a, b))
    counts = intervals._seed_draws(2, 200, 4)
    means_a, means_b = ((counts * rows.T).sum(axis=1) / 2 for rows in (rows_a, rows_b))
    low, middle, high = np.quantile(means_a, [0.025, 0.5, 0.975])
    estimate = np.mean([mean_average_precision(x, labels)["map"] for x in a])
    assert r["map"] == pytest.approx(estimate, abs=1e-12)
    assert r["low"] == pytest.approx(r["map"] + low - middle, abs=1e-9)
    assert r["high"] == pytest.approx(r["map"] + high - middle, abs=1e-9)
    # the difference: the percentile interval of the same resamples' differences, not centred
    difference = np.quantile(means_a - means_b, [0.025, 0.975])
    assert (d["low"], d["high"]) == pytest.approx(tuple(difference), abs=1e-9)
    assert r["method"] == "centred percentile"


def test_pairing_cancels_the_shared_image_difficulty():
    """The difference's interval is much narrower than the two models' own intervals would imply if the
    models were resampled independently (what an unpaired comparison would do)."""
    a, b, labels = generated(np.random.default_rng(4), 600)
    diff = paired_difference(a, b, labels, resamples=400)
    own = [mean_ap_interval(x, labels, resamples=400) for x in (a, b)]
    unpaired = math.hypot(*(o["high"] - o["low"] for o in own))
    assert diff["high"] - diff["low"] < 0.75 * unpaired
    assert own[0]["map"] - own[1]["map"] == pytest.approx(diff["diff"], abs=1e-12)


# ------------------------------------------------------------------------------------------ seeds
def test_identical_seeds_give_the_single_seed_answer():
    rng = np.random.default_rng(5)
    a, b, labels = generated(rng, 250)
    one = paired_difference(a, b, labels, resamples=300, seed=11)
    three = paired_difference(np.stack([a] * 3), np.stack([b] * 3), labels, resamples=300, seed=11)
    assert three["seeds"] == 3 and one["seeds"] == 1
    for key in ("diff", "low", "high"):
        assert three[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12)
    assert three["verdict"] == one["verdict"]
    single = mean_ap_interval(a, labels, resamples=300, seed=11)
    tripled = mean_ap_interval(np.stack([a] * 3), labels, resamples=300, seed=11)
    assert (tripled["low"], tripled["high"]) == pytest.approx((single["low"], single["high"]), rel=1e-12)


def test_seeds_that_disagree_widen_the_interval_beyond_any_single_seed():
    rng = np.random.default_rng(6)
    n = 400
    labels = (rng.random((n, 3)) < PREVALENCE).astype(np.int8)
    difficulty = rng.normal(size=(n, 3))

    def model(mu: float) -> np.ndarray:
        return np.digitize(labels * mu + difficulty + rng.normal(size=(n, 3)), EDGES) / 4

    a = np.stack([model(mu) for mu in (0.8, 1.6, 2.6)])  # seeds far apart: the training run matters
    b = np.stack([model(1.6) for _ in range(3)])
    both = paired_difference(a, b, labels, resamples=400)
    singles = [paired_difference(a[s], b[s], labels, resamples=400) for s in range(3)]
    assert both["diff"] == pytest.approx(np.mean([s["diff"] for s in singles]), abs=1e-12)
    assert max(s["diff"] for s in singles) - min(s["diff"] for s in singles) > 15  # they do disagree
    assert both["high"] - both["low"] > max(s["high"] - s["low"] for s in singles)


# ------------------------------------------------------------------------------------------ the rest
def test_shapes_that_do_not_match_are_refused_with_the_shapes():
    rng = np.random.default_rng(8)
    labels = (rng.random((30, 4)) < 0.5).astype(int)
    good = rng.random((30, 4))
    cases = [
        (good, rng.random((31, 4)), labels, "(31, 4)"),  # N of b
        (good, rng.random((30, 5)), labels, "(30, 5)"),  # L of b
        (good, good, labels[:, :3], "(30, 3)"),  # labels
        (np.stack([good] * 2), np.stack([good] * 3), labels, "(2, 30, 4)"),  # seeds
        (np.stack([good] * 2), good, labels, "(2, 30, 4)"),  # seeds on one side only
        (good[0], good[0], labels[0], "(4,)"),  # not a matrix
    ]
    for a, b, y, shape in cases:
        with pytest.raises(ValueError, match=re.escape(shape)):
            paired_difference(a, b, y, resamples=10)
    with pytest.raises(ValueError, match=re.escape("(30, 3)")):
        mean_ap_interval(good, labels[:, :3], resamples=10)
    with pytest.raises(ValueError, match="0 or 1"):
        paired_difference(good, good, labels * 2, resamples=10)
    with pytest.raises(ValueError, match="level"):
        paired_difference(good, good, labels, resamples=10, level=95)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    rng = np.random.default_rng(9)
    a, b, labels = generated(rng, 200)
    first = paired_difference(a, b, labels, resamples=200, seed=1)
    intervals._MEMO.clear()  # recomputed, not remembered
    assert paired_difference(a, b, labels, resamples=200, seed=1) == first
    other = paired_difference(a, b, labels, resamples=200, seed=2)
    assert other["diff"] == first["diff"] and (other["low"], other["high"]) != (first["low"], first["high"])


def test_one_models_interval_is_around_its_map():
    rng = np.random.default_rng(10)
    a, _, labels = generated(rng, 300)
    r = mean_ap_interval(a.astype(np.float16), labels, resamples=300, level=0.9)
    assert r["map"] == pytest.approx(mean_average_precision(a.astype(np.float16), labels)["map"], abs=1e-12)
    assert r["low"] < r["map"] < r["high"] and (r["level"], r["images"], r["seeds"]) == (0.9, 300, 1)
    assert r.keys() == {"map", "low", "high", "level", "resamples", "images", "seeds", "method"}


def test_verdict():
    assert verdict(0.1, 2.0) == "yes"
    assert verdict(-2.0, -0.1) == "no"
    assert verdict(-0.1, 0.1) == verdict(0.0, 1.0) == verdict(-1.0, 0.0) == "not resolved"


def test_class_blocks_from_a_memory_map_and_sparse_labels_give_the_same_intervals(tmp_path, monkeypatch):
    """The report's path at scale: float16 logits memory-mapped from test_logits.npy, the labels as
    sparse rows, read three classes at a time: the same intervals as the whole dense matrices."""
    from ffcv_data.sparse import LabelRows

    rng = np.random.default_rng(5)
    a, labels = random_case(rng, 300, 11, "float16")
    b = np.clip(a.astype(np.float32) + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float16)
    whole = (paired_difference(a, b, labels, resamples=200), mean_ap_interval(a, labels, resamples=200))
    intervals._MEMO.clear()
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    monkeypatch.setattr(intervals, "_CLASS_BLOCK_BYTES", 3 * 8 * 300)
    mapped_a, mapped_b = (np.load(tmp_path / f, mmap_mode="r") for f in ("a.npy", "b.npy"))
    sparse = LabelRows.from_dense(labels)
    blocked = (paired_difference(mapped_a, mapped_b, sparse, resamples=200),
               mean_ap_interval(mapped_a, sparse, resamples=200))
    for got, want in zip(blocked, whole, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value), key


def test_seeds_memory_mapped_one_by_one_give_the_intervals_of_the_stacked_array(tmp_path):
    """The report's S seeds: each seed's test logits a memory map of its own, passed as Seeds (never
    stacked into one S x N x L array): the same intervals as the stacked array; mismatched seeds are
    refused with their shapes."""
    rng = np.random.default_rng(6)
    a, labels = random_case(rng, 200, 7, "float16")
    seeds_a = [a, np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float16)]
    seeds_b = [np.clip(s + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float16) for s in seeds_a]
    whole = (paired_difference(np.stack(seeds_a), np.stack(seeds_b), labels, resamples=100),
             mean_ap_interval(np.stack(seeds_a), labels, resamples=100))
    intervals._MEMO.clear()
    mapped = {}
    for name, arrays in (("a", seeds_a), ("b", seeds_b)):
        for s, x in enumerate(arrays):
            np.save(tmp_path / f"{name}{s}.npy", x)
        mapped[name] = intervals.Seeds(np.load(tmp_path / f"{name}{s}.npy", mmap_mode="r") for s in range(2))
    assert mapped["a"].shape == (2, 200, 7)
    lazy = (paired_difference(mapped["a"], mapped["b"], labels, resamples=100),
            mean_ap_interval(mapped["a"], labels, resamples=100))
    assert lazy == whole
    with pytest.raises(ValueError, match=r"one shape, got shapes \[\(200, 6\), \(200, 7\)\]"):
        intervals.Seeds([a, a[:, :6]])
