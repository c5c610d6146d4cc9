"""Names inside the run directory, in one place (DESIGN.md "Run directory").

    <run>/teacher/                 the teacher's stage directory (see trainer.py)
    <run>/teacher/probs/           inference shards
    <run>/pseudo/probs.npy         merged teacher probabilities, N x L float16
    <run>/pseudo/<target>/labels.npy   one target set per student: tau-0.75, soft, class_prior
    <run>/students/<target>/       the student trained on it
    <run>/references/<loss>/       reference teachers (full-label BCE, EM, ...) for the report
"""

from __future__ import annotations

from pathlib import Path


def tau_name(tau: float) -> str:
    """Deterministic folder name of a tau: 0.75 -> tau-0.75 (resubmissions find the same folder)."""
    return f"tau-{tau:g}"


def teacher_dir(run_dir: Path) -> Path:
    return run_dir / "teacher"


def probs_dir(run_dir: Path) -> Path:
    return run_dir / "teacher" / "probs"


def pseudo_dir(run_dir: Path) -> Path:
    return run_dir / "pseudo"


def target_labels(run_dir: Path, target: str) -> Path:
    return run_dir / "pseudo" / target / "labels.npy"


def student_dir(run_dir: Path, target: str) -> Path:
    return run_dir / "students" / target


def reference_dir(run_dir: Path, loss: str) -> Path:
    """A reference teacher trained with another loss (full BCE, EM, ...), for the report."""
    return run_dir / "references" / loss
