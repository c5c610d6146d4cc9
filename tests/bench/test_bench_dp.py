"""bench/bench_dp.py runs end to end on tiny sizes (one 2-rank torchrun job, every mode, one round):
exit 0, one table row per mode and one ratio line per DeepSpeed stage, with numbers. No timing is
asserted (the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_dp.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_bench_dp_prints_the_table(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "1", "--warmup", "1", "--train-images",
           "200", "--image-size", "32", "--width", "8", "--port", "29637"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert re.search(r"^ddp +\d+\.\d +\d+\.\d-\d+\.\d +1\.000$", out, re.M), out
    for mode in ("zero0", "zero1", "zero2"):
        assert re.search(rf"^{mode} +\d+\.\d +\d+\.\d-\d+\.\d +\d+\.\d{{3}} +\d+\.\d{{3}}-\d+\.\d{{3}}$", out,
                         re.M), (mode, out)
        assert re.search(rf"^{mode} / ddp \d+\.\d{{3}}x$", out, re.M), (mode, out)
    assert re.search(r"^goal \(issue 16\) zero0 >= 0\.97x ddp: (PASS|BELOW)$", out, re.M), out
    assert re.search(r"^wall time \d+ s$", out, re.M), out
