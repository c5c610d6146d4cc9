from __future__ import annotations

import numpy as np
import pytest

from ffcv_data.protocol import NONE, draw_observed, one_hot, split_train_val
from ffcv_data.sparse import LabelRows


def label_sets(dense: np.ndarray) -> LabelRows:
    return LabelRows.from_dense(dense)


def draw(dense: np.ndarray, ids: np.ndarray, seed: int, protocol: str = "keyed", **kw) -> np.ndarray:
    """draw_observed on a dense matrix, as the one-hot rows the .beton holds."""
    observed = draw_observed(label_sets(dense), ids, seed, protocol, **kw)
    return one_hot(observed, dense.shape[1])


@pytest.fixture
def labels():
    rng = np.random.default_rng(3)
    y = (rng.random((500, 12)) < 0.3).astype(np.uint8)
    y[np.arange(500), rng.integers(12, size=500)] = 1  # every image has a positive
    return y


def test_one_observed_positive_per_image_and_always_a_true_one(labels):
    ids = np.arange(1000, 1500)
    obs = draw(labels, ids, seed=1200)
    assert obs.dtype == np.uint8 and obs.shape == labels.shape
    assert (obs.sum(axis=1) == 1).all()
    assert (obs <= labels).all()


def test_same_seed_same_draw_other_seed_other_draw(labels):
    ids = np.arange(500)
    a = draw(labels, ids, seed=1200)
    assert np.array_equal(a, draw(labels, ids, seed=1200))
    b = draw(labels, ids, seed=1201)
    multi = labels.sum(axis=1) > 1
    assert (a[multi] != b[multi]).any(axis=1).mean() > 0.3


def test_draw_is_uniform_among_positives():
    labels = np.ones((4000, 4), dtype=np.uint8)
    counts = draw(labels, np.arange(4000), seed=1200).sum(axis=0)
    assert counts.min() > 900 and counts.max() < 1100


def test_draw_does_not_depend_on_order_or_subset(labels):
    """Keyed by image id: however the images are split over processes, each gets the same draw."""
    ids = np.arange(500) * 7 + 3
    whole = draw(labels, ids, seed=5)
    perm = np.random.default_rng(0).permutation(500)
    parts = [draw(labels[p], ids[p], seed=5) for p in np.array_split(perm, 3)]
    assert np.array_equal(np.concatenate(parts), whole[perm])


def test_image_without_positive_is_an_error_under_keyed_and_observes_nothing_under_cole(labels):
    with pytest.raises(ValueError, match="image 7 has no positive"):
        draw(np.zeros((1, 3), np.uint8), np.array([7]), seed=0)
    labels = labels.copy()
    labels[[3, 10]] = 0
    observed = draw_observed(label_sets(labels), np.arange(500), 1200, "cole")
    assert (observed[[3, 10]] == NONE).all() and (observed[np.arange(500) != 3] != NONE).sum() == 498


def test_validation_split_is_seeded_disjoint_and_complete():
    ids = np.random.default_rng(1).permutation(1000) + 10
    train, val = split_train_val(ids, 0.2, seed=0)
    assert len(val) == 200 and len(train) == 800
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    again = split_train_val(ids, 0.2, seed=0)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, split_train_val(ids, 0.2, seed=1)[1])
    # depends on the set of ids only, not the order they were listed in
    order = np.argsort(ids)
    _, val_sorted = split_train_val(ids[order], 0.2, seed=0)
    assert np.array_equal(np.sort(ids[order][val_sorted]), np.sort(ids[val]))


def test_validation_split_refuses_an_empty_part():
    with pytest.raises(ValueError, match="empty"):
        split_train_val(np.arange(3), 0.1, seed=0)


def test_keyed_draw_is_the_documented_hash_of_seed_and_key():
    """Re-implemented in plain Python integers from protocol.py's description: splitmix64's finaliser
    of (seed + golden ratio), xor the key, finalised again; its top 53 bits pick the position."""
    mask = (1 << 64) - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    rng = np.random.default_rng(4)
    dense = (rng.random((200, 9)) < 0.4).astype(np.uint8)
    dense[:, 0] = 1
    keys = rng.integers(0, 2**62, 200)
    observed = draw_observed(label_sets(dense), keys, 77)
    for row, key in enumerate(keys.tolist()):
        h = mix(mix((77 + 0x9E3779B97F4A7C15) & mask) ^ key)
        positives = np.flatnonzero(dense[row])
        assert observed[row] == positives[int((h >> 11) * 2.0**-53 * len(positives))]


def test_cole_draw_is_refused_where_it_cannot_finish_in_minutes(monkeypatch):
    from ffcv_data import protocol

    monkeypatch.setattr(protocol, "COLE_MAX_CELLS", 100)
    rows = label_sets(np.eye(11, dtype=np.uint8))  # 11 x 11 = 121 draws
    with pytest.raises(ValueError, match=r"11 images x 11 classes = 1.2e\+02 draws.*observed_protocol=keyed"):
        draw_observed(rows, np.arange(11), 1200, "cole")
    assert len(draw_observed(rows, np.arange(11), 1200, "keyed")) == 11  # keyed has no such limit
