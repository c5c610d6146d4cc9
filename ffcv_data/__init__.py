"""The data package: COCO-format data (real or generated) -> FFCV .beton files with the
single-positive protocol, and their loaders. Imports nothing of pml_dist (docs/architecture.md)."""

import os

# numba (FFCV's compiler) picks TBB for its parallel loops where libtbb is installed (Debian's
# OpenCV pulls it in). With a single usable CPU (a Slurm task bound to one core, a cgroup quota of
# one) and loops launched from a non-main thread, as FFCV's loader does, oneTBB never runs the
# task numba's unload waits for, and the process hangs at exit after its last line (oneTBB #2056,
# numba #10556; reproduced here under `taskset -c 0`). OpenMP first, then numba's own workqueue.
# Set before numba is imported; a user's own NUMBA_THREADING_LAYER(_PRIORITY) wins.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp workqueue tbb")
