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

from amc.graph import Member, PrunableGraph


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
    removals: dict[tuple[str, str], tuple[Member, set[int]]] = {}
    units = {unit.name: unit for unit in graph.units}
    for name, kept in plan.items():
        unit = units[name]
        removed_roots = np.setdiff1d(np.arange(unit.channels), np.asarray(kept, dtype=np.int64))
        for member in unit.members:
            entry = removals.setdefault((member.module, member.dim), (member, set()))
            entry[1].update(member.entries_of(removed_roots).tolist())
    for member, idxs in removals.values():
        if idxs:
            _prune_member(pruned, member, sorted(idxs))
    return pruned


def _prune_member(model: nn.Module, member: Member, idxs: list[int]) -> None:
    """Remove entries ``idxs`` of one member's dimension: a module through its torch-pruning
    pruner, an unwrapped parameter by replacing it with the kept slice."""
    if member.param_dim is None:
        getattr(member.pruner, member.method)(model.get_submodule(member.module), idxs)
        return
    owner, _, attr = member.module.rpartition(".")
    param = model.get_parameter(member.module)
    kept = np.setdiff1d(np.arange(param.shape[member.param_dim]), idxs)
    sliced = param.detach().index_select(member.param_dim, torch.as_tensor(kept, device=param.device))
    setattr(model.get_submodule(owner), attr, nn.Parameter(sliced, requires_grad=param.requires_grad))


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
