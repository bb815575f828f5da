"""CIFAR ResNets (He et al. 2016, section 4.2) and the matching plain (shortcut-free) nets.

Three stages of ``n`` BasicBlocks with 16/32/64 channels, depth = 6n + 2. Where a block changes
shape (first block of stages 2 and 3) the shortcut is a 1x1 stride-2 conv + BN projection, so
the graph is made of ordinary modules that torch-pruning can trace; elsewhere it is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from amc.errors import UserError
from amc.models.common import check_sizes, init_weights

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, (+ shortcut), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=True)
        self.use_shortcut = shortcut
        if shortcut and (stride != 1 or in_ch != out_ch):
            self.downsample: nn.Module | None = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.use_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu2(out)


class CifarResNet(nn.Module):
    """Stem conv 3x3/16, three stages of ``n`` blocks, global average pool, linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: bool = True):
        super().__init__()
        kind = "resnet" if shortcut else "plain"
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise UserError(f"{kind}: depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth!r}")
        check_sizes(f"{kind}{depth}", num_classes, in_channels)
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = STAGE_WIDTHS[0]
        stages = []
        for i, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride=stride, shortcut=shortcut))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (~0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (~0.46 M parameters)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (~0.85 M parameters)."""
    return CifarResNet(56, num_classes, in_channels)


def plain20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Plain-20: ResNet-20's layers without any shortcut."""
    return CifarResNet(20, num_classes, in_channels, shortcut=False)
