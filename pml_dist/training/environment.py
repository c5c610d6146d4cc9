"""result.json's `environment`: what can change the numbers between two runs of one config (the
code, the library versions, threads, device, world shape, launcher, CUDA's algorithm choices), so
two results that differ can be told apart by more than their config."""

from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch

from pml_dist import dist
from pml_dist.config import git_revision

LAUNCHERS = {"torchrun": "torchrun", "slurm": "Slurm", "single": "one process"}


def environment(info: dist.RankInfo, device: torch.device, threads: int) -> dict:
    """Computed once per stage, after engine.configure_cuda set the CUDA flags it reports."""
    device = torch.device(device)
    return {
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "deepspeed": _version("deepspeed"),
        "numpy": np.__version__,
        "torch_threads_per_rank": threads,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "world_size": info.world_size,
        "local_world_size": info.local_world_size,
        "launcher": LAUNCHERS.get(info.source, info.source),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


def _version(package: str) -> str | None:
    """The installed distribution's version, without importing it (DeepSpeed's import is slow)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
