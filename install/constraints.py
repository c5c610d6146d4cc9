"""Write the venv's exact versions into constraints.txt after a deliberate upgrade (make constraints).

The header lines (comments) are kept; pml-dist itself and pip are left out."""

import importlib.metadata as md
import sys
from pathlib import Path

# Read the installed metadata rather than `pip freeze`, which writes "ffcv @ file://..." for a wheel
# installed from a path.
path = Path(sys.argv[1])
header = [line for line in path.read_text().splitlines() if line.startswith("#")]
names = {dist.metadata["Name"]: dist.version for dist in md.distributions()}
pins = sorted((f"{name}=={version}" for name, version in names.items() if name not in ("pip", "pml-dist")),
              key=str.lower)
path.write_text("\n".join([*header, *pins]) + "\n")
print(f"{path}: {len(pins)} pins")
