"""Find the prunable units of a model.

A unit is one torch-pruning dependency group rooted at a conv or linear layer's output
channels: pruning channel i of the unit removes output channel i of its producer(s), the
matching BatchNorm / LayerNorm / depthwise channels, unwrapped parameters (a ConvNeXt
``layer_scale``) and the consumers' input channels (through concat, split and flatten, which
torch-pruning maps). The dependency graph is traced once, on the original model; every member
of a group is recorded by module (or parameter) *name* and original index, so a policy can be
replayed on any copy of the model without tracing it again.

A group is left whole, with its reason, when its channels cannot be cut correctly: it touches a
grouped conv (the cost model and channel surgery assume dense or depthwise convs), or it passes
through a reshape that regroups channels (a channel shuffle), which torch-pruning would map as
if nothing moved. Groups of several producers joined by an element-wise op (a residual add, an
SE multiply) are units only with ``prune_residual``.
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

# Why a group is left whole (``PrunableGraph.skipped``). ``COUPLED`` ones become units, one
# shared ratio each, with ``prune_residual``; the others never do.
RESIDUAL = "residual-coupled"  # several producers joined by an add
SE = "SE-coupled"  # several producers joined by a multiply (squeeze-and-excitation gating)
OTHER_COUPLING = "coupled"  # several producers joined by another element-wise op
COUPLED = (RESIDUAL, SE, OTHER_COUPLING)
GROUPED = "grouped conv"
REGROUPED = "channel-shuffled"  # reaches a reshape that regroups channels (a channel shuffle)


@dataclass(frozen=True)
class Member:
    """One pruning operation of a unit: ``pruner.<method>(module, idxs)``, or, for an unwrapped
    parameter (``param_dim`` set; ``module`` is then the parameter's name), keeping the other
    entries of its dimension ``param_dim``."""

    module: str
    pruner: object
    method: str  # "prune_out_channels" or "prune_in_channels"
    root_idxs: np.ndarray  # root channel of each entry of idxs
    idxs: np.ndarray  # index in the module's own dimension
    param_dim: int | None = None

    @property
    def dim(self) -> str:
        """The dimension this member shrinks; a depthwise conv or a parameter has only one."""
        if self.param_dim is not None or isinstance(self.pruner, tp.pruner.function.DepthwiseConvPruner):
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
    coupling: str  # "" for one producer, else how several are joined (RESIDUAL, SE, OTHER_COUPLING)
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


@dataclass(frozen=True)
class Skipped:
    """A dependency group left whole: its root layer, why, and the layers producing its channels."""

    root: str
    reason: str  # one of COUPLED, GROUPED, REGROUPED
    producers: tuple[str, ...]


@dataclass
class PrunableGraph:
    """The units of a model, in forward order, and the facts the cost model needs."""

    units: list[Unit]
    layers: dict[str, LayerInfo]  # every conv / linear layer, in forward order
    skipped: list[Skipped]  # groups left whole, in forward order of their roots
    input_shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.units)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        """Roots of the groups left whole, by reason (in order of first appearance), in forward order."""
        out: dict[str, list[str]] = {}
        for s in self.skipped:
            out.setdefault(s.reason, []).append(s.root)
        return out

    def skipped_macs(self) -> int:
        """MACs of the layers whose output channels belong to groups left whole."""
        producers = {name for s in self.skipped for name in s.producers}
        return sum(self.layers[name].macs for name in producers)


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
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported, not raised
        raise UserError(f"{type(model).__name__} fails on a {tuple(example.shape)} input ({_one_line(exc)})",
                        field="model") from None
    finally:
        for h in hooks:
            h.remove()
    return layers


def _one_line(exc: Exception) -> str:
    """An exception as ``Type: first line of its message``, for a one-line ``UserError``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _group_importance(group) -> np.ndarray:
    imp = tp.importance.GroupMagnitudeImportance(p=1)(group)
    return imp.detach().cpu().double().numpy()


def _maps_channels(before: torch.Size, after: torch.Size) -> bool:
    """Whether channel i before a reshape is still channel i (or one block of a flatten) after it.

    True when only singleton dims come or go, when batch and channel dims stay and only the
    spatial ones are reshaped, or for a flatten of (N, C, ...) to (N, features) and back (which
    torch-pruning maps with a stride). False for a channel shuffle's (N, C, H, W) -> (N, g, C/g, H, W).
    """
    if [d for d in before if d != 1] == [d for d in after if d != 1]:
        return True
    if len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return False
    return before[1] == after[1] or len(before) == 2 or len(after) == 2


class _CutAtRegroupingReshapes(torch.overrides.TorchFunctionMode):
    """Cuts the autograd graph after each reshape that regroups channels; records what fed it.

    torch-pruning traces the autograd graph and would guess an index mapping through such a
    reshape (for a channel shuffle the guess divides by zero or maps channels as if nothing
    moved). Cut there, the groups before it end at the tensor that fed it, which the traced
    forward also returns (torch-pruning traces back from the outputs); their channels are left
    whole (see ``find_units``), and nothing after the cut has a producer to be grouped with.
    """

    def __init__(self):
        super().__init__()
        self.fed: list[torch.Tensor] = []  # the tensors that fed a regrouping reshape

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (isinstance(out, torch.Tensor) and isinstance(source, torch.Tensor) and out.grad_fn is not None
                and _is_reshape(out.grad_fn) and not _maps_channels(source.shape, out.shape)):
            if source.grad_fn is not None:
                self.fed.append(source)
            out = out.detach().requires_grad_()
        return out


def _is_reshape(grad_fn) -> bool:
    """torch-pruning's own test for a reshape node."""
    name = grad_fn.name().lower()
    return "view" in name or "reshape" in name


def _dependency_groups(model: nn.Module, example: torch.Tensor, protected: nn.Module) -> tuple[list, set]:
    """torch-pruning's groups rooted at conv / linear layers, and the grad_fns of the tensors
    that feed reshapes regrouping channels.

    A failure inside torch-pruning is the model's limitation, reported as a ``UserError``.
    """
    cut = _CutAtRegroupingReshapes()

    def forward(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with cut:
            out = m(x)
        # as views: torch-pruning makes an output's own op an output node (a concat would lose its type)
        return (out, *(t.view_as(t) for t in cut.fed))

    try:
        with torch.enable_grad():  # torch-pruning traces autograd; callers may be in no_grad
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward,
                                                          verbose=False)
        groups = list(graph.get_all_groups(ignored_layers=[protected], root_module_types=PRUNABLE_TYPES))
    except Exception as exc:  # noqa: BLE001 - torch-pruning's failures name no layer; say which model
        raise UserError(f"torch-pruning cannot build the dependency graph of {type(model).__name__} "
                        f"({_one_line(exc)})", field="model.name") from None
    return groups, {t.grad_fn for t in cut.fed}


def _coupling(ops: list[str]) -> str:
    """How several producers of one group are joined, from the element-wise ops in the group."""
    if any(op.startswith(("AddBackward", "SubBackward")) for op in ops):
        return RESIDUAL
    if any(op.startswith(("MulBackward", "DivBackward")) for op in ops):
        return SE
    return OTHER_COUPLING


def find_units(
    model: nn.Module, input_shape: tuple[int, ...], prune_residual: bool = False
) -> PrunableGraph:
    """Trace ``model`` at ``input_shape`` (batch 1) and return its prunable units.

    The layer producing the model's output is protected (its output channels are the
    classes). Coupled groups (several producers) are units only when ``prune_residual``.
    """
    example = torch.zeros(input_shape)
    layers = trace_layers(model, example)
    if not layers:
        raise UserError("the model has no Conv2d or Linear layer to prune", field="model.name")
    order = {name: i for i, name in enumerate(layers)}
    output_layer = list(layers)[-1]
    names = {module: name for name, module in model.named_modules()}
    param_names = {id(p): name for name, p in model.named_parameters()}
    groups, feeds_regrouping = _dependency_groups(model, example, model.get_submodule(output_layer))

    units: list[Unit] = []
    skipped: list[Skipped] = []
    for group in groups:
        members, ops, regrouped = [], [], False
        for item in group:
            node = item.dep.target
            target = node.module
            handler = item.dep.handler
            param = isinstance(target, nn.Parameter)
            if param or target in names:
                member = Member(
                    module=param_names[id(target)] if param else names[target], pruner=handler.__self__,
                    method=handler.__name__, root_idxs=np.asarray(item.root_idxs, dtype=np.int64),
                    idxs=np.asarray(item.idxs, dtype=np.int64),
                    param_dim=node.pruning_dim % target.dim() if param else None,
                )
                members.append(member)
                if member.dim == "in":  # a layer's input channels: its output is not this group's
                    continue
            elif node.grad_fn is not None:  # torch-pruning's pseudo ops (add, mul, concat, reshape)
                ops.append(node.grad_fn.name())
            regrouped |= node.grad_fn is not None and node.grad_fn in feeds_regrouping
        producers = sorted(
            {m.module for m in members if m.module in layers and m.dim == "out"
             and not layers[m.module].depthwise},
            key=order.__getitem__,
        )
        if not producers:  # depthwise convs on channels no layer here produces (the image, a shuffle's output)
            continue
        root = layers[producers[0]]
        coupling = _coupling(ops) if len(producers) > 1 else ""
        grouped = sorted({m.module for m in members if m.module in layers
                          and layers[m.module].groups > 1 and not layers[m.module].depthwise})
        reason = (REGROUPED if regrouped else GROUPED if grouped
                  else coupling if coupling and not prune_residual else None)
        if reason:
            if grouped:  # channel surgery and the cost model assume dense or depthwise convs
                warnings.warn(f"left unpruned: unit {root.name} touches grouped convs {', '.join(grouped)}")
            skipped.append(Skipped(root.name, reason, tuple(producers)))
            continue
        importance = _group_importance(group)
        channels = len(importance)
        ranking = np.argsort(-importance, kind="stable")
        units.append(Unit(index=-1, name=root.name, channels=channels, members=members,
                          importance=importance, ranking=ranking, coupling=coupling, layer=root))

    units.sort(key=lambda u: order[u.name])
    skipped.sort(key=lambda s: order[s.root])
    for i, unit in enumerate(units):
        unit.index = i
    return PrunableGraph(units=units, layers=layers, skipped=skipped, input_shape=tuple(input_shape))
