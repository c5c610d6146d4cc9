"""COCO-format root -> a prepared folder: {train,val,test}.beton + meta + stats.json (prepared.py).

Plain arguments only (`PrepareSpec`): the data package knows nothing of the experiment config;
`pml_dist/data_stage.py` maps the config onto it. Every input is read and checked before any .beton
is written. A split whose .beton already exists is skipped (each appears only when complete), so an
interrupted prepare resumes. `stats.json` is written last and marks the data stage as done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with, write_json
from ffcv_data.beton import write_beton
from ffcv_data.coco import CocoSplit, read_split
from ffcv_data.errors import DataError
from ffcv_data.prepared import PreparedData
from ffcv_data.protocol import draw_observed, split_train_val

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSpec:
    """What `prepare` reads and how it encodes (the experiment's `data.*` keys)."""

    root: Path  # annotations/instances_<split>.json and <split>/*.jpg
    train_split: str
    test_split: str
    observed_seed: int
    val_fraction: float
    val_seed: int
    max_resolution: int
    jpeg_quality: int
    observed_protocol: str = "keyed"  # protocol.py: cole (Cole et al.'s exact draws) or keyed
    keep_original_jpegs: bool = True  # beton.py: JPEGs FFCV decodes as PIL does are stored as they are
    write_workers: int = 0


def prepare(d: PrepareSpec, out: PreparedData) -> dict:
    """Write the three .beton files and stats.json into `out`; returns the stats."""
    t0 = time.perf_counter()
    root = Path(d.root)
    train_full = read_split(root, d.train_split)
    test = read_split(root, d.test_split)
    if train_full.category_ids != test.category_ids:
        raise DataError(
            f"{test.annotation_file}: categories differ from those of {train_full.annotation_file}"
        )
    # Each source split gets its own draw over all of it (Cole et al. draw train2014 and val2014).
    observed_full, observed_test = (
        draw_observed(s.labels, s.image_ids, d.observed_seed, d.observed_protocol, s.listed_columns)
        for s in (train_full, test)
    )
    try:
        train_rows, val_rows = split_train_val(train_full.image_ids, d.val_fraction, d.val_seed,
                                               d.observed_protocol)
    except ValueError as exc:
        raise DataError(f"{train_full.annotation_file}: {exc}") from None
    parts = {
        "train": (train_full, train_rows, observed_full[train_rows]),
        "val": (train_full, val_rows, observed_full[val_rows]),
        "test": (test, np.arange(len(test)), observed_test),
    }

    Path(out.folder).mkdir(parents=True, exist_ok=True)
    for name, (source, rows, observed) in parts.items():
        path = out.beton(name)
        meta = out.meta(name)
        if path.exists() and meta.exists():
            log.info("%s exists, skipping", path)
            continue
        log.info("writing %s (%d images from %s)", path, len(rows), source.annotation_file)
        # The side file first: a .beton under its final name always has its metadata beside it.
        save_with(meta, lambda tmp, rows=rows, source=source, observed=observed: np.savez(
            tmp,
            image_ids=source.image_ids[rows],
            labels=source.labels[rows],
            observed=observed,
        ))
        write_beton(
            path,
            [source.files[i] for i in rows],
            source.labels[rows],
            observed,
            max_resolution=d.max_resolution,
            jpeg_quality=d.jpeg_quality,
            keep_original_jpegs=d.keep_original_jpegs,
            workers=d.write_workers,
        )

    stats = {
        "root": str(root),
        "category_ids": train_full.category_ids,
        "category_names": train_full.category_names,
        "num_classes": train_full.num_classes,
        "observed_seed": d.observed_seed,
        "observed_protocol": d.observed_protocol,
        "max_resolution": d.max_resolution,
        "jpeg_quality": d.jpeg_quality,
        "keep_original_jpegs": d.keep_original_jpegs,
        "val_fraction": d.val_fraction,
        "val_seed": d.val_seed,
        "sources": {
            "train": _source_stats(train_full),
            "test": _source_stats(test),
        },
        "splits": {name: _label_stats(src.labels[rows], src) for name, (src, rows, _) in parts.items()},
        "seconds": time.perf_counter() - t0,  # wall time of this call (files already there are skipped)
    }
    write_json(out.stats_file, stats)
    return stats


def _source_stats(split: CocoSplit) -> dict:
    return {
        "annotation_file": str(split.annotation_file),
        "images_read": split.images_read,
        "images_kept": len(split),
        "images_dropped": split.dropped,
    }


def _label_stats(labels: np.ndarray, split: CocoSplit) -> dict:
    per_image = labels.sum(axis=1)
    per_class = labels.sum(axis=0)
    return {
        "images": int(labels.shape[0]),
        "labels_per_image": {
            "mean": float(per_image.mean()),
            "min": int(per_image.min()),
            "max": int(per_image.max()),
        },
        "per_class": {name: int(c) for name, c in zip(split.category_names, per_class, strict=True)},
        "classes_without_positives": [
            name for name, c in zip(split.category_names, per_class, strict=True) if c == 0
        ],
    }
