"""The Open Images reader (data.format: openimages) on a small release written here under V7's file
names: label sets and verified negatives compared with the files re-read by a plain-Python reference
of the format's description; the trainable-class narrowing; images with only negatives; the bad
inputs, each one line naming the file (and line) with nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffcv_data.errors import DataError
from ffcv_data.formats import read_split
from ffcv_data.prepare import PrepareSpec, prepare
from ffcv_data.prepared import PreparedData

pytestmark = pytest.mark.timeout(300)
MIDS = [f"/m/0{k:03x}" for k in range(7)]
NAMES = ["Cat", "Dog", "Tree", "Car", "Person", "Bicycle wheel", "Retired"]  # the last is not trainable


def write_release(root: Path) -> Path:
    """V7-style files: 7 classes described, 6 trainable; train 40 images, test 12. Rows repeat a pair
    from a second source; image 3 of each split has negatives only; image 5 lists Dog as both 1 and
    0 (two sources disagree); every image also has a label of the non-trainable class."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    with open(root / "oidv7-class-descriptions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["LabelName", "DisplayName"], *zip(MIDS, NAMES, strict=True)])
    (root / "oidv7-classes-trainable.txt").write_text("".join(m + "\n" for m in MIDS[:6]))
    for split, n in (("train", 40), ("test", 12)):
        ids = [f"{rng.integers(2**63):016x}" for _ in range(n)]
        rows = [["ImageID", "Source", "LabelName", "Confidence"]]
        for i, image_id in enumerate(ids):
            conf = rng.choice([1, 0, -1], size=6, p=[0.3, 0.3, 0.4])
            conf[rng.integers(6)] = 1
            if i == 3:
                conf = np.where(conf == 1, 0, conf)
            for c in rng.permutation(6):
                if conf[c] >= 0:
                    rows.append([image_id, "verification", MIDS[c], str(conf[c])])
                    if rng.random() < 0.2:
                        rows.append([image_id, "crowdsource-verification", MIDS[c], str(conf[c])])
            rows.append([image_id, "machine", MIDS[6], "1"])
            if i == 5:
                rows += [[image_id, "verification", MIDS[1], "1"], [image_id, "crowdsource", MIDS[1], "0"]]
            path = root / split / f"{image_id}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(path, quality=90)
        order = [rows[0], *(rows[k] for k in rng.permutation(np.arange(1, len(rows))))]  # not sorted
        with open(root / f"oidv7-{split}-annotations-human-imagelabels.csv", "w", newline="") as f:
            csv.writer(f).writerows(order)
    return root


def reference(root: Path, split: str) -> dict[str, tuple[set[str], set[str]]]:
    """ImageID -> (positive, negative) trainable LabelNames, from the description: confidence 1 is a
    positive, 0 a verified negative, a pair with both a positive; images with a kept label only."""
    trainable = set((root / "oidv7-classes-trainable.txt").read_text().split())
    out: dict[str, tuple[set[str], set[str]]] = {}
    with open(root / f"oidv7-{split}-annotations-human-imagelabels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["LabelName"] in trainable:
                pos, neg = out.setdefault(row["ImageID"], (set(), set()))
                (pos if row["Confidence"] == "1" else neg).add(row["LabelName"])
    return {i: (pos, neg - pos) for i, (pos, neg) in out.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("oi") / "openimages")


def _spec(root: Path) -> PrepareSpec:
    return PrepareSpec(root=root, train_split="train", test_split="test", observed_seed=1200,
                       val_fraction=0.2, val_seed=1200, max_resolution=32, jpeg_quality=90, write_workers=1,
                       format="openimages")


def _names(classes) -> set[str]:
    return {MIDS[c] for c in classes}


def test_reader_gives_the_label_sets_and_verified_negatives_of_the_files(release):
    for split in ("train", "test"):
        got, want = read_split("openimages", release, split), reference(release, split)
        assert [f.stem for f in got.files] == sorted(want)  # ImageIDs ascending
        assert got.class_names == NAMES[:6]
        for row, image_id in enumerate(sorted(want)):
            assert _names(got.labels.row(row)) == want[image_id][0], image_id
            assert _names(got.negatives.row(row)) == want[image_id][1], image_id
        assert got.labels_left_out == {"class_not_trainable": len(want)}


def test_prepare_keeps_negatives_and_drops_images_without_a_positive_under_keyed(release, tmp_path):
    out = PreparedData(tmp_path / "data")
    stats = prepare(_spec(release), out)
    want = reference(release, "train")
    assert stats["sources"]["train"]["images_dropped"] == {"no_positive": 1}
    assert stats["sources"]["train"]["labels_left_out"] == {"class_not_trainable": 40}
    seen = {}
    for part in ("train", "val"):
        split = out.labels(part)
        for row, file in enumerate(split.files()):
            seen[Path(file).stem] = (_names(split.labels.row(row)), _names(split.negatives.row(row)))
            assert MIDS[split.observed[row]] in seen[Path(file).stem][0]
        negatives = np.mean([len(seen[Path(f).stem][1]) for f in split.files()])
        assert stats["splits"][part]["verified_negatives_per_image"] == pytest.approx(negatives)
    assert seen == {i: sets for i, sets in want.items() if sets[0]}


def _copy(release: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(release, tmp_path / "copy"))


def _append(path: Path, line: str) -> int:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, line]) + "\n")
    return len(lines) + 1


@pytest.mark.parametrize("damage, message", [
    ("bad_confidence", r"oidv7-train-annotations-human-imagelabels.csv:{line}: expected ImageID,Source,"
                       r"LabelName,Confidence with confidence 1 or 0, got 'abc,verification,/m/0000,0.5'"),
    ("unknown_class", r"oidv7-train-annotations-human-imagelabels.csv:{line}: class '/m/zzz' is not in "
                      r".*oidv7-class-descriptions.csv"),
    ("two_label_files", r"the labels of split 'train' must be exactly one file matching "
                        r"\*train-annotations-human-imagelabels.csv \(found: oidv7-train-annotations-human-"
                        r"imagelabels.csv, train-annotations-human-imagelabels.csv\)"),
    ("class_twice", r"oidv7-class-descriptions.csv:9: class /m/0000 is listed twice \(first on line 2\)"),
    ("unknown_trainable", r"oidv7-classes-trainable.txt: class '/m/nope' is not in "),
    ("missing_image", r"image file\(s\) missing: .*/train/"),
])
def test_bad_inputs_are_one_line_naming_the_file_and_nothing_is_written(release, tmp_path, damage, message):
    root = _copy(release, tmp_path)
    labels = root / "oidv7-train-annotations-human-imagelabels.csv"
    line = 0
    if damage == "bad_confidence":
        line = _append(labels, "abc,verification,/m/0000,0.5")
    elif damage == "unknown_class":
        line = _append(labels, "abc,verification,/m/zzz,1")
    elif damage == "two_label_files":
        (root / "train-annotations-human-imagelabels.csv").write_bytes(labels.read_bytes())
    elif damage == "class_twice":
        _append(root / "oidv7-class-descriptions.csv", "/m/0000,Cat again")
    elif damage == "unknown_trainable":
        _append(root / "oidv7-classes-trainable.txt", "/m/nope")
    else:
        next((root / "train").glob("*.jpg")).unlink()
    out = PreparedData(tmp_path / "data")
    with pytest.raises(DataError, match=message.format(line=line)) as err:
        prepare(_spec(root), out)
    assert "\n" not in str(err.value)
    assert not out.folder.exists() or list(out.folder.iterdir()) == []


def test_v6_validation_and_v7_val_are_told_apart(release, tmp_path):
    root = _copy(release, tmp_path)
    (root / "oidv7-test-annotations-human-imagelabels.csv").rename(
        root / "validation-annotations-human-imagelabels.csv")
    (root / "test").rename(root / "validation")
    assert len(read_split("openimages", root, "validation")) == 12
    with pytest.raises(DataError, match=r"split 'val' must be exactly one file .*\(found: none\)"):
        read_split("openimages", root, "val")


def test_a_cole_draw_too_large_to_reproduce_is_one_line_naming_the_split(release, tmp_path, monkeypatch):
    """(Limit lowered: the real one, 5e9 image-class draws, is OpenImages-size.)"""
    from dataclasses import replace

    from ffcv_data import protocol

    monkeypatch.setattr(protocol, "COLE_MAX_CELLS", 100)
    out = PreparedData(tmp_path / "data")
    with pytest.raises(DataError, match=r"oidv7-train-annotations-human-imagelabels.csv: observed_protocol="
                                        r"cole .* 40 images x 6 classes = 2.4e\+02 draws") as err:
        prepare(replace(_spec(release), observed_protocol="cole"), out)
    assert "\n" not in str(err.value) and not out.folder.exists()
