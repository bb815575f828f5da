"""Measured costs and accuracy of a model: thop MACs, parameters, latency, top-k accuracy and
cross-entropy.

The reward metric (``search.reward_metric``) is higher-is-better with error = 1 - metric: top-1
or top-5 accuracy, or for ``nll`` one minus the mean cross-entropy of the true class, so that the
error is the cross-entropy itself."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import thop
import torch
import torch.nn.functional as F
from thop.vision.basic_hooks import count_convNd, count_linear, zero_ops
from torch import nn

from amc.config import LatencyConfig


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


MIN_SAMPLE_S = 0.001  # a timed sample repeats the forward pass until it lasts this long
MIN_SAMPLES = 5  # samples taken whatever the time limit
MAX_PHASE_S = 1.0  # warmup, and sampling, stop after this long once their minimum is done


@torch.inference_mode()
def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, threads: int = 1,
    warmup: int = 5, repeats: int = 20,
) -> float:
    """Median wall time of one forward pass of a ``batch_size`` batch, in milliseconds.

    ``warmup`` untimed passes come first (allocator, caches, lazy kernel selection). Each of the
    ``repeats`` samples then times back-to-back passes lasting at least ``MIN_SAMPLE_S``: a
    sub-millisecond model timed one call at a time measures the timer and the scheduler. The
    median ignores samples another process interrupted. A slow model (a large batch on a CPU)
    stops warming up, and sampling, after ``MAX_PHASE_S`` each, with at least one warmup pass
    and ``MIN_SAMPLES`` samples (or ``repeats`` when fewer).
    """
    model = model.eval()
    device = next(model.parameters()).device
    x = torch.randn((batch_size, *input_shape[1:]), device=device)

    def timed(passes: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(passes):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch_threads(threads):
        spent = 0.0
        for _ in range(warmup):
            spent += timed(1)
            if spent >= MAX_PHASE_S:
                break
        one = timed(1)  # also the last warmup pass
        passes = max(1, math.ceil(MIN_SAMPLE_S / max(one, 1e-9)))
        samples: list[float] = []
        spent = 0.0
        while len(samples) < repeats and (spent < MAX_PHASE_S or len(samples) < MIN_SAMPLES):
            elapsed = timed(passes)
            spent += elapsed
            samples.append(elapsed / passes)
    return 1000.0 * statistics.median(samples)


def latency_report(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig) -> dict[str, float]:
    """``latency_ms`` at ``cfg.batch_size`` and ``latency_ms_b<N>`` at ``cfg.large_batch`` (ms per batch)."""
    report = {}
    for key, batch in (("latency_ms", cfg.batch_size), (f"latency_ms_b{cfg.large_batch}", cfg.large_batch)):
        report[key] = measure_latency(model, input_shape, batch, cfg.threads, cfg.warmup, cfg.repeats)
    return report


@torch.inference_mode()
def accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) and ``nll``, the mean cross-entropy of the
    true class, over ``batches``; NaN if any logit is not finite.

    ``dtype`` (bfloat16 / float16) runs the model under autocast; ``channels_last`` feeds the
    images in that layout (the model should be in it too). The defaults are plain fp32.
    """
    model = model.eval()
    device = next(model.parameters()).device
    layout = torch.channels_last if channels_last else torch.preserve_format
    correct1 = correct5 = seen = 0
    nll = 0.0
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)
            logits = model(x)
            if not torch.isfinite(logits).all():
                return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan")}
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(y[:, None])
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            nll += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            seen += len(y)
    return {"top1": correct1 / max(seen, 1), "top5": correct5 / max(seen, 1), "nll": nll / max(seen, 1)}


def metric_value(stats: dict[str, float], metric: str) -> float:
    """The reward metric (higher is better, error = 1 - metric) from ``accuracy``'s statistics."""
    return 1.0 - stats["nll"] if metric == "nll" else stats[metric]


@torch.inference_mode()
def per_image_metric(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     metric: str = "top1") -> np.ndarray:
    """Per image, in data order (fp32): hit (1.0) or miss (0.0) in top1 / top5, or for nll one
    minus the image's cross-entropy; their mean is ``metric_value`` on the same images."""
    model = model.eval()
    device = next(model.parameters()).device
    k = 5 if metric == "top5" else 1
    values = []
    for x, y in batches:
        logits, y = model(x.to(device)).float(), y.to(device)
        if metric == "nll":
            values.append((1.0 - F.cross_entropy(logits, y, reduction="none")).cpu())
        else:
            values.append(logits.topk(min(k, logits.shape[1]), dim=1).indices.eq(y[:, None]).any(dim=1).cpu())
    return torch.cat(values).double().numpy() if values else np.zeros(0)


def in_units(difference: float, metric: str) -> str:
    """A difference of the run's metric in words: points of accuracy, nats of cross-entropy, or
    the user's metric's own units."""
    if metric in ("top1", "top5"):
        return f"{100 * difference:.2f} points"
    return f"{difference:.4f} nats" if metric == "nll" else f"{difference:.4g}"
