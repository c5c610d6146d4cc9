"""Read a COCO-format `instances` file into label sets (source.py), with every input checked first.

COCO's category ids are not contiguous (1..90 with gaps); they are mapped to 0..L-1 in id order.
Images without annotations are dropped and counted, as Cole et al. 2021 do. Problems a user can fix
(malformed JSON, an id that is not a JSON integer, two records with the same id (or two images with the
same file), unknown category, annotation of a missing image, missing image file, empty split) raise
`DataError` naming the file and record(s), before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError
from ffcv_data.source import SourceSplit, check_images_exist
from ffcv_data.sparse import LabelRows


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def read_split(root: str | Path, split: str, images: Path | None = None) -> SourceSplit:
    """Read `<root>/annotations/instances_<split>.json` and check `<root>/<split>/<file_name>` exist.
    Rows are the images with annotations, image ids ascending; Cole et al.'s scripts walk them with
    the ids sorted as strings, and number the classes in the order the file lists them."""
    root = Path(root)
    ann_file = annotation_path(root, split)
    dataset = _load_json(ann_file)
    coco = _index(dataset, ann_file)

    category_ids = sorted(coco.getCatIds())
    if not category_ids:
        raise DataError(f"{ann_file}: 'categories' is empty")
    column = {cat_id: i for i, cat_id in enumerate(category_ids)}
    names = [coco.cats[c]["name"] for c in category_ids]

    image_ids = sorted(coco.getImgIds())
    kept_ids, files, label_sets = [], [], []
    dropped = {"no_annotations": 0}
    for image_id in image_ids:
        anns = coco.imgToAnns.get(image_id, [])
        if not anns:
            dropped["no_annotations"] += 1
            continue
        kept_ids.append(image_id)
        files.append(root / split / coco.imgs[image_id]["file_name"])
        label_sets.append([column[ann["category_id"]] for ann in anns])

    if not kept_ids:
        raise DataError(
            f"{ann_file}: split '{split}' is empty ({len(image_ids)} images read, none with annotations)"
        )
    keys = np.asarray(kept_ids, dtype=np.int64)
    out = SourceSplit(
        name=split, source_file=ann_file, label_files=[ann_file], image_root=root / split, files=files,
        keys=keys, labels=LabelRows.from_sets(label_sets, len(names)), class_names=names,
        class_ids=category_ids,
        reference_order=np.argsort(keys.astype(str), kind="stable"),  # "100" before "25"
        reference_classes=np.asarray([column[c["id"]] for c in dataset["categories"]], dtype=np.int64),
        images_read=len(image_ids), dropped=dropped,
    )
    check_images_exist(out)
    return out


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataError(f"{path}: malformed JSON at {where}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list '{key}'")
    return data


def _index(dataset: dict, path: Path):
    """Check record-level consistency (pycocotools does not), then build the pycocotools index."""
    from pycocotools.coco import COCO

    cats = _records(dataset, "categories", ("id", "name"), path)
    imgs = _records(dataset, "images", ("id", "file_name"), path)
    anns = _records(dataset, "annotations", ("id", "image_id", "category_id"), path)
    for i, img in enumerate(imgs):
        if not isinstance(img["file_name"], str):
            raise DataError(f"{path}: images[{i}] (id {img['id']}) has file_name {img['file_name']!r} of "
                            f"type {type(img['file_name']).__name__}, not a string")
    cat_ids = _unique(cats, "categories", "id", path, lambda c: f"name {c['name']!r}")
    img_ids = _unique(imgs, "images", "id", path, lambda img: f"file_name {img['file_name']!r}")
    _unique(imgs, "images", "file_name", path, lambda img: f"id {img['id']}")
    _unique(anns, "annotations", "id", path, lambda a: f"image_id {a['image_id']}")
    for i, ann in enumerate(anns):
        if ann["category_id"] not in cat_ids:
            raise DataError(
                f"{path}: annotations[{i}] (id {ann['id']}) has category_id {ann['category_id']}, "
                "which is not in 'categories'"
            )
        if ann["image_id"] not in img_ids:
            raise DataError(
                f"{path}: annotations[{i}] (id {ann['id']}) refers to image_id {ann['image_id']}, "
                "which is not in 'images'"
            )
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _records(dataset: dict, key: str, fields: tuple[str, ...], path: Path) -> list[dict]:
    """dataset[key], each a dict with `fields`, whose id fields (id, *_id) are JSON integers."""
    records = dataset[key]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or any(f not in rec for f in fields):
            raise DataError(f"{path}: {key}[{i}] lacks {' or '.join(repr(f) for f in fields)}")
        for f in fields:
            value = rec[f]
            if (f == "id" or f.endswith("_id")) and (not isinstance(value, int) or isinstance(value, bool)):
                which = f" (id {rec['id']!r})" if f != "id" else ""
                raise DataError(f"{path}: {key}[{i}]{which} has {f} {value!r} of type "
                                f"{type(value).__name__}; ids must be JSON integers")
    return records


def _unique(records: list[dict], key: str, field: str, path: Path, describe) -> set:
    """The set of `field` over `records`; a value that two records share is an error naming both."""
    first: dict = {}
    for i, rec in enumerate(records):
        j = first.setdefault(rec[field], i)
        if j != i:
            raise DataError(f"{path}: {key}[{j}] ({describe(records[j])}) and {key}[{i}] "
                            f"({describe(rec)}) have the same {field} {rec[field]!r}")
    return set(first)
