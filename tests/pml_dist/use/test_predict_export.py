"""`pml-dist predict` and `pml-dist export` on one tiny trained teacher (small_resnet, 2 epochs on
the generated data set, 48 px images scored at 32 px, so the resize is exercised), shared by every
test of this file: the records and their formats, unreadable images, the export folder and its
refusals, model.pt in a fresh interpreter without pml_dist, and the difference to the FFCV
evaluation path with the same weights."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcv_data.synthetic import photo_like
from pml_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TINY = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "data.loader_workers=1",
        "model.width=8", "train.micro_batch=16", "train.eval_batch=64", "train.epochs=2",
        "data.write_workers=2"]
TEACHER = ["--stage", "teacher"]
# Measured on this file's teacher (CPU, torch 2.14, Pillow 13): predict from the JPEG files against
# the FFCV evaluation loader, test split (50 images x 20 classes): max |dp| 0.0025, mean 0.00025.
# Nearly all of it is the JPEG decoder: FFCV's libjpeg-turbo call uses the fast integer IDCT
# (TJFLAG_FASTDCT), PIL the accurate one (pixels differ by 1.3 levels on average, 17 at most);
# at image_size=48 (no resize at all) the difference is already max 0.0018. The resize (resize.py:
# INTER_AREA as weight matrices, within the loader's uint8 rounding) adds little; bilinear with
# antialias instead gave max 0.0067.
BOUND_MAX, BOUND_MEAN = 0.01, 0.001


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> dict:
    """One trained teacher: its overrides, run directory and a folder of a few of its test images
    (one in a sub-folder, to see recursion and relative names)."""
    base = tmp_path_factory.mktemp("use")
    run = base / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY]
    assert main(["prepare", *overrides]) == 0
    done = subprocess.run([sys.executable, "-m", "pml_dist", "train", *TEACHER, *overrides],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    images = base / "images"
    (images / "sub").mkdir(parents=True)
    test_files = sorted((synthetic_root / "test").glob("*.jpg"))
    for f in test_files[:5]:
        shutil.copy(f, images / f.name)
    shutil.copy(test_files[5], images / "sub" / test_files[5].name)
    names = json.loads((run / "data" / "stats.json").read_text())["category_names"]
    thresholds = json.loads((run / "teacher" / "thresholds.json").read_text())["threshold"]
    return {"overrides": overrides, "run": run, "images": images, "names": names,
            "thresholds": thresholds, "root": synthetic_root}


def _predict(trained, *args: str, capsys) -> tuple[int, str, str]:
    """main(["predict", ...]): overrides before --stage and PATHs after it, as the synopsis has them."""
    code = main(["predict", *trained["overrides"], *TEACHER, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_predict_writes_one_record_per_image_with_labels_at_the_thresholds(trained, tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    assert _predict(trained, str(trained["images"]), "--top-k", "0", "--out", str(out), capsys=capsys)[0] == 0
    records = _records(out.read_text())
    expected = sorted(p.relative_to(trained["images"]).as_posix() for p in trained["images"].rglob("*.jpg"))
    assert [r["file"] for r in records] == expected and "sub/" in "".join(expected)
    names, thresholds = trained["names"], trained["thresholds"]
    for r in records:
        assert set(r) == {"file", "labels", "scores"}
        assert set(r["scores"]) == set(names)  # --top-k 0: every class
        assert r["labels"] == [n for n, t in zip(names, thresholds, strict=True) if r["scores"][n] >= t]
        assert all(0.0 <= p <= 1.0 for p in r["scores"].values())
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file

    # stdout, the default k = 5, and k = 3: the likeliest classes, highest first
    for k, args in ((5, ()), (3, ("--top-k", "3"))):
        code, text, _ = _predict(trained, *args, str(trained["images"]), capsys=capsys)
        assert code == 0
        for full, r in zip(records, _records(text), strict=True):
            top = sorted(full["scores"].items(), key=lambda kv: -kv[1])[:k]
            assert list(r["scores"]) == [n for n, _ in top] and r["labels"] == full["labels"]
            assert np.allclose(list(r["scores"].values()), [p for _, p in top], atol=0, rtol=0)


def test_a_txt_list_names_images_relative_to_its_folder(trained, tmp_path, capsys):
    listing = trained["images"].parent / "list.txt"
    listing.write_text("# a pool\nimages/sub/" + next((trained["images"] / "sub").iterdir()).name + "\n\n"
                       + f"{sorted(trained['images'].glob('*.jpg'))[0]}\n")
    code, text, _ = _predict(trained, str(listing), capsys=capsys)
    assert code == 0
    files = [r["file"] for r in _records(text)]
    assert len(files) == 2 and files[0].startswith("images/sub/") and Path(files[1]).is_absolute()


def test_labels_format_is_the_csv_a_fully_labelled_split_is_read_from(trained, tmp_path, capsys):
    code, text, _ = _predict(trained, "--format", "labels", "--top-k", "0", str(trained["images"]),
                             capsys=capsys)
    assert code == 0
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["file", "labels"]
    jsonl = _records(_predict(trained, str(trained["images"]), capsys=capsys)[1])
    assert [(f, labels.split("|") if labels else []) for f, labels in rows[1:]] == [
        (r["file"], r["labels"]) for r in jsonl]
    # data.format csv reads it with data.images pointing at the folder predict was given
    csv_lists = pytest.importorskip("ffcv_data.csv_lists")
    (tmp_path / "pool.csv").write_text(text)
    split = csv_lists.read_split(tmp_path, "pool", images=trained["images"], classes=trained["names"])
    assert [split.files.name(i) for i in range(len(split.files))] == [f for f, _ in rows[1:]]


def test_unreadable_images_are_named_and_the_others_scored(trained, tmp_path, capsys):
    folder = tmp_path / "pool"
    shutil.copytree(trained["images"], folder)
    good = sorted(folder.glob("*.jpg"))[0]
    (folder / "broken.jpg").write_bytes(good.read_bytes()[:200])  # a JPEG cut off in its header
    (folder / "notes.png").write_text("not an image")
    code, text, err = _predict(trained, str(folder), capsys=capsys)
    assert code == 1
    files = [r["file"] for r in _records(text)]
    assert len(files) == 6 and "broken.jpg" not in files and "notes.png" not in files
    assert "cannot read broken.jpg" in err and "cannot read notes.png" in err
    assert err.strip().splitlines()[-1] == "pml-dist predict: 2 of 8 images could not be read"


def test_predict_refuses_a_missing_path_and_an_untrained_stage_with_one_line(trained, capsys):
    assert _predict(trained, str(trained["images"] / "nothing-here"), capsys=capsys)[0] == 2
    code = main(["predict", "--stage", "student", "--target", "tau-0.3", *trained["overrides"],
                 str(trained["images"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train it first: pml-dist train --stage student --tau 0.3" in err
    assert main(["predict", "--stage", "student", "--target", "nonsense", *trained["overrides"], "a"]) == 2
    assert "is not one of the run's targets" in capsys.readouterr().err
    # another image size than the run was trained with would feed the network other pixels
    code, _, err = _predict(trained, "data.image_size=40", str(trained["images"]), capsys=capsys)
    assert code == 2 and "data.image_size=32" in err


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "teacher"
    assert main(["export", *TEACHER, *trained["overrides"], "--out", str(out)]) == 0
    return out


def test_export_writes_the_five_files_and_refuses_to_overwrite(trained, exported, capsys):
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["model.pt", "classes.json", "thresholds.json", "model.json", "state_dict.pt"])
    assert json.loads((exported / "classes.json").read_text()) == trained["names"]
    stage = trained["run"] / "teacher"
    assert (exported / "thresholds.json").read_bytes() == (stage / "thresholds.json").read_bytes()
    info = json.loads((exported / "model.json").read_text())
    result = json.loads((stage / "result.json").read_text())
    assert (info["test_map"], info["val_map"]) == (result["test_map"], result["val_map"])
    assert info["architecture"] == {"name": "small_resnet", "width": 8, "norm": "batch", "num_classes": 20}
    assert info["image_size"] == 32 and info["data"]["root"] == str(trained["root"])
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["git_revision"]
    assert not list(exported.parent.glob(".*"))  # no temporary folder left beside it
    capsys.readouterr()

    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    assert main(["export", *TEACHER, *trained["overrides"], "--out", str(exported)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before

    out = exported.parent / "reference"
    code = main(["export", "--stage", "reference", "--loss", "bce", *trained["overrides"], "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train it first: pml-dist train --stage reference --loss bce" in err
    assert not out.exists()


FRESH = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
model = torch.jit.load(sys.argv[1])
folder = Path(sys.argv[2])
size = json.loads((Path(sys.argv[1]).parent / "model.json").read_text())["image_size"]
files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
probs = {}
with torch.no_grad():
    for f in files:
        img = Image.open(folder / f)
        if img.format == "JPEG":  # model.json's input: the evaluation loader's reduced scale
            (w, h), d = img.size, 8
            while d > 1 and (-(-h // d) < size or -(-w // d) < size):
                d //= 2
            if d > 1:
                img.draft("RGB", (w // d, h // d))
        x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
        probs[f] = model(x[None])[0].tolist()
    two = model(torch.rand(2, 3, 57, 41))  # any size, any batch
assert two.shape == (2, len(probs[files[0]])) and two.dtype == torch.float32
assert "pml_dist" not in sys.modules and "ffcv_data" not in sys.modules and "ffcv" not in sys.modules
print(json.dumps(probs))
"""


def test_model_pt_scores_as_predict_in_a_fresh_interpreter_without_the_project(trained, exported, large_jpegs,
                                                                                 tmp_path, capsys):
    """With a large JPEG among the images, which predict decodes at 1/8 of its size (model.json's
    input says how; the fresh interpreter follows it)."""
    images = tmp_path / "images"
    shutil.copytree(trained["images"], images)
    shutil.copy(large_jpegs[0], images / "large.jpg")
    info = json.loads((exported / "model.json").read_text())
    assert "img.draft('RGB', (W // d, H // d))" in info["input"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH, str(exported / "model.pt"), str(images)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout)
    names = json.loads((exported / "classes.json").read_text())
    code, text, _ = _predict(trained, "--top-k", "0", str(images), capsys=capsys)
    assert code == 0
    records = _records(text)
    assert sorted(fresh) == [r["file"] for r in records]
    ours = np.array([[r["scores"][n] for n in names] for r in records])
    theirs = np.array([fresh[r["file"]] for r in records])
    assert np.abs(ours - theirs).max() < 1e-4


def test_state_dict_loads_strictly_into_the_plain_network(trained, exported):
    from pml_dist.training.models import SmallResNet

    net = SmallResNet(20, width=8, norm="batch")
    net.load_state_dict(torch.load(exported / "state_dict.pt", weights_only=True), strict=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_torchvision_resnet_exports_a_state_dict_torchvision_loads(trained, tmp_path):
    """resnet18 weights (untrained: only the keys and the scripted model's equality matter) in a run
    sharing the trained run's data: state_dict.pt loads into torchvision.models.resnet18(num_classes)
    strictly, and model.pt scores as that network does on the resized, normalised pixels."""
    import torchvision

    from pml_dist.training.models import build_model

    run = tmp_path / "r18"
    (run / "teacher").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_model("resnet18", 20).state_dict(), run / "teacher" / "best.pt")
    shutil.copy(trained["run"] / "teacher" / "thresholds.json", run / "teacher")
    overrides = [*trained["overrides"], f"run.dir={run}", f"run.data_dir={trained['run'] / 'data'}",
                 "model.name=resnet18"]
    assert main(["export", *TEACHER, *overrides, "--out", str(tmp_path / "out")]) == 0
    net = torchvision.models.resnet18(num_classes=20).eval()
    net.load_state_dict(torch.load(tmp_path / "out" / "state_dict.pt", weights_only=True), strict=True)
    model = torch.jit.load(tmp_path / "out" / "model.pt")
    x = torch.rand(2, 3, 32, 32)  # already the image size: the scripted resize leaves it as it is
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = torch.sigmoid(net((x - mean[:, None, None]) / std[:, None, None]))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_predict_agrees_with_the_ffcv_evaluation_path_within_the_measured_bound(trained, tmp_path, capsys):
    """The test split scored from its original JPEG files (stored in the .beton as they are: 48 px
    <= data.max_resolution) by predict, and by the loaders' evaluation path with the same best.pt."""
    from pml_dist import dist
    from pml_dist.config import load_config
    from pml_dist.layout import RunLayout
    from pml_dist.training.evaluate import predict as loader_predict
    from pml_dist.training.evaluate import split_loader
    from pml_dist.training.models import build_model

    cfg = load_config(None, trained["overrides"])
    labels = RunLayout.of(cfg).data.labels("test")
    listing = tmp_path / "test.txt"
    listing.write_text("".join(f"{trained['root'] / 'test' / labels.file(i)}\n" for i in range(len(labels))))
    code, text, _ = _predict(trained, "--top-k", "0", str(listing), capsys=capsys)
    assert code == 0
    names = trained["names"]
    ours = np.array([[r["scores"][n] for n in names] for r in _records(text)])

    net = build_model("small_resnet", len(names), width=8)
    net.load_state_dict(torch.load(trained["run"] / "teacher" / "best.pt", weights_only=True))
    loader = split_loader(cfg, "test", dist.resolve({}), torch.device("cpu"), ())
    indices, arrays = loader_predict(net, loader, "cpu", len(names))
    theirs = arrays["probs"][np.argsort(indices)]
    assert theirs.shape == ours.shape == (len(labels), len(names))

    diff = np.abs(ours - theirs)
    print(f"predict vs FFCV evaluation, {diff.size} probabilities: max |dp| {diff.max():.5f}, "
          f"mean {diff.mean():.6f}")
    assert diff.max() < BOUND_MAX and diff.mean() < BOUND_MEAN


# A large JPEG at image_size=32 decodes at 1/8 in the loader; 1200 x 900 -> 150 x 113.
LARGE = ((1200, 900), (900, 1200), (1000, 700))


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[Path]:
    """Photo-like JPEGs (quality 90, 4:2:0) far larger than the image size."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("large")
    paths = []
    for k, (w, h) in enumerate(LARGE):
        path = folder / f"large-{k}.jpg"
        Image.fromarray(photo_like(w, h, seed=k)).save(path, quality=90)
        paths.append(path)
    return paths


def test_a_large_jpeg_is_decoded_at_the_scale_the_loader_picks(large_jpegs, tmp_path):
    from PIL import Image

    from ffcv_data.decode_scale import scale_denominator
    from pml_dist.use.images import decode, loader_max_denominator

    assert loader_max_denominator(center_crop=False) == 8 and loader_max_denominator(center_crop=True) == 1
    assert decode(large_jpegs[0], 32).shape == (3, 113, 150)  # 1/8: ceil(900 / 8), ceil(1200 / 8)
    assert decode(large_jpegs[0], 200).shape == (3, 225, 300)  # 1/4: 1/8 would be 113 rows < 200
    assert decode(large_jpegs[0], 0).shape == (3, 900, 1200)  # no output size: full size
    assert decode(large_jpegs[0], 32, loader_max_denominator(True)).shape == (3, 900, 1200)  # center_crop
    # odd sizes, where PIL's own choice for the output size would differ from the loader's
    for (w, h), size in (((449, 301), 224), ((447, 333), 56), ((801, 37), 5), ((97, 41), 5)):
        path = tmp_path / f"{w}x{h}.jpg"
        Image.fromarray(photo_like(w, h, seed=w)).save(path, quality=90)
        d = scale_denominator(h, w, size, size, 8)
        assert decode(path, size).shape == (3, -(-h // d), -(-w // d)), (w, h, size, d)
    # not a JPEG: full size, whatever the output size
    png = tmp_path / "large.png"
    Image.open(large_jpegs[0]).save(png)
    assert decode(png, 32).shape == (3, 900, 1200)


# Measured (CPU, torch 2.14, Pillow 13, this file's teacher) on LARGE at image_size=32, 60 probabilities:
# max |dp| 0.00010, mean 0.000029 with the reduced-scale decode (at 1/8 libjpeg's scaled IDCT is the
# same whatever the IDCT method, so PIL's and FFCV's pixels nearly agree); decoding at full size, as
# predict did, gave max 0.00070, mean 0.00025, which these bounds reject.
LARGE_BOUND_MAX, LARGE_BOUND_MEAN = 0.0005, 0.0001


def test_predict_on_large_jpegs_agrees_with_the_loader_within_the_measured_bound(trained, large_jpegs,
                                                                                   tmp_path, capsys):
    """The large JPEGs stored as they are in a .beton (max_resolution 1200) and scored by the loader's
    evaluation transform (decoded at 1/8, INTER_AREA to 32 px), and by predict from the files."""
    from ffcv_data.beton import write_beton
    from ffcv_data.loaders import eval_loader
    from pml_dist.training.models import build_model
    from pml_dist.use.classifier import Classifier
    from pml_dist.use.images import decode

    names = trained["names"]
    code, text, _ = _predict(trained, "--top-k", "0", *map(str, large_jpegs), capsys=capsys)
    assert code == 0
    ours = np.array([[r["scores"][n] for n in names] for r in _records(text)])

    net = build_model("small_resnet", len(names), width=8)
    net.load_state_dict(torch.load(trained["run"] / "teacher" / "best.pt", weights_only=True))
    net.eval()
    beton = write_beton(tmp_path / "large.beton", large_jpegs, max_resolution=1200, jpeg_quality=90,
                        workers=1)
    with torch.no_grad():
        x = torch.cat([b["image"] for b in eval_loader(beton, 8, 32, transform="resize", jit=False,
                                                        label_fields=())])
        theirs = torch.sigmoid(net(x)).numpy()
        full = Classifier(net, 32)(torch.stack([Classifier(net, 32).resize(decode(p)[None])[0]
                                                for p in large_jpegs])).numpy()
    assert theirs.shape == ours.shape == (len(LARGE), len(names))
    diff, before = np.abs(ours - theirs), np.abs(full - theirs)
    print(f"predict vs FFCV evaluation on {len(LARGE)} large JPEGs: max |dp| {diff.max():.5f}, mean "
          f"{diff.mean():.6f} (full-size decode: max {before.max():.5f}, mean {before.mean():.6f})")
    assert diff.max() < LARGE_BOUND_MAX and diff.mean() < LARGE_BOUND_MEAN
