from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pml_dist.config import DATA_FORMATS, DEFAULT_PRESET, REPO_ROOT, load_config, write_resolved
from pml_dist.errors import ConfigError


def test_demo_preset_is_the_default_and_has_the_interface_keys():
    cfg = load_config()
    assert cfg == load_config(DEFAULT_PRESET)
    for key in ("run.dir", "data.root", "data.train_split", "data.test_split", "pseudo.taus",
                "train.epochs", "loss.name", "model.name"):
        section, name = key.split(".")
        assert key.split(".")[0] in yaml.safe_load(DEFAULT_PRESET.read_text())
        assert getattr(getattr(cfg, section), name) is not None


@pytest.mark.parametrize("preset", sorted((REPO_ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    load_config(preset)


def test_overrides_apply_last_with_yaml_types(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  epochs: 3\n")
    cfg = load_config(preset, ["train.epochs=7", "pseudo.taus=[0.5, 0.9]", "data.val_fraction=1e-1"])
    assert cfg.train.epochs == 7
    assert cfg.pseudo.taus == [0.5, 0.9]
    assert cfg.data.val_fraction == pytest.approx(0.1)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["pseudo.taus=[0, 0.5]"]).pseudo.taus == [0.0, 0.5]
    with pytest.raises(ConfigError, match="'train.epochs' expects int, got float"):
        load_config(None, ["train.epochs=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.epochs=3", "unknown config section 'trian'"),
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("train.epochs=ten", "'train.epochs' expects int, got str"),
        ("train.epochs=true", "'train.epochs' expects int, got bool"),
        ("pseudo.taus=0.5", "'pseudo.taus' expects a list of float"),
        ("pseudo.taus=[0.5, 1.0]", "'pseudo.taus': 1.0 is outside"),
        ("pseudo.taus=[-0.1]", "'pseudo.taus': -0.1 is outside"),
        ("loss.name=focal", "'loss.name' must be one of"),
        ("model.name=vgg16", "'model.name' must be"),
        ("data.val_fraction=1.5", "'data.val_fraction'"),
        ("data.train_transform=crop", "'data.train_transform' must be one of resize_flip, random_resized_c"),
        ("data.eval_transform=resize_flip", "'data.eval_transform' must be one of resize, center_crop"),
        ("data.observed_protocol=cole2021", "'data.observed_protocol' must be one of cole, keyed"),
        ("train.linear_init_epochs=-1", "'train.linear_init_epochs' must be >= 0"),
        ("train.early_stop=[em, focal]", "'train.early_stop' must list losses"),
        ("train.early_stop=true", "'train.early_stop' expects a list of str"),
        ("report.published_coco=true", "unknown config key 'report.published_coco'"),
        ("epochs=3", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_bad_preset_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=f"{unknown}: unknown config key 'train.lr'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_config(tmp_path)


@pytest.mark.faults
@pytest.mark.parametrize("override, message", [
    ("pseudo.taus=[0.3,0.5,0.3]", "'pseudo.taus' lists 0.3 twice"),
    # two array tasks would write one folder: tau-0.3
    ("pseudo.taus=[0.3,0.3000001]", "'pseudo.taus' lists 0.3 and 0.3000001, which name one folder (tau-0.3)"),
    ("pseudo.teacher_taus={em: [0.55, 0.55]}", "'pseudo.teacher_taus.em' lists 0.55 twice"),
    ("pseudo.modes=[hard,soft,hard]", "'pseudo.modes' lists 'hard' twice"),
    ("report.references=[bce,bce]", "'report.references' lists 'bce' twice"),
])
def test_a_value_listed_twice_is_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.dir=runs/x", "data.root=data/y"])
    assert Path(cfg.run.dir) == tmp_path / "runs/x"
    assert Path(cfg.data.root) == tmp_path / "data/y"
    assert cfg.data.images == ""  # unset stays unset
    cfg = load_config(None, ["data.format=cole", "data.root=data/y", "data.images=data/y/Flickr"])
    assert Path(cfg.data.images) == tmp_path / "data/y/Flickr"


@pytest.mark.parametrize("overrides, message", [
    (["data.format=yolo"], "config key 'data.format' must be one of coco, voc, cub, cole, openimages, csv"),
    (["data.format=cole"], "config key 'data.images' must name the folder the formatted lists' image paths "
                           "are relative to (data.format: cole)"),
    (["report.published=imagenet"],
     "config key 'report.published' must be '' (none) or one of voc, coco, nuswide, cub"),
])
def test_the_data_format_and_published_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert str(exc.value) == message


def test_data_formats_are_the_readers_formats():
    from ffcv_data.formats import FORMATS

    assert DATA_FORMATS == tuple(FORMATS)
    assert load_config().data.format == "coco"
    assert load_config(None, ["data.format=voc", "data.images=ignored"]).data.format == "voc"


def test_resolved_config_written_once_and_a_different_one_refused(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    path = write_resolved(cfg)
    saved = yaml.safe_load(path.read_text())
    assert saved["train"]["epochs"] == cfg.train.epochs
    assert "git" in saved["meta"]
    before = path.read_text()
    write_resolved(load_config(None, [f"run.dir={tmp_path}"]))  # a resubmission: accepted
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.jsonl").write_text("{}\n")  # something this config produced
    with pytest.raises(ConfigError, match=r"different settings \(train.epochs\) .*teacher/metrics.jsonl"):
        write_resolved(load_config(None, [f"run.dir={tmp_path}", "train.epochs=99"]))
    assert path.read_text() == before


def test_a_run_directory_holding_only_configs_and_logs_is_taken_over(tmp_path):
    """A first command that failed (a typo) produced nothing: the corrected one may use the folder."""
    write_resolved(load_config(None, [f"run.dir={tmp_path}", "data.train_split=trian"]))
    (tmp_path / "logs" / "submitit").mkdir(parents=True)
    (tmp_path / "logs" / "submitit" / "1_log.err").write_text("error\n")
    (tmp_path / "chain-em").mkdir()
    write_resolved(load_config(None, [f"run.dir={tmp_path / 'chain-em'}", "data.train_split=trian"]))
    path = write_resolved(load_config(None, [f"run.dir={tmp_path}", "data.train_split=train"]))
    assert yaml.safe_load(path.read_text())["data"]["train_split"] == "train"


def test_a_key_added_to_the_code_since_is_accepted_at_its_default(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    path = write_resolved(cfg)
    saved = yaml.safe_load(path.read_text())
    del saved["infer"]["hflip_tta"]  # as if written before the key existed
    path.write_text(yaml.safe_dump(saved))
    (tmp_path / "pseudo").mkdir()  # pseudo labels made with those settings (they depend on infer.*)
    (tmp_path / "pseudo" / "merge.json").write_text("{}")
    write_resolved(load_config(None, [f"run.dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"\(infer.hflip_tta\)"):
        write_resolved(load_config(None, [f"run.dir={tmp_path}", "infer.hflip_tta=true"]))


@pytest.mark.parametrize("overrides, message", [
    (["sweep.losses=[an]", "sweep.micro_batch=[8]"], "'sweep.lr' must not be empty"),
    (["sweep.losses=[an]", "sweep.lr=[1e-3]"], "'sweep.micro_batch' must not be empty"),
    (["sweep.losses=[focal]", "sweep.lr=[1e-3]", "sweep.micro_batch=[8]"], "'sweep.losses' must list"),
    (["sweep.losses=[an]", "sweep.lr=[0]", "sweep.micro_batch=[8]"], "'sweep.lr' values must be > 0"),
])
def test_a_sweep_needs_its_losses_and_both_grids(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_empty_sweep_losses_turns_the_presets_grid_off(tmp_path):
    """The COCO preset's header: `sweep.losses=[]` trains AN and full BCE at lr 1e-5, batch 16, without
    the grid (which stays in the preset, unused)."""
    from pml_dist.pipeline.stage_list import experiment

    preset = REPO_ROOT / "configs" / "coco2014_r50.yaml"
    swept = load_config(preset, [f"run.dir={tmp_path}"])
    assert any(e.role == "sweep" for e in experiment(swept, swept))  # the preset sweeps
    cfg = load_config(preset, [f"run.dir={tmp_path}", "sweep.losses=[]"])
    assert cfg.sweep.losses == [] and cfg.sweep.lr == swept.sweep.lr  # unused, not refused
    entries = experiment(cfg, cfg)
    assert not any(e.role == "sweep" for e in entries)
    assert {"teacher", "references/bce"} <= {e.name for e in entries}
    assert (cfg.optim.lr, cfg.train.micro_batch) == (1e-5, 16)
    load_config(None, ["sweep.lr=[1e-3]", "sweep.micro_batch=[8]"])  # a grid with no losses: off too


def test_train_device_is_checked_and_its_default_comes_from_the_environment(monkeypatch):
    with pytest.raises(ConfigError, match="config key 'train.device' must be one of auto, cuda, cpu"):
        load_config(None, ["train.device=gpu"])
    monkeypatch.delenv("PML_DIST_DEVICE", raising=False)
    assert load_config().train.device == "auto"
    monkeypatch.setenv("PML_DIST_DEVICE", "cpu")  # what tests/conftest.py sets for the suite
    assert load_config().train.device == "cpu"
    assert load_config(None, ["train.device=cuda"]).train.device == "cuda"  # overrides win
    assert load_config(REPO_ROOT / "configs" / "coco2014_r50.yaml").train.device == "cuda"  # presets too
    monkeypatch.setenv("PML_DIST_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="environment variable PML_DIST_DEVICE='tpu' must be one of"):
        load_config()


def test_a_resolved_config_without_train_device_is_accepted_at_the_environment_default(tmp_path):
    path = write_resolved(load_config(None, [f"run.dir={tmp_path}"]))
    saved = yaml.safe_load(path.read_text())
    del saved["train"]["device"]  # written before the key existed, in a session forcing the CPU
    path.write_text(yaml.safe_dump(saved))
    write_resolved(load_config(None, [f"run.dir={tmp_path}"]))


def test_a_run_resolved_with_report_published_coco_resumes_under_report_published(tmp_path):
    """A run directory written before report.published replaced report.published_coco, which already
    holds results, is taken up by the same experiment under the new key (the same settings: nothing
    to record); another value is recorded (no output depends on report.*: the report is made again)."""
    path = write_resolved(load_config(None, [f"run.dir={tmp_path}", "report.published=coco"]))
    saved = yaml.safe_load(path.read_text())
    del saved["report"]["published"]
    saved["report"]["published_coco"] = True
    path.write_text(yaml.safe_dump(saved))
    before = path.read_text()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text("{}")
    (tmp_path / "report.json").write_text("{}")
    write_resolved(load_config(None, [f"run.dir={tmp_path}", "report.published=coco"]))
    assert path.read_text() == before
    write_resolved(load_config(None, [f"run.dir={tmp_path}"]))
    assert yaml.safe_load(path.read_text())["report"]["published"] == ""
