"""Pieces shared by the zoo families: weight init, conv-BN-ReLU, argument checks."""

from __future__ import annotations

from torch import nn

from amc.errors import UserError


def init_weights(model: nn.Module) -> nn.Module:
    """Standard init: Kaiming-normal convs (fan_out, ReLU), BN weight 1 / bias 0, small-normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` with 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def check_sizes(model: str, num_classes: int, in_channels: int) -> None:
    """Reject non-positive / non-integer class and channel counts with a ``UserError``."""
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{model}: {field} must be a positive integer, got {value!r}")


def check_width(model: str, width_mult: float) -> float:
    """``width_mult`` as a float, or a ``UserError`` when it is not a number > 0."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise UserError(f"{model}: width_mult must be a number > 0, got {width_mult!r}")
    return float(width_mult)


def scaled_width(channels: int, width_mult: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 8."""
    return max(8, int(round(channels * width_mult)))
