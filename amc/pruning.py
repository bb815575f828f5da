"""Apply a whole policy to a model: channel pruning by units, or fine-grained masks.

A policy is a list of keep counts, one per unit (channels for channel pruning, weights for
fine-grained pruning). Channel pruning replays the units' recorded torch-pruning operations on
a copy of the model: the removals of all units are gathered per (module, dimension) first and
applied once, so indices never shift between units (a layer fed by a concat of two units loses
both units' channels in one call).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from amc.graph import PrunableGraph


def keep_count(ratio: float, size: int, step: int = 1) -> int:
    """Round ``ratio * size`` to the nearest multiple of ``step``, at least one step, at most ``size``."""
    if size <= step:
        return size
    multiples = int(np.floor(ratio * size / step + 0.5))
    return int(min(size, max(step, multiples * step)))


def channel_plan(graph: PrunableGraph, keep: Sequence[int]) -> dict[str, list[int]]:
    """Kept root channels of every unit that loses any, by unit name (the stored plan)."""
    return {
        unit.name: unit.kept_channels(k).tolist()
        for unit, k in zip(graph.units, keep) if k < unit.channels
    }


def prune_channels(
    model: nn.Module, graph: PrunableGraph, keep: Sequence[int], inplace: bool = False
) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with each unit cut to its keep count."""
    kept = {unit.name: unit.kept_channels(k) for unit, k in zip(graph.units, keep) if k < unit.channels}
    return apply_channel_plan(model, graph, kept, inplace=inplace)


def apply_channel_plan(
    model: nn.Module, graph: PrunableGraph, plan: dict[str, Sequence[int]], inplace: bool = False
) -> nn.Module:
    """Keep exactly the listed root channels of the named units; others stay whole."""
    pruned = model if inplace else copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    removals: dict[tuple[str, str], tuple[object, str, set[int]]] = {}
    units = {unit.name: unit for unit in graph.units}
    for name, kept in plan.items():
        unit = units[name]
        removed_roots = np.setdiff1d(np.arange(unit.channels), np.asarray(kept, dtype=np.int64))
        for member in unit.members:
            entry = removals.setdefault((member.module, member.dim), (member.pruner, member.method, set()))
            entry[2].update(member.entries_of(removed_roots).tolist())
    for (module_name, _), (pruner, method, idxs) in removals.items():
        if idxs:
            getattr(pruner, method)(modules[module_name], sorted(idxs))
    return pruned


def fine_grained_masks(
    model: nn.Module, layer_names: Sequence[str], keep: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ``keep[i]`` largest-magnitude weights of each layer."""
    modules = dict(model.named_modules())
    masks = {}
    for name, k in zip(layer_names, keep):
        weight = modules[name].weight.detach()
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        if k > 0:
            mask[torch.topk(weight.abs().flatten(), k, sorted=False).indices] = True
        masks[name] = mask.view_as(weight)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    """Zero the masked-out weights (the masks are baked in; the shapes stay)."""
    pruned = model if inplace else copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
    return pruned
