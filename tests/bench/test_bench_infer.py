"""bench/bench_infer.py runs end to end on a tiny generated set: exit 0, a row per world size with
numbers, the speed-ups and the shard-write time. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_infer.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RATE = r"\d+ \(\d+-\d+\)"  # a median (min-max) of samples/s


def test_bench_infer_prints_the_speed_up(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--train", "40", "--repeat", "1", "--batch", "16",
           "--write-rows", "2000", "--tmp", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=270, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert re.search(r"^sharded inference: \d+ training samples x 20 classes.* \d+ usable cores", out,
                     re.M), out
    for ranks in (1, 2):  # loop samples/s, per rank, wall s, wall samples/s
        row = rf"^ +{ranks} +{RATE} +{RATE} +\d+\.\d\d \(\S+\) +{RATE}$"
        assert re.search(row, out, re.M), (ranks, out)
    speed_up = r"^speed-up 2 ranks / 1: loop \d+\.\d\d \(\S+\)x .*wall, start-up included \d+\.\d\d"
    assert re.search(speed_up, out, re.M), out
    assert re.search(r"^shard write .*: \d+ x 20 \d+\.\d ms; 2000 x 80 \d+ ms", out, re.M), out
    assert not list(tmp_path.iterdir()), "the run directory is left behind"
