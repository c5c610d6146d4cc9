"""The single-positive protocol of Cole et al. 2021 and the seeded train/validation split.

Each draw is keyed by (seed, COCO image id), not by position or process: the observed positive of an
image is the same whichever subset of images is prepared, in whatever order, by however many
processes.
"""

from __future__ import annotations

import numpy as np


def draw_observed(labels: np.ndarray, image_ids: np.ndarray, seed: int) -> np.ndarray:
    """One observed positive per row, uniform among that row's true positives; all else unobserved.

    labels: (N, L) multi-hot, every row with at least one positive. Returns (N, L) uint8 one-hot.
    """
    labels = np.asarray(labels)
    counts = labels.sum(axis=1)
    if (counts == 0).any():
        row = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"image id {int(image_ids[row])} has no positive label to observe")
    observed = np.zeros(labels.shape, dtype=np.uint8)
    for row, (image_id, count) in enumerate(zip(image_ids, counts, strict=True)):
        pick = np.random.default_rng([seed, int(image_id)]).integers(int(count))
        observed[row, np.flatnonzero(labels[row])[pick]] = 1
    return observed


def split_train_val(image_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the training and validation parts, each sorted; `fraction` goes to validation.

    The permutation is over image ids sorted ascending, so the split depends only on the set of ids.
    """
    order = np.argsort(image_ids, kind="stable")
    permuted = order[np.random.default_rng(seed).permutation(len(order))]
    n_val = int(round(fraction * len(order)))
    if n_val == 0 or n_val == len(order):
        raise ValueError(
            f"validation fraction {fraction} of {len(order)} images leaves an empty train or val split"
        )
    return np.sort(permuted[n_val:]), np.sort(permuted[:n_val])
