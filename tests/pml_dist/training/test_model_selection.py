"""Model selection as the references did it: Zhou et al.'s early stopping (on a scripted validation
sequence, through the real trainer) and Cole et al.'s LinearInit (the backbone untouched while the
head trains alone, then trained end to end), on a small generated data set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pml_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TINY = ["data.image_size=32", "data.max_resolution=32", "data.jit=false", "data.loader_workers=1",
        "model.width=8", "train.micro_batch=16", "train.eval_batch=64", "train.keep_last=100"]

# The trainer with its validation replaced by a scripted sequence of mAPs, one per epoch.
SCRIPTED = """
import sys
from pml_dist.cli import main
from pml_dist.training import trainer
maps = [float(m) for m in sys.argv[1].split(",")]
def scripted(self):
    return {"map": maps[self.state.epoch], "targets": "labels", "classes_without_positives": []}
trainer.Trainer._validate = scripted
sys.exit(main(["train", "--stage", "teacher", *sys.argv[2:]]))
"""


@pytest.fixture
def prepared(synthetic_root, tmp_path):
    def make(*extra: str) -> tuple[list[str], Path]:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY, *extra]
        assert main(["prepare", *overrides]) == 0
        return overrides, run
    return make


def _train(overrides: list[str], maps: str | None = None) -> None:
    cmd = ([sys.executable, "-c", SCRIPTED, maps] if maps is not None
           else [sys.executable, "-m", "pml_dist", "train", "--stage", "teacher"])
    done = subprocess.run([*cmd, *overrides], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("listed, trained, stopped, best", [
    ("[an]", 3, 2, 1),    # 10, 12, then 12 again does not improve: stop after epoch 2, keep epoch 1
    ("[em]", 5, None, 4),  # the rule applies only to the losses listed
])
def test_early_stop_ends_at_the_first_epoch_that_does_not_improve(prepared, listed, trained, stopped, best):
    overrides, run = prepared("train.epochs=5", f"train.early_stop={listed}")
    _train(overrides, maps="10,12,12,15,16")
    result = json.loads((run / "teacher" / "result.json").read_text())
    assert (result["epochs_trained"], result["stopped_early_after_epoch"], result["best_epoch"]) == (
        trained, stopped, best)
    steps = json.loads((run / "teacher" / "derived.json").read_text())["steps_per_epoch"]
    assert result["best_step"] == (best + 1) * steps


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(run / "teacher" / "ckpt" / f"step-{step}" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_linear_init_trains_the_head_alone_then_everything(prepared):
    overrides, run = prepared("train.linear_init_epochs=2", "train.epochs=1")
    _train(overrides)
    result = json.loads((run / "teacher" / "result.json").read_text())
    assert (result["linear_init_epochs"], result["epochs_trained"]) == (2, 3)
    assert result["best_epoch"] == 2  # chosen among the end-to-end epochs only, as Cole et al. do
    steps = json.loads((run / "teacher" / "derived.json").read_text())["steps_per_epoch"]

    from pml_dist.config import load_config
    from pml_dist.training.models import build_model

    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    initial = build_model(cfg.model.name, _num_classes(run), width=cfg.model.width).state_dict()
    backbone = [k for k in initial if not k.startswith("fc.")]
    for epoch in (1, 2):  # after each head-only epoch: the backbone (BatchNorm statistics too) as it was
        w = _weights(run, epoch * steps)
        assert [k for k in backbone if not torch.equal(w[k], initial[k])] == [], epoch
        assert not torch.equal(w["fc.weight"], initial["fc.weight"])
    end = _weights(run, 3 * steps)
    changed = [k for k in backbone if not torch.equal(end[k], initial[k])]
    assert len(changed) == len(backbone)  # every weight, BatchNorm statistic and counter moved


def _num_classes(run: Path) -> int:
    return json.loads((run / "data" / "stats.json").read_text())["num_classes"]
