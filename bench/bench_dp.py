"""Training throughput of DeepSpeed ZeRO 0 / 1 / 2 against plain torch DDP, side by side.

Same model, data (.beton of the built-in data set, FFCV loader), micro batch, optimizer and ranks
for every mode; only the data-parallel engine differs. Each mode runs as its own 2-rank torchrun
job; the ratio to DDP is printed at the end.

    .venv/bin/python bench/bench_dp.py [--ranks 2] [--steps 40] [--warmup 8] [--micro-batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("ddp", "zero0", "zero1", "zero2")


def worker(mode: str, beton: str, out: str, steps: int, warmup: int, micro: int, image_size: int) -> None:
    """One rank: train `warmup + steps` steps, time the last `steps`; rank 0 writes samples/s."""
    import torch
    import torch.distributed as tdist

    from ffcv_data.loaders import threads_per_rank, train_loader
    from pml_dist import dist
    from pml_dist.config import load_config
    from pml_dist.training import engine
    from pml_dist.training.losses import build_loss
    from pml_dist.training.models import build_model, param_groups
    from pml_dist.training.trainer import TrainModule

    info = dist.resolve()
    torch.set_num_threads(threads_per_rank(0, info.local_world_size))
    device = dist.init_process_group(info)
    torch.manual_seed(0)
    module = TrainModule(build_model("small_resnet", 20), build_loss("an", 20, 1))
    groups = param_groups(module.model, 0.0)
    cfg = load_config(None, [f"train.micro_batch={micro}", f"dist.deepspeed_config=configs/deepspeed/"
                             f"{mode if mode != 'ddp' else 'zero0'}.json"])
    derived = engine.derive(cfg, 10_000, info.world_size)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = engine.build_optimizer(cfg, groups, derived.lr)

        def step(images, targets, index):
            optimizer.zero_grad(set_to_none=True)
            model(images, targets, index).backward()
            optimizer.step()
    else:
        ds = engine.initialize(cfg, module, groups, derived, device)

        def step(images, targets, index):
            ds.backward(ds(images, targets, index))
            ds.step()

    loader = train_loader(beton, micro, image_size, rank=info.rank, world_size=info.world_size,
                          local_world_size=info.local_world_size, transform="random_resized_crop", jit=True)
    done, t0 = 0, None
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                tdist.barrier()
                t0 = time.perf_counter()
            step(batch["image"], batch["observed"].float(), batch["index"])
            done += 1
            if done == warmup + steps:
                break
    tdist.barrier()
    seconds = time.perf_counter() - t0
    if info.rank == 0:
        rate = steps * micro * info.world_size / seconds
        Path(out).write_text(json.dumps({"mode": mode, "samples_per_s": rate, "seconds": seconds}))


def prepare_data(root: Path) -> Path:
    from pml_dist.cli import main

    run = root / "run"
    assert main(["prepare", f"run.dir={run}", f"data.root={root / 'data'}", "data.synthetic=true"]) == 0
    return run / "data" / "train.beton"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--beton")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.beton, args.out, args.steps, args.warmup, args.micro_batch, args.image_size)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        beton = prepare_data(Path(tmp))
        rates = {}
        for mode in MODES:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                   "--master_port=29611", __file__, "--worker", mode, "--beton", str(beton), "--out",
                   str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--micro-batch", str(args.micro_batch), "--image-size", str(args.image_size)]
            subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL)
            rates[mode] = json.loads(out.read_text())["samples_per_s"]
            print(f"{mode:6s} {rates[mode]:8.1f} samples/s", flush=True)
    print(f"\n{args.ranks} ranks, small_resnet, {args.image_size} px, micro batch {args.micro_batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps; os.cpu_count()={os.cpu_count()}")
    print("mode    samples/s  ratio to DDP")
    for mode in MODES:
        print(f"{mode:6s} {rates[mode]:10.1f}  {rates[mode] / rates['ddp']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
