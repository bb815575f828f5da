"""Measured costs and accuracy of a model: thop MACs, parameters, latency, top-k accuracy."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager

import thop
import torch
from thop.vision.basic_hooks import count_convNd, count_linear, zero_ops
from torch import nn


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass (batch 1) as thop counts them, conv and linear layers only.

    AMC, its paper and its official code count conv and fully connected layers; thop would
    also count BatchNorm and pooling, so those leaf types are registered as zero-cost here
    (containers must stay unregistered: thop does not descend into a module it has a rule for).
    """
    probe = copy.deepcopy(model).eval()
    others = {
        type(m): zero_ops for m in probe.modules()
        if not isinstance(m, (nn.Conv2d, nn.Linear)) and next(m.children(), None) is None
    }
    # subclasses (the quantized layers) count as their base class; thop matches exact types only
    others.update({type(m): count_convNd if isinstance(m, nn.Conv2d) else count_linear for m in probe.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) not in (nn.Conv2d, nn.Linear)})
    device = next(probe.parameters()).device
    macs, _ = thop.profile(probe, inputs=(torch.zeros(input_shape, device=device),), custom_ops=others, verbose=False)
    return int(macs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, threads: int = 1,
    warmup: int = 5, repeats: int = 20,
) -> float:
    """Median wall time of one forward pass in milliseconds, after ``warmup`` untimed passes."""
    model = model.eval()
    device = next(model.parameters()).device
    x = torch.randn((batch_size, *input_shape[1:]), device=device)
    times = []
    with torch_threads(threads):
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) over ``batches``; NaN if any logit is not finite."""
    model = model.eval()
    device = next(model.parameters()).device
    correct1 = correct5 = seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        if not torch.isfinite(logits).all():
            return {"top1": float("nan"), "top5": float("nan")}
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        seen += len(y)
    return {"top1": correct1 / max(seen, 1), "top5": correct5 / max(seen, 1)}
