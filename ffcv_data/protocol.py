"""Which positive of each image is observed, and which training images are held out for validation.

Two protocols (`data.observed_protocol`):

- `keyed`: each draw is keyed by (seed, COCO image id), not by position or process, so the observed
  positive of an image is the same whichever subset of images is prepared, in whatever order, by
  however many processes. The split permutes the ids sorted ascending with numpy's default_rng.
- `cole`: exactly what Cole et al. 2021's scripts do for the same annotation file
  (`preproc/format_coco.py`, `preproc/generate_observed_labels.py`, `datasets.generate_split`): rows
  ordered by image id sorted *as strings*, classes in the order the JSON lists its categories, one
  `RandomState(seed)` per split walked over those rows (shuffle the row's positive class indices,
  keep the first; shuffle its negatives too, which keeps none but consumes the generator), and a
  validation split of `round(fraction * N)` rows from `RandomState(split seed).permutation(N)`.
  Their draws depend on the whole split's order, so they are reproduced for whole splits only.

Every function takes and returns rows in the caller's order (ours: image ids ascending).
"""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("cole", "keyed")


def draw_observed(labels: np.ndarray, image_ids: np.ndarray, seed: int, protocol: str = "keyed",
                  class_order: np.ndarray | None = None) -> np.ndarray:
    """One observed positive per row, uniform among that row's true positives; all else unobserved.

    labels: (N, L) multi-hot, every row with at least one positive. class_order (cole only): the
    columns of `labels` in the order the annotation file lists its categories (default: as they
    are). Returns (N, L) uint8 one-hot.
    """
    labels = np.asarray(labels)
    counts = labels.sum(axis=1)
    if (counts == 0).any():
        row = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"image id {int(image_ids[row])} has no positive label to observe")
    if protocol == "keyed":
        return _draw_keyed(labels, image_ids, counts, seed)
    if protocol == "cole":
        return _draw_cole(labels, image_ids, seed, class_order)
    raise ValueError(f"unknown observed-label protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")


def split_train_val(image_ids: np.ndarray, fraction: float, seed: int,
                    protocol: str = "keyed") -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the training and validation parts, each sorted; `fraction` goes to validation.

    The permutation is over a canonical order of the ids (ascending for keyed, as strings for cole),
    so the split depends only on the set of ids, not on the order they are given in.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown observed-label protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    n = len(image_ids)
    n_val = int(np.round(fraction * n))
    if n_val == 0 or n_val == n:
        raise ValueError(f"validation fraction {fraction} of {n} images leaves an empty train or val split")
    if protocol == "cole":
        order = cole_row_order(image_ids)
        perm = np.random.RandomState(seed).permutation(n)
        return np.sort(order[perm[: n - n_val]]), np.sort(order[perm[-n_val:]])
    order = np.argsort(image_ids, kind="stable")
    permuted = order[np.random.default_rng(seed).permutation(n)]
    return np.sort(permuted[n_val:]), np.sort(permuted[:n_val])


def cole_row_order(image_ids: np.ndarray) -> np.ndarray:
    """Our rows in Cole et al.'s order: image ids sorted as strings ("100" before "25")."""
    return np.argsort(np.asarray(image_ids).astype(str), kind="stable")


def _draw_keyed(labels: np.ndarray, image_ids: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    observed = np.zeros(labels.shape, dtype=np.uint8)
    for row, (image_id, count) in enumerate(zip(image_ids, counts, strict=True)):
        pick = np.random.default_rng([seed, int(image_id)]).integers(int(count))
        observed[row, np.flatnonzero(labels[row])[pick]] = 1
    return observed


def _draw_cole(labels: np.ndarray, image_ids: np.ndarray, seed: int,
               class_order: np.ndarray | None) -> np.ndarray:
    columns = np.arange(labels.shape[1]) if class_order is None else np.asarray(class_order)
    theirs = labels[:, columns]  # their class index k is our column columns[k]
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.uint8)
    for row in cole_row_order(image_ids):
        positives = np.nonzero(theirs[row] == 1)[0]
        rng.shuffle(positives)
        observed[row, columns[positives[0]]] = 1
        rng.shuffle(np.nonzero(theirs[row] == 0)[0])  # num_neg = 0: none kept, the draw still made
    return observed
