"""VGG-16 with batch norm for CIFAR-sized inputs (any side >= 32 works thanks to the global pool)."""

from __future__ import annotations

import torch
from torch import nn

from amc.models.common import check_sizes, check_width, conv_bn_relu, init_weights, scaled_width

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """``features`` (conv-BN-ReLU stacks and 2x2 max pools from ``cfg``), global average pool, linear."""

    def __init__(self, cfg: tuple[int | str, ...], num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = scaled_width(int(v), width_mult)
                layers.extend(conv_bn_relu(ch, out, 3))
                ch = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> VGG:
    """VGG-16 (13 conv-BN-ReLU + 1 linear), ~14.7 M parameters at width 1 (313 M MACs at 32x32)."""
    check_sizes("vgg16_cifar", num_classes, in_channels)
    return VGG(VGG16_CFG, num_classes, in_channels, check_width("vgg16_cifar", width_mult))
