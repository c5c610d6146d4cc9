"""Every path of a run directory, in one object (the design card's "Run directory"), and the typed reader of
the record several modules read (`StageResult`). No other module spells a file name of a run.

    <run>/config.yaml                  the resolved config (config.write_resolved)
    <run>/jobs.json                    job ids and logs of every submission (pipeline/graph.py)
    <run>/logs/run.lock                `pml-dist run`'s lock on the run directory (pml_dist/lock.py);
                                       each stage's own lock is in its folder's logs/ (`*.lock`)
    <run>/logs/submitit/               submitit's job folders
    <run>/logs/slurm/                  the plain sbatch scripts' logs (slurm/*.sbatch)
    <run>/data/                        prepared data (ffcv_data/prepared.py; sub-runs share it)
    <run>/teacher/                     a training stage's folder, see `StageFiles`
    <run>/teacher/probs/shard-RRRRR-of-WWWWW.{npz,json}   inference shards + manifests
    <run>/pseudo/probs.npz             merged teacher probabilities: the kept ones, CSR (stored_probs.py)
    <run>/pseudo/merge.json            the merge's record (teacher, data and store rule it was made from)
    <run>/pseudo/stats.json            every target's rule (tau-0.75, soft, class_prior: applied to
                                       probs.npz as a student's batch is built), positives per
                                       image, precision, recall
    <run>/students/<target>/           the student trained on it
    <run>/references/<loss>/           reference teachers (full-label BCE, EM, ...)
    <run>/seed-<s>/, <run>/chain-<loss>/, <chain>/round-<k>/   sub-runs (pipeline/subruns.py),
                                       each a run directory
    <run>/sweep/<stage>/lr-<lr>_mb-<b>/     sub-runs too: one point of a stage's sweep grid
    <run>/report.md, report.json, figure1a.png, figure1b.png
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ffcv_data.prepared import PreparedData

_SHARD = re.compile(r"shard-(\d{5})-of-(\d{5})\.(json|npz)$")


def tau_name(tau: float) -> str:
    """Deterministic folder name of a tau: 0.75 -> tau-0.75 (resubmissions find the same folder)."""
    return f"tau-{tau:g}"


def lr_name(lr: float) -> str:
    """The learning rate's part of a sweep point's folder name: 0.001 -> lr-0.001."""
    return f"lr-{lr:g}"


@dataclass(frozen=True)
class StageResult:
    """A training stage's result.json: its presence (with matching inputs) means the stage is done."""

    raw: dict

    @classmethod
    def read(cls, path: Path) -> StageResult | None:
        return cls(json.loads(path.read_text())) if path.is_file() else None

    @property
    def test_map(self) -> float:
        return self.raw["test_map"]

    @property
    def val_map(self) -> float:
        return self.raw["val_map"]

    @property
    def inputs(self) -> dict | None:
        """The ids of what the stage consumed (provenance.py); None in records of older versions."""
        return self.raw.get("inputs")


@dataclass(frozen=True)
class StageFiles:
    """One training stage's folder (teacher, reference, student); trainer.py writes it.

    ckpt/step-N/ DeepSpeed checkpoints + COMPLETE; metrics.jsonl; derived.json; best.pt + best.json
    (the best validation epoch's plain weights); test_logits.npy (its test-set logits, float16, in
    test-index order, for the report's paired intervals: AP needs only the order of the scores, and
    float16 probabilities tie near 1 where float16 logits do not); thresholds.json (each class's
    decision threshold, chosen on the validation split with the best weights); result.json (written
    last); tensorboard/ (TensorBoard event files of the same scalars as metrics.jsonl, which stays
    the record); logs/rank-R.log."""

    dir: Path

    @property
    def ckpt(self) -> Path:
        return self.dir / "ckpt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    @property
    def derived(self) -> Path:
        return self.dir / "derived.json"

    @property
    def best_weights(self) -> Path:
        return self.dir / "best.pt"

    @property
    def best_record(self) -> Path:
        return self.dir / "best.json"

    @property
    def test_logits(self) -> Path:
        return self.dir / "test_logits.npy"

    @property
    def thresholds(self) -> Path:
        return self.dir / "thresholds.json"

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    def read_result(self) -> StageResult | None:
        return StageResult.read(self.result)

    def log(self, rank: int, prefix: str = "rank") -> Path:
        return self.dir / "logs" / f"{prefix}-{rank}.log"

    @property
    def lock(self) -> Path:
        """The training process's lock on this folder (pml_dist/lock.py), held by rank 0."""
        return self.dir / "logs" / "stage.lock"


@dataclass(frozen=True)
class PseudoFiles:
    dir: Path

    @property
    def probs(self) -> Path:
        return self.dir / "probs.npz"

    @property
    def record(self) -> Path:
        return self.dir / "merge.json"

    @property
    def stats(self) -> Path:
        return self.dir / "stats.json"

    def read_stats(self) -> dict | None:
        return json.loads(self.stats.read_text()) if self.stats.is_file() else None

    def read_record(self) -> dict | None:
        return json.loads(self.record.read_text()) if self.record.is_file() else None

    @property
    def lock(self) -> Path:
        """The merge's lock on this folder (pml_dist/lock.py)."""
        return self.dir / "logs" / "stage.lock"


class RunLayout:
    """The run directory `root`; `data_dir` is where its prepared data lives (default `<root>/data`)."""

    def __init__(self, root: Path, data_dir: Path | None = None):
        self.root = Path(root)
        self.data = PreparedData(Path(data_dir) if data_dir else self.root / "data")
        self.teacher = StageFiles(self.root / "teacher")
        self.pseudo = PseudoFiles(self.root / "pseudo")

    @classmethod
    def of(cls, cfg) -> RunLayout:
        """The layout of a config's run (`run.dir`, `run.data_dir`)."""
        return cls(cfg.run_dir, cfg.data_dir)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def run_lock(self) -> Path:
        """`pml-dist run`'s lock on the whole run directory (pml_dist/lock.py)."""
        return self.root / "logs" / "run.lock"

    @property
    def data_lock(self) -> Path:
        """`prepare`'s lock on the prepared data's folder (run.data_dir may be shared)."""
        return Path(self.data.folder) / "logs" / "prepare.lock"

    def infer_lock(self, rank: int = 0) -> Path:
        """Inference rank `rank`'s lock on its shard of teacher/probs/, beside its log: the ranks
        are independent processes (pml_dist/pseudo/infer.py), so each holds its own."""
        return self.teacher.dir / "logs" / f"infer-rank-{rank}.lock"

    @property
    def submitit_logs(self) -> Path:
        return self.root / "logs" / "submitit"

    @property
    def slurm_logs(self) -> Path:
        """The plain sbatch scripts' logs (slurm/*.sbatch)."""
        return self.root / "logs" / "slurm"

    def reference(self, loss: str) -> StageFiles:
        return StageFiles(self.root / "references" / loss)

    def student(self, target: str) -> StageFiles:
        return StageFiles(self.root / "students" / target)

    @property
    def probs_dir(self) -> Path:
        return self.teacher.dir / "probs"

    def shard(self, rank: int, world: int) -> Path:
        """A shard's .npz; its manifest is the same name with .json."""
        return self.probs_dir / f"shard-{rank:05d}-of-{world:05d}.npz"

    def shard_manifests(self) -> list[Path]:
        return sorted(self.probs_dir.glob("shard-*.json")) if self.probs_dir.is_dir() else []

    @staticmethod
    def shard_rank(path: Path) -> tuple[int, int] | None:
        """(rank, world size) a shard file's name says, or None for a name that is not a shard's."""
        match = _SHARD.match(Path(path).name)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def seed_run(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"

    def sweep_run(self, stage_dir: Path, lr: float, micro_batch: int) -> Path:
        """One point of a stage's grid: <run>/sweep/<the stage's folder>/lr-<lr>_mb-<micro batch>."""
        stage = Path(stage_dir).relative_to(self.root)
        return self.root / "sweep" / stage / f"{lr_name(lr)}_mb-{micro_batch}"

    def chain_run(self, loss: str) -> Path:
        return self.root / f"chain-{loss}"

    def round_run(self, k: int) -> Path:
        return self.root / f"round-{k}"

