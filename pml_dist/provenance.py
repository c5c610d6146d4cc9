"""What every output was made from (make's rule): ids of the inputs a stage consumed, stored in its
completion record and compared with the current inputs, so anything downstream of a changed input
is stale and reruns.

    data             the prepared training split: its meta file's digest and the .beton's size
    config           the settings of the run's resolved config.yaml that the stage's output
                     depends on (pml_dist/dependencies.py): `settings-<digest>`; a change of any
                     other (train.device, slurm.*) makes nothing stale
    teacher          the teacher's best.pt (the merge; a student: the teacher of its labels)
    pseudo_labels    a student's target: the merged probabilities and its rule
    <stage name>     for the report: the digest of each result it read

Ids are sha256 prefixes of file bytes, cached per (path, size, mtime), so `status` over many stages
hashes each file once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import yaml

from pml_dist.config import default_settings, settings_of
from pml_dist.dependencies import STUDENTS, TRAINED, Output
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout

SETTINGS = "settings-"  # the prefix of a settings id (records of older versions: config.yaml's file id)


def file_id(path: Path) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def data_id(run: RunLayout) -> str:
    """Identifies the training split: its labels file and the size of its .beton (hashing a
    COCO-sized .beton would take minutes; the labels already change with any re-preparation)."""
    meta, beton = run.data.labels_file("train"), run.data.beton("train")
    if not meta.is_file() or not beton.is_file():
        raise PmlError(f"no prepared training split in {run.data.folder} (run `pml-dist prepare`)")
    return f"{file_id(meta)}-{beton.stat().st_size}"


def teacher_id(run: RunLayout) -> str:
    path = run.teacher.best_weights
    if not path.is_file():
        raise PmlError(f"no teacher weights at {path} (train the teacher first)")
    return file_id(path)


def training_inputs(run: RunLayout, stage) -> dict[str, str]:
    """The inputs of a training stage (pml_dist.stages): data and the settings it depends on; a
    student's pseudo labels."""
    inputs = {"data": data_id(run)}
    if run.config.is_file():  # absent only when the library is called without the CLI or a job
        inputs["config"] = settings_id(run.config, STUDENTS if stage.kind == "student" else TRAINED)
    if stage.kind == "student":
        inputs["teacher"], inputs["pseudo_labels"] = pseudo_labels_ids(run, stage.target)
    return inputs


def settings_id(config: Path, output: Output) -> str:
    """Identifies the values in the resolved config `config` of the settings `output` depends on
    (pml_dist/dependencies.py). Those at their default are left out, so a key added to the code
    since (at its default) changes no id. Cached by the file's bytes (a rewrite may keep its size
    and, within the clock's granularity, its mtime)."""
    return _settings_digest(Path(config).read_bytes(), output)


@functools.lru_cache(maxsize=64)
def _settings_digest(text: bytes, output: Output) -> str:
    default = default_settings()
    saved = settings_of(yaml.safe_load(text) or {})
    chosen = {k: v for k, v in saved.items() if output.depends(k) and v != default.get(k)}
    digest = hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()
    return SETTINGS + digest[:16]


def pseudo_labels_ids(run: RunLayout, target: str) -> tuple[str, str]:
    """(teacher id, pseudo-labels id) of a student's target: the merged probabilities' file and the
    target's rule in pseudo/stats.json (the labels are that rule applied to that file)."""
    probs, record, stats = run.pseudo.probs, run.pseudo.read_record(), run.pseudo.read_stats()
    if not probs.is_file() or record is None or stats is None:
        raise PmlError(f"no pseudo labels at {run.pseudo.dir} (run `pml-dist merge` first)")
    rule = stats.get("targets", {}).get(target)
    if rule is None:
        has = ", ".join(stats.get("targets", {}))
        raise PmlError(f"{run.pseudo.stats}: no target {target!r} (it has {has}; run `pml-dist merge` "
                       "with it among pseudo.taus / pseudo.modes)")
    rule = {k: v for k, v in rule.items() if k in ("mode", "tau", "thresholds", "last_rows")}
    digest = hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]
    # the teacher too: a retrained teacher reruns its students even where a threshold happens
    # to give the same labels (the paper's experiment is one teacher and its students)
    return record["teacher_id"], f"{file_id(probs)}-{digest}"


def stale(recorded: dict | None, current: dict) -> str | None:
    """Why a record made from `recorded` inputs is out of date with `current` (None: it is not).
    Records without inputs (written by versions before provenance) are taken as they are."""
    if recorded is None:
        return None
    changed = [key for key in current
               if recorded.get(key) != current[key] and not _older_config_id(key, recorded)]
    return f"{', '.join(k.replace('_', ' ') for k in changed)} changed" if changed else None


def _older_config_id(key: str, recorded: dict) -> bool:
    """A record of a version before settings ids holds config.yaml's file id under "config". That
    version never rewrote config.yaml once anything was produced, and write_resolved since rewrites
    it only for settings no existing output depends on: the record was made with the current ones."""
    return key == "config" and key in recorded and not str(recorded[key]).startswith(SETTINGS)
