"""Find the prunable units of a model.

A unit is one torch-pruning dependency group rooted at a conv or linear layer's output
channels: pruning channel i of the unit removes output channel i of its producer(s), the
matching BatchNorm / depthwise channels and the consumers' input channels (through concat,
split and flatten, which torch-pruning maps). The dependency graph is traced once, on the
original model; every member of a group is recorded by module *name* and original index, so a
policy can be replayed on any copy of the model without tracing it again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from amc.errors import UserError

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Member:
    """One pruning operation of a unit: ``pruner.<method>(module, idxs)``."""

    module: str
    pruner: object
    method: str  # "prune_out_channels" or "prune_in_channels"
    root_idxs: np.ndarray  # root channel of each entry of idxs
    idxs: np.ndarray  # index in the module's own dimension

    @property
    def dim(self) -> str:
        """The module dimension this member shrinks; a depthwise conv has only one."""
        if isinstance(self.pruner, tp.pruner.function.DepthwiseConvPruner):
            return "out"
        return "out" if self.method == "prune_out_channels" else "in"

    def entries_of(self, roots: np.ndarray) -> np.ndarray:
        """This member's own indices that belong to the given root channels."""
        return self.idxs[np.isin(self.root_idxs, roots)]


@dataclass
class LayerInfo:
    """Shape facts of one conv / linear layer of the original model (batch 1)."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel: int  # kernel side (1 for linear)
    kernel_area: int
    stride: int
    in_hw: tuple[int, int]
    out_positions: int  # output elements per output channel
    has_bias: bool

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def macs(self) -> int:
        return self.out_positions * self.out_channels * (self.in_channels // self.groups) * self.kernel_area

    @property
    def weight_count(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel_area


@dataclass
class Unit:
    """A prunable unit: the channels of one dependency group, ranked by importance."""

    index: int
    name: str  # the producing layer the state describes
    channels: int
    members: list[Member]
    importance: np.ndarray  # L1 magnitude of each root channel over the whole group
    ranking: np.ndarray  # root channels, most important first
    residual: bool  # coupled through a residual add (several producers)
    layer: LayerInfo = field(repr=False)

    def kept_channels(self, keep: int) -> np.ndarray:
        """The ``keep`` most important root channels, in ascending order."""
        return np.sort(self.ranking[:keep])

    def removed_channels(self, keep: int) -> np.ndarray:
        """The root channels a keep count removes: all but the ``keep`` most important."""
        return self.ranking[keep:]

    def removed_count_table(self, member: Member) -> np.ndarray:
        """``table[k]`` = entries of ``member`` removed when the unit keeps ``k`` channels.

        The closed form of ``len(member.entries_of(self.removed_channels(k)))`` for every k.
        """
        per_root = np.bincount(member.root_idxs, minlength=self.channels)[self.ranking]
        return np.append(np.cumsum(per_root[::-1])[::-1], 0)


@dataclass
class PrunableGraph:
    """The units of a model, in forward order, and the facts the cost model needs."""

    units: list[Unit]
    layers: dict[str, LayerInfo]  # every conv / linear layer, in forward order
    skipped: list[str]  # roots of groups left unpruned (residual-coupled, unsupported)
    input_shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.units)


def trace_layers(model: nn.Module, example: torch.Tensor) -> dict[str, LayerInfo]:
    """Run one forward pass and record every conv / linear layer's shapes, in call order."""
    layers: dict[str, LayerInfo] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs, output):
            if name in layers:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                layers[name] = LayerInfo(
                    name=name, kind="conv", in_channels=module.in_channels,
                    out_channels=module.out_channels, groups=module.groups, kernel=module.kernel_size[0],
                    kernel_area=module.kernel_size[0] * module.kernel_size[1],
                    stride=module.stride[0], in_hw=(x.shape[2], x.shape[3]),
                    out_positions=output[0].numel() // module.out_channels,
                    has_bias=module.bias is not None,
                )
            else:
                layers[name] = LayerInfo(
                    name=name, kind="linear", in_channels=module.in_features,
                    out_channels=module.out_features, groups=1, kernel=1, kernel_area=1, stride=1,
                    in_hw=(1, 1), out_positions=output[0].numel() // module.out_features,
                    has_bias=module.bias is not None,
                )
        return hook

    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return layers


def _group_importance(group) -> np.ndarray:
    imp = tp.importance.GroupMagnitudeImportance(p=1)(group)
    return imp.detach().cpu().double().numpy()


def find_units(
    model: nn.Module, input_shape: tuple[int, ...], prune_residual: bool = False
) -> PrunableGraph:
    """Trace ``model`` at ``input_shape`` (batch 1) and return its prunable units.

    The layer producing the model's output is protected (its output channels are the
    classes). Residual-coupled groups are units only when ``prune_residual``.
    """
    example = torch.zeros(input_shape)
    layers = trace_layers(model, example)
    if not layers:
        raise UserError("the model has no Conv2d or Linear layer to prune", field="model.name")
    order = {name: i for i, name in enumerate(layers)}
    output_layer = list(layers)[-1]
    names = {module: name for name, module in model.named_modules()}
    modules = dict(model.named_modules())

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = graph.get_all_groups(ignored_layers=[modules[output_layer]], root_module_types=PRUNABLE_TYPES)

    units: list[Unit] = []
    skipped: list[str] = []
    for group in groups:
        members = []
        for item in group:
            module = item.dep.target.module
            if module not in names:  # torch-pruning's pseudo ops (add, concat, reshape)
                continue
            handler = item.dep.handler
            members.append(Member(
                module=names[module], pruner=handler.__self__, method=handler.__name__,
                root_idxs=np.asarray(item.root_idxs, dtype=np.int64),
                idxs=np.asarray(item.idxs, dtype=np.int64),
            ))
        producers = sorted(
            {m.module for m in members if m.module in layers and m.dim == "out"
             and not layers[m.module].depthwise},
            key=order.__getitem__,
        )
        producing = producers or sorted(
            {m.module for m in members if m.module in layers and m.dim == "out"}, key=order.__getitem__
        )
        if not producing:
            continue
        root = layers[producing[0]]
        residual = len(producers) > 1
        if residual and not prune_residual:
            skipped.append(root.name)
            continue
        grouped = sorted({m.module for m in members if m.module in layers
                          and layers[m.module].groups > 1 and not layers[m.module].depthwise})
        if grouped:  # channel surgery and the cost model assume dense or depthwise convs
            warnings.warn(f"left unpruned: unit {root.name} touches grouped convs {', '.join(grouped)}")
            skipped.append(root.name)
            continue
        importance = _group_importance(group)
        channels = len(importance)
        ranking = np.argsort(-importance, kind="stable")
        units.append(Unit(index=-1, name=root.name, channels=channels, members=members,
                          importance=importance, ranking=ranking, residual=residual, layer=root))

    units.sort(key=lambda u: order[u.name])
    for i, unit in enumerate(units):
        unit.index = i
    return PrunableGraph(units=units, layers=layers, skipped=skipped, input_shape=tuple(input_shape))
