"""bench/gpu.sh's first step, with the machine's own Python: what the later steps need, each missing
piece named in one line, exit 1 if any is missing.

- torch sees a CUDA GPU (not with --dry-run), and numpy, numba, cv2 and PIL import;
- every requirement of pml-dist (setup.cfg, with the test extra) that the wheelhouse holds no copy
  of (it left it out because the image has it: bench/gpu-machine.txt) is installed here at a version
  inside pml-dist's range, since the offline install has nothing else to take.

    python bench/gpu_preflight.py WHEELHOUSE [--dry-run]
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def project_ranges() -> dict[str, Requirement]:
    """pml-dist's own requirements and its test extra's, by canonical name (setup.cfg)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [*cfg["options"]["install_requires"].splitlines(),
             *cfg["options.extras_require"]["test"].splitlines()]
    reqs = [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def held_by(wheelhouse: Path) -> set[str]:
    """The packages the wheelhouse has a wheel or source archive of (name-version-....whl/.tar.gz)."""
    return {canonicalize_name(p.name.split("-")[0]) for p in wheelhouse.iterdir()
            if p.name.endswith((".whl", ".tar.gz"))}


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    wheelhouse = Path(next(a for a in argv if not a.startswith("--")))
    missing = []
    for name in ("torch", "numpy", "numba", "cv2", "PIL"):
        try:
            module = importlib.import_module(name)
            print(f"{name} {getattr(module, '__version__', '?')}: ok")
        except Exception as err:  # report every missing one, not only the first
            missing.append(f"{name} does not import ({type(err).__name__}: {err})")

    # Dependencies of dependencies are left to pip, which checks them against their package's range.
    held = held_by(wheelhouse)
    for name, req in project_ranges().items():
        if name in held:
            continue
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            missing.append(f"{name}: neither installed here nor in {wheelhouse}")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{name} {version} (installed here) is outside pml-dist's range {req.specifier}, "
                           f"and {wheelhouse} has no copy in range: carry one")
        else:
            print(f"{name} {version} (installed here): inside {req.specifier or 'any version'}")

    torch = sys.modules.get("torch")
    if torch is None:
        pass  # named above
    elif torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible, torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    elif dry:
        print("GPU: none (dry run)")
    else:
        missing.append("torch sees no CUDA GPU")
    for line in missing:
        print(f"MISSING: {line}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
