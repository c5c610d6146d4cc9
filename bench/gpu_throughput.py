"""Training and inference throughput at the COCO large-batch preset's settings (ResNet-50, 448 px, bf16
autocast, channels_last) on one GPU, with the project's own model, loss, DeepSpeed engine and loaders.

Measured side by side in one process, each after a warm-up, on a .beton of the given JPEGs repeated
to --samples images:
  ffcv_train       training steps fed by the FFCV training loader (the preset's transform)
  synthetic_train  the same steps on one batch already on the GPU: the ceiling the loader is judged by
  pil_train        the same steps fed by a torchvision DataLoader (PIL + transforms v2, same workers)
  ffcv_loader      the FFCV loader alone; pil_loader: the DataLoader alone
  ffcv_infer       sharded-inference scoring (the project's predict()) from the FFCV eval loader

    python bench/gpu_throughput.py --images DIR [--device cuda] [--out FILE.json]
    python bench/gpu_throughput.py --images DIR --tiny --device cpu   # the CPU dry run (tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs/coco2014_r50_largebatch.yaml"
NUM_CLASSES = 80


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="a folder of JPEGs (bench/gpu_images.sh)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128, help="micro batch (one GPU)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--workers", type=int, default=0,
                   help="loader threads / DataLoader workers (0: all cores)")
    p.add_argument("--tiny", action="store_true", help="64 px, 32 samples, 2 steps: checks the code paths")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.batch, args.steps, args.warmup = 32, 4, 2, 1
    args.size = 64 if args.tiny else 448
    args.workers = args.workers or len(os.sched_getaffinity(0))
    return args


def build(args, device):
    """The trainer's own pieces, as the large-batch preset configures them."""
    from pml_dist.config import load_config
    from pml_dist.training import engine
    from pml_dist.training.losses import build_loss
    from pml_dist.training.models import build_model, on_device, param_groups
    from pml_dist.training.trainer import TrainModule, _loss_params

    overrides = [f"train.micro_batch={args.batch}", f"data.image_size={args.size}", "model.pretrained=",
                 f"dist.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
                 f"train.device={device.type}"]
    cfg = load_config(PRESET, overrides)
    engine.configure_cuda(device)
    torch.manual_seed(0)
    model = on_device(build_model(cfg.model.name, NUM_CLASSES, norm=cfg.model.norm), device)
    loss = build_loss("an", NUM_CLASSES, args.samples, _loss_params(cfg))
    derived = engine.derive(cfg, args.samples, 1)
    ds_engine = engine.initialize(cfg, TrainModule(model, loss), param_groups(model, cfg.optim.weight_decay),
                                  derived, device)
    return cfg, ds_engine


def write_bench_beton(args, scratch: Path) -> Path:
    from ffcv_data.beton import write_beton
    from ffcv_data.prepared import labels_beside, write_split_labels
    from ffcv_data.sparse import LabelRows

    jpegs = sorted(args.images.glob("*.jpg"))
    if not jpegs:
        raise SystemExit(f"gpu_throughput: no .jpg files in {args.images}")
    files = [jpegs[i % len(jpegs)] for i in range(args.samples)]
    rng = np.random.default_rng(0)
    observed = rng.integers(0, NUM_CLASSES, args.samples)
    beton = write_beton(scratch / "bench.beton", files, max_resolution=640, jpeg_quality=95,
                        workers=args.workers)
    write_split_labels(labels_beside(beton), np.arange(args.samples),
                       LabelRows.from_sets(observed[:, None], NUM_CLASSES), observed, [f.name for f in files])
    return beton


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches, steps: int, warmup: int, step, device, batch_size: int) -> float:
    """Images per second over `steps` calls of step(batch) after `warmup` of them."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def forever(loader):
    """Epoch after epoch of a loader (the measurements may need more batches than one epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class JpegFolder(torch.utils.data.Dataset):
    """What the SPML reference repositories do per sample: PIL decode, resize, flip. Batches leave the
    workers as uint8 and are normalised on the device (a quarter of the shared memory and host copy of
    float32 batches: 8 workers x 448 px float32 batches of 128 would want gigabytes of /dev/shm)."""

    def __init__(self, files, size):
        from torchvision.transforms import v2

        self.files = files
        self.transform = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            image = self.transform(img.convert("RGB"))
        observed = torch.zeros(NUM_CLASSES, dtype=torch.uint8)
        observed[i % NUM_CLASSES] = 1
        return {"image": image, "observed": observed, "index": i}


class Results:
    """The measurements so far, printed and written to --out after each one: a run cut off by its time
    limit still leaves everything it measured."""

    def __init__(self, args, device):
        self.out = args.out
        self.data = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                     "settings": {"image_size": args.size, "micro_batch": args.batch, "samples": args.samples,
                                  "workers": args.workers, "steps": args.steps, "warmup": args.warmup},
                     "img_per_s": {}, "ratios": {}}

    def setting(self, **values):
        self.data["settings"].update(values)

    def add(self, name: str, rate: float):
        rates = self.data["img_per_s"]
        rates[name] = round(rate, 1)
        pairs = (("ffcv_train", "synthetic_train"), ("ffcv_train", "pil_train"), ("ffcv_infer", "ffcv_train"))
        for a, b in pairs:
            if a in rates and b in rates:
                self.data["ratios"][f"{a} / {b}"] = round(rates[a] / rates[b], 3)
        text = json.dumps(self.data, indent=2)
        print(text, flush=True)
        if self.out:
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(text + "\n")
            tmp.replace(self.out)


def main(argv=None) -> int:
    args = arguments(argv)
    from ffcv_data.loaders import eval_loader, train_loader
    from pml_dist import dist
    from pml_dist.errors import PmlError
    from pml_dist.training.engine import autocast_dtype
    from pml_dist.training.evaluate import predict

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        # The .beton first: FFCV's writer forks its workers, which must not inherit CUDA or NCCL state.
        start = time.perf_counter()
        beton = write_bench_beton(args, Path(scratch))
        write_s = time.perf_counter() - start

        info = dist.resolve()
        try:
            device = dist.compute_device(info, args.device)  # the trainer's own choice and checks
        except PmlError as err:
            raise SystemExit(f"gpu_throughput: {err}") from None
        torch.set_num_threads(args.workers)
        dist.init_process_group(info, device=device)
        try:
            measure(args, device, beton, write_s, eval_loader, train_loader, autocast_dtype, predict)
        finally:
            dist.destroy_process_group()
    return 0


def measure(args, device, beton, write_s, eval_loader, train_loader, autocast_dtype, predict):
    cfg, ds_engine = build(args, device)
    results = Results(args, device)
    results.setting(model=cfg.model.name, precision=cfg.dist.precision,
                    deepspeed_config=Path(cfg.dist.deepspeed_config).name,
                    train_transform=cfg.data.train_transform, beton_write_s=round(write_s, 1))
    channels_last = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def train_step(batch):
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # the PIL DataLoader's batches: normalised here, on the device
            images = (images.float() - mean) / std
        images = images.contiguous(memory_format=channels_last)
        value = ds_engine(images, batch["observed"].to(device, non_blocking=True).float(),
                          batch["index"].to(device, non_blocking=True))
        ds_engine.backward(value)
        ds_engine.step()

    n, b = args.steps, args.batch
    jit = not args.tiny  # numba compiles each loader for ~20 s: not worth it for 2 steps
    loader = train_loader(beton, b, args.size, transform=cfg.data.train_transform, device=device,
                          workers=args.workers, jit=jit)
    batches = forever(loader)
    results.add("ffcv_loader", timed(batches, n, args.warmup, lambda batch: None, device, b))
    results.add("ffcv_train", timed(batches, n, args.warmup, train_step, device, b))
    fixed = next(batches)
    fixed = {k: v.clone() for k, v in fixed.items()}  # FFCV reuses its buffers
    results.add("synthetic_train", timed(iter(lambda: fixed, None), n, args.warmup, train_step, device, b))

    net = ds_engine.module.model
    scoring = eval_loader(beton, cfg.infer.batch, args.size, transform=cfg.data.eval_transform,
                          device=device, workers=args.workers, label_fields=(), jit=jit)
    autocast = autocast_dtype(cfg, device)
    # the first pass compiles the loader and lets cuDNN pick its algorithms
    predict(net, scoring, device, NUM_CLASSES, autocast=autocast)
    sync(device)
    start = time.perf_counter()
    predict(net, scoring, device, NUM_CLASSES, autocast=autocast)
    sync(device)
    results.add("ffcv_infer", args.samples / (time.perf_counter() - start))

    # The PIL baseline last: the slowest, and the one a cut-off may lose.
    jpegs = sorted(args.images.glob("*.jpg"))
    dataset = JpegFolder([jpegs[i % len(jpegs)] for i in range(args.samples)], args.size)
    pil = torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=True, drop_last=True,
                                      num_workers=min(8, args.workers), prefetch_factor=1,
                                      pin_memory=device.type == "cuda", persistent_workers=True)
    pil_batches = forever(pil)
    results.add("pil_loader", timed(pil_batches, n, args.warmup, lambda batch: None, device, b))
    results.add("pil_train", timed(pil_batches, n, args.warmup, train_step, device, b))


if __name__ == "__main__":
    sys.exit(main())
