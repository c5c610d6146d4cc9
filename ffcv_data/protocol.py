"""Which positive of each image is observed, and which training images are held out for validation.

Two protocols (`data.observed_protocol`):

- `keyed`: each draw is keyed by (seed, image key) (source.py: the image's id), not by position or
  process, so the observed positive of an image is the same whichever subset of images is prepared,
  in whatever order, by however many processes. The split permutes the keys sorted ascending with
  numpy's default_rng. Every row needs a positive (prepare drops those without, and counts them).
- `cole`: exactly what Cole et al. 2021's scripts do (`preproc/generate_observed_labels.py`,
  `datasets.generate_split`) for the same files: their row order and class numbering (the reader's
  `reference_order` and `reference_classes`), one `RandomState(seed)` per split walked over those
  rows (shuffle the row's positive class indices, keep the first; shuffle its negatives too, which
  keeps none but consumes the generator; a row without a positive keeps nothing), and a validation
  split of `round(fraction * N)` rows, the last of `RandomState(split seed).permutation(N)`.
  Their draws depend on the whole split's order, so they are reproduced for whole splits only.

Label sets are sparse (a sorted array of class indices per row); every function takes and returns
rows in the caller's order.
"""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("cole", "keyed")
NONE = -1  # a row with no observed positive (cole, a row without positives)


def draw_observed(label_sets: list[np.ndarray], keys: np.ndarray, seed: int, protocol: str = "keyed", *,
                  num_classes: int, reference_order: np.ndarray | None = None,
                  reference_classes: np.ndarray | None = None) -> np.ndarray:
    """The observed positive of each row, uniform among that row's positives: (N,) int64 class
    indices, NONE where a row has none to observe (cole only; keyed requires a positive per row).
    reference_order / reference_classes (cole): source.py's, default the rows and classes as given."""
    if protocol == "keyed":
        return _draw_keyed(label_sets, keys, seed)
    if protocol == "cole":
        n = len(label_sets)
        order = np.arange(n) if reference_order is None else np.asarray(reference_order)
        classes = np.arange(num_classes) if reference_classes is None else np.asarray(reference_classes)
        return _draw_cole(label_sets, seed, num_classes, order, classes)
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
        perm = np.random.RandomState(seed).permutation(n)
        return np.sort(order[perm[: n - n_val]]), np.sort(order[perm[-n_val:]])
    order = np.argsort(keys, kind="stable")
    permuted = order[np.random.default_rng(seed).permutation(n)]
    return np.sort(permuted[n_val:]), np.sort(permuted[:n_val])


def _draw_keyed(label_sets: list[np.ndarray], keys: np.ndarray, seed: int) -> np.ndarray:
    observed = np.empty(len(label_sets), dtype=np.int64)
    for row, (key, classes) in enumerate(zip(keys, label_sets, strict=True)):
        if len(classes) == 0:
            raise ValueError(f"image {int(key)} has no positive label to observe")
        observed[row] = classes[np.random.default_rng([seed, int(key)]).integers(len(classes))]
    return observed


def _draw_cole(label_sets: list[np.ndarray], seed: int, num_classes: int, order: np.ndarray,
               classes: np.ndarray) -> np.ndarray:
    theirs = np.empty(num_classes, dtype=np.int64)
    theirs[classes] = np.arange(num_classes)  # our class c is their class theirs[c]
    rng = np.random.RandomState(seed)
    observed = np.full(len(label_sets), NONE, dtype=np.int64)
    for row in order:
        positives = np.sort(theirs[label_sets[row]])  # as np.nonzero lists them in their class order
        rng.shuffle(positives)
        if len(positives):
            observed[row] = classes[positives[0]]
        # their negatives, shuffled with num_neg = 0: none kept, but the draws are made (only the
        # count matters to the generator)
        rng.shuffle(np.arange(num_classes - len(positives)))
    return observed
