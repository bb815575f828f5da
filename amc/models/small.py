"""Small models: ``demo_cnn`` for the 8x8 digits demo and ``branchy_cnn`` (concat + residual) for tests."""

from __future__ import annotations

import torch
from torch import nn

from amc.models.common import check_sizes, conv_bn_relu, init_weights


class DemoCNN(nn.Module):
    """Four conv-BN-ReLU layers (16, 32, pool, 64, 64), global average pool, linear; made for 8x8 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 16),
            *conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            *conv_bn_relu(32, 64),
            *conv_bn_relu(64, 64),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BranchBlock(nn.Module):
    """Two parallel branches (3x3 and 1x1, ``channels // 2`` each) joined by ``torch.cat``, then a
    1x1 conv-BN and a residual add with the block input, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch_a = conv_bn_relu(channels, half, 3)
        self.branch_b = conv_bn_relu(channels, channels - half, 1)
        self.merge = nn.Conv2d(channels, channels, 1, bias=False)
        self.merge_bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.relu(x + self.merge_bn(self.merge(y)))


class BranchyCNN(nn.Module):
    """stem conv -> BranchBlock(16) -> stride-2 conv -> BranchBlock(32) -> pool -> linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 16)
        self.block1 = BranchBlock(16)
        self.down = conv_bn_relu(16, 32, 3, stride=2)
        self.block2 = BranchBlock(32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def demo_cnn(num_classes: int = 10, in_channels: int = 1) -> DemoCNN:
    """Tiny CNN for the 8x8 sklearn digits (~0.06 M parameters)."""
    check_sizes("demo_cnn", num_classes, in_channels)
    return DemoCNN(num_classes, in_channels)


def branchy_cnn(num_classes: int = 10, in_channels: int = 3) -> BranchyCNN:
    """Small net with a concatenation and residual adds, for graph/pruning tests on branches."""
    check_sizes("branchy_cnn", num_classes, in_channels)
    return BranchyCNN(num_classes, in_channels)
