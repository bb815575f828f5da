"""Bit widths as a space: mixed-precision quantization (HAQ-style), alone or joint with channel pruning.

One space serves both modes, walked by the same environment and agent as channel pruning:

* ``quantize``: per conv / linear layer in forward order, one step for its weight bit width
  and, with activations, one for its input's;
* ``joint``: the same, with a pruning step (the channel unit's keep count) just before the
  bit-width steps of the layer that roots the unit.

A step's value is a keep count (``RatioChoice``) or a bit width (``BitsChoice``); the untouched
policy (``sizes``) keeps every channel at 32 bits. Costs are analytic and exact: ``size`` is
the bits of the packed weight codes (what the exported checkpoint stores), ``bitops`` is
MACs x weight bits x input bits on the pruned shapes, both summed over the layers.
Applying a policy prunes (joint: then repairs the copy as scoring does), folds BatchNorm and
fake-quantizes the layers (``amc.quantization``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from amc.cost import CostModel
from amc.errors import UserError
from amc.graph import LayerInfo, PrunableGraph
from amc.pruning import channel_plan, prune_channels
from amc.quantization import FULL_BITS, batchnorm_pairs, fold_batchnorm, packed_bytes, quantize_layers, weight_scales
from amc.spaces import ChannelSpace, Choice, RatioChoice

QUANT_MODES = ("quantize", "joint")


class BitsChoice:
    """A bit width in [min_bits, max_bits]: the action's range cut into equal bins, one per width (HAQ)."""

    size = FULL_BITS
    step = 1

    def __init__(self, min_bits: int, max_bits: int):
        self.floor, self.ceiling = min_bits, max_bits
        self.allowed = np.arange(min_bits, max_bits + 1)
        self.bound_text = f"min_bits {min_bits}"

    def pick(self, action: float) -> int:
        levels = self.ceiling - self.floor + 1
        return self.floor + min(int(action * levels), levels - 1)

    def ratio(self, value: int) -> float:
        return value / FULL_BITS  # the fraction of the fp32 storage (or of one operand's bits) kept

    def state(self, value: int) -> float:
        return value / self.ceiling


@dataclass(frozen=True)
class Step:
    role: str  # "channels" (a unit's keep count), "weight" or "input" (a layer's bit width)
    layer: LayerInfo
    unit: int = -1  # the unit a "channels" step sets


class MixedPrecisionSpace:
    """Bit widths per layer (``quantize``), or keep counts and bit widths (``joint``, with ``channels``)."""

    reward_measure = "bitops"  # the accuracy protocol's -Error * log(cost): bit operations play FLOPs' part

    def __init__(
        self, model: nn.Module, graph: PrunableGraph, resource: str, min_bits: int, max_bits: int,
        activations: bool, images: Callable[[], torch.Tensor], channels: ChannelSpace | None = None,
        repair: Callable[[nn.Module, dict], None] | None = None,
    ):
        if resource not in ("size", "bitops"):
            raise ValueError(f"bit widths are budgeted in size or bitops, got {resource!r}")
        self.kind = "joint" if channels is not None else "quantize"
        self.graph, self.resource = graph, resource
        self.channels, self.repair = channels, repair
        self.cost_model = channels.cost_model if channels is not None else CostModel(graph, model)
        self.min_bits, self.max_bits = min_bits, max_bits
        self.round_to = channels.round_to if channels is not None else 1
        self._images_fn, self._images = images, None
        self._layers = list(graph.layers.values())
        roots = {unit.name: unit.index for unit in graph.units} if channels is not None else {}
        self.steps: list[Step] = []
        for layer in self._layers:
            if layer.name in roots:
                self.steps.append(Step("channels", layer, roots[layer.name]))
            self.steps.append(Step("weight", layer))
            if activations:
                self.steps.append(Step("input", layer))
        self.names = [f"{s.layer.name}:{s.role}" for s in self.steps]
        self.sizes = [graph.units[s.unit].channels if s.role == "channels" else FULL_BITS for s in self.steps]
        self.layers = [s.layer for s in self.steps]
        self.unit_costs = [float(s.layer.macs if resource == "bitops" else s.layer.weight_count) for s in self.steps]
        self.step_flags = {
            **({"prune": [float(s.role == "channels") for s in self.steps]} if channels is not None else {}),
            "activation": [float(s.role == "input") for s in self.steps],
            "depthwise": [float(s.layer.depthwise) for s in self.steps],
        }
        index = {(s.layer.name, s.role): i for i, s in enumerate(self.steps)}
        self._unit_steps = [i for i, s in enumerate(self.steps) if s.role == "channels"]
        self._bit_steps = [(layer, index[layer.name, "weight"], index.get((layer.name, "input")))
                           for layer in self._layers]
        self._full_channels = [unit.channels for unit in graph.units]
        self.folds = batchnorm_pairs(model, graph.input_shape)
        self._scales: dict[tuple[str, int], torch.Tensor] = {}

    # the policy, split ------------------------------------------------------------------------

    def channel_keep(self, keep: Sequence[int]) -> list[int]:
        return [int(keep[i]) for i in self._unit_steps] if self.channels is not None else self._full_channels

    def bits(self, keep: Sequence[int]) -> dict[str, list[int]]:
        """Layer name -> [weight bits, input bits] (32: not quantized)."""
        return {layer.name: [int(keep[w]), int(keep[a]) if a is not None else FULL_BITS]
                for layer, w, a in self._bit_steps}

    def check(self, keep: Sequence[int]) -> None:
        """Refuse a policy (e.g. a hand-written policy file) the space cannot apply."""
        if len(keep) != len(self.steps):
            raise UserError(f"policy has {len(keep)} entries, the {self.kind} space has {len(self.steps)} steps",
                            field="keep")
        for name, step, value, size in zip(self.names, self.steps, keep, self.sizes):
            if step.role == "channels" and not 1 <= value <= size:
                raise UserError(f"{name}: {value} channels is outside 1..{size}", field="keep")
            if step.role != "channels" and not (self.min_bits <= value <= self.max_bits or value == FULL_BITS):
                raise UserError(f"{name}: {value} bits is outside min_bits..max_bits "
                                f"({self.min_bits}..{self.max_bits}) and is not {FULL_BITS}", field="keep")

    # costs ------------------------------------------------------------------------------------

    def choices(self, lbound: float, rbound: float) -> list[Choice]:
        bits = BitsChoice(self.min_bits, self.max_bits)
        return [RatioChoice(size, self.round_to, lbound, rbound) if s.role == "channels" else bits
                for s, size in zip(self.steps, self.sizes)]

    def _totals(self, keep: Sequence[int]) -> tuple[int, int]:
        """(bits of the packed weight codes, BitOPs) of a policy, on its pruned shapes."""
        channels = self.channel_keep(keep)
        size = bitops = 0
        for layer, w, a in self._bit_steps:
            c_in, c_out, groups = self.cost_model.layer_channels(layer, channels)
            weights = c_out * (c_in // groups) * layer.kernel_area
            w_bits, a_bits = keep[w], keep[a] if a is not None else FULL_BITS
            size += 8 * packed_bytes(weights, w_bits)
            bitops += layer.out_positions * weights * w_bits * a_bits
        return size, bitops

    def cost(self, keep: Sequence[int]) -> float:
        size, bitops = self._totals(keep)
        return float(size if self.resource == "size" else bitops)

    def measures(self, keep: Sequence[int]) -> dict[str, float]:
        channels = self.channel_keep(keep)
        size, bitops = self._totals(keep)
        return {"macs": float(self.cost_model.macs(channels)), "params": float(self.cost_model.params(channels)),
                "size": float(size), "bitops": float(bitops)}

    # the model --------------------------------------------------------------------------------

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._images_fn()
        return self._images

    def _weight_scales(self, name: str, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """Quantize mode folds the same base weights every time: their scales are computed once per width."""
        if (name, bits) not in self._scales:
            self._scales[name, bits] = weight_scales(weight, bits)
        return self._scales[name, bits]

    def apply(self, model: nn.Module, keep: Sequence[int]) -> nn.Module:
        """Prune (joint: then repair, as scoring does), fold BatchNorm, fake-quantize; in place."""
        self.check(keep)
        if self.channels is not None:
            channels = self.channel_keep(keep)
            prune_channels(model, self.graph, channels, inplace=True)
            if self.repair is not None:
                self.repair(model, self.channels.refit_layers(channels))
        fold_batchnorm(model, self.folds)
        quantize_layers(model, self.bits(keep), self.images,
                        scales=self._weight_scales if self.channels is None else None)
        return model

    def plan(self, keep: Sequence[int]) -> dict:
        plan = {"kind": self.kind, "folded": [list(pair) for pair in self.folds], "bits": self.bits(keep)}
        if self.channels is not None:
            plan["channels"] = channel_plan(self.graph, self.channel_keep(keep))
        return plan

    def refit_layers(self, keep: Sequence[int]) -> dict[str, torch.Tensor | None]:
        return {}  # joint mode repairs inside ``apply``, before quantization; nothing is left to refit
