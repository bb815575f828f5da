"""The fast inference path: how every reward (and every measured accuracy) is evaluated.

A repaired model is evaluated with its BatchNorm folded into the preceding convolution, in
channels_last when it has convolutions, under ``torch.inference_mode`` and, for rewards, in
reduced precision where the hardware runs it natively (bf16 on CPUs with avx512_bf16 / AMX;
fp16 or bf16 on GPUs). Results a user reads stay fp32 (``precision="fp32"``): folding and the
layout change fp32 logits by rounding only.

The batch size is measured once per model and precision (the fastest of a few candidates) and
kept for the run. It only changes speed: per-image results do not depend on it (tested), so a
resumed search scores a policy exactly as the original run did. The layout is decided by rule,
not by timing, because channels_last and the default layout round differently in bf16.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from amc.errors import UserError
from amc.metrics import accuracy

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_SIZES = (64, 128, 256, 512)  # candidates of the batch-size measurement
TUNING_IMAGES = 512  # images timed per candidate batch size


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (avx512_bf16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def native_precisions(device: torch.device) -> list[str]:
    """The reduced precisions this device runs natively, in the order ``auto`` tries them."""
    if device.type == "cuda":
        return ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    return ["bf16"] if device.type == "cpu" and cpu_has_native_bf16() else []


def candidate_precisions(requested: str, device: torch.device) -> list[str]:
    """The reduced precisions the fidelity check may accept (empty: fp32 only)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        return native_precisions(device)
    if requested == "fp16" and device.type == "cpu":
        raise UserError("fp16 has no fast kernels on a CPU (it runs many times slower than fp32); "
                        "use auto, bf16 or fp32", field="search.precision")
    return [] if requested == "fp32" else [requested]


def repair_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """Adaptive BN's forward passes run in bf16 where the device has it natively, unless the
    config asks for fp32 throughout. Never fp16: its range could overflow the statistics."""
    return torch.bfloat16 if requested != "fp32" and "bf16" in native_precisions(device) else None


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names that can be folded: the BN reads only that conv's output
    and each runs once. Found by tracing the model with torch.fx; a model that cannot be traced
    is evaluated unfolded (still correct, only slower)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- fx raises many types on untraceable Python; folding is optional
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1
                and calls[source.target] == 1 and calls[node.target] == 1):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> nn.Module:
    """Fold each BatchNorm of ``pairs`` into its conv (in place; the BN becomes an Identity).

    Only for evaluation: the folded conv computes ``bn(conv(x))`` with the BN's running statistics.
    """
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if bn.running_mean is None:  # normalises with batch statistics: nothing fixed to fold
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
    return model


def uses_channels_last(model: nn.Module) -> bool:
    """channels_last for convolutional models: faster on CPU (oneDNN) and on GPU tensor cores."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare(model: nn.Module, pairs: Iterable[tuple[str, str]], channels_last: bool) -> nn.Module:
    """``model`` (modified in place) ready for the fast path: BN folded, in its layout, eval mode."""
    fold_batchnorm(model.eval(), pairs)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fp32_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 / top-5 in fp32 on the fast path (a folded copy; ``model`` is left as it is)."""
    fast = copy.deepcopy(model)
    channels_last = uses_channels_last(fast)
    return accuracy(prepare(fast, batchnorm_pairs(model), channels_last), batches, None, channels_last)


class FastEval:
    """Top-1 / top-5 of models on a fixed image set (the reward-val subset), on the fast path.

    ``precision`` may be changed between evaluations (the fidelity check does). ``batch_size``
    None measures the fastest batch size on the first model evaluated in each precision.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pairs: list[tuple[str, str]],
                 channels_last: bool, precision: str = "fp32", batch_size: int | None = None):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
        self.channels_last = channels_last and images.dim() == 4
        self.images = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        self.labels = labels
        self.pairs = pairs
        self.precision = precision
        self.fixed_batch_size = batch_size
        self.measured: dict[str, int] = {}  # precision -> fastest batch size

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        end = len(self.images) if limit is None else min(limit, len(self.images))
        for start in range(0, end, batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]

    def batch_size(self, model: nn.Module) -> int:
        """The configured batch size, or the fastest candidate measured on ``model`` (prepared)."""
        if self.fixed_batch_size is not None:
            return self.fixed_batch_size
        if self.precision not in self.measured:
            self.measured[self.precision] = self._fastest(model)
        return self.measured[self.precision]

    def _fastest(self, model: nn.Module) -> int:
        n = len(self.images)
        candidates = [b for b in BATCH_SIZES if b < n] + [min(n, BATCH_SIZES[-1])]
        per_image = {}
        for size in dict.fromkeys(candidates):
            images = max(size, min(n, TUNING_IMAGES))
            accuracy(model, self.batches(size, limit=size), DTYPES[self.precision], self.channels_last)  # warm-up
            start = time.perf_counter()
            accuracy(model, self.batches(size, limit=images), DTYPES[self.precision], self.channels_last)
            per_image[size] = (time.perf_counter() - start) / images
        return min(per_image, key=per_image.get)

    def accuracy(self, model: nn.Module, inplace: bool = False) -> dict[str, float]:
        """Top-1 / top-5 of ``model`` in the current precision (``inplace``: fold ``model`` itself)."""
        model = prepare(model if inplace else copy.deepcopy(model), self.pairs, self.channels_last)
        return accuracy(model, self.batches(self.batch_size(model)), DTYPES[self.precision], self.channels_last)
