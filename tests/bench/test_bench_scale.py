"""bench/bench_scale.py runs end to end on tiny sizes: exit 0, one line per stage and size in the
documented form, the dense path skipped with its reason where it exceeds the budget, and the JSON.
No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_scale.py"

pytestmark = pytest.mark.timeout(300)


def test_bench_scale_prints_a_line_per_stage_and_size(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--rows", "20000", "--dense-rows", "3000", "--classes", "500",
           "--eval-rows", "1500", "--eval-dense-rows", "400", "--dense-budget-gib", "0.02",
           "--json", str(tmp_path / "scale.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    line = r"^stage {} rows {} classes 500: peak RSS \d+ MiB, \d+\.\d\d s per million rows$"
    for n in (3000, 20000):
        for stage in ("read-coco", "read-coco-dense", "prepare-labels", "target-lookup", "merge",
                      "pseudo-stats", "pseudo-lookup"):
            assert re.search(line.format(stage, n), out, re.M), out
    for stage in ("prepare-labels-dense", "target-lookup-dense", "merge-dense", "pseudo-stats-dense"):
        assert re.search(line.format(stage, 3000), out, re.M), out  # 3000 x 500 fits 0.02 GiB
    for stage in ("prepare-labels-dense", "target-lookup-dense", "pseudo-stats-dense"):  # 20000 not
        skipped = rf"^stage {stage} rows 20000 classes 500: skipped \(its dense N x L arrays"
        assert re.search(skipped, out, re.M), out
    for n in (400, 1500):  # a test split's sizes
        for stage in ("evaluate", "bootstrap", "bootstrap-dense"):
            assert re.search(line.format(stage, n), out, re.M), out
    assert re.search(line.format("evaluate-dense", 400), out, re.M), out
    assert re.search(r"^stage evaluate-dense rows 1500 classes 500: skipped", out, re.M), out
    for stage in ("evaluate", "bootstrap"):  # the sparse path's mAP is the dense path's
        assert re.search(rf"^check {stage} rows 400 classes 500: mAP [\d.]+ sparse, [\d.]+ dense: equal$",
                         out, re.M), out
    assert not re.search(r"^stage (?!evaluate|bootstrap)\S+ rows (400|1500) ", out, re.M), out
    results = json.loads((tmp_path / "scale.json").read_text())
    measured = re.findall(r"^stage \S+ rows \d+ classes 500: peak RSS", out, re.M)
    assert len(results) == len(measured) >= 24 and all(r["peak_rss_mib"] > 0 for r in results)
