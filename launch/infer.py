#!/usr/bin/env python
"""Per-rank entry for sharded inference under torchrun, `srun` or the deepspeed launcher: same
arguments as `pml-dist infer`. Ranks need no process group; each writes its own shard.

    torchrun --nproc_per_node=4 launch/infer.py --config CFG
    srun --ntasks=64 python launch/infer.py --config CFG
"""

import sys

from pml_dist.cli import main

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["infer", *argv]))
