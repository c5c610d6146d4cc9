from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from ffcv_data.coco import read_split
from ffcv_data.errors import DataError


def test_coco_mini_reads_like_pycocotools(coco_mini):
    split = read_split(coco_mini, "train2017")
    coco = COCO(str(coco_mini / "annotations" / "instances_train2017.json"))
    assert split.class_ids == sorted(coco.getCatIds())
    assert split.num_classes == 80 and split.class_ids[-1] == 90  # non-contiguous ids mapped
    assert split.images_read == 208 and len(split) == 206
    assert split.dropped == {"no_annotations": 2}
    labels = split.labels.dense()
    for row, image_id in enumerate(split.keys):
        cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[int(image_id)]))}
        expected = np.isin(split.class_ids, sorted(cats)).astype(np.uint8)
        assert np.array_equal(labels[row], expected), image_id
        assert split.files[row].name == coco.imgs[int(image_id)]["file_name"]
    assert 2.0 < labels.sum(axis=1).mean() < 4.0


def test_synthetic_set_reads_with_the_same_reader(synthetic_root):
    split = read_split(synthetic_root, "train")
    assert len(split) == 150 and split.num_classes == 20
    assert split.labels.counts().min() >= 1


@pytest.fixture
def broken(synthetic_root, tmp_path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    return root


def _edit(root: Path, change) -> Path:
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.faults
def test_malformed_json_names_the_file_and_position(broken):
    path = broken / "annotations" / "instances_train.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(DataError, match=rf"{path}: malformed JSON at line 1 column \d+"):
        read_split(broken, "train")


@pytest.mark.faults
def test_unknown_category_names_the_annotation(broken):
    def change(d):
        d["annotations"][3]["category_id"] = 999

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: annotations\[3\] .* category_id 999"):
        read_split(broken, "train")


@pytest.mark.faults
def test_annotation_of_missing_image_names_the_annotation(broken):
    def change(d):
        d["annotations"][5]["image_id"] = 123456

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: annotations\[5\] .* image_id 123456"):
        read_split(broken, "train")


@pytest.mark.faults
def test_missing_image_file_is_named(broken):
    victim = sorted((broken / "train").glob("*.jpg"))[4]
    victim.unlink()
    with pytest.raises(DataError, match=f"image file\\(s\\) missing: {victim}"):
        read_split(broken, "train")


@pytest.mark.faults
def test_empty_split_is_refused(broken):
    path = _edit(broken, lambda d: d.update(annotations=[]))
    with pytest.raises(DataError, match=f"{path}: split 'train' is empty"):
        read_split(broken, "train")


@pytest.mark.faults
def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        read_split(tmp_path, "train2014")


@pytest.mark.faults
def test_two_images_with_one_id_are_both_named(broken):
    def change(d):
        d["images"][6]["id"] = d["images"][2]["id"]

    path = _edit(broken, change)
    data = json.loads(path.read_text())
    first, second = data["images"][2]["file_name"], data["images"][6]["file_name"]
    image_id = data["images"][2]["id"]
    with pytest.raises(DataError, match=rf"{path}: images\[2\] \(file_name '{first}'\) and images\[6\] "
                                        rf"\(file_name '{second}'\) have the same id {image_id}"):
        read_split(broken, "train")


@pytest.mark.faults
@pytest.mark.parametrize("key, field", [("annotations", "id"), ("categories", "id"), ("images", "file_name")])
def test_other_duplicates_name_both_records(broken, key, field):
    def change(d):
        d[key][4][field] = d[key][1][field]

    path = _edit(broken, change)
    with pytest.raises(DataError,
                       match=rf"{path}: {key}\[1\] \(.*\) and {key}\[4\] \(.*\) have the same {field}"):
        read_split(broken, "train")


@pytest.mark.faults
@pytest.mark.parametrize("key, field, value, type_name", [
    ("annotations", "category_id", "1", "str"),
    ("annotations", "image_id", 3.0, "float"),
    ("images", "id", "7", "str"),
    ("categories", "id", None, "NoneType"),
])
def test_an_id_of_the_wrong_json_type_names_its_type(broken, key, field, value, type_name):
    def change(d):
        d[key][3][field] = value

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: {key}\[3\].* has {field} {value!r} of type {type_name}; "
                                        "ids must be JSON integers") as err:
        read_split(broken, "train")
    assert "\n" not in str(err.value) and "not in 'categories'" not in str(err.value)
