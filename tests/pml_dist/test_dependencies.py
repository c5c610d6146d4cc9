"""What a run directory holding outputs accepts: a change no existing output depends on is recorded
in config.yaml (and makes nothing stale), one that an output depends on is refused naming the key
and the output (pml_dist/dependencies.py, config.write_resolved)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pml_dist.cli import main
from pml_dist.config import default_settings, load_config, write_resolved
from pml_dist.dependencies import (
    NOT_CONTENT,
    PREPARED,
    RECORDS,
    STUDENTS,
    TRAINED,
    UNKNOWN,
    output_of,
)
from pml_dist.errors import ConfigError
from pml_dist.layout import RunLayout
from pml_dist.provenance import stale, training_inputs
from pml_dist.stages import Teacher

TINY = ["data.image_size=32", "data.max_resolution=32", "data.jit=false", "data.loader_workers=1",
        "model.width=8", "train.micro_batch=16", "train.eval_batch=64", "train.epochs=1"]


def _saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_every_setting_is_placed_in_the_table():
    """Each key is depended upon by some output, or is one of those that no output depends on: a
    key added to a section is depended upon like its neighbours; the prepared data's keys include
    every key that ffcv_data.prepare records as changing the encoded content."""
    from ffcv_data.prepare import CONTENT_KEYS

    nothing = {"run.dir", "run.seeds", "pseudo.teachers", "pseudo.rounds", *NOT_CONTENT}
    for key in default_settings():
        depended = any(o.depends(key) for o in (PREPARED, TRAINED, STUDENTS))
        assert depended != (key in nothing or key.split(".")[0] in ("slurm", "report")), key
        assert UNKNOWN.depends(key) == depended, key
    assert {f"data.{k}" for k in CONTENT_KEYS} <= {k for k in default_settings() if PREPARED.depends(k)}
    assert not PREPARED.depends("data.image_size") and TRAINED.depends("data.image_size")
    assert not TRAINED.depends("infer.hflip_tta") and STUDENTS.depends("infer.hflip_tta")


@pytest.mark.parametrize("path, output", [
    ("data/inputs.json", PREPARED), ("teacher/result.json", TRAINED), ("references/em/best.pt", TRAINED),
    ("teacher/probs/shard-00000-of-00002.npz", STUDENTS), ("pseudo/merge.json", STUDENTS),
    ("students/tau-0.5/result.json", STUDENTS), ("jobs.json", RECORDS), ("report.md", RECORDS),
    ("figure1b.png", RECORDS), ("seed-1/teacher/result.json", TRAINED), ("seed-1/report.json", RECORDS),
    ("chain-em_apl/teacher/best.pt", TRAINED), ("chain-em/round-2/teacher/result.json", STUDENTS),
    ("sweep/teacher/lr-0.001_mb-8/teacher/result.json", TRAINED), ("notes.txt", UNKNOWN),
    ("backup/teacher.pt", UNKNOWN),
])
def test_each_file_belongs_to_one_output(path, output):
    assert output_of(Path(path)) == output


def test_a_record_of_an_older_version_is_not_stale_by_its_config_id():
    """Records before settings ids hold config.yaml's file id: taken as made with the current
    settings (config.yaml could not change under outputs then); a settings id is compared."""
    current = {"data": "d1", "config": "settings-aaaa"}
    assert stale({"data": "d1", "config": "0123456789abcdef"}, current) is None
    assert stale({"data": "d1", "config": "settings-bbbb"}, current) == "config changed"
    assert stale({"data": "d2", "config": "0123456789abcdef"}, current) == "data changed"


@pytest.mark.slow
def test_after_prepare_only_a_prepare_key_is_refused(synthetic_overrides, capsys):
    """`pml-dist prepare`, then: a device change (the run trained nowhere yet) is accepted and
    recorded, and so are data.image_size (the loaders' size, not what prepare reads) and model.width;
    data.max_resolution, which the prepared files were encoded with, is refused naming it and data/."""
    run = Path(next(o.partition("=")[2] for o in synthetic_overrides if o.startswith("run.dir=")))
    assert main(["prepare", *synthetic_overrides]) == 0
    assert _saved(run)["train"]["device"] == "cpu"  # tests/conftest.py's PML_DIST_DEVICE
    capsys.readouterr()
    assert main(["prepare", *synthetic_overrides, "train.device=auto"]) == 0  # prepare again: accepted
    assert _saved(run)["train"]["device"] == "auto"
    assert [line for line in capsys.readouterr().out.splitlines() if "changed" in line] == [
        f"{run}: train.device changed; no output it holds depends on them: recorded in config.yaml"]
    write_resolved(load_config(None, [*synthetic_overrides, "train.device=auto", "data.image_size=40",
                                      "model.width=24"]))
    assert (_saved(run)["data"]["image_size"], _saved(run)["model"]["width"]) == (40, 24)
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["prepare", *synthetic_overrides, "data.max_resolution=40"]) == 2
    err = capsys.readouterr().err
    assert "different settings (data.image_size, data.max_resolution, model.width, train.device)" in err
    assert "already holds its results (data/inputs.json: the prepared data, which depends on " \
           "data.max_resolution)" in err
    assert (run / "config.yaml").read_text() == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_a_trained_teacher_slurm_and_device_changes_are_accepted_and_keep_it(synthetic_root, tmp_path):
    """A real teacher (one epoch): a slurm section and a device change are recorded, and the teacher
    stays up to date (its record identifies only the settings it depends on); model.width is refused
    naming teacher/ and the key."""
    from pml_dist.pipeline.stage_list import _training_outdated

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY]
    assert main(["prepare", *overrides]) == 0
    done = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    layout = RunLayout.of(load_config(None, overrides))
    result = layout.teacher.result
    mtime, recorded = result.stat().st_mtime_ns, layout.teacher.read_result().inputs

    changed = [*overrides, "slurm.partition=gpu", "slurm.teacher_time_min=30", "train.device=auto"]
    write_resolved(load_config(None, changed))
    assert _saved(run)["slurm"]["partition"] == "gpu" and _saved(run)["train"]["device"] == "auto"
    assert training_inputs(layout, Teacher()) == recorded
    assert _training_outdated(layout, Teacher()) is None  # `status`: up to date, `run` skips it
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"different settings \(model.width\) .* already holds its results "
                                          r"\(teacher/\S+: a trained stage, which depends on model.width\)"):
        write_resolved(load_config(None, [*changed, "model.width=24"]))
    assert (run / "config.yaml").read_text() == before
    assert result.stat().st_mtime_ns == mtime
