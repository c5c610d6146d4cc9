"""Let a new venv see the packages of the Python that made it (a cluster's own torch, a conda env).

`python -m venv --system-site-packages` sees only the *base* interpreter's packages: made from inside
another venv or a conda env, it loses them. A .pth file adds the maker's package folders (every
folder on its sys.path outside the standard library, .pth-added ones included) after the venv's own,
so pip installs beside them and keeps what already meets the ranges. It adds them with
site.addsitedir, which also runs *their* .pth files: a plain path line would not, and those files
switch on setuptools' distutils (Python 3.12+), namespace packages and editable installs.

    /path/to/cluster/python install/inherit.py .venv
"""

import subprocess
import sys
import sysconfig
from pathlib import Path

if len(sys.argv) != 2:
    sys.exit("usage: python install/inherit.py VENV")
venv = Path(sys.argv[1])
ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
purelib = subprocess.run([str(venv / "bin/python"), "-c", ask], capture_output=True, text=True,
                         check=True).stdout.strip()
# The base installation's standard library (in a venv, sysconfig's own "platstdlib" is the venv's lib/
# folder, which holds its site-packages too).
base = {"installed_base": sys.base_prefix, "base": sys.base_prefix, "platbase": sys.base_exec_prefix,
        "installed_platbase": sys.base_exec_prefix}
stdlib = [Path(sysconfig.get_path(key, vars=base)).resolve() for key in ("stdlib", "platstdlib")]


def packages_folder(path: Path) -> bool:
    if {"site-packages", "dist-packages"} & set(path.parts):
        return True
    return not any(path == lib or lib in path.parents for lib in stdlib)


here = Path(__file__).resolve().parent
folders: list[str] = []
for entry in sys.path[1:]:  # sys.path[0] is this script's folder
    path = Path(entry).resolve() if entry else None
    if path and path.is_dir() and path != here and str(path) not in folders and packages_folder(path):
        folders.append(str(path))
# One line: a .pth file runs lines that start with "import" (and adds other lines as plain paths).
line = f"import site; list(map(site.addsitedir, {folders!r}))\n"  # exec()ed: no comprehension scope
(Path(purelib) / "_inherited_site.pth").write_text(line)
print(f"{venv}: sees {', '.join(folders) or 'no other packages'}")
