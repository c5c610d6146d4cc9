"""Make a venv that sees the packages of the Python that made it (a cluster's own torch, a conda env).

`python -m venv --system-site-packages` sees only the *base* interpreter's packages: made from inside
another venv or a conda env, it loses them. A .pth file adds the maker's package folders (every
folder on its sys.path outside the standard library, .pth-added ones included) after the venv's own,
so pip installs beside them and keeps what already meets the ranges. It adds them with
site.addsitedir, which also runs *their* .pth files: a plain path line would not, and those files
switch on setuptools' distutils (Python 3.12+), namespace packages and editable installs.

A Python without ensurepip (Debian/Ubuntu's without python3-venv) makes the venv without pip; pip
then comes from the wheelhouse's pip wheel, which runs straight from its file.

    /path/to/cluster/python install/inherit.py VENV [--wheelhouse DIR]
"""

import argparse
import subprocess
import sys
import sysconfig
import venv as venvs
from pathlib import Path


def create(path: Path, wheelhouse: Path | None) -> None:
    try:
        venvs.create(path, with_pip=True)
        return
    except (subprocess.CalledProcessError, OSError) as err:
        pips = sorted(wheelhouse.glob("pip-*.whl")) if wheelhouse else []
        if not pips:
            sys.exit(f"inherit.py: {sys.executable} cannot make a venv with pip ({err}) and no pip wheel "
                     f"was given (--wheelhouse DIR with pip-*.whl)")
    print(f"inherit.py: no ensurepip in {sys.executable}: pip from {pips[-1].name}")
    venvs.create(path, with_pip=False, clear=True)
    pip = pips[-1]
    subprocess.run([str(path / "bin/python"), f"{pip}/pip", "install", "-q", "--no-index", str(pip)],
                   check=True)


def package_folders() -> list[str]:
    """This Python's sys.path entries that hold packages, not its standard library."""
    # The base installation's standard library (in a venv, sysconfig's own "platstdlib" is the venv's
    # lib/ folder, which holds its site-packages too).
    base = {"installed_base": sys.base_prefix, "base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_platbase": sys.base_exec_prefix}
    stdlib = [Path(sysconfig.get_path(key, vars=base)).resolve() for key in ("stdlib", "platstdlib")]
    here = Path(__file__).resolve().parent
    folders: list[str] = []
    for entry in sys.path[1:]:  # sys.path[0] is this script's folder
        path = Path(entry).resolve() if entry else None
        if not path or not path.is_dir() or path == here or str(path) in folders:
            continue
        in_stdlib = any(path == lib or lib in path.parents for lib in stdlib)
        if not in_stdlib or {"site-packages", "dist-packages"} & set(path.parts):
            folders.append(str(path))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--wheelhouse", type=Path,
                        help="a pip wheel's folder, for a Python without ensurepip")
    args = parser.parse_args()
    if not (args.venv / "bin/python").exists():
        create(args.venv, args.wheelhouse)
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([str(args.venv / "bin/python"), "-c", ask], capture_output=True, text=True,
                             check=True).stdout.strip()
    folders = package_folders()
    # One line: a .pth file runs lines that start with "import" (and adds other lines as plain paths).
    line = f"import site; list(map(site.addsitedir, {folders!r}))\n"  # exec()ed: no comprehension scope
    (Path(purelib) / "_inherited_site.pth").write_text(line)
    print(f"{args.venv}: sees {', '.join(folders) or 'no other packages'}")


if __name__ == "__main__":
    main()
