"""What a policy acts on: channel units or fine-grained layers, with their costs.

A space is the swappable part between the environment and the model: it lists the steps a
policy sets (size, the values each step may take, the layer the state describes), prices a
policy in the budgeted resource analytically, and applies a policy to a copy of the model.
Bit widths (``amc.quant_spaces``) are spaces too, walked by the same environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import nn

import numpy as np
import torch

from amc.budget import allowed_counts, nearest_allowed
from amc.calibration import reconstructable
from amc.cost import CostModel
from amc.graph import LayerInfo, PrunableGraph
from amc.pruning import apply_masks, channel_plan, fine_grained_masks, keep_count, prune_channels


class Choice(Protocol):
    """The values one step of a policy may take, and how an action in [0, 1] picks one."""

    size: int  # the untouched value: every channel or weight, or 32 bits
    step: int  # values are multiples of this (or ``size``)
    floor: int  # the smallest value an action maps to
    ceiling: int  # the largest
    allowed: np.ndarray  # every value the step may take, ascending (budget clipping bisects over these)
    bound_text: str  # what sets the floor, for messages ("lbound 0.2", "min_bits 2")

    def pick(self, action: float) -> int: ...
    def ratio(self, value: int) -> float: ...  # the fraction of ``size`` kept (episode logs, plots)
    def state(self, value: int) -> float: ...  # the state's a_{t-1}, in [0, 1]


class RatioChoice:
    """Keep a fraction of ``size`` things: action -> preserve ratio in [lbound, rbound] -> rounded count."""

    def __init__(self, size: int, step: int, lbound: float, rbound: float):
        self.size, self.step, self.lbound, self.rbound = size, step, lbound, rbound
        self.floor = keep_count(lbound, size, step)
        self.ceiling = keep_count(rbound, size, step)
        self.allowed = allowed_counts(size, step)
        self.bound_text = f"lbound {lbound:g}"

    def pick(self, action: float) -> int:
        ratio = self.lbound + action * (self.rbound - self.lbound)
        return min(keep_count(ratio, self.size, self.step), self.ceiling)

    def ratio(self, value: int) -> float:
        return value / self.size

    state = ratio


class AnchoredChoice:
    """Another choice re-centred on a rule's value: action 0.5 picks ``anchor``, the ends its value
    scaled by 2 ** -``spread`` and 2 ** ``spread``, snapped to the nearest allowed value within the
    inner choice's bounds. The walk then explores around a policy known to fit the budget well
    instead of anywhere in [lbound, rbound] (``search.anchor``; docs/benchmarks.md, sessions 16-17)."""

    def __init__(self, inner: Choice, anchor: int, spread: float):
        self.anchor, self.spread = anchor, spread
        self.size, self.step, self.floor, self.ceiling = inner.size, inner.step, inner.floor, inner.ceiling
        self.allowed, self.bound_text = inner.allowed, inner.bound_text
        self.ratio, self.state = inner.ratio, inner.state

    def pick(self, action: float) -> int:
        wanted = self.anchor * 2.0 ** (self.spread * (2.0 * action - 1.0))
        return nearest_allowed(wanted, self.allowed, self.floor, self.ceiling)


class Space(Protocol):
    kind: str
    names: list[str]
    sizes: list[int]  # each step's untouched value: the policy that changes nothing
    round_to: int  # keep counts are multiples of this (or the whole unit)
    layers: list[LayerInfo]  # the layer each step's state describes
    unit_costs: list[float]  # the state's FLOPs[t] (or weights, fine-grained)
    reward_measure: str  # the measure in -Error * log(cost), whatever resource is budgeted
    step_flags: dict[str, list[float]]  # extra per-step state features, appended after the 11 (none here)

    def choices(self, lbound: float, rbound: float) -> list[Choice]: ...
    def cost(self, keep: Sequence[int]) -> float: ...
    def measures(self, keep: Sequence[int]) -> dict[str, float]: ...
    def apply(self, model: nn.Module, keep: Sequence[int]) -> nn.Module: ...
    def plan(self, keep: Sequence[int]) -> dict: ...
    def refit_layers(self, keep: Sequence[int]) -> dict[str, torch.Tensor | None]: ...


class ChannelSpace:
    """Structured channel pruning of dependency-group units."""

    kind = "channel"
    reward_measure = "macs"

    def __init__(self, model: nn.Module, graph: PrunableGraph, resource: str = "flops",
                 round_to: int = 1, latency=None):
        self.graph = graph
        self.cost_model = CostModel(graph, model)
        self.resource = resource
        self.latency = latency
        self.names = [u.name for u in graph.units]
        self.sizes = [u.channels for u in graph.units]
        self.round_to = round_to
        self.layers = [u.layer for u in graph.units]
        producers = [{m.module for m in u.members if m.dim == "out" and m.module in graph.layers}
                     for u in graph.units]
        self.unit_costs = [float(sum(graph.layers[n].macs for n in names)) for names in producers]
        self.step_flags: dict[str, list[float]] = {}
        self._model = model
        if resource == "latency" and latency is None:
            raise ValueError("the latency resource needs a latency model")

    def choices(self, lbound: float, rbound: float) -> list[Choice]:
        return [RatioChoice(size, self.round_to, lbound, rbound) for size in self.sizes]

    def cost(self, keep: Sequence[int]) -> float:
        if self.resource == "flops":
            return float(self.cost_model.macs(keep))
        if self.resource == "params":
            return float(self.cost_model.params(keep))
        return self.latency.predict(self.cost_model, keep)

    def measures(self, keep: Sequence[int]) -> dict[str, float]:
        out = {"macs": float(self.cost_model.macs(keep)), "params": float(self.cost_model.params(keep))}
        if self.latency is not None:
            out["latency_ms"] = self.latency.predict(self.cost_model, keep)
        return out

    def apply(self, model: nn.Module, keep: Sequence[int]) -> nn.Module:
        return prune_channels(model, self.graph, keep, inplace=True)

    def plan(self, keep: Sequence[int]) -> dict:
        return {"kind": self.kind, "channels": channel_plan(self.graph, keep)}

    def refit_layers(self, keep: Sequence[int]) -> dict[str, torch.Tensor | None]:
        """Layers whose input channels the policy cuts -> the output channels each keeps."""
        modules = dict(self._model.named_modules())
        cut: set[str] = set()
        removed_out: dict[str, set[int]] = {}
        for unit, k in zip(self.graph.units, keep):
            if k == unit.channels:
                continue
            removed_roots = unit.removed_channels(k)
            for m in unit.members:
                if m.module not in self.graph.layers:
                    continue
                if m.dim == "in":
                    cut.add(m.module)
                else:
                    removed_out.setdefault(m.module, set()).update(m.entries_of(removed_roots).tolist())
        layers = {}
        for name, info in self.graph.layers.items():  # forward order
            if name in cut and reconstructable(modules[name]):
                gone = removed_out.get(name)
                layers[name] = None if not gone else torch.as_tensor(
                    np.setdiff1d(np.arange(info.out_channels), sorted(gone)))
        return layers


class FineGrainedSpace:
    """Unstructured magnitude pruning: one density per conv / linear layer, budget on non-zeros."""

    kind = "fine_grained"
    reward_measure = "params"

    def __init__(self, model: nn.Module, graph: PrunableGraph):
        self.graph = graph
        self.layers = list(graph.layers.values())
        self.names = [layer.name for layer in self.layers]
        self.sizes = [layer.weight_count for layer in self.layers]
        self.round_to = 1
        self.unit_costs = [float(s) for s in self.sizes]
        self.step_flags: dict[str, list[float]] = {}
        total = sum(p.numel() for p in model.parameters())
        self._fixed = total - sum(self.sizes)  # biases, norms: never pruned
        self._macs = float(sum(layer.macs for layer in self.layers))

    def choices(self, lbound: float, rbound: float) -> list[Choice]:
        return [RatioChoice(size, self.round_to, lbound, rbound) for size in self.sizes]

    def cost(self, keep: Sequence[int]) -> float:
        return float(self._fixed + sum(keep))

    def measures(self, keep: Sequence[int]) -> dict[str, float]:
        return {"macs": self._macs, "params": self.cost(keep)}

    def apply(self, model: nn.Module, keep: Sequence[int]) -> nn.Module:
        return apply_masks(model, fine_grained_masks(model, self.names, keep), inplace=True)

    def plan(self, keep: Sequence[int]) -> dict:
        return {"kind": self.kind, "density": {n: k / s for n, k, s in zip(self.names, keep, self.sizes)}}

    def refit_layers(self, keep: Sequence[int]) -> dict[str, torch.Tensor | None]:
        return {}
