"""The COCO reproduction presets cannot rot: their protocol values, and the preset's data stage plus
one short teacher epoch (pretrained-weights path included) on the real coco-mini files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from pml_dist.cli import main
from pml_dist.config import REPO_ROOT, load_config
from pml_dist.training.engine import derive

PRESET = REPO_ROOT / "configs" / "coco2014_r50.yaml"
LARGE = REPO_ROOT / "configs" / "coco2014_r50_largebatch.yaml"
TRAIN2014 = 82_783  # images in COCO train2014; 80% of them train after the validation split


def test_the_preset_is_the_cole_et_al_protocol():
    cfg = load_config(PRESET)
    d, s = cfg.data, cfg.slurm
    assert (d.train_split, d.test_split, d.observed_seed, d.val_fraction, d.val_labels) == (
        "train2014",
        "val2014",
        1200,
        0.2,
        "full",
    )
    # Cole et al.'s draws and split, images and transforms (tests/ffcv_data/test_coco_protocol.py)
    assert (d.observed_protocol, d.val_seed, d.train_transform, d.eval_transform) == (
        "cole", 1200, "resize_flip", "resize")
    assert d.max_resolution >= 640 and d.keep_original_jpegs
    # the references' arithmetic and Zhou et al.'s model selection for EM and EM+APL
    assert cfg.dist.precision == "fp32"
    assert cfg.train.device == "cuda"  # a GPU preset: no silent fall-back to the CPU
    assert set(cfg.train.early_stop) == {"em", "em_apl"} and cfg.train.linear_init_epochs == 0
    # Cole et al.'s grid for their losses (the AN teacher and full BCE), in their order
    sw = cfg.sweep
    assert (set(sw.losses), sw.lr, sw.micro_batch) == ({"an", "bce"}, [1e-2, 1e-3, 1e-4, 1e-5], [8, 16])
    assert (cfg.model.name, d.image_size, cfg.model.pretrained.endswith("resnet50-0676ba61.pth")) == (
        "resnet50",
        448,
        True,
    )
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.weight_decay, cfg.train.epochs) == (
        "adam",
        "constant",
        0.0,
        10,
    )
    derived = derive(cfg, int(TRAIN2014 * 0.8), s.teacher_nodes * s.teacher_tasks_per_node)
    assert (derived.global_batch, derived.lr, derived.warmup_steps) == (16, 1e-5, 0)
    assert cfg.report.published == "coco" and {"bce", "em", "em_apl"} <= set(cfg.report.references)


def test_the_large_batch_variant_scales_batch_and_lr_by_the_rule():
    base, cfg = load_config(PRESET), load_config(LARGE)
    s = cfg.slurm
    derived = derive(cfg, int(TRAIN2014 * 0.8), s.teacher_nodes * s.teacher_tasks_per_node)
    assert derived.global_batch == 256
    assert derived.lr == pytest.approx(1e-5 * math.sqrt(256 / 16))
    assert derived.warmup_steps == derived.steps_per_epoch  # one epoch of warm-up
    assert cfg.dist.deepspeed_config.endswith("zero1.json") and cfg.dist.precision == "bf16"
    assert cfg.sweep.losses == []
    # the rest is the base preset's protocol
    for section in ("data", "model", "loss", "pseudo", "report"):
        assert getattr(cfg, section) == getattr(base, section), section
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.micro_batch, cfg.train.epochs) == ("adam", 1e-5, 16, 10)


@pytest.mark.slow
def test_preset_data_stage_and_a_teacher_epoch_on_coco_mini(coco_mini, tmp_path, capsys):
    import torch
    import torchvision

    weights = tmp_path / "resnet50-imagenet.pth"  # stands in for the ImageNet file: same keys, with fc
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    run = tmp_path / "run"
    overrides = [
        f"run.dir={run}",
        f"data.root={coco_mini}",
        "data.train_split=train2017",
        "data.test_split=val2017",
        "data.max_resolution=64",
        "data.image_size=32",
        "data.jit=false",
        "data.write_workers=2",
        f"model.pretrained={weights}",
        "train.epochs=1",
        "train.device=cpu",  # the preset is a GPU preset (train.device: cuda)
    ]
    assert main(["prepare", "--config", str(PRESET), *overrides]) == 0
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["num_classes"] == 80 and stats["observed_seed"] == 1200
    assert stats["observed_protocol"] == "cole"
    splits = stats["splits"]
    assert splits["train"]["images"] + splits["val"]["images"] == 206  # 208 less 2 without annotations
    assert splits["test"]["images"] == 79

    # As a user starts it: its own process (training exports the torch.distributed variables and
    # keeps a process group, which must not leak into this one), outside any launcher or Slurm job.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "pml_dist",
            "train",
            "--stage",
            "teacher",
            "--config",
            str(PRESET),
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads((run / "teacher" / "result.json").read_text())
    derived = json.loads((run / "teacher" / "derived.json").read_text())
    assert (derived["global_batch"], derived["lr"]) == (16, 1e-5)
    assert derived["total_steps"] == derived["steps_per_epoch"] >= 5
    assert 0 < result["test_map"] <= 100 and math.isfinite(result["val_map"])

    assert main(["report", "--config", str(PRESET), *overrides]) == 0
    md = (run / "report.md").read_text()
    assert "(published 64.92) |" in md.split("| AN teacher |")[1].splitlines()[0]  # beside the measured
    assert "full BCE 76.78" in md and "EM 70.7" in md
