"""The COCO reader (a stream, json_stream.py) against an independent reading of the same file with
pycocotools' index (the real coco-mini files and a generated file with the odd cases, read also in
chunks of a few characters), and the bad inputs, each one line naming the file and record(s)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from ffcv_data import coco as coco_reader
from ffcv_data import json_stream
from ffcv_data.coco import read_split
from ffcv_data.errors import DataError
from ffcv_data.sparse import LabelRows


def pycocotools_reading(root: Path, split: str) -> dict:
    """What read_split should give, read with pycocotools' index: rows the images with annotations,
    ids ascending; classes the category ids ascending; Cole et al.'s order the ids sorted as strings,
    their class k the k-th category the file lists."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    class_ids = sorted(coco.getCatIds())
    column = {cat_id: k for k, cat_id in enumerate(class_ids)}
    image_ids = sorted(coco.getImgIds())
    kept = [i for i in image_ids if coco.imgToAnns.get(i)]
    keys = np.asarray(kept, dtype=np.int64)
    return dict(
        files=[root / split / coco.imgs[i]["file_name"] for i in kept], keys=keys,
        labels=LabelRows.from_sets([[column[a["category_id"]] for a in coco.imgToAnns[i]] for i in kept],
                                   len(class_ids)),
        class_names=[coco.cats[c]["name"] for c in class_ids], class_ids=class_ids,
        reference_order=np.argsort(keys.astype(str), kind="stable"),
        reference_classes=np.asarray([column[c["id"]] for c in coco.dataset["categories"]], dtype=np.int64),
        images_read=len(image_ids), dropped={"no_annotations": len(image_ids) - len(kept)},
    )


def assert_reads_like_pycocotools(split, root: Path, name: str) -> None:
    expected = pycocotools_reading(root, name)
    assert split.name == name and split.image_root == root / name
    assert split.source_file == root / "annotations" / f"instances_{name}.json"
    assert split.label_files == [split.source_file] and split.negatives is None
    assert split.files == expected["files"]
    assert split.keys.dtype == np.int64 and np.array_equal(split.keys, expected["keys"])
    assert split.labels.equals(expected["labels"])
    assert split.labels.indptr.dtype == np.int64 and split.labels.classes.dtype == np.int32
    assert split.class_names == expected["class_names"] and split.class_ids == expected["class_ids"]
    assert all(type(c) is int for c in split.class_ids)
    for field in ("reference_order", "reference_classes"):
        got = getattr(split, field)
        assert got.dtype == expected[field].dtype and np.array_equal(got, expected[field]), field
    assert split.images_read == expected["images_read"] and split.dropped == expected["dropped"]


def test_coco_mini_reads_like_pycocotools(coco_mini):
    split = read_split(coco_mini, "train2017")
    assert_reads_like_pycocotools(split, coco_mini, "train2017")
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


ODD_NAMES = ["é.jpg", "中文/图.jpg", "\U0001F600 smile.jpg", "plain.jpg", "a b.jpg", "x\\y.jpg"]


def write_odd(root: Path, indent: int | None) -> Path:
    """A COCO-format file with the cases a reader gets wrong: images without annotations; a class
    twice in one image; category ids not contiguous, listed out of order; image ids whose string
    order is not their numeric order (9, 25, 100, 1000), listed out of order; unicode file names;
    annotations before images and categories first; records with polygons, boxes and extra keys."""
    rng = np.random.default_rng(3)
    image_ids = [100, 9, 1000, 25, 7, 250, 3, 12]
    categories = [{"supercategory": "s", "id": c, "name": f"class {c}"} for c in (42, 3, 17, 90, 1, 8)]
    images = [{"license": 1, "file_name": name, "height": 4, "width": 5, "id": image_id}
              for image_id, name in zip(image_ids, ODD_NAMES + ["unlabelled.jpg", "ünlabelled.jpg"],
                                        strict=True)]
    annotations = []
    for k in range(40):
        image_id = image_ids[k % 6]  # the last two images have no annotation
        category = 17 if k % 6 == 1 else int(rng.choice([42, 3, 17, 90, 8]))  # 1 is never used
        polygon = [round(float(v), 2) for v in rng.uniform(0, 500, 2 * int(rng.integers(3, 40)))]
        annotations.append({"segmentation": [polygon], "area": 12.5, "iscrowd": 0, "image_id": image_id,
                            "bbox": [1.0, 2.5, 3.0, 4.0], "category_id": category, "id": 5000 - 7 * k})
    data = {"categories": categories, "info": {"description": "odd\ncases", "year": 2024},
            "annotations": [annotations[i] for i in rng.permutation(len(annotations))],
            "licenses": [{"id": 1, "name": "x", "url": ""}], "images": images}
    (root / "annotations").mkdir(parents=True)
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=indent is None), encoding="utf-8")
    for image in images:
        (root / "train" / image["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / image["file_name"]).write_bytes(b"")
    return path


@pytest.mark.parametrize("chunk_size", [7, json_stream.CHUNK])
@pytest.mark.parametrize("indent", [None, 2])
def test_odd_cases_read_like_pycocotools(tmp_path, monkeypatch, indent, chunk_size):
    """One line and pretty-printed, in 7-character chunks (every record spans chunk ends) and whole."""
    write_odd(tmp_path, indent)
    monkeypatch.setattr(json_stream, "members", functools.partial(json_stream.members, chunk_size=chunk_size))
    split = read_split(tmp_path, "train")
    assert_reads_like_pycocotools(split, tmp_path, "train")
    # the odd cases are there: ids as strings sort otherwise, a class with no annotation, two dropped
    assert split.keys.tolist() == [7, 9, 25, 100, 250, 1000] and split.dropped == {"no_annotations": 2}
    assert split.class_ids == [1, 3, 8, 17, 42, 90] and split.reference_classes.tolist() == [4, 1, 3, 5, 0, 2]
    assert split.reference_order.tolist() == [3, 5, 2, 4, 0, 1]  # "100" "1000" "25" "250" "7" "9"
    assert split.labels.per_class()[0] == 0 and {f.name for f in split.files} >= {"图.jpg", "é.jpg"}


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


@pytest.mark.faults
def test_the_first_repeated_value_is_named_with_its_first_record(broken):
    """ids A B B A: the first record repeating a value is [3] (B, first at [2]), not [4] (A, at [1])."""
    def change(d):
        for i, ann_id in zip((1, 2, 3, 4), (900001, 900002, 900002, 900001), strict=True):
            d["annotations"][i]["id"] = ann_id

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: annotations\[2\] \(image_id \d+\) and annotations\[3\] "
                                        r"\(image_id \d+\) have the same id 900002$"):
        read_split(broken, "train")


@pytest.mark.faults
def test_file_names_sharing_a_hash_are_compared_as_names(broken, monkeypatch):
    """The file-name check compares hashes, then the names: with every hash equal it still finds
    no repeat in distinct names, and the right pair where two names are the same."""
    monkeypatch.setattr(coco_reader._Images, "name_hashes", lambda self: np.zeros(self.count, np.int64))
    assert len(read_split(broken, "train")) == 150

    def change(d):
        d["images"][5]["file_name"] = d["images"][3]["file_name"]

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: images\[3\] \(id \d+\) and images\[5\] \(id \d+\) have "
                                        "the same file_name"):
        read_split(broken, "train")


@pytest.mark.faults
def test_problems_are_reported_in_the_order_of_the_checks_not_of_the_file(broken):
    """The file lists annotations before categories; a bad category record is still reported first,
    as reading the whole file and checking categories, images, then annotations did."""
    def change(d):
        d["annotations"][2]["image_id"] = None
        d["categories"][4]["id"] = 2.5
        d.update(categories=d.pop("categories"))  # last in the file

    path = _edit(broken, change)
    assert list(json.loads(path.read_text()))[-1] == "categories"
    with pytest.raises(DataError, match=rf"{path}: categories\[4\] has id 2.5 of type float"):
        read_split(broken, "train")


@pytest.mark.faults
def test_a_list_given_twice_counts_once_the_later_as_json_load_keeps_it(broken):
    path = broken / "annotations" / "instances_train.json"
    path.write_text(path.read_text().rstrip().removesuffix("}") + ', "annotations": []}')
    with pytest.raises(DataError, match=f"{path}: split 'train' is empty"):
        read_split(broken, "train")


@pytest.mark.faults
def test_an_id_beyond_64_bits_is_refused(broken):
    def change(d):
        d["images"][3]["id"] = 2**63

    path = _edit(broken, change)
    with pytest.raises(DataError, match=rf"{path}: images\[3\] has id {2**63}; ids must fit in 64 bits"):
        read_split(broken, "train")


def test_ids_in_the_order_of_their_decimal_strings_without_making_the_strings():
    """Cole et al. walk COCO's images with the ids sorted as strings ("100" before "25"); the reader
    gets that order from the numbers (any number of digits, up to int64's largest)."""
    from ffcv_data.coco import _decimal_string_order

    rng = np.random.default_rng(3)
    for _ in range(100):
        keys = rng.integers(0, 10 ** int(rng.integers(1, 19)), int(rng.integers(0, 200)))
        keys = rng.permutation(np.unique(np.concatenate([keys, [0, 1, 10, 100, 9, 99, 2**63 - 1]])))
        assert np.array_equal(_decimal_string_order(keys), np.argsort(keys.astype(str), kind="stable"))
    keys = np.array([5, -3, 40, -12])  # a negative id: '-' sorts first, as the strings say
    assert np.array_equal(_decimal_string_order(keys), np.argsort(keys.astype(str), kind="stable"))
