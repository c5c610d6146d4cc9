"""`pml-dist prepare`: COCO-format root -> <run>/data/{train,val,test}.beton + stats.json.

Every input is read and checked before any .beton is written. A split whose .beton already exists is
skipped (each appears only when complete), so an interrupted prepare resumes. `stats.json` is written
last and marks the data stage as done.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ffcv_data.beton import write_beton
from ffcv_data.coco import CocoSplit, read_split
from ffcv_data.protocol import draw_observed, split_train_val
from pml_dist.atomic import save_with, write_json
from pml_dist.config import Config
from pml_dist.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def beton_path(cfg: Config, split: str) -> Path:
    return cfg.data_dir / f"{split}.beton"


def prepare(cfg: Config) -> dict:
    """Write the three .beton files and stats.json; returns the stats."""
    t0 = time.perf_counter()
    root = Path(cfg.data.root)
    if not root.exists():
        _generate(cfg)
    d = cfg.data
    train_full = read_split(root, d.train_split)
    test = read_split(root, d.test_split)
    if train_full.category_ids != test.category_ids:
        raise DataError(
            f"{test.annotation_file}: categories differ from those of {train_full.annotation_file}"
        )
    observed_full = draw_observed(train_full.labels, train_full.image_ids, d.observed_seed)
    try:
        train_rows, val_rows = split_train_val(train_full.image_ids, d.val_fraction, d.val_seed)
    except ValueError as exc:
        raise DataError(f"{train_full.annotation_file}: {exc}") from None
    parts = {
        "train": (train_full, train_rows, observed_full[train_rows]),
        "val": (train_full, val_rows, observed_full[val_rows]),
        "test": (test, np.arange(len(test)), draw_observed(test.labels, test.image_ids, d.observed_seed)),
    }

    out = cfg.data_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, (source, rows, observed) in parts.items():
        path = beton_path(cfg, name)
        meta = out / f"{name}.meta.npz"
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
            workers=d.write_workers,
        )

    stats = {
        "root": str(root),
        "category_ids": train_full.category_ids,
        "category_names": train_full.category_names,
        "num_classes": train_full.num_classes,
        "observed_seed": d.observed_seed,
        "val_fraction": d.val_fraction,
        "val_seed": d.val_seed,
        "sources": {
            "train": _source_stats(train_full),
            "test": _source_stats(test),
        },
        "splits": {name: _label_stats(src.labels[rows], src) for name, (src, rows, _) in parts.items()},
        "seconds": time.perf_counter() - t0,  # wall time of this call (files already there are skipped)
    }
    write_json(out / "stats.json", stats)
    return stats


def _generate(cfg: Config) -> None:
    from ffcv_data.synthetic import make_synthetic

    d = cfg.data
    log.info("data.root %s does not exist: generating the built-in data set there", d.root)
    make_synthetic(
        d.root,
        seed=d.synthetic_seed,
        n_train=d.synthetic_train,
        n_test=d.synthetic_test,
        image_size=d.max_resolution,
        train_split=d.train_split,
        test_split=d.test_split,
    )


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
