"""Tests for the built-in synthetic COCO-format data set (ffcv_data/synthetic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ffcv_data import synthetic
from ffcv_data.synthetic import CATEGORIES, make_synthetic, summarize

SMALL = {"n_train": 60, "n_test": 20, "image_size": 64}
SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "coco"
    make_synthetic(out, seed=0, **SMALL)
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_is_byte_identical(tmp_path, small_set):
    make_synthetic(tmp_path / "again", seed=0, **SMALL)
    a, b = _tree_bytes(small_set), _tree_bytes(tmp_path / "again")
    assert a.keys() == b.keys()
    assert a == b


def test_different_seed_differs(tmp_path, small_set):
    make_synthetic(tmp_path / "other", seed=1, **SMALL)
    a, b = _tree_bytes(small_set), _tree_bytes(tmp_path / "other")
    assert a.keys() == b.keys()  # same layout and file names ...
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert sum(a[k] != b[k] for k in a if k.endswith(".jpg")) == len(a) - 2  # ... other pixels


def test_split_content_independent_of_other_split_size(tmp_path, small_set):
    # Per-image random streams: the train images don't depend on how many test images exist.
    make_synthetic(tmp_path / "more", seed=0, n_train=60, n_test=5, image_size=64)
    a, b = _tree_bytes(small_set), _tree_bytes(tmp_path / "more")
    train = [k for k in a if k.startswith("train/")]
    assert train and all(a[k] == b[k] for k in train)


@pytest.mark.parametrize("split", SPLITS)
def test_loads_with_pycocotools(small_set, split):
    coco = COCO(str(small_set / "annotations" / f"instances_{split}.json"))
    n = SMALL[f"n_{split}"]
    assert len(coco.getImgIds()) == n
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["image_id"] in coco.imgs
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, float) for v in ann["bbox"])
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= SMALL["image_size"] and y + h <= SMALL["image_size"]
    for img in coco.loadImgs(coco.getImgIds()):
        path = small_set / split / img["file_name"]
        assert path.is_file()
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (SMALL["image_size"],) * 2 == (img["width"], img["height"])


def test_json_fields(small_set):
    data = json.loads((small_set / "annotations" / "instances_train.json").read_text())
    assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
    assert data["licenses"] == []
    assert set(data["images"][0]) == {"id", "file_name", "width", "height"}
    assert set(data["annotations"][0]) == {"id", "image_id", "category_id", "bbox", "area",
                                           "iscrowd"}
    assert set(data["categories"][0]) == {"id", "name", "supercategory"}


def test_ids_unique_across_splits(small_set):
    image_ids, ann_ids = [], []
    for split in SPLITS:
        data = json.loads((small_set / "annotations" / f"instances_{split}.json").read_text())
        image_ids += [img["id"] for img in data["images"]]
        ann_ids += [ann["id"] for ann in data["annotations"]]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(ann_ids)) == len(ann_ids)


@pytest.mark.parametrize("split", SPLITS)
def test_categories_contiguous(small_set, split):
    coco = COCO(str(small_set / "annotations" / f"instances_{split}.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, len(CATEGORIES) + 1))
    assert [c["name"] for c in cats] == CATEGORIES
    assert len(set(CATEGORIES)) == len(CATEGORIES) >= 15


@pytest.mark.parametrize("split", SPLITS)
def test_objects_per_image(small_set, split):
    coco = COCO(str(small_set / "annotations" / f"instances_{split}.json"))
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(anns) <= 5
        assert all(1 <= a["category_id"] <= len(CATEGORIES) for a in anns)


def test_refuses_existing_folder(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        make_synthetic(out, seed=0, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp folder left


def test_no_partial_output_on_failure(tmp_path, monkeypatch):
    # A run that dies midway must leave neither `out` nor its temporary sibling behind.
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "_write_json", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_synthetic(tmp_path / "out", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_summary_matches_files(small_set, tmp_path):
    summary = make_synthetic(tmp_path / "s", seed=0, **SMALL)
    for split in SPLITS:
        assert summary["splits"][split] == summarize(small_set, split)
    assert summary["splits"]["train"]["images"] == SMALL["n_train"]


def test_custom_split_names(tmp_path):
    out = tmp_path / "named"
    make_synthetic(out, seed=0, n_train=4, n_test=3, train_split="train2017", test_split="val2017")
    for split, n in (("train2017", 4), ("val2017", 3)):
        assert (out / "annotations" / f"instances_{split}.json").is_file()
        assert len(list((out / split).glob("*.jpg"))) == n


def test_label_statistics(tmp_path):
    # Multi-label like COCO (2.9 labels/image) and long-tailed, on a few hundred images.
    summary = make_synthetic(tmp_path / "stats", seed=0, n_train=400, n_test=20)
    stats = summary["splits"]["train"]
    assert 2.0 <= stats["mean_labels_per_image"] <= 3.5
    counts = stats["class_image_counts"]
    assert list(counts) == CATEGORIES
    assert min(counts.values()) > 0
    assert max(counts.values()) >= 5 * min(counts.values())


def test_tag_classes_make_a_sparse_label_space_over_the_same_pixels(tmp_path, small_set):
    """num_classes 300: 280 tag classes beside the 20 drawn ones, 1 + Poisson(0.5) tags per image
    from a long tail, each image's pixels and drawn categories unchanged."""
    make_synthetic(tmp_path / "tags", seed=0, num_classes=300, **SMALL)
    a, b = _tree_bytes(small_set), _tree_bytes(tmp_path / "tags")
    jpegs = [k for k in a if k.endswith(".jpg")]
    assert jpegs and all(a[k] == b[k] for k in jpegs) and b.keys() == a.keys()
    for split in SPLITS:
        old = json.loads(a[f"annotations/instances_{split}.json"])
        new = json.loads(b[f"annotations/instances_{split}.json"])
        assert [c["id"] for c in new["categories"]] == list(range(1, 301))
        assert new["categories"][:20] == old["categories"]
        drawn = [(x["image_id"], x["category_id"]) for x in new["annotations"] if x["category_id"] <= 20]
        assert drawn == [(x["image_id"], x["category_id"]) for x in old["annotations"]]
        tags = {}
        for x in new["annotations"]:
            if x["category_id"] > 20:
                tags.setdefault(x["image_id"], []).append(x["category_id"])
        assert set(tags) == {img["id"] for img in new["images"]}  # every image has a tag
        per_image = [len(t) for t in tags.values()]
        assert all(len(set(t)) == len(t) for t in tags.values()) and 1.2 < np.mean(per_image) < 1.9
    with pytest.raises(ValueError, match="num_classes must be >= 20"):
        make_synthetic(tmp_path / "few", seed=0, num_classes=19, **SMALL)
