"""Installing where users are: ranges that keep a cluster's torch, an offline wheelhouse, FFCV built
without system packages, and the prepared GPU check's dry run (docs/install.md).

"The cluster" here is a real Python that already has a torch: a venv of the base interpreter whose
only packages are this venv's real torch and torchvision, and of the other packages the device
machine's image has (bench/gpu-machine.txt) those installed here, with what they need: linked in, as
a site's module or conda env would provide them. Nothing reaches an index while installing: pip's config
and find-links are switched off and --no-index is given.
"""

from __future__ import annotations

import configparser
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CFG = configparser.ConfigParser()
CFG.read(REPO / "setup.cfg")
REQUIREMENTS = [Requirement(r) for r in CFG["options"]["install_requires"].split("\n") if r.strip()]
# pip with nothing but what the command line says: no index, no machine-wide constraint or find-links.
OFFLINE = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _pins_or_names(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [canonicalize_name(line.split("==")[0]) for line in lines if line]


def test_constraints_pin_every_requirement_inside_its_range():
    pins = _pins(REPO / "constraints.txt")
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert pins[name] in req.specifier, f"constraints.txt pins {name}=={pins[name]} outside {req}"


def test_ranges_admit_the_gpu_machines_torch_and_pythons_3_11_to_3_13():
    """The device machine's own versions (bench/gpu-machine.txt) are kept, not replaced."""
    machine = _pins(REPO / "bench/gpu-machine.txt")
    assert {"torch", "torchvision", "numpy"} <= machine.keys()
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        if name in machine:
            assert machine[name] in req.specifier, f"{req} would replace the machine's {machine[name]}"
    python = SpecifierSet(CFG["options"]["python_requires"])
    assert all(Version(v) in python for v in ("3.11.7", "3.12.3", "3.13.0"))
    assert Version("3.10.13") not in python


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def _cluster_packages() -> set[str]:
    """torch, torchvision, what the device machine's image has and is installed here, and everything
    they need (extras followed)."""
    image = [name for name in _pins_or_names(REPO / "bench/gpu-machine.txt") if _installed(name)]
    todo, seen = [(name, "") for name in ("torch", "torchvision", *image)], set()
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return {name for name, _ in seen}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    """A Python whose only packages are _cluster_packages(), and its pip freeze."""
    root = tmp_path_factory.mktemp("cluster")
    site = root / "site"
    site.mkdir()
    freeze = []
    for name in sorted(_cluster_packages()):
        dist = md.distribution(name)
        freeze.append(f"{dist.metadata['Name']}=={dist.version}")
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    python = root / "venv/bin/python"
    subprocess.run([sys._base_executable, "-m", "venv", str(root / "venv")], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "cluster-torch.pth").write_text(f"{site}\n")
    (root / "freeze.txt").write_text("\n".join(freeze) + "\n")
    return {"python": python, "freeze": root / "freeze.txt", "root": root}


@pytest.fixture(scope="module")
def wheelhouse(cluster, tmp_path_factory) -> Path:
    """make wheelhouse's script, leaving out what the cluster has (its pip freeze)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run([sys.executable, str(REPO / "install/wheelhouse.py"), "--out", str(out),
                           "--skip", str(cluster["freeze"]), "--extras", "test"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _inheriting_venv(cluster: dict, path: Path) -> Path:
    subprocess.run([str(cluster["python"]), str(REPO / "install/inherit.py"), str(path)], check=True,
                   capture_output=True)
    return path / "bin/python"


@pytest.mark.slow
def test_wheelhouse_holds_no_torch_and_a_self_contained_ffcv(wheelhouse, cluster):
    names = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*.whl")}
    assert {"deepspeed", "ffcv", "submitit", "pycocotools", "pml_dist", "pytorch_pfn_extras"} <= names
    assert {"setuptools", "wheel", "packaging"} <= names  # builds with no index see no other packages
    left_out = {"torch", "torchvision", "triton", "numpy", "numba", "llvmlite", "opencv_python_headless"}
    assert not names & left_out, "packages the cluster has are in it"
    import zipfile

    ffcv = next(wheelhouse.glob("ffcv-*.whl"))
    bundled = [n for n in zipfile.ZipFile(ffcv).namelist() if n.startswith("ffcv.libs/")]
    assert any("opencv_core" in n for n in bundled) and any("turbojpeg" in n for n in bundled)
    assert "Requires-Dist: opencv-python-headless" in zipfile.ZipFile(ffcv).read(
        next(n for n in zipfile.ZipFile(ffcv).namelist() if n.endswith("METADATA"))).decode()
    # Python 3.12 has no distutils: FFCV 1.0.2's unused import of it is patched out
    assert b"distutils" not in zipfile.ZipFile(ffcv).read("ffcv/pipeline/graph.py")


@pytest.mark.slow
def test_pip_install_over_an_existing_torch_keeps_it(wheelhouse, cluster, tmp_path):
    python = _inheriting_venv(cluster, tmp_path / "venv")
    report = tmp_path / "report.json"
    done = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--find-links",
                           str(wheelhouse), "--report", str(report), str(REPO)],
                          capture_output=True, text=True, env=OFFLINE)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    planned = {canonicalize_name(item["metadata"]["name"]) for item in installs}
    assert {"pml-dist", "deepspeed", "ffcv"} <= planned
    assert not planned & {"torch", "torchvision", "numpy"}, f"would replace the cluster's packages: {planned}"


@pytest.mark.slow
def test_a_python_without_ensurepip_gets_pip_from_the_wheelhouse(wheelhouse, cluster, tmp_path):
    """Debian/Ubuntu's Python without python3-venv, where venv's `-m ensurepip` step fails (made to
    fail here as it does there: the step raises CalledProcessError)."""
    no_ensurepip = (
        "import runpy, subprocess, sys, venv\n"
        "def fail(self, context):\n"
        "    raise subprocess.CalledProcessError(1, [context.env_exec_cmd, '-m', 'ensurepip'])\n"
        "venv.EnvBuilder._setup_pip = fail\n"
        f"sys.argv = ['inherit.py', {str(tmp_path / 'venv')!r}, '--wheelhouse', {str(wheelhouse)!r}]\n"
        f"runpy.run_path({str(REPO / 'install/inherit.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([str(cluster["python"]), "-c", no_ensurepip], capture_output=True, text=True,
                          env=OFFLINE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no ensurepip" in done.stdout
    pip = subprocess.run([str(tmp_path / "venv/bin/python"), "-m", "pip", "--version"], capture_output=True,
                         text=True, env=OFFLINE)
    assert pip.returncode == 0 and str(tmp_path / "venv") in pip.stdout, pip.stdout + pip.stderr
    ask = "import torch; print(torch.__file__)"
    torch_at = subprocess.run([str(tmp_path / "venv/bin/python"), "-c", ask], capture_output=True, text=True,
                              env=OFFLINE)
    assert str(cluster["root"] / "site") in torch_at.stdout, torch_at.stderr


@pytest.mark.slow
def test_ffcv_builds_on_the_target_from_the_wheelhouse_alone(wheelhouse, cluster, tmp_path):
    """make ffcv-wheel's route: the sdist and the kit, no index; every library it loads is bundled."""
    out = tmp_path / "built"
    done = subprocess.run([str(cluster["python"]), str(REPO / "install/ffcv_wheel.py"), "build", "--out",
                           str(out), "--offline", str(wheelhouse)],
                          capture_output=True, text=True, env=OFFLINE)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next(out.glob("ffcv-1.0.2-*.whl"))
    import zipfile

    zipfile.ZipFile(wheel).extractall(tmp_path / "unpacked")
    ext = next((tmp_path / "unpacked/ffcv").glob("_libffcv*.so"))
    ldd = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=True).stdout
    outside = [line.split()[0] for line in ldd.splitlines() if "=>" in line and "ffcv.libs" not in line
               and not line.split()[0].startswith(("libc.", "libm.", "libstdc++", "libgcc_s", "libpthread",
                                                   "libdl.", "librt."))]
    assert not outside, f"loaded from the system, not the wheel: {outside}"
    assert "not found" not in ldd


@pytest.mark.slow
def test_gpu_check_dry_run_installs_offline_and_runs_every_cpu_step(wheelhouse, cluster, tmp_path):
    """bench/gpu.sh --dry-run: the preflight, the install from the wheelhouse into a scratch venv (ffcv
    imported, a .beton decoded, pml-dist --help), pytest -m gpu, the demo's plan, the throughput code
    at tiny sizes. Then again in the same WORK with the throughput step given 3 s: it is cut off, its
    log holds the stacks it was in, and OUTDIR still holds every step's record and the table."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(images / f"{i}.jpg")

    def check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run(["bash", str(REPO / "bench/gpu.sh"), "--dry-run", *options,
                               "--wheelhouse", str(wheelhouse), "--python", str(cluster["python"]),
                               "--images", str(images), "--work", str(tmp_path / "work"), str(out)],
                              capture_output=True, text=True, env=OFFLINE, timeout=1200)
        # what comes back from a device machine: at most 8 files, every step's record among them
        assert sorted(p.name for p in out.iterdir()) == [
            "demo.log", "gpu-check.json", "gpu-check.md", "gpu_tests.log", "install.log", "preflight.log",
            "steps.jsonl", "throughput.log"]
        steps = {s["step"]: s["rc"] for s in json.loads((out / "gpu-check.json").read_text())["steps"]}
        return done, steps

    out = tmp_path / "check"
    done, steps = check(out)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, done.stdout[-2000:] + logs
    assert steps == {"preflight": 0, "install": 0, "gpu_tests": 0, "demo": 0, "throughput": 0}
    assert "GPU: none (dry run)" in (out / "preflight.log").read_text()
    assert "wrote and decoded" in (out / "install.log").read_text()
    assert "skipped" in (out / "gpu_tests.log").read_text()  # collected, and skipped without CUDA
    table = (out / "gpu-check.md").read_text()
    assert "| ffcv_train |" in table and "| install | ok |" in table
    # the venv's torch is the cluster's: nothing was installed over it
    venv_python = tmp_path / "work/venv/bin/python"
    torch_at = subprocess.run([str(venv_python), "-c", "import torch; print(torch.__file__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert str(cluster["root"] / "site") in torch_at

    cut = tmp_path / "cut"
    done, steps = check(cut, "--share", "throughput=3")
    assert done.returncode != 0
    assert steps == {"preflight": 0, "install": 0, "throughput": 124, "gpu_tests": 0, "demo": 0}
    assert "(most recent call first)" in (cut / "throughput.log").read_text()  # faulthandler's stacks
    table = (cut / "gpu-check.md").read_text()
    assert "| throughput | FAILED (exit 124): cut off at its time limit |" in table
    assert "| ffcv_train |" not in table  # the first check's measurements are not this one's
