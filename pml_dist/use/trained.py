"""A trained stage as predict and export read it: its best.pt, thresholds.json, result.json and the
prepared data's class names, checked to exist and to fit the config before anything is scored or
written."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from pml_dist.config import saved_settings, settings_of
from pml_dist.errors import ConfigError, PmlError
from pml_dist.layout import RunLayout, StageFiles, StageResult
from pml_dist.stages import Stage

# The keys that shape the classifier: a config that differs from the run's in one of them would
# build another network or feed it other pixels than it was trained on.
SHAPING_KEYS = ("model.name", "model.width", "model.norm", "data.image_size", "data.eval_transform")


@dataclass(frozen=True)
class TrainedStage:
    stage: Stage
    files: StageFiles
    class_names: list[str]
    thresholds: dict  # thresholds.json as written (trainer._thresholds): "threshold" is per class
    result: StageResult | None  # result.json: test and validation mAP (written with thresholds.json)

    @property
    def threshold(self) -> list[float]:
        return self.thresholds["threshold"]

    def weights(self) -> dict[str, torch.Tensor]:
        """best.pt: the plain fp32 state dict trainer._export wrote."""
        return torch.load(self.files.best_weights, map_location="cpu", weights_only=True)


def train_command(stage: Stage) -> str:
    """The `pml-dist train` flags that train `stage` (for the "train it first" message)."""
    if stage.kind == "teacher":
        return "pml-dist train --stage teacher"
    if stage.kind == "reference":
        return f"pml-dist train --stage reference --loss {stage.target}"
    if stage.target.startswith("tau-"):
        return f"pml-dist train --stage student --tau {stage.target.removeprefix('tau-')}"
    return f"pml-dist train --stage student --pseudo {stage.target}"


def open_stage(cfg, stage: Stage) -> TrainedStage:
    """The trained `stage` of cfg's run; a one-line PmlError when it is not trained (yet) or was
    trained with other settings than `cfg` names."""
    run = RunLayout.of(cfg)
    files = stage.files(run)
    missing = [p.name for p in (files.best_weights, files.thresholds) if not p.is_file()]
    if missing:
        raise PmlError(f"{files.dir} has no {' and no '.join(missing)}: train it first: "
                       f"{train_command(stage)} (or pml-dist run)")
    _check_same_settings(cfg, run)
    names = list(run.data.stats().raw["category_names"])
    thresholds = json.loads(files.thresholds.read_text())
    if len(thresholds["threshold"]) != len(names):
        raise PmlError(f"{files.thresholds} has {len(thresholds['threshold'])} thresholds but "
                       f"{run.data.stats_file} {len(names)} classes: the stage was trained on other data")
    return TrainedStage(stage, files, names, thresholds, files.read_result())


def _check_same_settings(cfg, run: RunLayout) -> None:
    if not run.config.is_file():  # a run made by the library without the CLI: nothing to compare
        return
    # flat section.key settings, as config.write_resolved compares them (renamed keys included)
    saved, current = saved_settings(run.config), settings_of(cfg.to_dict())
    differ = [f"{key}={saved[key]} (this config: {current[key]})" for key in SHAPING_KEYS
              if key in saved and saved[key] != current[key]]
    if differ:
        raise ConfigError(f"{run.config}: the run was trained with {', '.join(differ)}; "
                          f"use the run's settings")
