"""Derived training quantities and the DeepSpeed engine, with the CPU specifics measured here.

`derive()` is the one place where global batch, learning rate and steps per epoch are computed;
the trainer writes its result next to the metrics so a run says what it actually used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from pml_dist.config import Config
from pml_dist.errors import ConfigError, PmlError


@dataclass(frozen=True)
class Derived:
    world_size: int
    global_batch: int  # micro x accumulation x world
    lr: float  # optim.lr scaled from optim.ref_batch to global_batch
    samples_per_rank: int  # per epoch, after DistributedSampler-style padding
    micro_steps_per_epoch: int  # per rank; a multiple of grad_accum
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int

    @property
    def epoch_samples(self) -> int:
        """Samples all ranks together train on per epoch (whole accumulation cycles only); the
        trainer keeps its position inside an epoch in this unit, the unit the loader skips in."""
        return self.global_batch * self.steps_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


def derive(cfg: Config, num_train: int, world_size: int) -> Derived:
    t, o = cfg.train, cfg.optim
    global_batch = t.micro_batch * t.grad_accum * world_size
    ratio = global_batch / o.ref_batch
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[o.lr_scaling]
    samples_per_rank = -(-num_train // world_size)
    # Whole accumulation cycles only: a partial one at the epoch end would mix two epochs' gradients.
    micro = (samples_per_rank // t.micro_batch) // t.grad_accum * t.grad_accum
    if micro == 0:
        raise ConfigError(
            f"train.micro_batch={t.micro_batch} x train.grad_accum={t.grad_accum} exceeds the "
            f"{samples_per_rank} training samples each of {world_size} ranks gets per epoch"
        )
    steps = micro // t.grad_accum
    return Derived(
        world_size=world_size,
        global_batch=global_batch,
        lr=o.lr * scale,
        samples_per_rank=samples_per_rank,
        micro_steps_per_epoch=micro,
        steps_per_epoch=steps,
        total_steps=steps * (t.linear_init_epochs + t.epochs),  # LinearInit's epochs come first
        warmup_steps=int(round(o.warmup_epochs * steps)),
    )


def lr_lambda(derived: Derived, schedule: str):
    """Linear warm-up from 0, then cosine to 0 (or constant); a multiplier of each group's lr."""

    def factor(step: int) -> float:
        if step < derived.warmup_steps:
            return (step + 1) / derived.warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, derived.total_steps - derived.warmup_steps)
        progress = min(1.0, (step - derived.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: Config, derived: Derived, on_gpu: bool) -> dict:
    """The JSON preset with everything the experiment config decides filled in."""
    path = Path(cfg.dist.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON: {exc}") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "optimizer", "scheduler", "fp16", "bf16", "torch_autocast", "communication_data_type",
                "gradient_clipping"):
        if key in ds:
            raise ConfigError(f"{path}: '{key}' is set by the experiment config (train.*, optim.*, dist.*)")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = derived.global_batch
    # Always stated: DeepSpeed's default (0.19.8) is 1.0, which clipped every step at norm 1 although
    # optim.grad_clip=0 means off, and cost each step a norm over all gradients plus a blocking
    # all-reduce of it (ZeRO-0 at every step: clip_fp32_gradients). 0 turns both off.
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if resolve_precision(cfg, on_gpu) == "bf16":
        if not on_gpu:
            raise ConfigError("dist.precision=bf16 on CPU: about 10x slower than fp32 here; use fp32")
        # Autocast keeps fp32 master weights and BatchNorm in fp32; DeepSpeed's own bf16 mode casts
        # parameters but not BatchNorm buffers and fails in ResNets. DeepSpeed tags the parameters of
        # the modules it lists as "lower precision safe" (Conv, Linear by default) with comm_dtype=bf16,
        # and ZeRO-1/2 then reduce their gradients in bf16 while ZeRO-0 reduces everything in fp32.
        # An empty list tags none: gradients are reduced in fp32 at every stage (the safe choice: a
        # bf16 sum over many ranks loses about 3 digits; ResNet gradients are small to send anyway).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    # Stated for every precision and stage (DeepSpeed's default is fp32 here too, bf16 with its own
    # bf16 mode): ZeRO-0/1/2 reduce gradients alike.
    ds["communication_data_type"] = "fp32"
    if on_gpu:
        _gpu_settings(ds)
    return ds


def _gpu_settings(ds: dict) -> None:
    """Throughput settings of the generated config on GPUs (a preset's own values win)."""
    # DeepSpeed's throughput timer synchronises the device at every forward and step (a host sync
    # per micro-step); the trainer measures samples/s itself.
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):
        # Reduce gradients in buckets while backward still runs (overlap_comm; the default bucket of
        # 5e8 elements is larger than a ResNet-50, so it would reduce once, after backward): buckets
        # of 25 MiB of fp32 gradients, torch DDP's default. The all-gather of updated weights after
        # the step cannot overlap: one call for a whole ResNet-50 (25.6 M), fewest latency-bound
        # calls across nodes.
        zero.setdefault("overlap_comm", True)
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_bucket_size", 6_553_600)
        zero.setdefault("allgather_bucket_size", 50_000_000)


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    """dist.precision with auto decided: bf16 (autocast) on GPU, fp32 on CPU."""
    precision = cfg.dist.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    return precision


def autocast_dtype(cfg: Config, device) -> torch.dtype | None:
    """The autocast dtype of forward passes outside DeepSpeed (evaluation, inference): the training
    precision's, on CUDA only (None: plain fp32)."""
    on_gpu = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_gpu and resolve_precision(cfg, on_gpu) == "bf16" else None


def configure_cuda(device) -> None:
    """Process-wide throughput settings on CUDA (no-op elsewhere): cuDNN picks the fastest
    convolution algorithm for each shape (fixed here: one image size, one batch size), and fp32
    matmuls and convolutions use TF32 tensor cores. With bf16 autocast they only touch the few
    fp32 ops left; with dist.precision=fp32 they trade mantissa bits (10 instead of 23) for speed, as
    torch's cuDNN default already does for convolutions."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    # torch.set_float32_matmul_precision("high") would do this too, but also switch oneDNN's CPU
    # matmuls to TF32 (torch 2.14.1): these two flags are CUDA's alone.
    torch.backends.cuda.matmul.allow_tf32 = True


def prepare_deepspeed_on_cpu() -> None:
    """What DeepSpeed needs on a CPU-only machine (measured with DeepSpeed 0.19.8).

    The one place DS_ACCELERATOR is set: DeepSpeed's own detection also lands on cpu, but with a
    warning per process. (Which device a rank computes on is dist.compute_device's decision.)"""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch`
    # (the torch package), which that statement would return instead of the submodule.
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    # DeepSpeed's CPU backend compiles a shared-memory collective op with g++ on first use (74 s,
    # and a compiler on every node). It serves only inference-style all-reduce; training all-reduces
    # through gloo either way, so skip building it.
    ds_torch.build_shm_op = lambda: None


def build_optimizer(cfg: Config, groups: list[dict], lr: float,
                    on_gpu: bool = False) -> torch.optim.Optimizer:
    """A torch optimizer object: DeepSpeed's own Adam would compile C++ (FusedAdam, CPUAdam). On
    GPUs torch's fused Adam/AdamW: one kernel for all parameters instead of several per tensor,
    and no host sync (its step counts live on the device)."""
    for group in groups:
        group["lr"] = lr * group.pop("lr_mult", 1.0)
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    fused = {"fused": True} if on_gpu else {}  # CPU: unchanged (torch's default implementation)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    return torch.optim.Adam(groups, lr=lr, **fused)


def initialize(cfg: Config, module: torch.nn.Module, groups: list[dict], derived: Derived, device):
    """DeepSpeed engine + LambdaLR scheduler (both saved in its checkpoints), on `device`: the rank's
    one device choice (dist.compute_device), which DeepSpeed is handed instead of picking
    cuda:LOCAL_RANK itself (wrong with one GPU bound per task)."""
    on_gpu = device.type == "cuda"
    if not on_gpu:
        prepare_deepspeed_on_cpu()
    import deepspeed

    if on_gpu:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cuda":
            raise PmlError(f"training on {device}, but DeepSpeed's accelerator is "
                           f"{get_accelerator().device_name()!r} (DS_ACCELERATOR="
                           f"{os.environ.get('DS_ACCELERATOR')!r}): unset DS_ACCELERATOR")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    optimizer = build_optimizer(cfg, groups, derived.lr, on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(derived, cfg.optim.schedule))
    config = deepspeed_config(cfg, derived, on_gpu)
    if on_gpu:
        # DeepSpeed's _broadcast_model views every weight as bytes (p.data.view(torch.uint8)), which
        # needs a last stride of 1: a channels_last conv weight fails ("self.stride(-1) must be 1",
        # seen on an H200 with DeepSpeed 0.19.8). So the weights are NCHW while the engine is built.
        module.to(memory_format=torch.contiguous_format)
    engine, _, _, _ = deepspeed.initialize(
        # DeepSpeed's engine calls set_device(args.device_rank) when args has it, else
        # set_device(LOCAL_RANK) (runtime/engine.py _set_distributed_vars, DeepSpeed 0.19.8)
        args=SimpleNamespace(device_rank=device.index) if on_gpu else None,
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
    )
    if on_gpu and config.get("zero_optimization", {}).get("stage", 0) == 0:
        # ZeRO-0's optimizer holds the Parameter objects themselves, whose storage .to() replaces: the
        # weights go back to channels_last, as the loaders' batches are (models.on_device). ZeRO-1/2's
        # are views of one flat buffer and stay NCHW: new storage would cut them off from it.
        module.to(memory_format=torch.channels_last)
    return engine
