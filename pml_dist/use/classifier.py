"""`Classifier`: a stage's best.pt as one TorchScript-able module with the evaluation path's image
contract built in, so the exported model.pt needs torch only (no pml_dist, no FFCV).

    forward(x)   x: float (N, 3, H, W), RGB in [0, 1], any H and W
                 -> float32 (N, num_classes) sigmoid probabilities
    resize(x)    just the geometric part (predict resizes each image with it, so a batch stacks)

The evaluation loader (ffcv_data/transforms.py, data.eval_transform) decodes, optionally takes the
central square (center_crop), resizes with OpenCV's INTER_AREA to data.image_size (resize.py
reproduces it) and normalises with MEAN/STD; this module does the same on the 0-1 scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ffcv_data.transforms import MEAN, STD
from pml_dist.training.models import Fp32Head, build_model
from pml_dist.use.resize import area_resize

# The loaders' statistics are on the 0-255 scale of uint8 pixels; the classifier takes 0-1.
MEAN_01 = tuple(m / 255 for m in MEAN)
STD_01 = tuple(s / 255 for s in STD)


class Classifier(nn.Module):
    def __init__(self, network: nn.Module, image_size: int, center_crop: bool = False):
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.center_crop = center_crop
        self.register_buffer("mean", torch.tensor(MEAN_01, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD_01, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.jit.export
    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, image_size, image_size), as the evaluation loader shapes an image."""
        if self.center_crop:  # FFCV's CenterCropRGBImageDecoder(ratio=1): the central square
            h, w = x.shape[-2], x.shape[-1]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = x[:, :, top:top + side, left:left + side]
        return area_resize(x, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.resize(x.float()) - self.mean) / self.std
        return torch.sigmoid(self.network(x).float())


def plain_head(network: nn.Module) -> nn.Module:
    """`network` with its Fp32Head replaced by an nn.Linear holding the same parameters: the head
    only differs under autocast, which the classifier never uses (it runs in fp32), and TorchScript
    cannot compile Fp32Head's super().forward()."""
    for name, module in list(network.named_children()):
        if isinstance(module, Fp32Head):
            linear = nn.Linear(module.in_features, module.out_features, device=module.weight.device)
            linear.load_state_dict(module.state_dict())
            setattr(network, name, linear)
    return network


def build_network(cfg, num_classes: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The stage's architecture (model.*; without SyncBatchNorm, whose keys are BatchNorm's) with
    `state` (best.pt) loaded strictly, in eval mode, with a plain head."""
    m = cfg.model
    network = build_model(m.name, num_classes, width=m.width, norm=m.norm)
    network.load_state_dict(state, strict=True)
    return plain_head(network).eval()


def build_classifier(cfg, num_classes: int, state: dict[str, torch.Tensor]) -> Classifier:
    return Classifier(build_network(cfg, num_classes, state), cfg.data.image_size,
                      center_crop=cfg.data.eval_transform == "center_crop").eval()


def scripted(classifier: Classifier) -> torch.jit.ScriptModule:
    """torch.jit.script of the classifier (scripting keeps the resize's branches on the input size,
    which tracing would freeze at one size)."""
    import warnings

    with warnings.catch_warnings():  # torch 2.11 marks jit.script deprecated; its files still load
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(classifier)
