"""Linear quantization of conv / linear layers: the quantizers, BN folding, packed storage, costs.

* Weights: per-output-channel symmetric, ``b`` bits in the narrow range [-(2^(b-1) - 1),
  2^(b-1) - 1] (2 bits: ternary), the clip of each channel chosen on a grid to minimise the
  squared quantization error, not the channel's max (a few outliers would waste the levels).
  BatchNorm is folded into the preceding layer first, so the folded weights are quantized.
* Activations (a layer's input): per-tensor affine, ``b`` bits in [0, 2^b - 1], the range
  calibrated on training images (min / max shrunk by the same error criterion), layer by layer
  in forward order so each range sees the already-quantized layers before it.
* Both are fake-quantized in the forward pass, with a straight-through estimator in the backward
  pass. Weights use ``torch.fake_quantize_per_channel_affine`` (QuantizeLinear /
  DequantizeLinear in ONNX: every width is an 8-bit quantizer after a clamp to the narrower
  range, which is exact); activations are written out in plain ops (see
  ``fake_quantize_activation``).
* Storage: a quantized layer's ``state_dict`` holds its codes packed densely into bytes
  (``ceil(n * b / 8)``: 8 bits one byte each, 4 bits two per byte, 2 bits four per byte) and
  its fp32 scales; loading dequantizes them back into the weight.

A bit width of 32 (``FULL_BITS``) means "not quantized".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from amc.graph import trace_layers

FULL_BITS = 32
CLIP_GRID = torch.linspace(0.05, 1.0, 80)  # candidate clips, as fractions of the max magnitude
ACT_SAMPLE = 1 << 14  # activation values the range search looks at (a fixed stride through the tensor)


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take when packed densely (fp32 at 32 bits)."""
    return math.ceil(count * bits / 8)


def pack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers < 2^bits -> a uint8 tensor of ``packed_bytes(n, bits)`` (little-endian bit order)."""
    flat = values.detach().reshape(-1).cpu().numpy().astype(np.int64)
    matrix = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(matrix.reshape(-1), bitorder="little"))


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of ``pack_codes``; ``ValueError`` if ``data`` does not hold ``count`` values."""
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_bytes(count, bits):
        raise ValueError(f"expected {packed_bytes(count, bits)} packed bytes for {count} {bits}-bit codes, "
                         f"got a {data.dtype} tensor of shape {tuple(data.shape)}")
    flat = np.unpackbits(data.cpu().numpy(), bitorder="little")[:count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy(flat @ (1 << np.arange(bits, dtype=np.int64)))


@torch.no_grad()
def weight_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales (clip / qmax) minimising the squared error of ``bits``-bit symmetric quantization."""
    qmax = weight_qmax(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    top = flat.abs().amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))  # an all-zero channel: any scale will do
    best, best_error = top / qmax, torch.full_like(top, math.inf)
    for fraction in CLIP_GRID.tolist():
        scale = fraction * top / qmax
        error = ((torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax) * scale[:, None] - flat) ** 2).sum(1)
        better = error < best_error
        best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best


@torch.no_grad()
def activation_range(x: torch.Tensor, bits: int) -> tuple[float, int]:
    """(scale, zero point) of a ``bits``-bit affine quantizer for the values of ``x``.

    The range always holds 0 (so zero padding and ReLU zeros are exact); both ends are shrunk by
    the fraction that minimises the squared error on a fixed sample of the values.
    """
    qmax = 2 ** bits - 1
    flat = x.detach().reshape(-1).float()
    low, high = min(float(flat.min()), 0.0), max(float(flat.max()), 0.0)
    if high - low <= 0:
        return 1.0, 0
    sample = flat[:: max(1, flat.numel() // ACT_SAMPLE)]
    grid = CLIP_GRID.to(x.device, torch.float64)
    scales = grid * (high - low) / qmax
    zeros = torch.clamp(torch.round(-grid * low / scales), 0, qmax)
    scales, zeros = scales.float()[:, None], zeros.float()[:, None]
    errors = ((fake_quantize_activation(sample[None, :], scales, zeros, bits) - sample[None, :]) ** 2).sum(dim=1)
    best = int(torch.argmin(errors))
    return float(scales[best]), int(zeros[best])


def fake_quantize_activation(x: torch.Tensor, scale, zero_point, bits: int) -> torch.Tensor:
    """``bits``-bit affine fake quantization with a straight-through gradient inside the range.

    Written out in plain ops (ONNX: Mul, Round, Clip) because torch.export cannot trace the
    fused fake-quantize ops on a batch of dynamic size; the rounding is the same (half to even).
    """
    qmax = 2 ** bits - 1
    x = torch.clamp(x, (0 - zero_point) * scale, (qmax - zero_point) * scale)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, qmax)
    return x + ((q - zero_point) * scale - x).detach()


class QuantLayer:
    """Mixin of ``QuantConv2d`` / ``QuantLinear``: fake-quantized weights and input, packed storage.

    ``w_bits`` / ``a_bits`` are fixed at construction (the plan holds them); the scales and the
    activation zero point are buffers, set by ``quantize_layers`` or loaded from a checkpoint.
    """

    weight: nn.Parameter

    def _init_quant(self, w_bits: int, a_bits: int) -> None:
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        channels = self.weight.shape[0]
        device = self.weight.device
        self.register_buffer("weight_scale", torch.ones(channels, device=device), persistent=self.w_bits < FULL_BITS)
        self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("act_scale", torch.ones((), device=device), persistent=self.a_bits < FULL_BITS)
        self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32, device=device),
                             persistent=self.a_bits < FULL_BITS)

    def _scale_view(self) -> torch.Tensor:
        return self.weight_scale.view(-1, *[1] * (self.weight.dim() - 1))

    def quantized_weight(self) -> torch.Tensor:
        if self.w_bits >= FULL_BITS:
            return self.weight
        limit = weight_qmax(self.w_bits) * self._scale_view()
        return torch.fake_quantize_per_channel_affine(torch.clamp(self.weight, -limit, limit), self.weight_scale,
                                                      self.weight_zero_point, 0, -128, 127)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits >= FULL_BITS:
            return x
        return fake_quantize_activation(x, self.act_scale, self.act_zero_point, self.a_bits)

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The integer codes of the quantized weight, in [-qmax, qmax]."""
        return torch.round(self.quantized_weight() / self._scale_view()).to(torch.int64)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.w_bits < FULL_BITS:
            del destination[prefix + "weight"]
            destination[prefix + "weight_codes"] = pack_codes(self.weight_codes() + weight_qmax(self.w_bits), self.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, scale = prefix + "weight_codes", state_dict.get(prefix + "weight_scale")
        if self.w_bits < FULL_BITS and key in state_dict and scale is not None:
            try:
                codes = unpack_codes(state_dict.pop(key), self.w_bits, self.weight.numel())
                if codes.max() > 2 * weight_qmax(self.w_bits) or scale.shape != self.weight_scale.shape:
                    raise ValueError("codes or scales out of range for the layer")
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
                return
            codes = (codes - weight_qmax(self.w_bits)).reshape(self.weight.shape)
            state_dict[prefix + "weight"] = codes.to(scale) * scale.view(-1, *[1] * (self.weight.dim() - 1))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantConv2d(QuantLayer, nn.Conv2d):
    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int):
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight, self.bias = conv.weight, conv.bias
        self._init_quant(w_bits, a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int):
        nn.Linear.__init__(self, linear.in_features, linear.out_features, linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self._init_quant(w_bits, a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def batchnorm_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """(layer, BatchNorm) name pairs where the BatchNorm reads the layer's output and nothing else does.

    Conv2d -> BatchNorm2d and Linear -> BatchNorm1d with running statistics; found on the traced
    graph, so a layer whose output also feeds an add or a concat is left alone.
    """
    names = {module: name for name, module in model.named_modules()}
    example = torch.zeros(input_shape, device=next(model.parameters()).device)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    pairs = []
    for module, name in names.items():
        kinds = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}.get(type(module))
        node = graph.module2node.get(module)
        if kinds is None or node is None or len(node.outputs) != 1:
            continue
        norm = node.outputs[0].module
        if (isinstance(norm, kinds) and norm in names and norm.track_running_stats
                and len(node.outputs[0].inputs) == 1 and norm.num_features == module.weight.shape[0]):
            pairs.append((name, names[norm]))
    return pairs


def fold_structure(model: nn.Module, pairs: Iterable[Sequence[str]]) -> None:
    """The shape of folding: each layer gets a bias, each folded BatchNorm becomes an Identity."""
    for layer_name, norm_name in pairs:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
        _set_module(model, norm_name, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: Iterable[Sequence[str]]) -> None:
    """Fold each pair's BatchNorm (eval statistics) into its layer's weight and bias, in place."""
    pairs = list(pairs)
    for layer_name, norm_name in pairs:
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        factor = (norm.weight if norm.affine else 1.0) / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias if norm.affine else 0.0
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        layer.weight.mul_(factor.view(-1, *[1] * (layer.weight.dim() - 1)))
        folded = (bias - norm.running_mean) * factor + shift
        if layer.bias is None:
            layer.bias = nn.Parameter(folded)
        else:
            layer.bias.copy_(folded)
    fold_structure(model, pairs)


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, pairs: Iterable[Sequence[str]], images: torch.Tensor) -> None:
    """Give each folded layer a BatchNorm back, for quantization-aware training.

    A net without its BatchNorms trains badly; per-channel symmetric quantization commutes with
    the per-channel scaling of a fold, so the BatchNorms can train and be folded back exactly
    (``refold_batchnorm``). Each is initialised from its layer's output statistics on
    ``images``, so the model computes the same function in eval mode and nearly the same with
    batch statistics.
    """
    pairs = [tuple(pair) for pair in pairs]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output, name=layer: outputs.__setitem__(name, output.clone()))  # before in-place ReLUs
        for layer, _ in pairs]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    for layer_name, norm_name in pairs:
        layer = model.get_submodule(layer_name)
        y = outputs[layer_name] - layer.bias.view(1, -1, *[1] * (outputs[layer_name].dim() - 2))
        dims = [d for d in range(y.dim()) if d != 1]
        mean, var = y.mean(dim=dims), y.var(dim=dims, unbiased=False)
        norm = (nn.BatchNorm2d if y.dim() == 4 else nn.BatchNorm1d)(y.shape[1]).to(y.device)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(mean + layer.bias)
        layer.bias.zero_()
        _set_module(model, norm_name, norm)


@torch.no_grad()
def refold_batchnorm(model: nn.Module, pairs: Iterable[Sequence[str]]) -> None:
    """Fold the BatchNorms of ``unfold_batchnorm`` back; quantized weights keep their codes, scales absorb the fold."""
    pairs = [tuple(pair) for pair in pairs]
    for layer_name, norm_name in pairs:
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        if getattr(layer, "w_bits", FULL_BITS) < FULL_BITS:
            layer.weight_scale.mul_((norm.weight / torch.sqrt(norm.running_var + norm.eps)).abs())
    fold_batchnorm(model, pairs)


def to_quant_layers(model: nn.Module, bits: Mapping[str, Sequence[int]]) -> dict[str, QuantLayer]:
    """Replace each named conv / linear layer by its quantized twin (same parameters), in place."""
    layers = {}
    for name, (w_bits, a_bits) in bits.items():
        layer = model.get_submodule(name)
        twin = (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear)(layer, w_bits, a_bits)
        _set_module(model, name, twin)
        layers[name] = twin
    return layers


@torch.no_grad()
def quantize_layers(
    model: nn.Module, bits: Mapping[str, Sequence[int]], images: Callable[[], torch.Tensor],
    scales: Callable[[str, torch.Tensor, int], torch.Tensor] | None = None,
) -> None:
    """Quantize the named layers of a (BN-folded) model in place to ``bits[name] = (weight, input)``.

    Weight scales come from ``scales(name, weight, bits)`` (default: ``weight_scales``, a cache
    can be passed); input ranges are calibrated on ``images()`` in one forward pass, each
    layer's range set just before it runs, so it sees the quantized layers before it.
    """
    scales = scales or (lambda name, weight, b: weight_scales(weight, b))
    layers = to_quant_layers(model, bits)
    for name, layer in layers.items():
        if layer.w_bits < FULL_BITS:
            layer.weight_scale.copy_(scales(name, layer.weight, layer.w_bits))
    pending = {name: layer for name, layer in layers.items() if layer.a_bits < FULL_BITS}
    if not pending:
        return

    def calibrate(layer: QuantLayer):
        def hook(module, inputs):
            if module in calibrated:
                return
            scale, zero = activation_range(inputs[0], layer.a_bits)
            layer.act_scale.fill_(scale)
            layer.act_zero_point.fill_(zero)
            calibrated.add(module)
        return hook

    calibrated: set = set()
    hooks = [layer.register_forward_pre_hook(calibrate(layer)) for layer in pending.values()]
    try:
        model.eval()(images())
    finally:
        for hook in hooks:
            hook.remove()


def apply_quant_plan(model: nn.Module, plan: Mapping) -> None:
    """Replay a stored plan's structure: fold the BatchNorms' places, swap in the quantized layers."""
    fold_structure(model, plan["folded"])
    to_quant_layers(model, plan["bits"])


@torch.no_grad()
def storage_and_bitops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(bytes the conv / linear weights take, BitOPs of one forward pass at batch 1) as the model stands.

    A quantized layer's weights take their packed codes, any other layer's 4 bytes each (fp32);
    BitOPs = MACs x weight bits x input bits, 32 for what is not quantized.
    """
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    weight_bytes = bitops = 0
    for name, info in trace_layers(model, torch.zeros(input_shape, device=device)).items():
        w_bits = getattr(modules[name], "w_bits", FULL_BITS)
        a_bits = getattr(modules[name], "a_bits", FULL_BITS)
        weight_bytes += packed_bytes(info.weight_count, w_bits)
        bitops += info.macs * w_bits * a_bits
    return weight_bytes, bitops
