"""Repair a pruned copy: adaptive BatchNorm and least-squares reconstruction, and ``Repair``,
the one place that decides how a pruned copy is repaired for scoring and for export alike.

Without either repair, a magnitude-pruned network's BatchNorm statistics describe channels that
no longer exist, and every policy scores near chance (see the design's measurements).

A repair depends on the config and the device only (never on the fidelity check's verdict about
the reward's evaluation), so the model a search scores and the model ``amc export`` writes are
the same tensors.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

CALIBRATIONS = ("bn", "lsq", "both", "none")
ROWS_PER_UNKNOWN = 1.5  # least squares needs this many rows per weight of an output channel
POSITIONS_PER_IMAGE = 10  # sampled output positions per image and conv layer, at least


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (adaptive BN, EagleEye).

    Statistics are reset and averaged cumulatively (momentum None); only the BatchNorm layers
    run in training mode, so dropout and the weights are untouched. Image models run in
    channels_last and are handed back in the usual layout. ``dtype`` (bfloat16) runs the
    forward pass under autocast; the statistics stay fp32 buffers, accumulated in fp32.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    layout = torch.channels_last if batches[0].dim() == 4 else torch.contiguous_format
    model.to(memory_format=layout)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for x in batches:
                model(x.to(device, memory_format=layout))
    finally:
        model.to(memory_format=torch.contiguous_format)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()


def reconstructable(module: nn.Module) -> bool:
    """Least squares can refit plain (ungrouped) convs and linear layers."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def solve_least_squares(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None,
                        ridge: float = 0.0) -> torch.Tensor:
    """``argmin_W ||x W - y||^2 + lam ||W - prior||^2`` by the normal equations in fp64 (Cholesky).

    ``lam`` is ``ridge`` times the mean diagonal of ``x^T x`` (at least 1e-9 of it, which keeps
    all-zero columns of dead channels solvable). With few rows per unknown, or correlated inputs,
    plain least squares fits the reconstruction images with huge weights that cancel there and
    nowhere else; the ridge pulls those directions to ``prior`` (the pruned layer's own weights)
    instead. About 4x faster than ``torch.linalg.lstsq`` here.
    """
    x, y = x.double(), y.double()
    gram = x.T @ x
    lam = max(ridge, 1e-9) * gram.diagonal().mean() + 1e-30
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    rhs = x.T @ y if prior is None else x.T @ y + lam * prior.double()
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:  # numerically not positive definite: the slower, rank-revealing solver
        return torch.linalg.lstsq(system.cpu(), rhs.cpu()).solution.to(x.device)
    return torch.cholesky_solve(rhs, factor)


def _unknowns(module: nn.Module) -> int:
    """Weights per output channel: what one least-squares column solves for."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels * math.prod(module.kernel_size)


def _patches(module: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N * P, C * kh * kw): the input patch under each sampled output position, unfold's order.

    Gathered directly at the P sampled positions per image instead of unfolding the whole map.
    """
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    width = (x.shape[3] + 2 * module.padding[1] - dw * (kw - 1) - 1) // sw + 1
    x = nn.functional.pad(x, (module.padding[1], module.padding[1], module.padding[0], module.padding[0]))
    oy, ox = positions // width, positions % width  # (N, P)
    rows = oy[:, :, None] * sh + torch.arange(kh, device=x.device) * dh  # (N, P, kh)
    cols = ox[:, :, None] * sw + torch.arange(kw, device=x.device) * dw  # (N, P, kw)
    image = torch.arange(n, device=x.device)[:, None, None, None]
    picked = x[image, :, rows[:, :, :, None], cols[:, :, None, :]]  # (N, P, kh, kw, C)
    return picked.permute(0, 1, 4, 2, 3).reshape(-1, c * kh * kw)


def _inputs(module: nn.Module, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The rows a layer's output is a linear function of: sampled patches or linear inputs."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return _patches(module, x, positions)


def _outputs(module: nn.Module, y: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The layer's output rows at the sampled positions, without its bias (the bias is kept)."""
    if isinstance(module, nn.Linear):
        rows = y.reshape(-1, y.shape[-1])
    else:
        rows = y.flatten(2).gather(2, positions[:, None, :].expand(-1, y.shape[1], -1)).transpose(1, 2)
        rows = rows.reshape(-1, y.shape[1])
    return rows - module.bias if module.bias is not None else rows


class Reconstructor:
    """AMC's least-squares step: refit a pruned copy's layers so their outputs match the original's.

    For each layer, ``W = argmin ||Y - X W||``: Y is the original layer's output (bias removed)
    at sampled positions, X the pruned model's input patches at the same positions (any kernel
    size). The original's outputs depend on no policy, so they are computed once per layer and
    kept; each policy then costs one forward pass of the pruned copy (channels_last, fp32), in
    which a pre-hook refits each layer just before it runs (each fit sees the inputs of the
    already-refit layers).

    A layer is refit only when the images give at least ``ROWS_PER_UNKNOWN`` rows per weight of
    an output channel: a Linear layer gets one row per image, and fitting 1,152 inputs from 512
    images fits noise (a pretrained MNIST CNN fell from 96.7% to 50.3% test top-1 that way).
    Convs sample enough positions per image for their full input; a layer that still has too
    few rows keeps its pruned weights, with a warning.
    """

    def __init__(self, original: nn.Module, images: torch.Tensor, seed: int = 0, ridge: float = 0.0):
        self.original = original
        self.images = images
        self.seed = seed
        self.ridge = ridge
        self.positions: dict[str, torch.Tensor] = {}
        self.targets: dict[str, torch.Tensor] = {}

    def _sample(self, index: int, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        """Output positions per image for a conv (enough rows for its full input), None for a Linear."""
        if isinstance(module, nn.Linear):
            return None
        n, area = output.shape[0], output.shape[2] * output.shape[3]
        count = min(area, max(POSITIONS_PER_IMAGE, math.ceil(ROWS_PER_UNKNOWN * _unknowns(module) / n)))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.rand(n, area, generator=generator).argsort(dim=1)[:, :count].to(output.device)

    @torch.no_grad()
    def _capture(self, names: set[str]) -> None:
        """Run the original once and keep the output rows of the named layers."""
        hooks = []

        def capture(name: str, index: int):
            def hook(module, inputs, output):
                self.positions[name] = self._sample(index, module, output)
                self.targets[name] = _outputs(module, output, self.positions[name]).float()
            return hook

        self.original.eval()
        try:
            for index, (name, module) in enumerate(self.original.named_modules()):
                if name in names:
                    hooks.append(module.register_forward_hook(capture(name, index)))
            self.original(self.images)
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def __call__(self, pruned: nn.Module, layers: dict[str, torch.Tensor | None]) -> None:
        """Refit ``layers`` of ``pruned``: each maps to the original output channels it kept (None: all)."""
        missing = set(layers) - set(self.targets)
        if missing:
            self._capture(missing)

        def refit(name: str):
            def hook(module, inputs):
                x = _inputs(module, inputs[0], self.positions[name])
                if x.shape[0] < ROWS_PER_UNKNOWN * x.shape[1]:
                    warnings.warn(
                        f"least squares: {len(self.images)} reconstruction images are too few to refit {name} "
                        f"(it needs {ROWS_PER_UNKNOWN:g} rows per input); it keeps its pruned weights. "
                        "Raise search.reconstruct_samples to refit it.")
                    return
                y = self.targets[name]
                kept = layers[name]
                if kept is not None:
                    y = y[:, kept.to(y.device)]
                prior = module.weight.reshape(module.weight.shape[0], -1).T.to(x.device) if self.ridge else None
                solution = solve_least_squares(x, y, prior, self.ridge)
                module.weight.copy_(solution.T.reshape(module.weight.shape).to(module.weight))
            return hook

        pruned.eval()
        layout = torch.channels_last if self.images.dim() == 4 else torch.contiguous_format
        pruned.to(memory_format=layout)
        hooks = [module.register_forward_pre_hook(refit(name))
                 for name, module in pruned.named_modules() if name in layers]
        try:
            pruned(self.images.contiguous(memory_format=layout))
        finally:
            for hook in hooks:
                hook.remove()
            pruned.to(memory_format=torch.contiguous_format)


def reconstruct(original: nn.Module, pruned: nn.Module, layers: dict[str, torch.Tensor | None],
                images: torch.Tensor, seed: int = 0, ridge: float = 0.0) -> None:
    """Refit ``layers`` of ``pruned`` by least squares against ``original`` (see ``Reconstructor``)."""
    Reconstructor(original, images, seed, ridge)(pruned, layers)


class Repair:
    """How every pruned copy is repaired, for the reward and for export: configured once.

    ``calibration``: ``lsq`` refits the layers whose inputs were cut (least squares on
    ``recon_images``), ``bn`` re-estimates BatchNorm statistics on ``calib_batches``, ``both``
    does the first then the second, ``none`` leaves the magnitude-pruned weights. ``dtype``
    (bfloat16, where the hardware has it) runs adaptive BN's forward passes in bf16 with fp32
    statistics; least squares is always fp32.
    """

    def __init__(self, original: nn.Module, calibration: str = "none", calib_batches: Sequence[torch.Tensor] = (),
                 recon_images: torch.Tensor | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                 ridge: float = 0.0):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if calibration in ("lsq", "both") and recon_images is None:
            raise ValueError("least-squares calibration needs reconstruction images")
        self.calibration = calibration
        self.calib_batches = list(calib_batches) if calibration in ("bn", "both") else []
        self.reconstructor = Reconstructor(original, recon_images, seed, ridge) if calibration in ("lsq", "both") else None
        self.dtype = dtype

    def in_fp32(self) -> "Repair":
        """The same repair with adaptive BN in fp32 (the reference the fast path is compared with)."""
        twin = copy.copy(self)
        twin.dtype = None
        return twin

    def __call__(self, pruned: nn.Module,
                 refit_layers: dict[str, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Repair ``pruned`` in place; returns the seconds spent per step (reconstruct, calibrate)."""
        start = time.perf_counter()
        if self.reconstructor is not None and refit_layers:
            self.reconstructor(pruned, refit_layers)
        timings = {"reconstruct": time.perf_counter() - start}
        start = time.perf_counter()
        recalibrate_batchnorm(pruned, self.calib_batches, self.dtype)
        timings["calibrate"] = time.perf_counter() - start
        return timings
