"""Repair a pruned copy before it is scored: adaptive BatchNorm and least-squares reconstruction.

Without either, a magnitude-pruned network's BatchNorm statistics describe channels that no
longer exist, and every policy scores near chance (see the design's measurements).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (adaptive BN, EagleEye).

    Statistics are reset and averaged cumulatively (momentum None); only the BatchNorm layers
    run in training mode, so dropout and the weights are untouched.
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
    for x in batches:
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()


def _rows_at(columns: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, D, L) -> (N * P, D): the D-vectors at each image's sampled positions."""
    picked = columns.gather(2, positions[:, None, :].expand(-1, columns.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, columns.shape[1])


def _layer_inputs(module: nn.Module, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The rows a layer's output is a linear function of: im2col patches or linear inputs."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return _rows_at(F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride), positions)


def _layer_outputs(module: nn.Module, y: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The layer's output rows at the same positions, without its bias (the bias is kept)."""
    rows = y.reshape(-1, y.shape[-1]) if isinstance(module, nn.Linear) else _rows_at(y.flatten(2), positions)
    return rows - module.bias if module.bias is not None else rows


@torch.no_grad()
def reconstruct(
    original: nn.Module, pruned: nn.Module, layers: dict[str, torch.Tensor | None], images: torch.Tensor,
    positions_per_image: int = 10, seed: int = 0,
) -> None:
    """Refit the named layers of ``pruned`` so their outputs match ``original``'s (AMC's step).

    ``layers`` maps each layer to refit to the original output channels it kept (None: all).

    For each layer, ``W = argmin ||Y - X W||``: Y is the original layer's output (bias removed)
    at sampled positions, X the pruned model's input patches at the same positions (unfold, so
    any kernel size works). Layers are refit in forward order inside one pass of the pruned
    model (a pre-hook refits a layer just before it runs), so each fit sees the inputs produced
    by the already-refit layers before it.
    """
    names = set(layers)
    originals = dict(original.named_modules())
    targets: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    hooks = []

    def capture(name: str):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d) and name not in positions:
                n, _, h, w = output.shape
                count = min(positions_per_image, h * w)
                positions[name] = torch.stack([torch.randperm(h * w, generator=generator)[:count] for _ in range(n)]).to(output.device)
            rows = _layer_outputs(module, output, positions.get(name)).double()
            targets[name] = rows if layers[name] is None else rows[:, layers[name].to(rows.device)]
        return hook

    def refit(name: str):
        def hook(module, inputs):
            x = _layer_inputs(module, inputs[0], positions.get(name)).double()
            solution = torch.linalg.lstsq(x.cpu(), targets[name].cpu()).solution
            module.weight.copy_(solution.T.reshape(module.weight.shape).to(module.weight))
        return hook

    original.eval()
    pruned.eval()
    try:
        for name in names:
            hooks.append(originals[name].register_forward_hook(capture(name)))
        original(images)
        for hook in hooks:
            hook.remove()
        hooks = [module.register_forward_pre_hook(refit(name))
                 for name, module in pruned.named_modules() if name in names]
        pruned(images)
    finally:
        for hook in hooks:
            hook.remove()


def reconstructable(module: nn.Module) -> bool:
    """Least squares can refit plain (ungrouped) convs and linear layers."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
