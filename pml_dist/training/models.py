"""Classifiers: torchvision ResNets (ImageNet weights only from a local file) and a small CPU ResNet."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pml_dist.errors import ConfigError


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm has no batch statistics: a step is then exactly the same at any world size.
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(8, channels)


class Fp32Head(nn.Linear):
    """The classifier head, computed in fp32 under bf16 autocast too: bf16 logits of -4..-8 come in
    steps of 0.03-0.06, which over a large test set ties many scores and nudges every AP. A plain
    nn.Linear to everything else (state dict, weight decay by module type, CPU results)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class _Block(nn.Module):
    """The basic residual block of ResNet-18, narrower."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Four stages of one block each (widths w, 2w, 4w, 8w): ResNet-18's shape at a fraction of its
    cost, so a teacher learns the built-in 64 px data set in about a minute on 2 CPU cores."""

    def __init__(self, num_classes: int, width: int = 32, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU())
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, c_in = [], width
        for i, w in enumerate(widths):
            stages.append(_Block(c_in, w, stride=1 if i == 0 else 2, norm=norm))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.fc = Fp32Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, num_classes: int, *, pretrained: str = "", width: int = 32,
                norm: str = "batch", sync_bn: bool = False) -> nn.Module:
    """A classifier with `num_classes` logits. `pretrained`: a local torchvision ImageNet state dict
    (e.g. resnet50-11ad3fa6.pth); nothing is ever downloaded."""
    if name == "small_resnet":
        if pretrained:
            raise ConfigError("config key 'model.pretrained': there are no pretrained small_resnet weights")
        model: nn.Module = SmallResNet(num_classes, width, norm)
    else:
        import torchvision

        if norm != "batch":
            raise ConfigError("config key 'model.norm': torchvision ResNets use batch norm only")
        try:
            model = getattr(torchvision.models, name)(weights=None)
        except AttributeError:
            raise ConfigError(f"config key 'model.name': torchvision has no model {name!r}") from None
        if pretrained:
            _load_imagenet(model, Path(pretrained))
        model.fc = Fp32Head(model.fc.in_features, num_classes)
    if sync_bn:
        # DeepSpeed does not synchronise BatchNorm buffers across ranks (each rank keeps its own
        # running statistics; a checkpoint holds rank 0's). SyncBatchNorm computes the batch
        # statistics over the global batch instead.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def on_device(model: nn.Module, device) -> nn.Module:
    """`model` on `device`; on CUDA with channels_last weights too: the loaders give CUDA batches in
    channels_last, and cuDNN's NHWC kernels want the weights in it as well (otherwise every
    convolution converts its weight first). CPU: unchanged (NCHW, see ffcv_data/loaders.py).
    ZeRO-1/2 later make the weights views of one flat buffer, which are NCHW again."""
    if torch.device(device).type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def _load_imagenet(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config key 'model.pretrained': no weights file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # The ImageNet head (fc) is replaced afterwards; anything else missing means the wrong file.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        raise ConfigError(f"config key 'model.pretrained': {path} does not fit "
                          f"{type(model).__name__}: {str(exc).splitlines()[1].strip()}") from None
    if [k for k in missing if not k.startswith("fc.")] or unexpected:
        raise ConfigError(
            f"config key 'model.pretrained': {path} does not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, not on BatchNorm or biases (by module type,
    not by parameter name, so renamed layers cannot slip through)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
