"""The csv format (data.format: csv) on small data sets written here: both headers read back exactly
(files with commas and spaces, label sets, class order, a BOM), data.classes, every bad input as one
line naming the file and line; prepare with the validation part held out of train.csv or read whole
from val.csv (data.val_split), stats' complete_labels, a folder prepared before val_split existed;
and the built-in data set written as CSV (`pml-dist make-synthetic --layout csv`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffcv_data.csv_lists import read_classes
from ffcv_data.errors import DataError
from ffcv_data.formats import read_split
from ffcv_data.prepare import PrepareSpec, prepare
from ffcv_data.prepared import PreparedData
from ffcv_data.source import string_key
from ffcv_data.synthetic import CATEGORIES, make_synthetic
from pml_dist.cli import main
from pml_dist.config import load_config
from pml_dist.data_stage import prepare as prepare_stage
from pml_dist.layout import RunLayout

pytestmark = pytest.mark.timeout(300)
CLASSES = ["tree", "cat", "red car", "dog"]  # data.classes order (not sorted); "dog" only in test


def _jpeg(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(path, quality=90)


def _write_csv(path: Path, header: tuple[str, str], rows, bom: bool = False) -> None:
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """A user's data set: train.csv single-positive (24 images), val.csv and test.csv with label
    sets (8 each; test.csv with a BOM, one image with no positive, one with a class named twice);
    image names with commas and spaces under photos/; classes.txt listing every class."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(3)
    seen = CLASSES[:3]
    want = {"train": [], "val": [], "test": []}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for i in range(n):
            file = f"photos/{split}, no {i}.jpg" if i % 3 == 0 else f"photos/{split}_{i}.jpg"
            _jpeg(root / file, rng)
            if split == "train":
                labels = [seen[i % 3]]
            else:
                k = rng.integers(1, 4)
                labels = [str(c) for c in rng.choice(CLASSES if split == "test" else seen, k, replace=False)]
            want[split].append((file, labels))
    want["test"][2] = (want["test"][2][0], [])
    want["test"][5] = (want["test"][5][0], ["dog", "cat"])
    _write_csv(root / "train.csv", ("file", "label"), [(f, ls[0]) for f, ls in want["train"]])
    _write_csv(root / "val.csv", ("file", "labels"), [(f, "|".join(ls)) for f, ls in want["val"]])
    rows = [(f, "|".join(ls)) for f, ls in want["test"]]
    rows[5] = (rows[5][0], "dog | cat|dog")  # spaces around names, a name twice: counted once
    _write_csv(root / "test.csv", ("file", "labels"), rows, bom=True)
    (root / "classes.txt").write_text("\n".join(CLASSES[:2]) + "\n\n" + "\n".join(CLASSES[2:]) + "\n")
    return {"root": root, "want": want}


def _sets(split) -> list[list[str]]:
    return [sorted(split.class_names[c] for c in split.labels.row(i)) for i in range(len(split))]


def _names(split) -> list[str]:
    return [split.files.name(i) for i in range(len(split))]


def test_a_single_positive_csv_reads_back_exactly(own):
    split = read_split("csv", own["root"], "train")
    want = own["want"]["train"]
    assert _names(split) == [f for f, _ in want]
    assert split.files[0] == own["root"] / want[0][0]
    assert split.class_names == sorted(CLASSES[:3])  # those the file uses, sorted
    assert _sets(split) == [ls for _, ls in want]
    assert split.keys.tolist() == [string_key(f) for f, _ in want]
    assert not split.complete_labels
    assert split.label_files == [own["root"] / "train.csv"]
    assert split.class_ids == [0, 1, 2] and split.reference_order.tolist() == list(range(24))


def test_a_label_sets_csv_reads_back_exactly_with_its_bom_and_an_image_without_a_positive(own):
    split = read_split("csv", own["root"], "test", classes=own["root"] / "classes.txt")
    want = own["want"]["test"]
    assert split.class_names == CLASSES  # data.classes' order, "dog" included
    assert _names(split) == [f for f, _ in want]
    assert _sets(split) == [sorted(ls) for _, ls in want]
    assert split.labels.counts()[2] == 0 and split.labels.row(5).tolist() == [1, 3]  # cat, dog once
    assert split.complete_labels
    assert split.label_files == [own["root"] / "test.csv", own["root"] / "classes.txt"]


def test_data_images_is_the_folder_file_names_are_relative_to(own, tmp_path):
    (tmp_path / "train.csv").write_text("file,label\nval_1.jpg,cat\n")
    split = read_split("csv", tmp_path, "train", images=own["root"] / "photos")
    assert split.files[0] == own["root"] / "photos" / "val_1.jpg"
    assert split.image_root == own["root"] / "photos"


def test_read_classes_ignores_blank_lines_and_refuses_repeats_and_the_separator(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\ufeffa\n\n  b c \nd\n")
    assert read_classes(path) == ["a", "b c", "d"]
    for text, message in (("a\nb\n\na\n", r"classes.txt:4: class 'a' is listed twice \(first on line 1\)"),
                          ("a\nb|c\n", r"classes.txt:2: class name 'b\|c' holds '\|'"),
                          ("\n \n", r"classes.txt: no class names")):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_classes(path)
    with pytest.raises(DataError, match=r"nope.txt not found: data.classes must be a text file"):
        read_classes(tmp_path / "nope.txt")


def _tiny(root: Path, text: str, classes: str | None = None) -> Path:
    """A train.csv of `text` (after its header line) beside images a.jpg, b.jpg, c.jpg."""
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _jpeg(root / f"{name}.jpg", rng)
    (root / "train.csv").write_text(text)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


@pytest.mark.parametrize("text, message", [
    (None, r"train.csv not found: data.format csv reads split 'train' from <data.root>/train.csv"),
    ("image,class\na.jpg,cat\n", r"train.csv:1: expected the header file,label \(one observed positive per "
                                 r"image\) or file,labels \(every class present, separated by \|\), got "
                                 r"'image,class'"),
    ("", r"train.csv:1: expected the header file,label .* got ''"),
    ("file,label\n", r"train.csv: no rows after the header"),
    ("file,label\na.jpg,cat\nb.jpg,cat,dog\n", r"train.csv:3: expected 2 fields \(file,label\), got 3: "
                                               r"'b.jpg,cat,dog'"),
    ("file,labels\na.jpg\n", r"train.csv:2: expected 2 fields \(file,labels\), got 1: 'a.jpg'"),
    ("file,label\na.jpg,cat\n  ,dog\n", r"train.csv:3: empty file name in '  ,dog'"),
    ("file,label\na.jpg,\n", r"train.csv:2: empty class name in 'a.jpg,'"),
    ("file,labels\na.jpg,cat||dog\n", r"train.csv:2: empty class name in 'a.jpg,cat\|\|dog'"),
    ("file,label\na.jpg,cat\nb.jpg,dog\n\na.jpg,cat\n",
     r"train.csv:5: duplicate row: 'a.jpg' with 'cat' is already on line 2"),
    ("file,label\na.jpg,cat\nb.jpg,dog\na.jpg,dog\n",
     r"train.csv:4: image 'a.jpg' is listed again, with label 'dog' \(line 2: 'cat'\): a single-positive "
     r"CSV has one row per image; list the image once, or use header file,labels"),
    ("file,labels\na.jpg,cat|dog\nb.jpg,dog\na.jpg,cat\n",
     r"train.csv:4: image 'a.jpg' is listed again, with labels 'cat' \(line 2: 'cat\|dog'\): list each "
     r"image once with all its classes"),
    ("file,label\na.jpg,cat\nd.jpg,dog\n", r"train.csv: image file\(s\) missing: .*/d.jpg"),
    ('file,label\n"a.jpg,cat\n', r"train.csv:\d+: not readable as CSV"),
])
def test_bad_csvs_are_one_line_naming_the_file_and_line(tmp_path, text, message):
    _tiny(tmp_path, "")
    if text is None:
        (tmp_path / "train.csv").unlink()
    else:
        (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_split("csv", tmp_path, "train")
    assert "\n" not in str(err.value)


def test_a_class_outside_the_list_is_named_with_the_list(tmp_path):
    root = _tiny(tmp_path, "file,label\na.jpg,cat\nb.jpg,cow\n", classes="cat\ndog\n")
    with pytest.raises(DataError, match=rf"train.csv:3: class 'cow' is not in data.classes "
                                        rf"\({root}/classes.txt\)"):
        read_split("csv", root, "train", classes=root / "classes.txt")
    with pytest.raises(DataError, match=r"train.csv:3: class 'cow' is not among the training CSV's classes "
                                        r"\(list every class in data.classes"):
        read_split("csv", root, "train", classes=["cat", "dog"])
    with pytest.raises(ValueError, match="class list is read for data.format csv only"):
        read_split("coco", root, "train", classes=["cat"])


def _spec(root: Path, **kw) -> PrepareSpec:
    return PrepareSpec(**{"root": root, "train_split": "train", "test_split": "test", "observed_seed": 1200,
                          "val_fraction": 0.25, "val_seed": 0, "max_resolution": 32, "jpeg_quality": 90,
                          "write_workers": 2, "format": "csv", "classes": root / "classes.txt", **kw})


def test_prepare_holds_validation_out_of_a_single_positive_train_csv(own, tmp_path):
    out = PreparedData(tmp_path / "data")
    stats = prepare(_spec(own["root"]), out)
    want = dict(own["want"]["train"])
    train, val, test = (out.labels(s) for s in ("train", "val", "test"))
    assert sorted([*train.files(), *val.files()]) == sorted(want) and len(val) == 6
    for split in (train, val):  # the observed positive is the CSV's one label
        assert [CLASSES[c] for c in split.observed] == [want[f][0] for f in split.files()]
    assert stats["complete_labels"] == {"train": False, "val": False, "test": True}
    assert stats["category_names"] == CLASSES and stats["val_split"] == ""
    # the test image without a positive is dropped under keyed, as for every format
    assert stats["sources"]["test"]["images_dropped"] == {"no_positive": 1} and len(test) == 7
    cfg = load_config(None, [f"data.root={own['root']}", "data.format=csv", "report.references=[em]"])
    assert not cfg.data.full_validation  # validation images showing one positive each select no model


def test_prepare_reads_val_split_whole_and_records_it(own, tmp_path):
    """Through the data stage: data.val_split and data.classes reach prepare."""
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"data.root={own['root']}", "data.format=csv",
                             "data.val_split=val", f"data.classes={own['root'] / 'classes.txt'}",
                             "report.references=[em]",
                             "data.max_resolution=32", "data.write_workers=2"])
    stats = prepare_stage(cfg)
    out = RunLayout.of(cfg).data
    assert list(out.labels("train").files()) == [f for f, _ in own["want"]["train"]]  # the whole of train.csv
    val = out.labels("val")
    assert list(val.files()) == [f for f, _ in own["want"]["val"]]  # exactly val.csv's rows
    assert [sorted(CLASSES[c] for c in val.labels.row(i)) for i in range(len(val))] == [
        sorted(ls) for _, ls in own["want"]["val"]]
    assert all(val.observed[i] in val.labels.row(i) for i in range(len(val)))
    assert stats["complete_labels"] == {"train": False, "val": True, "test": True}
    assert stats["val_split"] == "val" and set(stats["sources"]) == {"train", "val", "test"}
    assert stats["splits"]["val"]["images"] == 8 and stats["splits"]["train"]["images"] == 24
    inputs = json.loads(out.inputs_file.read_text())
    assert inputs["spec"]["val_split"] == "val" and inputs["annotations"]["val"]["file"] == "val.csv"
    assert cfg.data.full_validation


def test_a_test_class_the_training_csv_never_shows_needs_data_classes(own, tmp_path):
    out = PreparedData(tmp_path / "data")
    with pytest.raises(DataError, match=r"test.csv:\d+: class 'dog' is not among the training CSV's classes "
                                        r"\(list every class in data.classes"):
        prepare(_spec(own["root"], classes=None), out)
    assert not out.folder.exists() or list(out.folder.iterdir()) == []


def test_a_folder_prepared_before_val_split_is_still_accepted(own, tmp_path):
    out = PreparedData(tmp_path / "data")
    prepare(_spec(own["root"]), out)
    record = json.loads(out.inputs_file.read_text())
    del record["spec"]["val_split"]  # as a version before the key wrote it
    out.inputs_file.write_text(json.dumps(record))
    out.stats_file.unlink()
    assert prepare(_spec(own["root"]), out)["splits"]["val"]["images"] == 6
    with pytest.raises(DataError, match=r"prepared from other inputs: val_split '' -> 'val'"):
        prepare(_spec(own["root"], val_split="val"), out)
    (own["root"] / "classes2.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    # the class list's digest is recorded with the CSV's
    with pytest.raises(DataError, match=r"train.csv changed \(its content differs\)"):
        prepare(_spec(own["root"], classes=own["root"] / "classes2.txt"), out)


def test_the_builtin_set_as_csv_prepares_and_shows_true_positives(tmp_path):
    root = tmp_path / "csv"
    assert main(["make-synthetic", str(root), "--layout", "csv", "--train", "30", "--test", "8",
                 "--size", "32"]) == 0
    make_synthetic(tmp_path / "coco", seed=0, n_train=30, n_test=8, image_size=32)  # the same images
    truth = {}
    for split in ("train", "test"):
        coco = json.loads((tmp_path / "coco" / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        truth.update({f"images/{im['file_name']}": set() for im in coco["images"]})
        for ann in coco["annotations"]:
            truth[f"images/{ann['image_id']:012d}.jpg"].add(names[ann["category_id"]])
        assert all((root / f"images/{im['file_name']}").read_bytes()
                   == (tmp_path / "coco" / split / im["file_name"]).read_bytes() for im in coco["images"])
    assert read_classes(root / "classes.txt") == CATEGORIES
    rows = {s: list(csv.reader(open(root / f"{s}.csv", encoding="utf-8"))) for s in ("train", "val", "test")}
    assert rows["train"][0] == ["file", "label"] and rows["val"][0] == rows["test"][0] == ["file", "labels"]
    assert all(label in truth[file] for file, label in rows["train"][1:])
    assert len(rows["val"]) - 1 == 6 and len(rows["train"]) - 1 <= 24
    for s in ("val", "test"):
        assert all(set(labels.split("|")) == truth[file] for file, labels in rows[s][1:])
    assert {f for f, _ in rows["train"][1:]}.isdisjoint(f for f, _ in rows["val"][1:])

    out = PreparedData(tmp_path / "data")
    stats = prepare(_spec(root, val_split="val"), out)
    assert stats["splits"]["val"]["images"] == 6 and stats["num_classes"] == 20
    train = out.labels("train")
    assert [CATEGORIES[c] for c in train.observed] == [label for _, label in rows["train"][1:]]


def test_a_quoted_header_is_read_alike_by_the_header_probe_and_the_reader(tmp_path):
    """Spreadsheets quote every field: `"file","label"` is the single-positive header for both the
    probe the config checks use (csv_lists.single_positive) and the reader."""
    from ffcv_data.csv_lists import single_positive

    path = tmp_path / "train.csv"
    path.write_text('"file","label"\n"a.jpg","cat"\n"b, c.jpg","dog"\n')
    assert single_positive(path)
    path.write_text('"file","labels"\n"a.jpg","cat|dog"\n')
    assert not single_positive(path)
    assert not single_positive(tmp_path / "absent.csv")
