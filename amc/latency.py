"""Measured latency of a pruned model, predicted from a per-layer lookup table.

Every conv / linear layer is timed standalone (same kernel, stride, padding, dilation, bias;
a depthwise conv stays depthwise) on an input of its real spatial size, at a grid of channel
counts: {0.25, 0.5, 0.75, 1.0} of its input channels x the same fractions of its output
channels. A dimension no unit can shrink (the image channels, the classes) is measured only
at full size, and a depthwise conv has one axis (in = out = groups).

A policy's latency is

    overhead + sum over layers of table[layer](c_in, c_out)

with bilinear interpolation between grid points (clamped at the grid's ends: below 25 % of
a layer's channels the table predicts no further gain). The overhead (BatchNorm, ReLU,
pooling, adds, Python dispatch) is the measured whole-model latency minus the layers' full-size
entries, so the prediction for the unpruned model equals its measured latency.

Timings are noisy, and budget clipping bisects on the assumption that cost never grows when a
unit keeps fewer channels, so each table is made monotone non-decreasing along both axes
(cumulative max) before use.

Tables are cached as JSON under ``~/.cache/amc-search/latency/`` (``$AMC_CACHE_DIR/latency/``
when that is set), keyed by the model spec, input shape, batch size, threads, device type,
torch version and the grid, so a search measures once per device.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amc.files import atomic_write_json
from amc.config import LatencyConfig
from amc.cost import CostModel
from amc.graph import LayerInfo, PrunableGraph
from amc.metrics import measure_latency

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
FORMAT_VERSION = 2  # 2: each timing sample lasts at least metrics.MIN_SAMPLE_S


def cache_dir() -> Path:
    """Where latency tables live: ``$AMC_CACHE_DIR/latency`` or ``~/.cache/amc-search/latency``."""
    root = os.environ.get("AMC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "amc-search") / "latency"


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear ``ys(x)`` on ascending ``xs``, clamped at both ends.

    Pure Python: the lists hold at most four points and budget clipping calls this thousands
    of times per episode, where numpy's per-call overhead would dominate.
    """
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


@dataclass
class LayerTable:
    """Latency (ms) of one layer at ``ms[i][j]`` = (``in_counts[i]``, ``out_counts[j]``) channels."""

    in_counts: list[int]
    out_counts: list[int]
    ms: list[list[float]]

    @property
    def full(self) -> float:
        return self.ms[-1][-1]

    def at(self, c_in: float, c_out: float) -> float:
        """Bilinear interpolation: along ``c_out`` in each row, then along ``c_in`` across rows."""
        rows = [_interp(c_out, self.out_counts, row) for row in self.ms]
        return _interp(c_in, self.in_counts, rows)

    def to_json(self) -> dict[str, Any]:
        return {"in": self.in_counts, "out": self.out_counts, "ms": self.ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerTable":
        return cls([int(c) for c in data["in"]], [int(c) for c in data["out"]],
                   [[float(v) for v in row] for row in data["ms"]])


def grid_counts(channels: int, step: int = 1, prunable: bool = True) -> list[int]:
    """Channel counts to measure: each fraction of ``channels`` as a multiple of ``step``."""
    if not prunable:
        return [channels]
    counts = {max(step, int(round(f * channels / step)) * step) for f in FRACTIONS}
    return sorted(min(c, channels) for c in counts)


def standalone_layer(module: nn.Module, layer: LayerInfo, c_in: int, c_out: int) -> nn.Module:
    """A fresh copy of ``module``'s layer type and settings with ``c_in`` / ``c_out`` channels."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return nn.Linear(c_in, c_out, bias=bias)
    if layer.depthwise:
        groups = c_in = c_out
    else:
        groups = module.groups
    return nn.Conv2d(c_in, c_out, module.kernel_size, stride=module.stride, padding=module.padding,
                     dilation=module.dilation, groups=groups, bias=bias, padding_mode=module.padding_mode)


def time_layer(module: nn.Module, layer: LayerInfo, c_in: int, c_out: int, device: torch.device,
               cfg: LatencyConfig) -> float:
    """Median latency (ms) of a standalone ``c_in`` -> ``c_out`` version of ``layer``."""
    probe = standalone_layer(module, layer, c_in, c_out).to(device)
    if isinstance(probe, nn.Linear):
        rows = layer.out_positions
        shape = (1, rows, probe.in_features) if rows > 1 else (1, probe.in_features)
    else:
        shape = (1, probe.in_channels, *layer.in_hw)
    return measure_latency(probe, shape, cfg.batch_size, cfg.threads, cfg.warmup, cfg.repeats)


def _monotone(values: np.ndarray) -> list[list[float]]:
    """Cumulative max along both axes: fewer channels never cost more."""
    return np.maximum.accumulate(np.maximum.accumulate(values, axis=0), axis=1).tolist()


class LatencyModel:
    """Predicts a pruned model's latency (ms) from per-layer tables plus a fixed overhead."""

    def __init__(self, tables: dict[str, LayerTable], overhead_ms: float, model_ms: float,
                 from_cache: bool = False, path: Path | None = None):
        self.tables = tables
        self.overhead_ms = overhead_ms
        self.model_ms = model_ms  # measured latency of the unpruned model
        self.from_cache = from_cache  # True when loaded, not measured
        self.path = path

    def predict(self, cost_model: CostModel, keep: Sequence[int]) -> float:
        """Predicted latency (ms) of the model pruned to ``keep``."""
        total = self.overhead_ms
        for layer in cost_model.layers:
            c_in, c_out, _ = cost_model.layer_channels(layer, keep)
            total += self.tables[layer.name].at(c_in, c_out)
        return total

    @classmethod
    def measure(cls, model: nn.Module, graph: PrunableGraph, input_shape: tuple[int, ...],
                cfg: LatencyConfig) -> "LatencyModel":
        """Time every layer on its channel grid and the whole model, on the model's device."""
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        shrinks = {(m.module, m.dim) for unit in graph.units for m in unit.members}
        tables = {}
        for name, layer in graph.layers.items():
            module = modules[name]
            step = 1 if layer.depthwise else layer.groups  # grouped convs need multiples of groups
            ins = grid_counts(layer.in_channels, step, (name, "in") in shrinks and not layer.depthwise)
            outs = grid_counts(layer.out_channels, step, (name, "out") in shrinks)
            values = np.array([[time_layer(module, layer, c_in, c_out, device, cfg) for c_out in outs]
                               for c_in in ins])
            tables[name] = LayerTable(ins, outs, _monotone(values))
        model_ms = measure_latency(model, input_shape, cfg.batch_size, cfg.threads, cfg.warmup, cfg.repeats)
        overhead = max(0.0, model_ms - sum(t.full for t in tables.values()))
        return cls(tables, overhead, model_ms)

    @classmethod
    def for_model(cls, model: nn.Module, graph: PrunableGraph, input_shape: tuple[int, ...],
                  cfg: LatencyConfig, spec: dict | None = None) -> "LatencyModel":
        """Load the cached table for this model and device, or measure it and cache it."""
        device = next(model.parameters()).device
        key = cache_key(graph, input_shape, cfg, spec, device)
        path = cache_dir() / f"{key}.json"
        loaded = cls.load(path, key, graph)
        if loaded is not None:
            return loaded
        latency = cls.measure(model, graph, input_shape, cfg)
        try:
            latency.save(path, key, {"spec": spec, "input_shape": list(input_shape), "device": device.type,
                                     "torch": torch.__version__, **cfg.model_dump()})
        except OSError as exc:  # a read-only home must not stop the search; it only costs a re-measure
            warnings.warn(f"latency table not cached ({path}: {exc.strerror or exc})")
        return latency

    def save(self, path: Path, key: str, meta: dict[str, Any]) -> None:
        atomic_write_json(path, {
            "format": FORMAT_VERSION, "key": key, "meta": meta,
            "model_ms": self.model_ms, "overhead_ms": self.overhead_ms,
            "layers": {name: table.to_json() for name, table in self.tables.items()},
        })
        self.path = path

    @classmethod
    def load(cls, path: Path, key: str, graph: PrunableGraph) -> "LatencyModel | None":
        """The cached model at ``path``, or None when missing, unreadable or not for this graph."""
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION or data.get("key") != key:
                return None
            tables = {name: LayerTable.from_json(t) for name, t in data["layers"].items()}
            if set(tables) != set(graph.layers):
                return None
            return cls(tables, float(data["overhead_ms"]), float(data["model_ms"]), from_cache=True, path=path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def cache_key(graph: PrunableGraph, input_shape: tuple[int, ...], cfg: LatencyConfig,
              spec: dict | None, device: torch.device) -> str:
    """Hash of everything the table depends on.

    The layer shapes and which dimensions the units shrink are included, so a model without a
    spec, or the same spec with ``prune_residual`` switched, gets its own table.
    """
    shrinks = sorted({(m.module, m.dim) for unit in graph.units for m in unit.members if m.module in graph.layers})
    layers = [[info.name, info.in_channels, info.out_channels, info.groups, info.kernel, info.stride,
               list(info.in_hw)] for info in graph.layers.values()]
    ident = {
        "format": FORMAT_VERSION, "spec": spec, "input_shape": list(input_shape),
        "batch_size": cfg.batch_size, "threads": cfg.threads, "device": device.type,
        "torch": torch.__version__, "fractions": FRACTIONS, "layers": layers, "shrinks": shrinks,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
