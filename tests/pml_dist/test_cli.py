from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pml_dist.cli import main
from pml_dist.config import REPO_ROOT


def test_bad_key_exits_2_naming_the_key(capsys, tmp_path):
    assert main(["prepare", f"run.dir={tmp_path}", "data.rot=/x"]) == 2
    assert "unknown config key 'data.rot'" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_module_entry_point_exits_non_zero_on_a_bad_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pml_dist", "prepare", f"run.dir={tmp_path}", "train.epochs=zero"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "'train.epochs' expects int" in proc.stderr


def test_make_synthetic_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["make-synthetic", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.faults
@pytest.mark.parametrize("args, message", [
    (["--train", "0"], "argument --train: must be >= 1, got 0"),
    (["--test", "-2"], "argument --test: must be >= 1, got -2"),
    (["--size", "16"], "argument --size: must be >= 32, got 16"),
])
def test_make_synthetic_refuses_bad_sizes_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["make-synthetic", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pml-dist make-synthetic: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.faults
def test_a_config_that_is_a_directory_is_one_line(tmp_path, capsys):
    assert main(["prepare", "--config", str(tmp_path), f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"pml-dist prepare: error: config file {tmp_path} is a directory; " \
                                      "name a YAML preset in it\n"


@pytest.mark.faults
def test_a_missing_coco_root_is_an_error_not_generated(tmp_path, capsys):
    """Only the built-in root, or data.synthetic=true, is generated when missing: a mistyped COCO
    path must not be silently replaced by generated images."""
    missing = tmp_path / "datasets" / "cocoo"
    preset = REPO_ROOT / "configs" / "coco2014_r50.yaml"
    run = tmp_path / "run"
    assert main(["prepare", "--config", str(preset), f"run.dir={run}", f"data.root={missing}"]) == 2
    assert f"data.root {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists() and not (run / "data").exists()


@pytest.mark.faults
def test_a_typo_in_a_first_command_does_not_lock_the_run_directory(synthetic_overrides, capsys):
    """The first command fails on the typo and produced nothing: the corrected one takes over."""
    assert main(["prepare", *synthetic_overrides, "data.train_split=trian"]) == 2
    assert "trian" in capsys.readouterr().err
    assert main(["prepare", *synthetic_overrides]) == 0
    run = next(o.partition("=")[2] for o in synthetic_overrides if o.startswith("run.dir="))
    assert main(["prepare", *synthetic_overrides, "data.val_fraction=0.3"]) == 2  # now it holds data
    assert "already holds its results (data/" in capsys.readouterr().err
    assert (Path(run) / "data" / "train.beton").is_file()


@pytest.mark.slow
def test_prepare_generates_missing_root_then_resumes(tmp_path):
    """The demo path: data.root does not exist, so prepare generates the built-in set first."""
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.root={tmp_path / 'gen'}", "data.synthetic=true",
                 "data.synthetic_train=60", "data.synthetic_test=20", "data.write_workers=2"]
    assert main(["prepare", *overrides]) == 0
    data = tmp_path / "run" / "data"
    stats = json.loads((data / "stats.json").read_text())
    assert stats["splits"]["train"]["images"] + stats["splits"]["val"]["images"] == 60
    assert stats["splits"]["val"]["images"] == 12
    assert stats["splits"]["test"]["images"] == 20
    assert (tmp_path / "gen" / "annotations" / "instances_train.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in data.glob("*.beton")}
    assert sorted(mtimes) == ["test.beton", "train.beton", "val.beton"]
    assert main(["prepare", *overrides]) == 0  # rerun: nothing rewritten
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in data.glob("*.beton")}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without CUDA")
def test_a_torchvision_resnet_without_cuda_fails_at_once_unless_cpu_is_asked_for(synthetic_overrides,
                                                                                   capsys):
    """No silent fp32 CPU training of a ResNet: one line, exit 2, before any process group."""
    overrides = [*synthetic_overrides, "model.name=resnet18", "train.device=auto"]
    assert main(["prepare", *overrides]) == 0
    capsys.readouterr()
    assert main(["train", "--stage", "teacher", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.name=resnet18 and no CUDA GPU is visible" in err and "train.device=cpu" in err
    assert len(err.splitlines()) == 1
    import torch.distributed as tdist

    assert not tdist.is_initialized()
