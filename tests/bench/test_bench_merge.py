"""bench/bench_merge.py runs end to end on tiny sizes: exit 0, the timing, ratio and peak-RSS lines with
numbers, for the default size and --large. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_merge.py"

pytestmark = pytest.mark.timeout(180)


def test_bench_merge_prints_the_ratios(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--samples", "5000", "--classes", "8", "--shards", "6",
           "--repeat", "2", "--large", "--large-samples", "12000", "--large-repeat", "1",
           "--tmp", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    for n in (5000, 12000):
        assert re.search(rf"^{n} x 8 kept by p >= 0 \(8\.0 per row\) in 6 shards", out, re.M), out
    for pattern in (r"^  np\.load of the shards +\d+\.\d{3}  \(\d+\.\d{3}-\d+\.\d{3}\) s",
                    r"^  merge_shards, every check +\d+\.\d{3}  \(",
                    r"^  ratio merge / np\.load +\d+\.\d\d  \(\d+\.\d\d-\d+\.\d\d\)",
                    r"^  output: memory-mapped CSR \.npz",
                    r"^  peak RSS, one run per child  merge \d+ MiB, np\.load \d+ MiB"):
        assert len(re.findall(pattern, out, re.M)) == 2, (pattern, out)
    assert not list(tmp_path.iterdir()), "the shards are left behind"
