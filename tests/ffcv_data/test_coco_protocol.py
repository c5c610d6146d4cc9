"""The COCO preset's data stage against the reference procedures, on the real coco-mini files:
Cole et al.'s observed positives and validation split (re-implemented from their scripts'
description in tests/ffcv_data/spml_reference.py), and the pixels the loaders produce against PIL's
decoding of the original JPEG resized to 448 x 448 as their transforms do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ffcv_data.loaders import MEAN, STD, eval_loader
from ffcv_data.prepare import PrepareSpec, prepare
from ffcv_data.prepared import PreparedData
from ffcv_data.protocol import one_hot
from pml_dist.config import REPO_ROOT, load_config

PRESET = load_config(REPO_ROOT / "configs" / "coco2014_r50.yaml").data
# Measured on coco-mini's 79 val2017 images (this machine, 2026-12-01): mean 1.55/255 over all
# pixels, 4.25 for the worst image; re-encoding as FFCV's writer does gave 2.28-2.42 at quality 90-95.
MEAN_BOUND, IMAGE_BOUND = 2.0, 6.0


def _spec(root: Path, **changes) -> PrepareSpec:
    d = PRESET
    values = dict(root=root, train_split="train2017", test_split="val2017", observed_seed=d.observed_seed,
                  val_fraction=d.val_fraction, val_seed=d.val_seed, max_resolution=d.max_resolution,
                  jpeg_quality=d.jpeg_quality, observed_protocol=d.observed_protocol,
                  keep_original_jpegs=d.keep_original_jpegs, write_workers=2)
    return PrepareSpec(**{**values, **changes})


# ------------------------------------------------------------ Cole et al.'s procedure, re-implemented

def cole_format(annotation_file: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """format_coco.py: rows = image ids with an annotation, sorted as strings; column = position of
    the category in the file's list. Returns (image ids by row, 0/1 label matrix, listed category ids)."""
    d = json.loads(annotation_file.read_text())
    index = {c["id"]: i for i, c in enumerate(d["categories"])}
    ids = np.array(sorted({str(a["image_id"]) for a in d["annotations"]}), dtype=int)
    row = {image_id: i for i, image_id in enumerate(ids)}
    y = np.zeros((len(ids), len(index)))
    for a in d["annotations"]:
        y[row[a["image_id"]], index[a["category_id"]]] = 1
    return ids, y, [c["id"] for c in d["categories"]]


@pytest.fixture(scope="module")
def shuffled_root(coco_mini, tmp_path_factory) -> Path:
    """coco-mini with the categories listed out of id order, so that Cole et al.'s class index
    (list position) and ours (id order) differ; the images are the same files."""
    root = tmp_path_factory.mktemp("coco-shuffled")
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        d = json.loads((coco_mini / "annotations" / f"instances_{split}.json").read_text())
        order = np.random.default_rng(7).permutation(len(d["categories"]))
        d["categories"] = [d["categories"][i] for i in order]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
        (root / split).symlink_to(coco_mini / split)
    return root


def test_the_preset_draws_cole_et_al_observed_labels_and_split(shuffled_root, tmp_path, reference):
    assert (PRESET.observed_protocol, PRESET.observed_seed, PRESET.val_seed, PRESET.val_fraction) == (
        "cole", 1200, 1200, 0.2)
    out = PreparedData(tmp_path / "data")
    prepare(_spec(shuffled_root, max_resolution=32), out)  # small images: the labels are what counts

    for split, parts in (("train2017", ("train", "val")), ("val2017", ("test",))):
        ids, y, listed = cole_format(shuffled_root / "annotations" / f"instances_{split}.json")
        assert not np.array_equal(ids, np.sort(ids)), "string order must differ from numeric order here"
        obs = reference.observe(y, PRESET.observed_seed)
        column = {c: i for i, c in enumerate(sorted(listed))}  # ours: category ids ascending
        expected_obs = np.zeros_like(obs, dtype=np.uint8)
        expected_obs[:, [column[c] for c in listed]] = obs == 1
        by_id = dict(zip(ids.tolist(), expected_obs, strict=True))
        if split == "train2017":
            train_rows, val_rows = reference.split(len(ids), PRESET.val_fraction, PRESET.val_seed)
            expected_ids = {"train": set(ids[train_rows].tolist()), "val": set(ids[val_rows].tolist())}
        else:
            expected_ids = {"test": set(ids.tolist())}
        for part in parts:
            meta = out.labels(part)
            got_ids = meta.keys
            assert set(got_ids.tolist()) == expected_ids[part], part
            got = one_hot(meta.observed, meta.num_classes)
            want = np.stack([by_id[i] for i in got_ids.tolist()])
            assert np.array_equal(got, want), f"{part}: {np.flatnonzero((got != want).any(1))[:5]}"


def test_keyed_protocol_draws_differently_on_the_same_files(shuffled_root, tmp_path):
    """The check above can fail: the demo's keyed draw is another one."""
    cole, keyed = PreparedData(tmp_path / "cole"), PreparedData(tmp_path / "keyed")
    prepare(_spec(shuffled_root, max_resolution=32), cole)
    prepare(_spec(shuffled_root, max_resolution=32, observed_protocol="keyed"), keyed)
    assert not np.array_equal(cole.labels("val").keys, keyed.labels("val").keys)


# ------------------------------------------------------------------------------------ pixels

def test_stored_pixels_match_pil_on_the_originals(coco_mini, tmp_path):
    import torch
    from PIL import Image
    from torchvision.transforms import Resize

    assert (PRESET.max_resolution, PRESET.eval_transform, PRESET.train_transform) == (640, "resize",
                                                                                      "resize_flip")
    out = PreparedData(tmp_path / "data")
    prepare(_spec(coco_mini), out)
    images = {im["id"]: coco_mini / "val2017" / im["file_name"] for im in
              json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())["images"]}
    ids = out.labels("test").keys
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    errors = []
    for batch in eval_loader(out.beton("test"), 16, 448, transform=PRESET.eval_transform, jit=False,
                             workers=2):
        pixels = (batch["image"] * std + mean).round().permute(0, 2, 3, 1).numpy()
        for got, index in zip(pixels, batch["index"].tolist(), strict=True):
            with Image.open(images[int(ids[index])]) as img:
                want = np.asarray(Resize((448, 448))(img.convert("RGB")), dtype=np.float64)
            errors.append(np.abs(got - want).mean())
    assert len(errors) == 79
    assert np.mean(errors) < MEAN_BOUND and max(errors) < IMAGE_BOUND, (np.mean(errors), max(errors))
