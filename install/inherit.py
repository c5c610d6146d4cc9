"""Let a new venv see the packages of the Python that made it (a cluster's own torch, a conda env).

`python -m venv --system-site-packages` sees only the *base* interpreter's packages: made from inside
another venv or a conda env, it loses them. A .pth file naming the maker's package folders (every
folder on its sys.path outside the standard library, .pth-added ones included) keeps them, after the
venv's own, so pip installs beside them and keeps what already meets the ranges.

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
stdlib = [Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")]
here = Path(__file__).resolve().parent
folders = []
for entry in sys.path[1:]:  # sys.path[0] is this script's folder
    path = Path(entry).resolve() if entry else None
    if (path and path.is_dir() and path != here and str(path) not in folders
            and not any(path == lib or lib in path.parents for lib in stdlib)):
        folders.append(str(path))
(Path(purelib) / "_inherited_site.pth").write_text("".join(f"{p}\n" for p in folders))
print(f"{venv}: sees {', '.join(folders) or 'no other packages'}")
