from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pml_dist.errors import ConfigError
from pml_dist.training.models import build_model, param_groups


def test_small_resnet_shapes_and_norms():
    for norm in ("batch", "group"):
        model = build_model("small_resnet", 7, width=16, norm=norm)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    kinds = {type(m) for m in build_model("small_resnet", 7, width=16, norm="group").modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds


def test_pretrained_weights_come_from_a_local_file_and_the_head_is_replaced(tmp_path):
    imagenet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model("resnet18", 80, pretrained=str(path))
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == 80
    with pytest.raises(ConfigError, match="no weights file"):
        build_model("resnet18", 80, pretrained=str(tmp_path / "missing.pth"))
    torch.save(build_model("small_resnet", 80).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="does not fit ResNet"):
        build_model("resnet18", 80, pretrained=str(tmp_path / "wrong.pth"))


def test_no_weight_decay_on_batchnorm_or_biases():
    model = build_model("small_resnet", 5, width=8)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert id(module.weight) not in decayed and id(module.bias) not in decayed
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) in decayed
    assert id(model.fc.bias) not in decayed
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total
