"""bench/bench_pipeline.py on a real tiny run (`pml-dist run --executor local`: both teacher chains, one
student each): exit 0, a row with seconds, share and samples/s for every stage of the root run and of
the chain-em sub-run, largest first, and the total; a folder without a run is a message and exit 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pml_dist.cli import main

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_pipeline.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TINY = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "model.width=8", "train.epochs=1",
        "train.micro_batch=16", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2",
        "pseudo.teachers=[an, em]", "pseudo.taus=[0.5]", "pseudo.modes=[hard]",
        "pseudo.teacher_taus={em: [0.5]}", "pseudo.teacher_modes={em: [hard]}", "report.references=[em]"]
STAGES = ["data", "teacher", "teacher/probs", "pseudo", "students/tau-0.5", "chain-em/teacher",
          "chain-em/teacher/probs", "chain-em/pseudo", "chain-em/students/tau-0.5"]


def test_bench_pipeline_lists_every_stage_largest_first(synthetic_root, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "--executor", "local", f"run.dir={run}", f"data.root={synthetic_root}", *TINY]) == 0
    done = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run)], capture_output=True, text=True,
                          timeout=120)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    rows = {m[1]: (float(m[2]), float(m[3])) for m in
            re.finditer(r"^(\S+) +\w+ +(\d+\.\d) +(\d+\.\d)% +\d+ ", out, re.M)}
    assert sorted(rows) == sorted(STAGES), out
    seconds = [s for s, _ in rows.values()]  # in printed order
    assert seconds == sorted(seconds, reverse=True), out
    assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.6), out
    assert re.search(r"^total of the stages +\d+\.\d +100\.0%", out, re.M), out
    assert re.search(r"^end-to-end wall time \(config\.yaml to report\.json\): \d+\.\d s", out, re.M), out

    missing = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 0 and "is no run directory" in missing.stdout, missing
