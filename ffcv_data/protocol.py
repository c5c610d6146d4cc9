"""Which positive of each image is observed, and which training images are held out for validation.

Two protocols (`data.observed_protocol`):

- `keyed`: each draw is a hash of (seed, image key) (source.py: the image's id), not of position or
  process, so the observed positive of an image is the same whichever subset of images is prepared,
  in whatever order, by however many processes; and it is vectorised (`keyed_hash`). The split
  permutes the keys sorted ascending with numpy's default_rng. Every row needs a positive (prepare
  drops those without, and counts them).
- `cole`: exactly what Cole et al. 2021's scripts do (`preproc/generate_observed_labels.py`,
  `datasets.generate_split`) for the same files: their row order and class numbering (the reader's
  `reference_order` and `reference_classes`), one `RandomState(seed)` per split walked over those
  rows (shuffle the row's positive class indices, keep the first; shuffle its negatives too, which
  keeps none but consumes the generator; a row without a positive keeps nothing), and a validation
  split of `round(fraction * N)` rows, the last of `RandomState(split seed).permutation(N)`.
  Their draws depend on the whole split's order, so they are reproduced for whole splits only.

Label sets are sparse (sparse.LabelRows); every function takes and returns rows in the caller's
order.
"""

from __future__ import annotations

import numpy as np

from ffcv_data.sparse import LabelRows

PROTOCOLS = ("cole", "keyed")
NONE = -1  # a row with no observed positive (cole, a row without positives)
# Cole et al.'s draw shuffles every row's negatives: ~26 ns per image and class here, so exact
# reproduction is refused above this many (about 2 minutes; OpenImages' 9M x 20k would take 77).
COLE_MAX_CELLS = 5_000_000_000


def draw_observed(labels: LabelRows, keys: np.ndarray, seed: int, protocol: str = "keyed", *,
                  reference_order: np.ndarray | None = None,
                  reference_classes: np.ndarray | None = None) -> np.ndarray:
    """The observed positive of each row, uniform among that row's positives: (N,) int64 class
    indices, NONE where a row has none to observe (cole only; keyed requires a positive per row).
    reference_order / reference_classes (cole): source.py's, default the rows and classes as given."""
    if protocol == "keyed":
        return _draw_keyed(labels, keys, seed)
    if protocol == "cole":
        cells = len(labels) * labels.num_classes
        if cells > COLE_MAX_CELLS:
            raise ValueError(
                f"observed_protocol=cole reproduces Cole et al.'s draw, which shuffles each image's "
                f"negatives: {len(labels):,} images x {labels.num_classes:,} classes = {cells:.1e} draws, "
                f"over the {COLE_MAX_CELLS:.0e} that finish in minutes; use observed_protocol=keyed at "
                f"this size")
        order = np.arange(len(labels)) if reference_order is None else np.asarray(reference_order)
        classes = (np.arange(labels.num_classes) if reference_classes is None
                   else np.asarray(reference_classes))
        return _draw_cole(labels, seed, order, classes)
    raise ValueError(f"unknown observed-label protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")


def one_hot(observed: np.ndarray, num_classes: int) -> np.ndarray:
    """draw_observed's classes as the (N, L) uint8 rows the .beton holds (a NONE row is all zero)."""
    out = np.zeros((len(observed), num_classes), dtype=np.uint8)
    rows = np.flatnonzero(observed != NONE)
    out[rows, observed[rows]] = 1
    return out


def split_train_val(keys: np.ndarray, fraction: float, seed: int, protocol: str = "keyed",
                    reference_order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the training and validation parts, each sorted; `fraction` goes to validation.

    The permutation is over a canonical order of the rows (keys ascending for keyed, the reference's
    row order for cole), so the split depends only on the set of images, not on the order given.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown observed-label protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    n = len(keys)
    n_val = int(np.round(fraction * n))
    if n_val == 0 or n_val == n:
        raise ValueError(f"validation fraction {fraction} of {n} images leaves an empty train or val split")
    if protocol == "cole":
        order = np.arange(n) if reference_order is None else np.asarray(reference_order)
        val = order[np.random.RandomState(seed).permutation(n)[-n_val:]]
    else:
        order = np.argsort(keys)  # keys are unique: any sort gives this order
        val = order[np.random.default_rng(seed).permutation(n)[:n_val]]
    held_out = np.zeros(n, dtype=bool)  # sorted positions without a sort
    held_out[val] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def _draw_keyed(labels: LabelRows, keys: np.ndarray, seed: int) -> np.ndarray:
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} label rows")
    counts = labels.counts()
    if (counts == 0).any():
        raise ValueError(f"image {int(keys[np.argmax(counts == 0)])} has no positive label to observe")
    # 53 random bits per image -> a position uniform in [0, count) (bias below 2^-40 for any count)
    unit = (keyed_hash(seed, keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    pick = (unit * counts).astype(np.int64)
    return labels.classes[labels.indptr[:-1] + pick].astype(np.int64)


def keyed_hash(seed: int, keys: np.ndarray) -> np.ndarray:
    """A uint64 per key, a counter-based hash of (seed, key): splitmix64's finaliser applied to the
    seed, xor the key, finalised again. Vectorised (9M keys: 0.56 s here), and the same on
    every machine, numpy version and process count."""
    with np.errstate(over="ignore"):
        mixed = _splitmix64(np.full(len(keys), seed, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        return _splitmix64(mixed ^ np.asarray(keys).astype(np.uint64))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _draw_cole(labels: LabelRows, seed: int, order: np.ndarray, classes: np.ndarray) -> np.ndarray:
    num_classes = labels.num_classes
    theirs = np.empty(num_classes, dtype=np.int64)
    theirs[classes] = np.arange(num_classes)  # our class c is their class theirs[c]
    rng = np.random.RandomState(seed)
    observed = np.full(len(labels), NONE, dtype=np.int64)
    for row in order:
        positives = np.sort(theirs[labels.row(row)])  # as np.nonzero lists them in their class order
        rng.shuffle(positives)
        if len(positives):
            observed[row] = classes[positives[0]]
        # their negatives, shuffled with num_neg = 0: none kept, but the draws are made (only the
        # count matters to the generator)
        rng.shuffle(np.arange(num_classes - len(positives)))
    return observed
