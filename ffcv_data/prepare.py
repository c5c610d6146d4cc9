"""A data set's root -> a prepared folder: {train,val,test}.beton + .labels.npz + stats.json (prepared.py).

Plain arguments only (`PrepareSpec`): the data package knows nothing of the experiment config;
`pml_dist/data_stage.py` maps the config onto it. Every input is read and checked before any .beton
is written: the label files (the format's reader, formats.py) and every image still to encode,
decoded in full. A split whose
.beton already exists is skipped (each appears only when complete, its .labels.npz right after it), so
an interrupted prepare resumes; temporaries left by dead processes (killed, interrupted) are removed
first (only this host's: on a shared file system another host's PIDs cannot be
checked). `inputs.json` records digests of the inputs (annotation files, the image list with file sizes,
the spec fields that change the encoded content) before the first .beton; a rerun whose inputs differ
from the record is an error naming what changed. `stats.json` is written last and marks the data
stage as done.

The validation part is a held-out fraction of the training split, or, with `val_split`, a split of
the data set read whole (csv's fully labelled val.csv beside a single-positive train.csv).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ffcv_data.atomic import owned, stale_temporary, write_json
from ffcv_data.beton import unreadable_images, write_beton
from ffcv_data.errors import DataError
from ffcv_data.formats import read_split
from ffcv_data.prepared import PreparedData, write_split_labels
from ffcv_data.protocol import NONE, draw_observed, split_train_val
from ffcv_data.source import SourceSplit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSpec:
    """What `prepare` reads and how it encodes (the experiment's `data.*` keys)."""

    root: Path  # the data set's root, as its format (formats.py) reads it
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
    format: str = "coco"  # formats.py: coco, voc, cub, cole, openimages or csv
    images: Path | None = None  # cole, csv: the folder its image paths are relative to
    # a split of the data set read whole as the validation part (its own observed draw, as the test
    # split's); "" = validation images held out of the training split (val_fraction, val_seed)
    val_split: str = ""
    classes: Path | None = None  # csv: the class-list file (csv_lists.read_classes); None = train's classes


# The PrepareSpec fields that change what is encoded; root (the data may move) and workers do not.
CONTENT_KEYS = ("format", "train_split", "test_split", "observed_seed", "observed_protocol", "val_fraction",
                "val_seed", "max_resolution", "jpeg_quality", "keep_original_jpegs", "val_split")
# Keys added after folders were prepared without them: a record without the key had this value.
# (The classes file is recorded as one of the label files, its digest with the CSV's.)
CONTENT_DEFAULTS = {"format": "coco", "val_split": ""}
INPUTS_VERSION = 2  # 2: labels in <split>.labels.npz, sparse; the .beton holds image and index
SPLITS = ("train", "val", "test")


def prepare(d: PrepareSpec, out: PreparedData) -> dict:
    """Write the three .beton files and stats.json into `out`; returns the stats."""
    t0 = time.perf_counter()
    root = Path(d.root)
    train_full = _read(d, d.train_split, d.classes)
    # csv: the other splits are read with the training split's class list (data.classes, else the
    # classes the training CSV shows), so their class indices are the same
    classes = (d.classes or train_full.class_names) if d.format == "csv" else None
    test = _read(d, d.test_split, classes)
    val_full = _read(d, d.val_split, classes) if d.val_split else None
    for other in (test, val_full):
        if other is not None and other.class_names != train_full.class_names:
            raise DataError(f"{other.source_file}: classes differ from those of {train_full.source_file}")
    # Each source split gets its own draw over all of it (Cole et al. draw train2014 and val2014).
    observed_full, observed_test = (_draw(s, d) for s in (train_full, test))
    parts = {"test": (test, np.arange(len(test)), observed_test)}
    if val_full is not None:  # the validation split as it is; the training split whole
        parts = {"train": (train_full, np.arange(len(train_full)), observed_full),
                 "val": (val_full, np.arange(len(val_full)), _draw(val_full, d)), **parts}
    else:
        try:
            train_rows, val_rows = split_train_val(train_full.keys, d.val_fraction, d.val_seed,
                                                   d.observed_protocol, train_full.reference_order)
        except ValueError as exc:
            raise DataError(f"{train_full.source_file}: {exc}") from None
        parts = {"train": (train_full, train_rows, observed_full[train_rows]),
                 "val": (train_full, val_rows, observed_full[val_rows]), **parts}
    sources = {"train": train_full, "test": test, **({"val": val_full} if val_full is not None else {})}

    folder = Path(out.folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_files(out)
    inputs = _inputs(d, sources)
    record = _check_inputs(out, inputs)

    todo = [name for name in parts if not out.beton(name).exists()]
    t_check = time.perf_counter()
    files = sorted({parts[n][0].files[i] for n in todo for i in parts[n][1]})
    bad = unreadable_images(files, d.write_workers)
    check_seconds = time.perf_counter() - t_check
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} image(s) could not be decoded (nothing was written): "
                        f"{'; '.join(bad[:3])}{more}")
    log.info("decode-checked %d images in %.1f s", len(files), check_seconds)
    if record:
        write_json(out.inputs_file, inputs)

    for name, (source, rows, observed) in parts.items():
        path = out.beton(name)
        if path.exists():
            log.info("%s exists, skipping", path)
        else:
            log.info("writing %s (%d images from %s)", path, len(rows), source.source_file)
            write_beton(
                path,
                [source.files[i] for i in rows],
                max_resolution=d.max_resolution,
                jpeg_quality=d.jpeg_quality,
                keep_original_jpegs=d.keep_original_jpegs,
                workers=d.write_workers,
            )
        # The labels only once their .beton is in place (a labels file never stands alone).
        if not out.labels_file(name).exists():
            write_split_labels(out.labels_file(name), source.keys[rows], source.labels.take(rows), observed,
                               [os.path.relpath(source.files[i], source.image_root) for i in rows],
                               None if source.negatives is None else source.negatives.take(rows))

    stats = {
        "root": str(root),
        "format": d.format,
        "category_ids": train_full.class_ids,
        "category_names": train_full.class_names,
        "num_classes": train_full.num_classes,
        "observed_seed": d.observed_seed,
        "observed_protocol": d.observed_protocol,
        "max_resolution": d.max_resolution,
        "jpeg_quality": d.jpeg_quality,
        "keep_original_jpegs": d.keep_original_jpegs,
        "val_fraction": d.val_fraction,
        "val_seed": d.val_seed,
        "val_split": d.val_split,
        "sources": {role: _source_stats(split) for role, split in sources.items()},
        "splits": {name: _label_stats(src, rows, observed) for name, (src, rows, observed) in parts.items()},
        # whether each split's label sets hold every class of its images: False for one read from
        # a single-positive CSV (its validation mAP cannot select a model), True for the others
        "complete_labels": {name: src.complete_labels for name, (src, _, _) in parts.items()},
        "seconds": time.perf_counter() - t0,  # wall time of this call (files already there are skipped)
        "image_check_seconds": check_seconds,  # of which decoding every image still to encode first
    }
    write_json(out.stats_file, stats)
    return stats


# Temporaries of the files prepare writes: atomic.py's `.NAME.tmp-HOST-PID[.suffix]`, beton.py's
# error logs `NAME.errors-HOST-PID` (names of older versions lack HOST-; atomic.owned reads both).
_FOREIGN_LOGGED: set[Path] = set()  # other hosts' temporaries already logged by this process


def remove_stale_files(out: PreparedData) -> list[Path]:
    """Delete what an interrupted or killed prepare left in `out`: temporaries of this host's
    processes that no longer run (a live process's are left alone, and so are another host's, whose
    PID cannot be checked from here: logged once) and side files without their .beton (older
    versions wrote the side file first). Returns the deleted paths."""
    folder = Path(out.folder)
    ours = {p.name for s in SPLITS for p in (out.beton(s), out.labels_file(s))}
    ours |= {out.stats_file.name, out.inputs_file.name}
    removed, foreign = [], []
    for path in sorted(folder.iterdir()):
        found = owned(path.name)
        if found is None or found.target not in ours:
            continue
        if found.foreign:
            if path not in _FOREIGN_LOGGED:
                _FOREIGN_LOGGED.add(path)
                foreign.append(f"{path.name} (host {found.host}, pid {found.pid})")
        elif stale_temporary(found):
            path.unlink(missing_ok=True)
            removed.append(path)
    if foreign:
        log.info("left %d temporary file(s) of other hosts alone in %s (whether their processes run "
                 "is seen only there; a prepare on that host removes them if they are dead): %s",
                 len(foreign), folder, ", ".join(foreign))
    for s in SPLITS:
        if out.labels_file(s).exists() and not out.beton(s).exists():
            out.labels_file(s).unlink(missing_ok=True)
            removed.append(out.labels_file(s))
    if removed:
        log.info("removed %d file(s) left by an interrupted prepare: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _inputs(d: PrepareSpec, sources: dict[str, SourceSplit]) -> dict:
    """What the folder's content depends on, as digests (inputs.json); `sources`: role -> split read."""
    spec = asdict(d)
    root = Path(d.root)
    record: dict = {"version": INPUTS_VERSION, "root": str(root),
                    "spec": {k: spec[k] for k in CONTENT_KEYS}, "annotations": {}, "images": {}}
    for role, split in sources.items():
        # one file's digest as it is; several (VOC's class lists) digested in order
        digests = [_sha256_file(f) for f in split.label_files]
        combined = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        record["annotations"][role] = {"file": os.path.relpath(split.source_file, root), "sha256": combined}
        listing = hashlib.sha256()
        for f in split.files:
            listing.update(f"{os.path.relpath(f, root)}\t{f.stat().st_size}\n".encode())
        record["images"][role] = {"count": len(split.files), "sha256": listing.hexdigest()}
    return record


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_inputs(out: PreparedData, inputs: dict) -> bool:
    """Whether `inputs` are still to be recorded (nothing prepared yet); else they must equal the record."""
    folder = Path(out.folder)
    prepared = [p for s in SPLITS for p in (out.beton(s), out.labels_file(s))] + [out.stats_file]
    prepared = [p.name for p in prepared if p.exists()]
    rebuild = f"delete {folder} to prepare it again, or prepare into another folder (run.data_dir)"
    if prepared:
        if not out.inputs_file.is_file():  # prepared by a version before the record: adopt it
            log.warning("%s holds %s but no %s (an older version prepared it): recording the current "
                        "inputs; changes made to them before now cannot be detected", folder,
                        ", ".join(prepared), out.inputs_file.name)
            return True
        try:
            recorded = json.loads(out.inputs_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{out.inputs_file}: malformed JSON ({exc.msg}); {rebuild}") from None
        changes = _changes(recorded, inputs)
        if changes:
            raise DataError(f"{folder} was prepared from other inputs: {'; '.join(changes)}; {rebuild}")
        return False
    return True


def _changes(old: dict, new: dict) -> list[str]:
    if not isinstance(old, dict) or old.get("version") != new["version"]:
        version = old.get("version") if isinstance(old, dict) else None
        return [f"its record is of another format (version {version!r}, expected {new['version']})"]
    changes = []
    for key, value in new["spec"].items():
        before = old.get("spec", {}).get(key, CONTENT_DEFAULTS.get(key, "<absent>"))
        if before != value:
            changes.append(f"{key} {before!r} -> {value!r}")
    for role, ann in new["annotations"].items():
        before = old.get("annotations", {}).get(role, {})
        if before.get("file") != ann["file"]:
            changes.append(f"{role} annotation file {before.get('file')!r} -> {ann['file']!r}")
        elif before.get("sha256") != ann["sha256"]:
            changes.append(f"{ann['file']} changed (its content differs)")
    for role, images in new["images"].items():
        before = old.get("images", {}).get(role, {})
        if before.get("sha256") != images["sha256"]:
            what = (f"{before.get('count')} -> {images['count']} images"
                    if before.get("count") != images["count"] else "file names or sizes differ")
            changes.append(f"the {role} image list changed ({what})")
    return changes


def _read(d: PrepareSpec, split: str, classes) -> SourceSplit:
    """One split of the data set, its rows without a positive handled as the protocol wants."""
    return _readable(read_split(d.format, d.root, split, d.images, classes), d.observed_protocol)


def _draw(split: SourceSplit, d: PrepareSpec) -> np.ndarray:
    """The split's observed positives; a draw the protocol refuses (cole at a size it cannot do in
    minutes) is one line naming the split's file."""
    try:
        return draw_observed(split.labels, split.keys, d.observed_seed, d.observed_protocol,
                             reference_order=split.reference_order, reference_classes=split.reference_classes)
    except ValueError as exc:
        raise DataError(f"{split.source_file}: {exc}") from None


def _readable(split: SourceSplit, protocol: str) -> SourceSplit:
    """Rows without a positive: kept under cole, as Cole et al. do (nothing observed, counted in the
    split's stats); dropped and counted under keyed, which observes one positive in every row."""
    empty = split.labels.counts() == 0
    if protocol == "cole" or not empty.any():
        return split
    return split.subset(np.flatnonzero(~empty), {"no_positive": int(empty.sum())})


def _source_stats(split: SourceSplit) -> dict:
    return {
        "annotation_file": str(split.source_file),
        "images_read": split.images_read,
        "images_kept": len(split),
        "images_dropped": split.dropped,
        "labels_left_out": split.labels_left_out,
    }


def _label_stats(split: SourceSplit, rows: np.ndarray, observed: np.ndarray) -> dict:
    per_image = split.labels.counts()[rows]
    per_class = split.labels.take(rows).per_class()
    return {
        "images": int(len(rows)),
        "labels_per_image": {
            "mean": float(per_image.mean()),
            "min": int(per_image.min()),
            "max": int(per_image.max()),
        },
        "images_without_positive": int((per_image == 0).sum()),  # kept under cole, nothing observed
        "images_without_observed": int((observed == NONE).sum()),
        # Open Images' verified negatives (confidence 0) per image; None where the format has none
        "verified_negatives_per_image": (None if split.negatives is None
                                         else float(split.negatives.counts()[rows].mean())),
        "per_class": {name: int(c) for name, c in zip(split.class_names, per_class, strict=True)},
        "classes_without_positives": [
            name for name, c in zip(split.class_names, per_class, strict=True) if c == 0
        ],
    }
