"""`pml-dist export`: a trained stage as a folder that needs torch only.

    model.pt         the scripted Classifier (torch.jit.load; any-size RGB in [0, 1] -> probabilities)
    classes.json     the class names, in output order
    thresholds.json  the stage's per-class decision thresholds (p >= threshold), as trained
    model.json       architecture, image size, mean/std (0-1 scale), the input contract, the data
                     and config it was trained with, git revision, test and validation mAP
    state_dict.pt    the network's plain state dict for fine-tuning: best.pt as written, whose keys
                     a torchvision resnetX(num_classes=L) (or the project's SmallResNet) loads strictly

Written into a hidden folder beside the destination and renamed at the end: the destination is
complete or absent. An existing non-empty destination is refused (nothing is overwritten).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ffcv_data.atomic import temporary_path
from pml_dist import provenance
from pml_dist.config import git_revision
from pml_dist.errors import PmlError
from pml_dist.stages import Stage
from pml_dist.use.classifier import MEAN_01, STD_01, build_classifier, scripted
from pml_dist.use.trained import TrainedStage, open_stage

FILES = ("model.pt", "classes.json", "thresholds.json", "model.json", "state_dict.pt")
FORMAT = "pml-dist classifier 1"


def export(cfg, stage: Stage, out: Path) -> Path:
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise PmlError(f"{out} already exists and is not empty; choose a new folder (nothing was written)")
    trained = open_stage(cfg, stage)
    state = trained.weights()
    module = scripted(build_classifier(cfg, len(trained.class_names), state))
    tmp = temporary_path(out, keep_suffix=False)  # .NAME.tmp-HOST-PID
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export of a process with this host and pid
    try:
        tmp.mkdir(parents=True)
        with warnings.catch_warnings():  # torch 2.11 marks jit.save deprecated; torch.jit.load reads it
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(module, str(tmp / "model.pt"))
        torch.save(state, tmp / "state_dict.pt")
        shutil.copyfile(trained.files.thresholds, tmp / "thresholds.json")
        (tmp / "classes.json").write_text(json.dumps(trained.class_names, indent=2) + "\n")
        (tmp / "model.json").write_text(json.dumps(describe(cfg, trained), indent=2) + "\n")
        os.replace(tmp, out)  # onto an empty folder too (rename(2) replaces an empty directory)
    except OSError as exc:
        raise PmlError(f"{out}: {exc.strerror or exc} while exporting; nothing was written there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def describe(cfg, trained: TrainedStage) -> dict:
    """model.json: what a user of model.pt needs to know, and what it was made from."""
    result = trained.result
    stage = trained.stage
    return {
        "format": FORMAT,
        "stage": {"kind": stage.kind, "target": stage.target, "dir": str(trained.files.dir)},
        "architecture": {"name": cfg.model.name, "width": cfg.model.width, "norm": cfg.model.norm,
                         "num_classes": len(trained.class_names)},
        "image_size": cfg.data.image_size,
        "resize": ("the central square, then " if cfg.data.eval_transform == "center_crop" else "")
        + f"the whole image to {cfg.data.image_size} x {cfg.data.image_size} (aspect not kept) with "
          "OpenCV's INTER_AREA, as the evaluation loader does (data.eval_transform="
          f"{cfg.data.eval_transform})",
        "mean": list(MEAN_01),
        "std": list(STD_01),
        "input": "float (N, 3, H, W) RGB in [0, 1], any H and W (decoded without EXIF rotation); "
                 "model.pt resizes and normalises. pml-dist predict decodes with PIL: "
                 "img = Image.open(f); "
                 + ("a JPEG (img.format == 'JPEG') at the reduced scale the evaluation loader decodes it at: "
                    "d = the largest of 8, 4, 2, 1 with ceil(H / d) >= image_size and "
                    "ceil(W / d) >= image_size (W, H = img.size), and where d > 1 "
                    "img.draft('RGB', (W // d, H // d)) first (libjpeg's DCT scaling; PIL then decodes "
                    "ceil(W / d) x ceil(H / d)); other images at full size; "
                    if cfg.data.eval_transform != "center_crop" else
                    "every image at full size (the center_crop loader decodes JPEGs at full size); ")
                 + "then np.asarray(img.convert('RGB')) / 255",
        "output": "float32 (N, num_classes) sigmoid probabilities, in classes.json order",
        "decision": "class c is present when p[c] >= thresholds.json's threshold[c]",
        "state_dict": ("torchvision.models." + cfg.model.name + "(num_classes=num_classes)"
                       if cfg.model.name != "small_resnet" else
                       "pml_dist.training.models.SmallResNet(num_classes, width, norm)") + ", strict",
        "data": {"root": cfg.data.root, "format": cfg.data.format, "prepared": str(cfg.data_dir)},
        "config_digest": hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16],
        "weights_digest": provenance.file_id(trained.files.best_weights),
        "inputs": result.inputs if result is not None else None,
        # the code the stage was trained with (result.json's environment; absent from older
        # results), and the code that exported it
        "git_revision": (result.raw.get("environment") or {}).get("git") if result is not None else None,
        "exported_by_git_revision": git_revision(),
        "torch_version": torch.__version__,
        "test_map": result.test_map if result is not None else None,
        "val_map": result.val_map if result is not None else None,
    }
