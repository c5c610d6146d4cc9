"""The VOC 2012, CUB-200-2011 and formatted-folder readers, each on a small folder written here in the
real layout, prepared by its preset (voc2012_r50, cub_r50, nuswide_r50: `cole`, seeds 1200) and
compared with Cole et al.'s scripts re-implemented in spml_reference.py (rows, order, labels,
observed positives, validation split); the keyed protocol on the same folders; the bad inputs, each
one line naming the file (and line) with nothing written; and `pml-dist labels` on each prepared
folder."""

from __future__ import annotations

import csv
import io
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffcv_data.errors import DataError
from ffcv_data.formats import read_split
from ffcv_data.prepare import PrepareSpec, prepare
from ffcv_data.prepared import PreparedData
from ffcv_data.protocol import one_hot
from pml_dist.cli import main

pytestmark = pytest.mark.timeout(300)
RNG_SEED = 11


def _jpeg(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, quality=90)


# ------------------------------------------------------------------------------ the three layouts

def write_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with 40 train and 16 val images; per class list every image of the split with
    1, 0 (difficult) or -1, positives padded to two spaces as the real files are. Image 7 of each split
    has only difficult and absent objects (the reference leaves it out)."""
    rng = np.random.default_rng(RNG_SEED)
    voc = root / "VOCdevkit" / "VOC2012"
    from ffcv_data.voc import CLASSES

    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split, n, year in (("train", 40, 2008), ("val", 16, 2009)):
        ids = [f"{year}_{i:06d}" for i in rng.permutation(n * 3)[:n]]
        labels = rng.choice([1, 0, -1], size=(n, len(CLASSES)), p=[0.12, 0.05, 0.83])
        labels[np.arange(n), rng.integers(len(CLASSES), size=n)] = 1
        labels[7] = np.where(labels[7] == 1, 0, labels[7])
        for c, name in enumerate(CLASSES):
            lines = [f"{image_id} {label:2d}" for image_id, label in zip(ids, labels[:, c], strict=True)]
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
        for image_id in ids:
            _jpeg(voc / "JPEGImages" / f"{image_id}.jpg", rng)
    return root


def write_cub(root: Path, nested: bool = False) -> Path:
    """attributes.txt beside CUB_200_2011/ (or Cole et al.'s doubly nested copy), 30 images in 3
    species folders, 12 attributes; one line of the attribute file with extra fields (the official
    file has such lines), image 5 with no attribute present."""
    rng = np.random.default_rng(RNG_SEED)
    outer = root / "CUB_200_2011" if nested else root
    cub = outer / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    names = [f"has_part_{k}::shape_{k % 3}" for k in range(12)]
    (outer / "attributes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(names)))
    files = [f"{1 + i % 3:03d}.Bird_{i % 3}/Bird_{i % 3}_{i:04d}_{7 * i}.jpg" for i in range(30)]
    (cub / "images.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(files)))
    is_train = rng.integers(0, 2, size=30)
    (cub / "train_test_split.txt").write_text("".join(f"{i + 1} {t}\n" for i, t in enumerate(is_train)))
    present = (rng.random((30, 12)) < 0.3).astype(int)
    present[5] = 0
    lines = []
    for i in range(30):
        for a in range(12):
            lines.append(f"{i + 1} {a + 1} {present[i, a]} {rng.integers(1, 5)} {rng.integers(0, 30)}.{i}")
    lines[40] += " 0 7"  # seven fields, as some lines of the official file
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for f in files:
        _jpeg(cub / "images" / f, rng)
    return root


def write_cole(root: Path) -> tuple[Path, Path]:
    """A formatted folder (float labels, as the reference saves them) and its image root; train row 3
    has no positive."""
    rng = np.random.default_rng(RNG_SEED)
    images = root / "Flickr"
    folder = root / "formatted"
    folder.mkdir(parents=True)
    for split, n in (("train", 35), ("val", 12)):
        paths = np.array([f"actor/{split}_{i:04d}.jpg" for i in rng.permutation(n)])
        y = (rng.random((n, 9)) < 0.25).astype(np.float64)
        y[np.arange(n), rng.integers(9, size=n)] = 1.0
        if split == "train":
            y[3] = 0.0
        np.save(folder / f"formatted_{split}_images.npy", paths)
        np.save(folder / f"formatted_{split}_labels.npy", y)
        for p in paths:
            _jpeg(images / p, rng)
    return folder, images


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return write_cub(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="module")
def cole_root(tmp_path_factory):
    return write_cole(tmp_path_factory.mktemp("cole"))


def _spec(fmt: str, root: Path, train: str, test: str, protocol: str = "cole", images: Path | None = None):
    return PrepareSpec(root=root, train_split=train, test_split=test, observed_seed=1200, val_fraction=0.2,
                       val_seed=1200, max_resolution=32, jpeg_quality=90, observed_protocol=protocol,
                       write_workers=1, format=fmt, images=images)


def _prepared(tmp_path_factory, spec: PrepareSpec) -> tuple[PreparedData, dict]:
    out = PreparedData(tmp_path_factory.mktemp("prepared"))
    return out, prepare(spec, out)


def _preset(name: str, tmp_path_factory, *overrides: str) -> tuple[PreparedData, dict]:
    """`pml-dist prepare` with a data-set preset (its format, splits, protocol and seeds), on the
    test's folder and at a small image size."""
    from pml_dist.config import REPO_ROOT, load_config
    from pml_dist.data_stage import prepare as prepare_stage
    from pml_dist.layout import RunLayout

    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml", [
        f"run.dir={tmp_path_factory.mktemp('run')}", "data.max_resolution=32", "data.write_workers=1",
        *overrides])
    return RunLayout.of(cfg).data, prepare_stage(cfg)


# Each data set as its preset prepares it, written once per module: (prepared folder, stats, reference)
@pytest.fixture(scope="module")
def voc(voc_root, tmp_path_factory, reference):
    data, stats = _preset("voc2012_r50", tmp_path_factory, f"data.root={voc_root}")
    return data, stats, {phase: reference.format_pascal(voc_root, phase) for phase in ("train", "val")}


@pytest.fixture(scope="module")
def cub(cub_root, tmp_path_factory, reference):
    data, stats = _preset("cub_r50", tmp_path_factory, f"data.root={cub_root}")
    cub = cub_root / "CUB_200_2011"
    ref = reference.format_cub(cub, cub_root / "attributes.txt")
    return data, stats, {"train": ref["train"], "val": ref["val"]}


@pytest.fixture(scope="module")
def cole(cole_root, tmp_path_factory):
    folder, images = cole_root
    data, stats = _preset("nuswide_r50", tmp_path_factory, f"data.root={folder}", f"data.images={images}")
    ref = {phase: (np.load(folder / f"formatted_{phase}_images.npy"),
                   np.load(folder / f"formatted_{phase}_labels.npy")) for phase in ("train", "val")}
    return data, stats, ref


# ----------------------------------------------------------------- against the reference procedure

@pytest.mark.parametrize("fmt", ["voc", "cub", "cole"])
def test_prepared_splits_equal_the_reference_procedure(fmt, request, reference):
    """Rows (files, order), full labels and observed positives of train, val and test are the
    reference's: its train file split by generate_split(RandomState(1200)), its val file the test set,
    each with its own generate_observed_labels draw."""
    data, stats, ref = request.getfixturevalue(fmt)
    train_files, train_y = ref["train"]
    train_rows, val_rows = reference.split(len(train_files), 0.2, 1200)
    train_obs = reference.observe(train_y)
    expected = {"train": (train_files[train_rows], train_y[train_rows], train_obs[train_rows]),
                "val": (train_files[val_rows], train_y[val_rows], train_obs[val_rows]),
                "test": (ref["val"][0], ref["val"][1], reference.observe(ref["val"][1]))}
    for split, (files, y, obs) in expected.items():
        got = data.labels(split)
        assert list(got.files()) == list(files), split
        assert np.array_equal(got.labels.dense(), y), split
        assert np.array_equal(one_hot(got.observed, got.num_classes), obs == 1), split
        assert stats["splits"][split]["images"] == len(files)


def test_voc_leaves_out_images_without_a_positive_and_counts_them(voc, voc_root):
    _, stats, ref = voc
    assert stats["format"] == "voc" and stats["num_classes"] == 20
    for role, phase in (("train", "train"), ("test", "val")):
        source = stats["sources"][role]
        assert source["images_read"] == {"train": 40, "val": 16}[phase]
        assert source["images_kept"] == len(ref[phase][0]) == source["images_read"] - 1
        assert source["images_dropped"] == {"no_positive": 1}


def test_cub_keeps_a_row_without_attributes_under_cole_and_drops_it_under_keyed(cub, cub_root,
                                                                                tmp_path_factory):
    _, stats, ref = cub
    train_empty = int((ref["train"][1].sum(axis=1) == 0).sum())
    assert stats["splits"]["train"]["images_without_positive"] + stats["splits"]["val"][
        "images_without_positive"] == train_empty
    _, keyed = _prepared(tmp_path_factory, _spec("cub", cub_root, "train", "test", protocol="keyed"))
    assert keyed["sources"]["train"]["images_kept"] == len(ref["train"][0]) - train_empty
    dropped = {"no_positive": train_empty} if train_empty else {}
    assert keyed["sources"]["train"]["images_dropped"] == dropped
    assert keyed["splits"]["train"]["images_without_observed"] == 0


def test_cub_reads_cole_et_al_doubly_nested_copy_alike(cub_root, tmp_path):
    nested = write_cub(tmp_path / "nested", nested=True)
    a, b = read_split("cub", cub_root, "train"), read_split("cub", nested, "train")
    assert [f.relative_to(a.image_root) for f in a.files] == [f.relative_to(b.image_root) for f in b.files]
    assert a.labels.equals(b.labels)
    assert a.class_names == b.class_names


def test_keyed_draws_are_the_same_for_any_subset_of_the_images(voc_root, tmp_path):
    """Keyed by each image's name: a copy of the data set missing some images draws the same
    positive for every image both have."""
    from ffcv_data.protocol import draw_observed

    whole = read_split("voc", voc_root, "train")
    part = whole.subset(np.arange(0, len(whole), 2), {})
    draws = [draw_observed(s.labels, s.keys, 1200) for s in (whole, part)]
    assert np.array_equal(draws[0][::2], draws[1])


def test_formatted_folder_rows_without_positive_are_counted(cole):
    _, stats, ref = cole
    assert stats["splits"]["train"]["images_without_observed"] + stats["splits"]["val"][
        "images_without_observed"] == 1
    assert stats["category_names"] == [str(k) for k in range(9)]


# ------------------------------------------------------------------------------------ bad inputs

def _copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def _edit_line(path: Path, lineno: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _refused(spec: PrepareSpec, tmp_path: Path, match: str) -> None:
    out = PreparedData(tmp_path / "out")
    with pytest.raises(DataError, match=match):
        prepare(spec, out)
    assert not out.folder.exists() or not any(out.folder.iterdir())  # nothing written


VOC_MAIN = Path("VOCdevkit/VOC2012/ImageSets/Main")


@pytest.mark.parametrize("edit, match", [
    (lambda r: _edit_line(r / VOC_MAIN / "cat_train.txt", 3, "2008_000001"),
     r"cat_train.txt:3: expected '<image id> <label>'"),
    (lambda r: _edit_line(r / VOC_MAIN / "dog_train.txt", 5, "2008_000001  2"),
     r"dog_train.txt:5: .*label 1, 0 or -1"),
    (lambda r: (r / VOC_MAIN / "sofa_train.txt").unlink(), r"class list not found: .*sofa_train.txt"),
    (lambda r: _edit_line(r / VOC_MAIN / "bus_train.txt", 2,
                          (r / VOC_MAIN / "bus_train.txt").read_text().splitlines()[0]),
     r"bus_train.txt:2: image \S+ is listed twice"),
    (lambda r: shutil.rmtree(r / "VOCdevkit/VOC2012/JPEGImages"),
     r"image file\(s\) missing: .* and \d+ more"),
])
def test_voc_bad_inputs_are_one_line_naming_the_file(voc_root, tmp_path, edit, match):
    root = _copy(voc_root, tmp_path)
    edit(root)
    _refused(_spec("voc", root, "train", "val"), tmp_path, match)


CUB_LABELS = Path("CUB_200_2011/attributes/image_attribute_labels.txt")


@pytest.mark.parametrize("edit, match", [
    (lambda r: _edit_line(r / CUB_LABELS, 4, "1 4"), r"image_attribute_labels.txt:4: expected"),
    (lambda r: _edit_line(r / CUB_LABELS, 4, "1 13 1 3 2.0"),
     r"image_attribute_labels.txt:4: attribute id 13 is outside 1..12"),
    (lambda r: _edit_line(r / CUB_LABELS, 4, "1 4 x 3 2.0"), r"image_attribute_labels.txt:4: is_present 'x'"),
    (lambda r: _edit_line(r / CUB_LABELS, 4, "1 3 1 3 2.0"),
     r"image_attribute_labels.txt:4: image 1, attribute 3 is listed twice"),
    (lambda r: _edit_line(r / CUB_LABELS, 30, None),
     r"image_attribute_labels.txt: image 3, attribute 6 is not listed"),
    (lambda r: _edit_line(r / "CUB_200_2011/train_test_split.txt", 2, "2 5"),
     r"train_test_split.txt:2: is_train must be 0 or 1"),
    (lambda r: (r / "attributes.txt").unlink(), r"file not found: .*attributes.txt"),
    (lambda r: _edit_line(r / "CUB_200_2011/images.txt", 2, "1 dup.jpg"),
     r"images.txt: image id 1 is listed twice"),
])
def test_cub_bad_inputs_are_one_line_naming_the_file(cub_root, tmp_path, edit, match):
    root = _copy(cub_root, tmp_path)
    edit(root)
    _refused(_spec("cub", root, "train", "test"), tmp_path, match)


@pytest.mark.parametrize("edit, match", [
    (lambda f: np.save(f / "formatted_train_labels.npy", np.full((35, 9), 2.0)), r"labels must be 0 or 1"),
    (lambda f: np.save(f / "formatted_train_labels.npy", np.zeros((34, 9))), r"expected 35 rows"),
    (lambda f: np.save(f / "formatted_train_images.npy", np.array(["actor/train_0000.jpg"] * 35)),
     r"rows 0 and 1 are the same image"),
    (lambda f: (f / "formatted_val_images.npy").unlink(), r"file not found: .*formatted_val_images.npy"),
])
def test_formatted_folder_bad_inputs_are_one_line_naming_the_file(cole_root, tmp_path, edit, match):
    folder, images = cole_root
    copy = _copy(folder, tmp_path)
    edit(copy)
    _refused(_spec("cole", copy, "train", "val", images=images), tmp_path, match)


def test_formatted_folder_needs_its_image_root(cole_root, tmp_path):
    _refused(_spec("cole", cole_root[0], "train", "val"), tmp_path, r"data.images must name the folder")


# ------------------------------------------------------------------------------- pml-dist labels

@pytest.mark.parametrize("fmt", ["voc", "cub", "cole"])
def test_labels_command_lists_a_prepared_split(fmt, request, tmp_path):
    data, stats, _ = request.getfixturevalue(fmt)
    names = stats["category_names"]
    for split in ("train", "test"):
        for with_names in (False, True):
            out = io.StringIO()
            with redirect_stdout(out):
                assert main(["labels", "--split", split, f"run.dir={tmp_path / 'run'}",
                             f"run.data_dir={data.folder}", *(["--names"] if with_names else [])]) == 0
            rows = list(csv.reader(io.StringIO(out.getvalue())))
            assert rows[0] == ["row", "file", "observed", "labels"]
            meta = data.labels(split)
            files, dense = list(meta.files()), meta.labels.dense()
            observed_rows = one_hot(meta.observed, len(names))
            assert len(rows) - 1 == len(files)
            for row, (i, file, observed, labels) in enumerate(rows[1:]):
                assert (int(i), file) == (row, files[row])
                classes = np.flatnonzero(dense[row])
                seen = np.flatnonzero(observed_rows[row])
                if with_names:
                    assert labels == "|".join(names[c] for c in classes)
                    assert observed == "|".join(names[c] for c in seen)
                else:
                    assert labels == " ".join(map(str, classes)) and observed == " ".join(map(str, seen))


def test_image_files_are_paths_under_the_root_kept_as_one_buffer(tmp_path):
    """What every reader gives as a split's files: root / name per row (unicode, a lone surrogate,
    subfolders), taken by rows in any order, equal to the list of Paths it stands for."""
    from ffcv_data.source import ImageFiles

    names = ["a.jpg", "图/é.jpg", "", "x\ud800y.jpg", "b/c/d.png"]
    files = ImageFiles.of(tmp_path, names)
    want = [tmp_path / n for n in names]
    assert len(files) == 5 and files == want and list(files) == want and files[-1] == want[-1]
    assert files[1:3] == want[1:3] and files.name(3) == "x\ud800y.jpg"
    rows = np.array([4, 0, 0, 3])
    assert files.take(rows) == [want[r] for r in rows] == files.take(rows, block=3)  # in blocks too
    assert files.take(np.zeros(0, np.int64)) == [] and ImageFiles.of(tmp_path, []).take([]) == []
    with pytest.raises(IndexError):
        files[5]
