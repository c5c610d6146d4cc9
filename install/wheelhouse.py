"""Every wheel pml-dist needs, in one folder to copy to a cluster whose compute nodes have no internet.

Run inside the project's venv (make wheelhouse does): the versions are the ones installed there, the
ones CI verified (constraints.txt). For each target Python it writes the dependency closure of
pml-dist (with its extras, if asked) as wheels, minus:
  - torch and torchvision and what only they need, unless --with-torch: clusters bring their own CUDA
    build, and a CUDA torch is several GB;
  - packages the target already has (--skip FILE: `pip freeze` of the target, or bare names): a
    `name==version` line is left out only when that version meets pml-dist's ranges.
Plus: pml-dist itself, setuptools and wheel (for builds with no index), FFCV's sdist and build kit
(make ffcv-wheel on the target), and an FFCV wheel for every target Python found here.

    python install/wheelhouse.py --out wheelhouse [--python-version 3.12 ...] [--with-torch]
                                 [--skip target-freeze.txt] [--extras dev]
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ffcv_wheel  # noqa: E402  (this folder is not a package)

ROOT = "pml-dist"
PROJECT = Path(__file__).resolve().parent.parent
TORCH = {"torch", "torchvision"}
BUILT_HERE = {"ffcv", ROOT}  # not downloaded: ffcv_wheel builds the one, `pip wheel .` the other
# For builds with no index (pml-dist itself, FFCV on the target; pip before 24 also wants `wheel`),
# and pip itself for a target Python without ensurepip (install/inherit.py).
BUILD_TOOLS = ("setuptools", "wheel", "pip")


def closure(roots: list[str], python_version: str, extras: list[str], with_torch: bool,
            skip: dict[str, Version | None]) -> tuple[dict[str, str], list[str]]:
    """{name: version} of `roots` (with `extras`) and every distribution they need on
    `python_version`, as installed here, and the names left out because the target has them."""
    wanted: dict[str, list[Requirement]] = {}  # name -> the requirements that point at it
    edges: dict[str, list[str]] = {}

    def requires(name: str, with_extras: set[str]) -> list[Requirement]:
        reqs = []
        for text in (project_requires() if name == ROOT else installed(name).requires or []):
            req = Requirement(text)
            env = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
            extras_here = with_extras | {""}
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras_here):
                reqs.append(req)
        return reqs

    todo = [(root, set(extras)) for root in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, with_extras = todo.pop()
        if (name, frozenset(with_extras)) in seen:
            continue
        seen.add((name, frozenset(with_extras)))
        for req in requires(name, with_extras):
            dep = canonicalize_name(req.name)
            wanted.setdefault(dep, []).append(req)
            edges.setdefault(canonicalize_name(name), []).append(dep)
            todo.append((dep, set(req.extras)))

    def left_out(name: str) -> bool:
        if name in TORCH and not with_torch:
            return True
        if name not in skip:
            return False
        have = skip[name]
        return have is None or all(have in req.specifier for req in wanted.get(name, []))

    stack = [canonicalize_name(root) for root in roots]
    keep = {name: installed(name).version for name in stack if name != ROOT}
    skipped: set[str] = set()
    while stack:
        name = stack.pop()
        for dep in edges.get(name, []):
            if dep in keep or dep in skipped:
                continue
            if left_out(dep):
                skipped.add(dep)
                continue
            keep[dep] = installed(dep).version
            stack.append(dep)
    return keep, sorted(skipped)


def project_requires() -> list[str]:
    """pml-dist's own requirements as setup.cfg states them now (the installed metadata of an
    editable install is as old as its last `make setup`), extras as `; extra == "x"` markers."""
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT / "setup.cfg")
    lines = [r for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    for extra, text in cfg["options.extras_require"].items():
        lines += [f'{r.strip()}; extra == "{extra}"' for r in text.splitlines()
                  if r.strip() and not r.strip().startswith("#")]
    return lines


def installed(name: str) -> md.Distribution:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        raise SystemExit(f"wheelhouse: {name} is not installed in {sys.prefix}, so its verified version "
                         f"is unknown: run `make setup` first") from None


def read_skip(path: Path | None) -> dict[str, Version | None]:
    skip: dict[str, Version | None] = {}
    for line in (path.read_text().splitlines() if path else []):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            skip[canonicalize_name(name.strip())] = Version(version.strip()) if version else None
    return skip


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def download(pins: dict[str, str], python_version: str, out: Path) -> None:
    """Binary wheels for `python_version` (this machine's platform tags); sdist-only packages are
    built here, which is right only for pure-Python ones (checked)."""
    names = [f"{n}=={v}" for n, v in sorted(pins.items())]
    target = ["--python-version", python_version, "--only-binary", ":all:"]
    if pip("download", "-q", "--no-deps", *target, "-d", str(out), *names).returncode == 0:
        return
    for spec in names:  # one of them has no wheel: find which, one at a time
        if pip("download", "-q", "--no-deps", *target, "-d", str(out), spec).returncode == 0:
            continue
        built = pip("wheel", "-q", "--no-deps", "-w", str(out), spec)
        if built.returncode:
            raise SystemExit(f"wheelhouse: cannot get a wheel of {spec}:\n{built.stderr.strip()[-2000:]}")
        name = spec.split("==")[0].replace("-", "_")
        for wheel in out.glob("*.whl"):
            if wheel.name.lower().startswith(name.lower() + "-") and not wheel.name.endswith("-none-any.whl"):
                if f"cp{python_version.replace('.', '')}" not in wheel.name:
                    raise SystemExit(f"wheelhouse: {spec} has no wheel for Python {python_version} and "
                                     f"builds only a compiled one here ({wheel.name})")


def find_python(version: str) -> str | None:
    """This Python, or a working `python3.X` on PATH (a pyenv shim that is not active does not count)."""
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return sys.executable
    found = shutil.which(f"python{version}")
    check = "import sys; print('%d.%d' % sys.version_info[:2])"
    answer = subprocess.run([found, "-c", check], capture_output=True, text=True) if found else None
    if answer and answer.stdout.strip() == version:
        return found
    return None


def ffcv_for(python_version: str, out: Path, kit: Path, sdist: Path) -> str:
    python = find_python(python_version)
    if not python:
        return (f"not built (no working python{python_version} here): build it on the target with "
                f"`make ffcv-wheel WHEELHOUSE={out}` (docs/install.md)")
    return f"built {ffcv_wheel.build(out, python, kit, sdist, offline=None).name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--python-version", action="append",
                        help=f"target Python, repeatable (default {here})")
    parser.add_argument("--with-torch", action="store_true", help="also torch and torchvision (several GB)")
    parser.add_argument("--skip", type=Path, help="packages the target has: pip freeze output or names")
    parser.add_argument("--extras", default="", help="extras of pml-dist to include, comma-separated (dev)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    skip = read_skip(args.skip)
    extras = [e for e in args.extras.split(",") if e]

    try:
        kit = ffcv_wheel.make_kit(out)
        sdist = ffcv_wheel.fetch_sdist(out)
        notes = []
        for version in args.python_version or [here]:
            pins, skipped = closure([ROOT], version, extras, args.with_torch, skip)
            # An isolated build sees none of the target's packages: the tools and all they need.
            pins.update(closure(list(BUILD_TOOLS), version, [], False, {})[0])
            download({n: v for n, v in pins.items() if n not in BUILT_HERE}, version, out)
            ffcv = ffcv_for(version, out, kit, sdist)
            notes.append(f"Python {version}: {len(pins)} packages; ffcv {ffcv}; "
                         f"left out: {', '.join(skipped) or 'nothing'}")
    except ffcv_wheel.BuildError as err:
        print(f"wheelhouse: {err}", file=sys.stderr)
        return 1
    built = pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(PROJECT))
    if built.returncode:
        print(f"wheelhouse: building pml-dist's wheel failed:\n{built.stderr.strip()[-2000:]}",
              file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print("\n".join(notes))
    print(f"wheelhouse: {len(list(out.iterdir()))} files, {size:.0f} MiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
