"""Built-in synthetic multi-label data set, written in the real COCO layout (or as CSV lists).

Scenes hold 1-5 objects from 20 categories; each category is a unique (shape, colour) pair, and
every shape and every colour is shared by at least two categories, so a classifier has to look at
both. Like COCO, the labels are long-tailed and co-occur through scene types (each with its own
category mix and background style), giving about 2.7 distinct labels per image. That is what makes
the single-positive setting lose information: with one observed positive per image, the other
~1.7 true labels are wrongly treated as negatives.

Layout (identical to COCO, so the same loaders serve both)::

    out/annotations/instances_<split>.json
    out/<split>/<file_name>          # 000000000001.jpg, ...

``layout="csv"`` writes the same images and labels in the csv format's layout (csv_lists.py), what
a user's own single-positive data looks like::

    out/images/<file_name>           # both splits' images, ids unique across them
    out/train.csv                    # file,label: each image's one observed positive (keyed draw)
    out/val.csv                      # file,labels: a fifth of the generated training images, all labels
    out/test.csv                     # file,labels
    out/classes.txt                  # every class name, in id order (data.classes)

Everything is deterministic in ``seed``: every image gets its own random stream keyed by
(seed, split role, index), so its pixels do not depend on generation order or on the other split.

``num_classes`` above the 20 drawn categories adds tag classes, a label space as sparse as large
sets have (Open Images: ~20k classes, a few per image): each image also carries 1 + Poisson(0.5)
tags drawn from a long tail (weight ~ 1 / rank) over the other ``num_classes - 20`` classes, from a
stream of its own, so the pixels and the drawn categories are those of the 20-class set. Tags are
not drawn in the image: they exercise the label path at scale, not a model.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ffcv_data.atomic import temporary_path
from ffcv_data.protocol import draw_observed, split_train_val
from ffcv_data.source import string_key
from ffcv_data.sparse import LabelRows

# RGB fill colours. Saturated and far apart (each pair differs by >= ~85 in some channel) so that
# JPEG and colour jitter never make two of them confusable, and all sit away from the desaturated,
# mid-brightness backgrounds below.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 65, 225),
    "yellow": (235, 225, 35),
    "orange": (245, 135, 20),
    "magenta": (215, 40, 200),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}

# (shape, colour, base frequency). Ids are list position + 1. Circle and hexagon never share a
# colour: at 8 px they differ by a pixel or two, which would be label noise, not a visual task.
# The base frequencies form the long tail (head/tail ~ 12x in images per class) and are
# deliberately not sorted by id, like COCO's.
_CATEGORY_TABLE: list[tuple[str, str, float]] = [
    ("circle", "red", 1.00),
    ("square", "blue", 0.80),
    ("triangle", "green", 0.62),
    ("star", "yellow", 0.45),
    ("bar", "white", 0.90),
    ("diamond", "orange", 0.22),
    ("ring", "cyan", 0.50),
    ("plus", "magenta", 0.12),
    ("circle", "blue", 0.40),
    ("triangle", "red", 0.70),
    ("square", "yellow", 0.30),
    ("cross", "green", 0.26),
    ("ellipse", "orange", 0.55),
    ("hexagon", "white", 0.34),
    ("star", "cyan", 0.16),
    ("semicircle", "magenta", 0.10),
    ("bar", "red", 0.19),
    ("diamond", "blue", 0.14),
    ("ring", "green", 0.08),
    ("hexagon", "yellow", 0.12),
]

CATEGORIES: list[str] = [f"{colour} {shape}" for shape, colour, _ in _CATEGORY_TABLE]


@dataclass(frozen=True)
class _Scene:
    """A scene type: which categories it favours and what its background looks like."""

    name: str
    prob: float
    core: tuple[int, ...]  # category ids (1-based) boosted in this scene
    style: str  # background generator, see _BACKGROUNDS
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]


# Each category is "core" in one or two scenes; a core category is _CORE_BOOST times more likely
# there. This is what makes labels co-occur (as knife/fork/cup do in COCO kitchens), so labels are
# not independent and a model can exploit context, as on real data.
_SCENES: tuple[_Scene, ...] = (
    _Scene("kitchen", 0.25, (1, 11, 13, 14, 2, 17), "gradient", (170, 150, 125), (115, 100, 85)),
    _Scene("street", 0.24, (5, 2, 10, 7, 20, 12), "stripes", (105, 105, 112), (145, 145, 150)),
    _Scene("park", 0.19, (3, 19, 4, 16, 6, 1), "blotches", (70, 95, 60), (115, 120, 80)),
    _Scene("beach", 0.18, (15, 9, 4, 13, 5, 18), "diagonal", (175, 165, 130), (115, 145, 160)),
    _Scene("night", 0.14, (8, 7, 14, 9, 12, 17), "speckle", (25, 30, 55), (50, 55, 90)),
)
_CORE_BOOST = 8.0

# Number of distinct categories per image, 1..5 (mean 2.7, COCO's is 2.9). Occlusion rejections
# lower the realised mean slightly.
_K_PROBS = np.array([0.14, 0.30, 0.31, 0.18, 0.07])
_DUPLICATE_PROB = 0.25  # chance of one extra instance of a category already in the scene
_MAX_OBJECTS = 5
_SIZE_RANGE = (0.13, 0.40)  # object extent as a fraction of the image side
_MIN_VISIBLE = 0.5  # every annotated object keeps at least this fraction of its pixels
_PLACEMENT_TRIES = 12
_MIN_PIXELS = 12  # a shape smaller than this is not recognisable; re-sample it

_SPLIT_ROLES = {"train": 0, "test": 1}  # stream keys by role, so renaming a split keeps pixels
_TAG_STREAM = 7  # the tags' random stream: (seed, role, index, _TAG_STREAM)
_TAGS_EXTRA = 0.5  # tags per image: 1 + Poisson(0.5)
_JPEG_QUALITY = 95
LAYOUTS = ("coco", "csv")
CSV_VAL_FRACTION = 0.2  # layout csv: the training images held out into val.csv


# ----------------------------------------------------------------------------- shapes


def _rotate(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]])
    return [(float(x + cx), float(y + cy)) for x, y in rot]


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _rect(half_len: float, half_wid: float) -> np.ndarray:
    return np.array([[-half_len, -half_wid], [half_len, -half_wid],
                     [half_len, half_wid], [-half_len, half_wid]])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rng: np.random.Generator) -> None:
    """Draw `shape` with circumradius `r` centred at (cx, cy) into a mask, fill 255.

    Square/diamond and plus/cross only get a small tilt (+-15 deg): a square turned 45 deg is a
    diamond and a turned plus is a cross, and we want those to stay distinct categories.
    """
    tilt = rng.uniform(-math.pi / 12, math.pi / 12)
    free = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, round(0.38 * r)))
    elif shape == "semicircle":
        start = math.degrees(free)
        draw.pieslice(box, start, start + 180, fill=255)
    elif shape == "square":
        draw.polygon(_rotate(_regular(4, r, math.pi / 4), tilt, cx, cy), fill=255)
    elif shape == "diamond":
        rhombus = np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]])
        draw.polygon(_rotate(rhombus, tilt, cx, cy), fill=255)
    elif shape == "triangle":
        draw.polygon(_rotate(_regular(3, r), free, cx, cy), fill=255)
    elif shape == "hexagon":
        draw.polygon(_rotate(_regular(6, r), free, cx, cy), fill=255)
    elif shape == "star":
        outer, inner = _regular(5, r), _regular(5, 0.42 * r, math.pi / 5)
        star = np.stack([outer, inner], axis=1).reshape(-1, 2)
        draw.polygon(_rotate(star, free, cx, cy), fill=255)
    elif shape == "bar":
        draw.polygon(_rotate(_rect(r, 0.28 * r), free, cx, cy), fill=255)
    elif shape == "ellipse":
        t = 2 * math.pi * np.arange(24) / 24
        pts = np.stack([r * np.cos(t), 0.5 * r * np.sin(t)], axis=1)
        draw.polygon(_rotate(pts, free, cx, cy), fill=255)
    elif shape in ("plus", "cross"):
        angle = tilt + (math.pi / 4 if shape == "cross" else 0.0)
        arm = _rect(r * 0.95, 0.3 * r)
        draw.polygon(_rotate(arm, angle, cx, cy), fill=255)
        draw.polygon(_rotate(arm, angle + math.pi / 2, cx, cy), fill=255)
    else:  # pragma: no cover - the table above is the only source of shapes
        raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random scale, position and rotation; the whole shape lies inside the image."""
    r = 0.5 * size * rng.uniform(*_SIZE_RANGE)
    cx, cy = rng.uniform(r, size - r, 2)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, rng)
    return np.asarray(mask) > 0


# ----------------------------------------------------------------------------- backgrounds


def _mix(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + t[..., None] * (b - a)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _bg_gradient(rng, size, a, b):
    x, y = _coords(size)
    angle = rng.uniform(0, 2 * math.pi)
    proj = x * math.cos(angle) + y * math.sin(angle)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    return _mix(t, a, b)


def _stripes(rng, size, a, b, angle):
    x, y = _coords(size)
    period = rng.uniform(6, 16)
    proj = x * math.cos(angle) + y * math.sin(angle)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
    return _mix(t, a, b)


def _bg_stripes(rng, size, a, b):
    return _stripes(rng, size, a, b, math.pi / 2 + rng.uniform(-0.2, 0.2))


def _bg_diagonal(rng, size, a, b):
    return _stripes(rng, size, a, b, rng.choice([1, -1]) * math.pi / 4 + rng.uniform(-0.3, 0.3))


def _bg_blotches(rng, size, a, b):
    # Low-frequency noise: a coarse random grid smoothly upsampled.
    cells = int(rng.integers(4, 9))
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    t = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return _mix(t, a, b)


def _bg_speckle(rng, size, a, b):
    t = rng.random((size, size)).astype(np.float32) ** 3  # mostly dark, a few brighter specks
    return _mix(t, a, b)


_BACKGROUNDS = {
    "gradient": _bg_gradient,
    "stripes": _bg_stripes,
    "diagonal": _bg_diagonal,
    "blotches": _bg_blotches,
    "speckle": _bg_speckle,
}


def _background(scene: _Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    # Per-image colour jitter, so the background hints at the scene without being a fixed key.
    a = np.array(scene.colour_a, np.float32) + rng.normal(0, 14, 3).astype(np.float32)
    b = np.array(scene.colour_b, np.float32) + rng.normal(0, 14, 3).astype(np.float32)
    return _BACKGROUNDS[scene.style](rng, size, a, b).astype(np.float32)


# ----------------------------------------------------------------------------- scenes


def _scene_weights() -> list[np.ndarray]:
    base = np.array([w for _, _, w in _CATEGORY_TABLE])
    out = []
    for scene in _SCENES:
        w = base.copy()
        w[np.array(scene.core) - 1] *= _CORE_BOOST
        out.append(w / w.sum())
    return out


_SCENE_PROBS = np.array([s.prob for s in _SCENES])
_SCENE_WEIGHTS = _scene_weights()


def _sample_categories(rng: np.random.Generator) -> tuple[_Scene, list[int]]:
    """Scene type, then category ids (1-based, drawing order) including duplicate instances."""
    scene_idx = int(rng.choice(len(_SCENES), p=_SCENE_PROBS))
    k = int(rng.choice(len(_K_PROBS), p=_K_PROBS)) + 1
    cats = [int(c) + 1 for c in rng.choice(len(CATEGORIES), k, replace=False,
                                           p=_SCENE_WEIGHTS[scene_idx])]
    while len(cats) < _MAX_OBJECTS and rng.random() < _DUPLICATE_PROB:
        cats.append(cats[int(rng.integers(len(cats)))])
    rng.shuffle(cats)  # draw order decides who occludes whom; don't always bury duplicates
    return _SCENES[scene_idx], cats


def _visible_counts(owner: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(owner[owner >= 0], minlength=n)


def _place_objects(cats: list[int], size: int, rng: np.random.Generator):
    """Place objects in drawing order; later ones occlude earlier ones.

    A new object is re-sampled if it would leave any earlier object less than _MIN_VISIBLE
    visible, and dropped (neither drawn nor annotated) if no placement works, so every label is
    backed by a clearly visible object. Returns (owner map, kept category ids, full areas).
    """
    owner = np.full((size, size), -1, np.int16)  # index of the topmost object per pixel
    kept: list[int] = []
    areas: list[int] = []
    for cat in cats:
        shape = _CATEGORY_TABLE[cat - 1][0]
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(shape, size, rng)
            area = int(mask.sum())
            if area < _MIN_PIXELS:
                continue
            trial = owner.copy()
            trial[mask] = len(kept)
            visible = _visible_counts(trial, len(kept))
            if all(visible[i] >= _MIN_VISIBLE * areas[i] for i in range(len(kept))):
                owner, kept, areas = trial, kept + [cat], areas + [area]
                break
    return owner, kept, areas


def _render(scene: _Scene, owner: np.ndarray, kept: list[int], size: int,
            rng: np.random.Generator) -> np.ndarray:
    img = _background(scene, size, rng)
    x, y = _coords(size)
    for i, cat in enumerate(kept):
        colour = np.array(_COLOURS[_CATEGORY_TABLE[cat - 1][1]], np.float32)
        colour += rng.normal(0, 9, 3).astype(np.float32)
        # A soft lighting ramp across the object, so colour is not one flat RGB value.
        angle = rng.uniform(0, 2 * math.pi)
        ramp = 1.0 + 0.12 * ((x * math.cos(angle) + y * math.sin(angle)) / size - 0.5)
        sel = owner == i
        img[sel] = colour * ramp[sel][:, None]
    img += rng.normal(0, rng.uniform(3, 9), img.shape).astype(np.float32)  # sensor-ish noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _annotations(owner: np.ndarray, kept: list[int]) -> list[dict]:
    """COCO-style bbox/area of each object's visible pixels (COCO derives both from the mask)."""
    anns = []
    for i, cat in enumerate(kept):
        ys, xs = np.nonzero(owner == i)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
        anns.append({"category_id": cat, "bbox": bbox, "area": float(len(xs)), "iscrowd": 0})
    return anns


def _make_image(seed: int, role: int, index: int, size: int) -> tuple[Image.Image, list[dict]]:
    # One stream per image: pixels depend only on (seed, split role, index).
    rng = np.random.default_rng([seed, role, index])
    scene, cats = _sample_categories(rng)
    owner, kept, _ = _place_objects(cats, size, rng)
    pixels = _render(scene, owner, kept, size, rng)
    return Image.fromarray(pixels, "RGB"), _annotations(owner, kept)


# ----------------------------------------------------------------------------- COCO files


def _categories_json(num_classes: int) -> list[dict]:
    drawn = [{"id": i + 1, "name": CATEGORIES[i], "supercategory": shape}
             for i, (shape, _, _) in enumerate(_CATEGORY_TABLE)]
    return drawn + [{"id": c, "name": f"tag {c}", "supercategory": "tag"}
                    for c in range(len(CATEGORIES) + 1, num_classes + 1)]


def _tags(seed: int, role: int, index: int, num_classes: int, size: int) -> list[dict]:
    """The tag annotations of one image (none in the 20-class set), each over the whole image."""
    tags = num_classes - len(CATEGORIES)
    if tags <= 0:
        return []
    rng = np.random.default_rng([seed, role, index, _TAG_STREAM])
    weights = 1.0 / np.arange(1, tags + 1)
    drawn = rng.choice(tags, size=min(tags, 1 + rng.poisson(_TAGS_EXTRA)), replace=False,
                       p=weights / weights.sum())
    return [{"category_id": len(CATEGORIES) + 1 + int(t), "bbox": [0.0, 0.0, float(size), float(size)],
             "area": float(size * size), "iscrowd": 0} for t in sorted(drawn)]


def _write_split(root: Path, split: str, role: int, seed: int, n: int, size: int,
                 first_image_id: int, first_ann_id: int, num_classes: int, folder: str = "") -> dict:
    """Write one split's JPEGs into `root / folder` (default: the split's name) and return its COCO
    dict (without 'info')."""
    folder = folder or split
    (root / folder).mkdir(exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(n):
        image_id = first_image_id + index
        file_name = f"{image_id:012d}.jpg"
        img, anns = _make_image(seed, role, index, size)
        anns += _tags(seed, role, index, num_classes, size)
        img.save(root / folder / file_name, format="JPEG", quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for ann in anns:
            annotations.append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
    return {"licenses": [], "images": images, "annotations": annotations,
            "categories": _categories_json(num_classes)}


def _info(split: str, seed: int, size: int) -> dict:
    # No timestamp: the files must be byte-identical for the same seed.
    return {"description": "pml-dist synthetic multi-label shapes", "version": "1.0",
            "split": split, "seed": seed, "image_size": size,
            "generator": "ffcv_data.synthetic.make_synthetic"}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


def split_stats(coco: dict) -> dict:
    """Counts for one COCO dict: images, annotations, mean labels/image, images per class."""
    labels: dict[int, set[int]] = {img["id"]: set() for img in coco["images"]}
    for ann in coco["annotations"]:
        labels[ann["image_id"]].add(ann["category_id"])
    per_class = Counter(c for cats in labels.values() for c in cats)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    n = len(labels)
    return {
        "images": n,
        "annotations": len(coco["annotations"]),
        "mean_labels_per_image": sum(map(len, labels.values())) / n if n else 0.0,
        "mean_objects_per_image": len(coco["annotations"]) / n if n else 0.0,
        "class_image_counts": {names[c]: per_class.get(c, 0) for c in sorted(names)},
    }


def _write_csv_layout(out: Path, cocos: dict[str, dict], seed: int, train_split: str, val_split: str,
                      test_split: str) -> dict:
    """The generated splits as the csv format's files, written from their COCO dicts (module
    docstring); returns the rows per CSV. train.csv holds what a single-positive data set gives: one
    positive per image, drawn from its labels as prepare's keyed draw would (keyed by the CSV's file
    name, seeded by `seed`); val.csv, held out of the same images, keeps every label, so validation
    mAP can select a model."""
    names = [c["name"] for c in cocos[train_split]["categories"]]  # ids 1..L in order
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    files, sets = _label_sets(cocos[train_split])
    keys = np.array([string_key(f) for f in files], dtype=np.int64)
    train_rows, val_rows = split_train_val(keys, CSV_VAL_FRACTION, seed)
    # an image none of whose objects could be placed has no label, so no single positive to show
    labelled = np.array([r for r in train_rows if sets[r]], dtype=np.int64)
    observed = draw_observed(LabelRows.from_sets([sets[r] for r in labelled], len(names)), keys[labelled],
                             seed)
    rows = {
        train_split: ("label", [(files[r], names[c]) for r, c in zip(labelled, observed, strict=True)]),
        val_split: ("labels", [(files[r], "|".join(names[c] for c in sets[r])) for r in val_rows]),
        test_split: ("labels", [(f, "|".join(names[c] for c in cs))
                                for f, cs in zip(*_label_sets(cocos[test_split]), strict=True)]),
    }
    for split, (column, lines) in rows.items():
        with open(out / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("file", column))
            writer.writerows(lines)
    return {split: len(lines) for split, (_, lines) in rows.items()}


def _label_sets(coco: dict) -> tuple[list[str], list[list[int]]]:
    """Each image's file under out/ (images/<file_name>) and its class indices (category id - 1)."""
    sets: dict[int, set[int]] = {img["id"]: set() for img in coco["images"]}
    for ann in coco["annotations"]:
        sets[ann["image_id"]].add(ann["category_id"] - 1)
    return ([f"images/{img['file_name']}" for img in coco["images"]],
            [sorted(sets[img["id"]]) for img in coco["images"]])


def summarize(out: str | Path, split: str) -> dict:
    """split_stats() of an existing data set's `split`."""
    path = Path(out) / "annotations" / f"instances_{split}.json"
    return split_stats(json.loads(path.read_text(encoding="utf-8")))


def _check_args(n_train: int, n_test: int, image_size: int, train_split: str,
                test_split: str, num_classes: int, layout: str = "coco", val_split: str = "val") -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if layout == "csv":
        if n_train < 3:  # a fifth, rounded, must leave both parts non-empty
            raise ValueError(f"layout csv holds out a fifth of the training images for val.csv: n_train "
                             f"must be >= 3, got {n_train}")
        if val_split in (train_split, test_split, "") or "/" in val_split:
            raise ValueError(f"bad validation split name {val_split!r} (it must differ from the others)")
    if num_classes < len(CATEGORIES):
        raise ValueError(f"num_classes must be >= {len(CATEGORIES)} (the drawn categories), "
                         f"got {num_classes}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (objects become unreadable), got {image_size}")
    if train_split == test_split:
        raise ValueError(f"train_split and test_split must differ, both are {train_split!r}")
    for name in (train_split, test_split):
        if not name or "/" in name or name in (".", "..", "annotations"):
            raise ValueError(f"bad split name {name!r}")


def make_synthetic(out: str | Path, seed: int = 0, n_train: int = 2000, n_test: int = 500,
                   image_size: int = 64, train_split: str = "train",
                   test_split: str = "test", num_classes: int = len(CATEGORIES), layout: str = "coco",
                   val_split: str = "val") -> dict:
    """Generate the synthetic data set at `out` and return a summary per split. `layout`: "coco", or
    "csv" (the module docstring; `val_split` names its val.csv).

    Built in a hidden sibling folder and renamed into place at the end, so an interrupted run
    never leaves a partial data set at `out` (which would later be mistaken for a complete one).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"refusing to overwrite existing data set folder: {out}")
    _check_args(n_train, n_test, image_size, train_split, test_split, num_classes, layout, val_split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out, keep_suffix=False)  # .NAME.tmp-HOST-PID
    if tmp.exists():  # left by an earlier, killed run of a process with the same host and pid
        shutil.rmtree(tmp)
    try:
        (tmp / "annotations" if layout == "coco" else tmp).mkdir(parents=True)
        splits, cocos = {}, {}
        next_image, next_ann = 1, 1
        for split, role, n in ((train_split, _SPLIT_ROLES["train"], n_train),
                               (test_split, _SPLIT_ROLES["test"], n_test)):
            coco = _write_split(tmp, split, role, seed, n, image_size, next_image, next_ann,
                                num_classes, folder="images" if layout == "csv" else split)
            next_image += n
            next_ann += len(coco["annotations"])
            if layout == "coco":
                _write_json(tmp / "annotations" / f"instances_{split}.json",
                            {"info": _info(split, seed, image_size), **coco})
            splits[split] = split_stats(coco)
            cocos[split] = coco
        csv_rows = (_write_csv_layout(tmp, cocos, seed, train_split, val_split, test_split)
                    if layout == "csv" else None)
        if out.exists():  # someone else created it while we were generating
            raise FileExistsError(f"refusing to overwrite existing data set folder: {out}")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"out": str(out), "seed": seed, "image_size": image_size, "splits": splits}
    return summary if csv_rows is None else {**summary, "layout": "csv", "csv_rows": csv_rows}


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 (height, width, 3) that JPEG-compresses like a photo (large test images for predict's
    decoding, tests/pml_dist/use and bench/bench_predict_decode.py): smooth colour areas (a bicubic
    enlargement of a coarse random grid), a finer texture, edges (a few flat rectangles) and noise."""
    rng = np.random.default_rng(seed)

    def enlarged(cells: int, spread: float) -> np.ndarray:
        grid = rng.uniform(0, 255, (max(2, height // cells), max(2, width // cells), 3)).astype(np.uint8)
        big = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        return (big - 127.5) * spread

    x = 127.5 + enlarged(max(height, width) // 6, 0.9) + enlarged(24, 0.15)
    for _ in range(6):
        top, left = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
        x[top:top + height // 5, left:left + width // 6] = rng.uniform(0, 255, 3)
    x += rng.normal(0, 4, x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)
