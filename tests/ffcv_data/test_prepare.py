"""prepare -> .beton files read back record by record; bad images stop it with nothing left behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ffcv_data.coco import read_split
from ffcv_data.errors import DataError
from ffcv_data.loaders import eval_loader
from ffcv_data.protocol import draw_observed, one_hot
from pml_dist.config import load_config
from pml_dist.data_stage import prepare
from pml_dist.layout import RunLayout

pytestmark = pytest.mark.timeout(300)  # FFCV's writer hangs on some failures: never wait forever


def _records(beton) -> dict:
    """Every sample as the evaluation loader gives it: index and the labels looked up by it."""
    batches = [{k: v.clone() for k, v in b.items() if k != "image"}
               for b in eval_loader(beton, 256, 16, label_fields=("labels", "observed"), jit=False)]
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in ("index", "labels", "observed")}


def _check_every_record(cfg, root, train_split, test_split):
    """Each split's records equal what the source annotations and the protocol say they should."""
    stats = json.loads((cfg.data_dir / "stats.json").read_text())
    train, test = read_split(root, train_split), read_split(root, test_split)
    seen_train_ids = []
    for name, source in (("train", train), ("val", train), ("test", test)):
        meta = RunLayout.of(cfg).data.labels(name)
        records = _records(RunLayout.of(cfg).data.beton(name))
        n = len(meta.keys)
        assert stats["splits"][name]["images"] == n
        assert np.array_equal(records["index"], np.arange(n))
        rows = np.searchsorted(source.keys, meta.keys)
        assert np.array_equal(source.keys[rows], meta.keys)
        assert np.array_equal(records["labels"], source.labels.dense(rows))
        assert meta.labels.equals(source.labels.take(rows))
        assert list(meta.files()) == [str(source.files[i].relative_to(source.image_root)) for i in rows]
        expected_obs = draw_observed(source.labels.take(rows), meta.keys, cfg.data.observed_seed)
        assert np.array_equal(records["observed"], one_hot(expected_obs, source.num_classes))
        assert np.array_equal(meta.observed, expected_obs)
        if name != "test":
            seen_train_ids.append(np.asarray(meta.keys))
    all_train = np.concatenate(seen_train_ids)
    assert np.array_equal(np.sort(all_train), train.keys)  # train and val partition the source
    assert len(seen_train_ids[1]) == round(cfg.data.val_fraction * len(train))


@pytest.mark.slow
def test_synthetic_records_read_back_exactly(synthetic_root, synthetic_overrides):
    cfg = load_config(None, synthetic_overrides)
    prepare(cfg)
    _check_every_record(cfg, synthetic_root, "train", "test")


@pytest.mark.slow
def test_coco_mini_records_read_back_exactly(coco_mini, coco_mini_overrides):
    cfg = load_config(None, coco_mini_overrides)
    stats = prepare(cfg)
    _check_every_record(cfg, coco_mini, "train2017", "val2017")
    assert stats["sources"]["train"]["images_dropped"] == {"no_annotations": 2}
    assert stats["num_classes"] == 80
    # Real COCO has grayscale JPEGs (RGBImageField needs 3 channels) and varied sizes: all decoded.
    batch = next(iter(eval_loader(RunLayout.of(cfg).data.beton("train"), 32, 64, jit=False)))
    assert batch["image"].shape == (32, 3, 64, 64)


@pytest.mark.slow
def test_images_survive_encoding(synthetic_root, synthetic_overrides):
    """Decoded pixels match the source JPEG up to FFCV's re-encoding at quality 90."""
    cfg = load_config(None, synthetic_overrides)
    prepare(cfg)
    keys = RunLayout.of(cfg).data.labels("test").keys
    batch = next(iter(eval_loader(RunLayout.of(cfg).data.beton("test"), 8, 48, jit=False)))
    from ffcv_data.loaders import MEAN, STD

    decoded = batch["image"].numpy() * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
    for k in range(8):
        file = synthetic_root / "test" / f"{int(keys[int(batch['index'][k])]):012d}.jpg"
        original = np.asarray(Image.open(file).convert("RGB"), dtype=np.float64).transpose(2, 0, 1)
        assert np.abs(decoded[k] - original).mean() < 6.0


@pytest.fixture
def broken_copy(synthetic_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_jpeg_in_the_test_split_is_named_before_any_beton(broken_copy, tmp_path, damage):
    """Every image is decoded before the first .beton: a bad one in the last split stops it all."""
    victim = sorted((broken_copy / "test").glob("*.jpg"))[7]
    if damage == "corrupt":
        victim.write_bytes(b"this is not a jpeg")
    else:
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"data.root={broken_copy}",
                             "data.max_resolution=48", "data.write_workers=2"])
    with pytest.raises(DataError, match=f"1 image\\(s\\) could not be decoded \\(nothing was written\\): "
                                        f"{victim}: ") as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    data = cfg.data_dir  # made for prepare's lock and removed with it: nothing left at all
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))


@pytest.mark.faults
def test_writer_still_names_an_image_that_breaks_after_the_check(broken_copy, tmp_path):
    """The writer's own fallback (a file changed between the check and its encoding): one line, no file."""
    from ffcv_data.beton import write_beton

    files = sorted((broken_copy / "test").glob("*.jpg"))[:6]
    files[3].write_bytes(b"this is not a jpeg")
    target = tmp_path / "out" / "x.beton"
    with pytest.raises(DataError, match=f"x.beton: 1 image\\(s\\) could not be read: {files[3]}: ") as err:
        write_beton(target, files, max_resolution=48, jpeg_quality=90, workers=2)
    assert "\n" not in str(err.value)
    assert list(target.parent.iterdir()) == []


@pytest.mark.faults
def test_cli_exits_non_zero_for_bad_data_and_keeps_earlier_results(broken_copy, tmp_path, capsys):
    from pml_dist.cli import main

    overrides = [f"run.dir={tmp_path / 'run'}", f"data.root={broken_copy}", "data.write_workers=2",
                 "data.max_resolution=48"]
    assert main(["prepare", *overrides]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir()}
    (broken_copy / "annotations" / "instances_test.json").write_text("{not json")
    shutil.rmtree(tmp_path / "run" / "data")
    (tmp_path / "run" / "data").mkdir()
    for name, content in before.items():
        if name.startswith("train"):
            (tmp_path / "run" / "data" / name).write_bytes(content)
    assert main(["prepare", *overrides]) == 2
    assert "instances_test.json: malformed JSON" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir()}
    assert after == {k: v for k, v in before.items() if k.startswith("train")}
