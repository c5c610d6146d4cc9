"""bench/bench_loader.py runs end to end on tiny sizes: exit 0, the ratio lines with numbers, and a
printed reason for a missing COCO folder. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_loader.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_bench_loader_prints_the_ratios(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--samples", "48", "--repeats", "1", "--workers", "2", "--image-size",
           "32", "--datasets", "coco-mini,generated", "--coco-root", str(tmp_path / "missing")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert re.search(r"^coco-mini: skipped, no COCO files at .*missing", out, re.M), out
    # one set of lines per preset (coco, demo) on the generated set
    for pattern in (r"^ffcv vs pil \d+\.\dx", r"^ffcv vs decode_jpeg \d+\.\dx", r"^ffcv / limit \d+%",
                    r"^limit vs pil \d+\.\dx, ffcv / limit\+float \d+%"):
        assert len(re.findall(pattern, out, re.M)) == 2, (pattern, out)
    assert re.search(r"\.beton / JPEG \d+\.\d\dx", out), out
    for variant in ("ffcv", "pil", "decode_jpeg", "limit", r"limit\+float"):
        assert re.search(rf"^  {variant} +\d+ ", out, re.M), (variant, out)
