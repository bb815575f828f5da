"""Analytic cost of a pruned model as a function of the channels each unit keeps.

MACs follow AMC's convention (and thop's formulas): conv and linear layers only,
``positions * c_out * c_in / groups * k*k``. Parameters are every parameter of the model.
Both are exact: for a kept-channel vector they equal what thop counts on the physically
pruned model, with no forward pass, so budget clipping can call them thousands of times.

A layer's input (or output) channel count is its original count minus what each unit feeding
it removes. Because a unit always keeps its most important channels, the number of entries a
member loses is a fixed table over the unit's keep count, precomputed once; this stays exact
through concat, split and flatten, where one root channel maps to several entries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from torch import nn

from amc.graph import LayerInfo, Member, PrunableGraph


class CostModel:
    """MACs and parameter counts of any policy, without touching the model."""

    def __init__(self, graph: PrunableGraph, model: nn.Module):
        self.graph = graph
        self.layers: list[LayerInfo] = list(graph.layers.values())
        # (layer or module name, dim) -> [(unit index, removed table)]
        self._shrinks: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = defaultdict(list)
        # other members of units (BatchNorm, LayerNorm, PReLU, unwrapped parameters):
        # name -> (params per channel, channels)
        self._channel_params: dict[str, tuple[int, int]] = {}
        for unit in graph.units:
            for member in unit.members:
                self._shrinks[(member.module, member.dim)].append((unit.index, unit.removed_count_table(member)))
                if member.module not in graph.layers:
                    counts = _params_per_channel(model, member)
                    if counts:
                        self._channel_params[member.module] = counts
        counted = sum(layer.weight_count + layer.has_bias * layer.out_channels for layer in self.layers)
        counted += sum(per_channel * channels for per_channel, channels in self._channel_params.values())
        self._fixed_params = sum(p.numel() for p in model.parameters()) - counted
        self.full_keep = [unit.channels for unit in graph.units]
        self.total_macs = self.macs(self.full_keep)
        self.total_params = self.params(self.full_keep)

    def _removed(self, name: str, dim: str, keep: Sequence[int]) -> int:
        return sum(int(table[keep[u]]) for u, table in self._shrinks.get((name, dim), ()))

    def layer_channels(self, layer: LayerInfo, keep: Sequence[int]) -> tuple[int, int, int]:
        """(in channels, out channels, groups) of ``layer`` after pruning."""
        c_out = layer.out_channels - self._removed(layer.name, "out", keep)
        if layer.depthwise:
            return c_out, c_out, c_out
        return layer.in_channels - self._removed(layer.name, "in", keep), c_out, layer.groups

    def layer_macs(self, layer: LayerInfo, keep: Sequence[int]) -> int:
        c_in, c_out, groups = self.layer_channels(layer, keep)
        return layer.out_positions * c_out * (c_in // groups) * layer.kernel_area

    def layer_params(self, layer: LayerInfo, keep: Sequence[int]) -> int:
        c_in, c_out, groups = self.layer_channels(layer, keep)
        return c_out * (c_in // groups) * layer.kernel_area + layer.has_bias * c_out

    def macs(self, keep: Sequence[int]) -> int:
        return sum(self.layer_macs(layer, keep) for layer in self.layers)

    def params(self, keep: Sequence[int]) -> int:
        total = self._fixed_params + sum(self.layer_params(layer, keep) for layer in self.layers)
        for name, (per_channel, channels) in self._channel_params.items():
            total += per_channel * (channels - self._removed(name, "out", keep))
        return total


def _params_per_channel(model: nn.Module, member: Member) -> tuple[int, int] | None:
    """(params per channel, channels) of an unwrapped parameter, or of a norm-like module whose
    parameters all index channels (on their first dimension)."""
    if member.param_dim is not None:
        param = model.get_parameter(member.module)
        channels = param.shape[member.param_dim]
        return param.numel() // channels, channels
    params = list(model.get_submodule(member.module).parameters(recurse=False))
    if not params or len({p.shape[0] for p in params}) != 1:
        return None
    channels = params[0].shape[0]
    return sum(p.numel() for p in params) // channels, channels
