#!/usr/bin/env python
"""Per-rank entry for torchrun, `srun` and the `deepspeed` launcher: same arguments as
`pml-dist train` (the deepspeed launcher's extra `--local_rank=N` is dropped: LOCAL_RANK is read
from the environment).

    torchrun --nproc_per_node=2 launch/train.py --config configs/demo.yaml --stage teacher
    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml --stage teacher
    srun --ntasks-per-node=4 python launch/train.py --config CFG --stage student --tau 0.75
"""

import signal
import sys

# Before any import: a stop signal (a preemption's SIGTERM) waits, pending, until `train` has its
# handlers in place (pml_dist/training/stop.py), instead of killing a rank that is starting up.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})

from pml_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["train", *argv]))
