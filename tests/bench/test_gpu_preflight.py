"""bench/gpu_preflight.py, the GPU check's first step: what pml-dist needs and the wheelhouse does not
hold must be installed in range on the machine, since the offline install has nothing else to take."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_preflight.py"


def preflight(wheelhouse: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, str(SCRIPT), str(wheelhouse), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=120)


def test_the_installed_requirements_pass_and_one_below_its_range_is_named(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    done = preflight(wheelhouse)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "numba " in done.stdout and "(installed here): inside >=0.61" in done.stdout

    # an image whose pytest-timeout is older than pml-dist's range (>=2.3), first on the path
    old = tmp_path / "old"
    (old / "pytest_timeout-2.0.0.dist-info").mkdir(parents=True)
    (old / "pytest_timeout-2.0.0.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: pytest-timeout\nVersion: 2.0.0\n")
    done = preflight(wheelhouse, str(old))
    assert done.returncode == 1
    assert (f"MISSING: pytest-timeout 2.0.0 (installed here) is outside pml-dist's range >=2.3, and "
            f"{wheelhouse} has no copy in range: carry one") in done.stdout.splitlines()

    # the same, with a copy in the wheelhouse: pip will install that one
    (wheelhouse / "pytest_timeout-2.4.0-py3-none-any.whl").write_bytes(b"")
    assert preflight(wheelhouse, str(old)).returncode == 0
