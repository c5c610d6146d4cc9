"""Cole et al. 2021's preparation scripts (elijahcole/single-positive-multi-label: preproc/format_pascal.py,
preproc/format_cub.py, preproc/generate_observed_labels.py, datasets.generate_split), re-implemented
here from their description (../shared/reference/spml-protocol.md, the issue), dense and line by line
as they are, so the readers in ffcv_data can be checked against them. Loaded by file path
(tests/ffcv_data/conftest.py: the tests folder is not on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def observe(y: np.ndarray, seed: int = 1200) -> np.ndarray:
    """generate_observed_labels.py, uniform, one positive, no negatives: a fresh RandomState per split;
    per row shuffle the positives and keep the first, then shuffle the negatives (none kept). A row
    without a positive keeps none."""
    y = np.where(y == 1, 1.0, -1.0)
    rng = np.random.RandomState(seed)
    obs = np.zeros_like(y)
    for i in range(len(y)):
        pos = np.nonzero(y[i] == 1.0)[0]
        rng.shuffle(pos)
        obs[i, pos[:1]] = 1.0
        neg = np.nonzero(y[i] == -1.0)[0]
        rng.shuffle(neg)
        obs[i, neg[:0]] = -1.0
    return obs


def split(n: int, frac: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """datasets.generate_split (the subsampling at fraction 1.0 that follows keeps every row): the last
    round(frac n) of RandomState(seed).permutation(n) are validation, both parts sorted."""
    n_val = int(np.round(frac * n))
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[: n - n_val]), np.sort(perm[-n_val:])


def format_pascal(root: Path, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """format_pascal.py: the 20 class lists of `phase`; `line.rstrip().split(' ')`, first field the id,
    last the label; only label 1 adds the image (on its first positive) and the class; the list sorted."""
    ann: dict[str, list[int]] = {}
    images: list[str] = []
    for cat_id, cat in enumerate(VOC_CLASSES):
        path = Path(root) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / f"{cat}_{phase}.txt"
        for line in path.read_text().splitlines():
            cur = line.rstrip().split(" ")
            fname = cur[0] + ".jpg"
            if int(cur[-1]) == 1:
                if fname not in ann:
                    ann[fname] = []
                    images.append(fname)
                ann[fname].append(cat_id)
    images.sort()
    y = np.zeros((len(images), len(VOC_CLASSES)))
    for i, fname in enumerate(images):
        y[i, ann[fname]] = 1
    return np.array(images), y


def format_cub(cub: Path, attributes_txt: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """format_cub.py: images.txt, train_test_split.txt and image_attribute_labels.txt read by position
    (pandas, space-delimited, usecols), the labels filled by a running counter over the attribute file
    (image after image, attribute after attribute); is_present whatever the certainty; rows in
    images.txt order, is_train 1 -> train, 0 -> val (their test set)."""
    images = [line.split(" ")[1] for line in (cub / "images.txt").read_text().splitlines() if line]
    is_train = [int(line.split(" ")[1]) for line in (cub / "train_test_split.txt").read_text().splitlines()
                if line]
    n_attr = len([line for line in attributes_txt.read_text().splitlines() if line])
    attrs = [line.split(" ") for line in
             (cub / "attributes" / "image_attribute_labels.txt").read_text().splitlines() if line]
    out: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    k = 0
    for i in range(len(images)):
        row = []
        for _ in range(n_attr):
            row.append(int(attrs[k][2]))
            k += 1
        phase = "train" if is_train[i] == 1 else "val"
        out[phase][0].append(images[i])
        out[phase][1].append(row)
    return {phase: (np.array(names), np.array(rows)) for phase, (names, rows) in out.items()}
