"""The per-unit state embedding: the AMC paper's 11 features, in the paper's order.

``t, n, c, h, w, stride, k, FLOPs[t]`` are static and min-max normalised across units to
[0, 1]; ``reduced`` (cost removed so far / total), ``rest`` (cost of the units after t / total)
and ``a_{t-1}`` (the previous unit's preserve ratio, 1 before the first) change per step.
A space may append per-step flags after these (the bit-width spaces: weight or activation
step, depthwise, pruning step), so the state's length depends on the mode. With
``search.state_history`` the state also carries every earlier step's value (``a_0 .. a_{t-1}``
in the units' order, zeros for the steps not yet taken): the paper's state summarises the
earlier steps only as ``reduced`` and ``a_{t-1}``, which cannot tell which units were cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amc.graph import LayerInfo

FEATURES = ("t", "n", "c", "h", "w", "stride", "k", "flops", "reduced", "rest", "a_prev")


def static_features(layers: Sequence[LayerInfo], unit_costs: Sequence[float]) -> np.ndarray:
    """(units, 8) matrix of the normalised static features."""
    raw = np.array(
        [[t, layer.out_channels, layer.in_channels, layer.in_hw[0], layer.in_hw[1], layer.stride,
          layer.kernel, cost] for t, (layer, cost) in enumerate(zip(layers, unit_costs))],
        dtype=np.float64,
    )
    low, high = raw.min(axis=0), raw.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return ((raw - low) / span).astype(np.float32)


def history_features(units: int) -> tuple[str, ...]:
    return tuple(f"a_{u}" for u in range(units))


def observation(static: np.ndarray, t: int, reduced: float, rest: float, a_prev: float,
                flags: np.ndarray | None = None, history: np.ndarray | None = None) -> np.ndarray:
    parts = [static[t], np.array([reduced, rest, a_prev], dtype=np.float32)]
    for extra in (flags, history):
        if extra is not None:
            parts.append(np.asarray(extra, dtype=np.float32))
    return np.concatenate(parts).clip(0.0, 1.0)
