"""Training loops: the base model, and fine-tuning a pruned one (optionally distilled)."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from amc.data import to_device

from amc.distributed import data_parallel, shuffle_epoch


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss, scaled by T^2 so its gradients match the hard loss."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


def fit(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, momentum: float = 0.9,
    weight_decay: float = 5e-4, label_smoothing: float = 0.0, teacher: nn.Module | None = None,
    temperature: float = 4.0, distill_weight: float = 0.9, desc: str = "train",
    progress: bool = True, masks: dict[str, torch.Tensor] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, seed: int = 0, max_steps: int | None = None,
) -> nn.Module:
    """SGD with a cosine schedule over ``epochs`` (or the first ``max_steps`` steps of them, the
    schedule then ending there); with ``teacher``, knowledge distillation.

    The loss is ``(1 - w) * CE + w * KD`` when distilling, plain cross-entropy otherwise;
    ``loss_fn(outputs, targets)`` replaces cross-entropy (another task than classification).
    ``masks`` (parameter name -> 0/1 tensor) are re-applied after every step, so weights that
    fine-grained pruning removed stay zero. Under ``torchrun`` (``amc.distributed.launched``) the
    model trains data-parallel, each process on its shard of ``loader`` (shuffled with ``seed``).
    """
    device = next(model.parameters()).device
    net, loader = data_parallel(model, loader, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=momentum > 0)
    steps = max(1, epochs * len(loader))
    if max_steps is not None:
        steps = min(steps, max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    if teacher is not None:
        teacher.eval()
    masked = [(p, masks[n].to(p)) for n, p in model.named_parameters() if n in masks] if masks else []
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    step = 0
    for epoch in range(epochs):
        if step == steps:
            break
        shuffle_epoch(loader, epoch)
        model.train()
        for x, y in islice(loader, steps - step):
            x, y = x.to(device, non_blocking=True), to_device(y, device)
            logits = net(x)
            if loss_fn is None:
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            else:
                loss = loss_fn(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(x)
                loss = (1 - distill_weight) * loss + distill_weight * distillation_loss(logits, soft, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for param, mask in masked:
                    param.mul_(mask)
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()

