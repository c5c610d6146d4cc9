"""Training throughput of the trainer's DeepSpeed engine at ZeRO 0 / 1 / 2 against plain torch DDP,
measured side by side in one run.

One 2-rank torchrun job (gloo) builds every mode in the same processes: the same TrainModule (model
and loss, identical initial weights), the same torch optimizer and LambdaLR schedule
(`engine.build_optimizer`, `engine.lr_lambda`), the same FFCV loader (`train_loader`, one shared by
all modes, so it compiles once) and micro batch. DeepSpeed modes are the trainer's own engine
(`trainer.build_engine` -> `engine.initialize` with configs/deepspeed/zero<N>.json) stepped as
`Trainer._micro_step` does; DDP is `torch.nn.parallel.DistributedDataParallel` with its defaults.

After --warmup untimed steps per mode, --rounds rounds follow; in each every mode trains --steps
timed steps (barrier, time, steps, barrier), the order reversed every other round (A B C D, D C B A,
...). Printed: samples/s per mode (median over rounds, min-max) and the ratio to DDP of the same
round (median, min-max). Goal (issue 16): ZeRO-0 >= 0.97x DDP, printed as PASS / BELOW, not asserted.

    .venv/bin/python bench/bench_dp.py [--ranks 2] [--rounds 5] [--steps 6] [--warmup 4] [--micro-batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer draws progress bars on stderr
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/bench_dp.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

MODES = ("ddp", "zero0", "zero1", "zero2")
GOAL_ZERO0 = 0.97


def overrides(args) -> list[str]:
    """The experiment config of every mode (the DeepSpeed preset aside)."""
    return [f"run.dir={args.run}", f"data.root={Path(args.run).parent / 'data'}", "data.synthetic=true",
            f"data.synthetic_train={args.train_images}", "data.synthetic_test=64",
            f"data.image_size={args.image_size}", "data.train_transform=random_resized_crop", "data.jit=true",
            "model.name=small_resnet", f"model.width={args.width}", "loss.name=an",
            f"train.micro_batch={args.micro_batch}"]


def worker(args) -> None:
    """One rank: build every mode, warm each up, then the timed rounds; rank 0 writes the times."""
    import logging

    import torch
    import torch.distributed as tdist

    from ffcv_data.loaders import threads_per_rank, train_loader
    from pml_dist import dist
    from pml_dist.config import load_config
    from pml_dist.layout import RunLayout
    from pml_dist.training import engine
    from pml_dist.training.losses import build_loss
    from pml_dist.training.models import build_model, on_device
    from pml_dist.training.trainer import TrainModule, build_engine

    info = dist.resolve()
    base = overrides(args)
    cfg = load_config(None, base)
    threads = threads_per_rank(cfg.data.loader_workers, info.local_world_size)
    torch.set_num_threads(threads)  # as Trainer._start_process_group
    device = dist.init_process_group(info, cfg.dist.timeout_s)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    data = RunLayout.of(cfg).data
    stats = data.stats()
    num_classes, num_train = stats.num_classes, stats.images("train")

    def parts(cfg):
        torch.manual_seed(cfg.train.seed)  # identical initial weights in every mode, on every rank
        model = on_device(build_model(cfg.model.name, num_classes, width=cfg.model.width), device)
        return model, build_loss(cfg.loss.name, num_classes, num_train, seed=cfg.train.seed)

    steppers = {}
    for mode in args.modes:
        preset = "zero0" if mode == "ddp" else mode
        mcfg = load_config(None, [*base, f"dist.deepspeed_config={REPO}/configs/deepspeed/{preset}.json"])
        derived = engine.derive(mcfg, num_train, info.world_size)
        model, loss = parts(mcfg)
        if mode == "ddp":
            from pml_dist.training.models import param_groups

            ddp = torch.nn.parallel.DistributedDataParallel(TrainModule(model, loss))
            optimizer = engine.build_optimizer(mcfg, param_groups(model, mcfg.optim.weight_decay), derived.lr)
            factor = engine.lr_lambda(derived, mcfg.optim.schedule)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

            def step(images, targets, index, ddp=ddp, optimizer=optimizer, schedule=schedule):
                ddp(images, targets, index).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        else:
            ds = build_engine(mcfg, model, loss, derived, device)

            def step(images, targets, index, ds=ds):  # Trainer._micro_step
                ds.backward(ds(images, targets, index))
                ds.step()
        steppers[mode] = step

    loader = train_loader(data.beton("train"), cfg.train.micro_batch, cfg.data.image_size, rank=info.rank,
                          world_size=info.world_size, seed=cfg.train.seed, order=cfg.data.order,
                          transform=cfg.data.train_transform, device=device, workers=cfg.data.loader_workers,
                          local_world_size=info.local_world_size, drop_last=True, jit=cfg.data.jit)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for batch in loader:
                yield batch["image"], batch["observed"].float(), batch["index"]
            epoch += 1

    it = batches()
    next(it)  # the loader's numba compilation, outside every mode's time
    for mode in args.modes:
        for _ in range(args.warmup):
            steppers[mode](*next(it))
    segments = []
    for r in range(args.rounds):
        for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
            tdist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steppers[mode](*next(it))
            tdist.barrier()
            segments.append({"round": r, "mode": mode, "seconds": time.perf_counter() - t0})
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({"segments": segments, "threads": threads,
                                              "world_size": info.world_size}))
    tdist.destroy_process_group()


def prepare_data(args) -> bool:
    from pml_dist.cli import main

    return main(["prepare", *overrides(args)]) == 0


def table(result: dict, args) -> list[str]:
    world, batch = result["world_size"], args.micro_batch
    rates: dict[str, dict[int, float]] = {m: {} for m in args.modes}
    for seg in result["segments"]:
        rates[seg["mode"]][seg["round"]] = args.steps * batch * world / seg["seconds"]
    lines = [f"mode    samples/s (median, min-max over {args.rounds} rounds)   "
             "ratio to DDP (median, min-max)"]
    ratios = {}
    for mode in args.modes:
        values = list(rates[mode].values())
        line = f"{mode:6s} {statistics.median(values):9.1f}  {min(values):7.1f}-{max(values):<7.1f}"
        if "ddp" in rates and mode != "ddp":
            per_round = [rates[mode][r] / rates["ddp"][r] for r in rates[mode]]
            ratios[mode] = statistics.median(per_round)
            line += f"{'':19s}{ratios[mode]:6.3f}  {min(per_round):.3f}-{max(per_round):.3f}"
        elif mode == "ddp":
            line += f"{'':19s}{1:6.3f}"
        lines.append(line)
    lines.append("")
    for mode, ratio in ratios.items():
        lines.append(f"{mode} / ddp {ratio:.3f}x")
    if "zero0" in ratios:
        verdict = "PASS" if ratios["zero0"] >= GOAL_ZERO0 else "BELOW"
        lines.append(f"goal (issue 16) zero0 >= {GOAL_ZERO0:.2f}x ddp: {verdict}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed segments per mode, modes alternated")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per mode before the rounds")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="small_resnet width")
    parser.add_argument("--train-images", type=int, default=2000, help="generated data set size")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-root", dest="run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {','.join(MODES)}")
    if args.worker:
        worker(args)
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.run, args.out = str(Path(tmp) / "run"), str(Path(tmp) / "result.json")
        if not prepare_data(args):
            print("bench_dp: pml-dist prepare failed", file=sys.stderr)
            return 1
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
               f"--master_port={args.port}", __file__, "--worker", "--run-root", args.run, "--out", args.out]
        for key in ("rounds", "steps", "warmup", "micro_batch", "image_size", "width", "train_images"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--modes", ",".join(args.modes)]
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            print(done.stdout[-8000:], file=sys.stderr)
            print(f"bench_dp: the torchrun job failed (exit {done.returncode})", file=sys.stderr)
            return 1
        result = json.loads(Path(args.out).read_text())
    print(f"bench_dp: {args.ranks} ranks x {result['threads']} torch threads "
          f"(os.cpu_count()={os.cpu_count()}), gloo, fp32, small_resnet width {args.width}, "
          f"{args.image_size} px, micro batch {args.micro_batch} (global {args.micro_batch * args.ranks}), "
          "Adam")
    print(f"{args.rounds} rounds x {args.steps} timed steps per mode after {args.warmup} warm-up steps, "
          f"modes alternated ({' '.join(args.modes)}, then reversed)")
    print("\n".join(table(result, args)))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
