"""Shared fixtures. Real files only: the generated data set and ../shared/data/coco-mini."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# CI and developers have ../shared beside the checkout; users of the project do not.
SHARED = Path(os.environ.get("PML_DIST_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"
# The suite runs on CPU also where a GPU is visible (train.device auto would take it): its tests start
# DeepSpeed on gloo and compare CPU results. PML_DIST_DEVICE is train.device's default in every config
# loaded in this session and in the processes its tests start; GPU tests (marker gpu) and presets
# that name a device (the COCO ones: cuda) override it.
os.environ["PML_DIST_DEVICE"] = "cpu"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO files not found at {COCO_MINI} (../shared is only on CI and dev machines)")
    return COCO_MINI


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated COCO-format data set, shared by the tests that only read it."""
    from ffcv_data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "coco"
    make_synthetic(root, seed=0, n_train=150, n_test=50, image_size=48)
    return root


@pytest.fixture
def coco_mini_overrides(coco_mini, tmp_path) -> list[str]:
    """Overrides that point the demo preset at coco-mini, with a fresh run directory."""
    return [
        f"run.dir={tmp_path / 'run'}",
        f"data.root={coco_mini}",
        "data.train_split=train2017",
        "data.test_split=val2017",
        "data.max_resolution=96",
        "data.write_workers=2",
    ]


@pytest.fixture
def synthetic_overrides(synthetic_root, tmp_path) -> list[str]:
    return [f"run.dir={tmp_path / 'run'}", f"data.root={synthetic_root}", "data.max_resolution=48",
            "data.image_size=48", "data.write_workers=2"]


def _test_module(relative: str):
    """A helper module of the tests, loaded by file path (with --import-mode=importlib the tests
    folder is not on sys.path), once per session."""
    import importlib.util
    import sys

    name = "pml_dist_tests_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def reference():
    """tests/ffcv_data/spml_reference.py: Cole et al.'s preparation scripts, re-implemented."""
    return _test_module("ffcv_data/spml_reference.py")


# ---------------------------------------------------------------- the real Slurm test cluster
# tests/slurm_cluster.py drives slurm/testcluster/start.sh and stop.sh.
def _slurm_cluster_module():
    return _test_module("slurm_cluster.py")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm cluster (two nodes on this machine), started once per session on first use.

    Skips when the machine cannot run it (not root, Slurm/munge/MariaDB not installed). For the session
    os.environ gets SLURM_CONF (and PATH with the Slurm clients), and loses any other SLURM_* /
    SBATCH_* / SRUN_* / SALLOC_* variables, so sbatch, srun, sacct and submitit in the test process and
    its subprocesses talk to this cluster. Stopped at the end of the session, also after failures.
    """
    mod = _slurm_cluster_module()
    ok, reason = mod.SlurmCluster.available()
    if not ok:
        pytest.skip(reason)
    cluster = mod.SlurmCluster().start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in [k for k in os.environ if mod.is_foreign_slurm_var(k)]:
                mp.delenv(key)
            for key, value in cluster.env.items():
                mp.setenv(key, value)
            yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- a disk that fills up
@contextlib.contextmanager
def _small_disk(folder: Path, size: str):
    """A real tmpfs of `size` mounted at `folder`: a file system that fills up. Root only (CI runs as
    root); elsewhere the test skips, saying why."""
    if os.geteuid() != 0:
        pytest.skip("a small disk (tmpfs mount) needs root")
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {folder}: {res.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill `folder`'s file system to the last byte with a file `filler`, then free `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
        with pytest.raises(OSError) as full:
            f.write(b"\0")
        assert full.value.errno == errno.ENOSPC
        f.truncate(f.tell() - leave)


@pytest.fixture
def small_disk():
    """`with small_disk(folder, "1m"):` a real tmpfs mounted at folder for the block."""
    return _small_disk


@pytest.fixture
def fill_disk():
    """`fill_disk(folder, leave=0)`: fill folder's file system up to `leave` free bytes."""
    return _fill
