"""MobileNet v1 (Howard et al. 2017): depthwise-separable conv-BN-ReLU blocks, width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from amc.errors import UserError
from amc.models.common import check_sizes, check_width, conv_bn_relu, init_weights, scaled_width

# (output channels, stride) of the 13 depthwise-separable blocks, ImageNet layout (224 -> 7).
IMAGENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# CIFAR layout: stem stride 1 and the last stride-2 block made stride 1, so 32 -> 4.
CIFAR_BLOCKS: tuple[tuple[int, int], ...] = IMAGENET_BLOCKS[:11] + ((1024, 1), (1024, 1))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU followed by 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.depthwise = conv_bn_relu(in_ch, in_ch, 3, stride=stride, groups=in_ch)
        self.pointwise = conv_bn_relu(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, cifar: bool = False):
        super().__init__()
        ch = scaled_width(32, width_mult)
        self.stem = conv_bn_relu(in_channels, ch, 3, stride=1 if cifar else 2)
        blocks = []
        for channels, stride in CIFAR_BLOCKS if cifar else IMAGENET_BLOCKS:
            out = scaled_width(channels, width_mult)
            blocks.append(DepthwiseSeparable(ch, out, stride))
            ch = out
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, cifar: bool = False) -> MobileNetV1:
    """MobileNet v1; ``cifar=True`` keeps 32x32 inputs at 4x4 before the pool, else the 224 -> 7 layout."""
    check_sizes("mobilenet_v1", num_classes, in_channels)
    width_mult = check_width("mobilenet_v1", width_mult)
    if not isinstance(cifar, bool):
        raise UserError(f"mobilenet_v1: cifar must be true or false, got {cifar!r}")
    return MobileNetV1(num_classes, in_channels, width_mult, cifar)
