"""Score a pruned copy: repair it (``amc.calibration.Repair``: adaptive BN, least squares, both or
none), then measure its error on the reward-val subset on the fast path (``amc.inference``). All
data is held in memory, so the same policy always gets the same reward and no data loading
happens inside an episode.

The error is 1 - top-1 (or top-5) accuracy, the mean cross-entropy for ``nll``, or
1 - ``evaluate(model, batches)`` for a user's metric (higher is better): the resource
protocol's reward ``-error`` is then ``metric - 1``.
A user's metric runs the user's code as written (fp32): the fast path serves top-k accuracy.
Fake-quantized models (``fold=False``) have their BatchNorms folded already; their rounding runs
in the reduced precision too, which the fidelity check measures like any other."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from amc.calibration import Repair
from amc.inference import FastEval, batchnorm_pairs, candidate_precisions, uses_channels_last
from amc.metrics import metric_value


class Scorer:
    """``scorer(pruned, refit_layers) -> (error, timings)``; ``scorer.repair`` is what export uses.

    ``precision``: the requested one (auto | fp32 | bf16 | fp16). Until the fidelity check
    (``amc.fidelity``) has run, rewards use the first candidate the hardware offers; the check
    keeps it or falls back to fp32 (``use_precision``).
    """

    def __init__(
        self, original: nn.Module, reward_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        repair: Repair | None = None, metric: str = "top1", precision: str = "fp32", batch_size: int | None = None,
        evaluate: Callable[[nn.Module, Sequence], float] | None = None, fold: bool = True,
    ):
        self.original = original
        self.repair = repair or Repair(original)
        self.metric = metric
        self.evaluate = evaluate
        self.reward_batches = list(reward_batches) if evaluate else None
        fast_path = evaluate is None
        self.candidates = candidate_precisions(precision, next(original.parameters()).device) if fast_path else []
        images = torch.cat([x for x, _ in reward_batches])
        labels = torch.cat([y for _, y in reward_batches])
        pairs = batchnorm_pairs(original) if fast_path and fold else []
        self.fast = FastEval(images, labels, pairs, uses_channels_last(original), (self.candidates or ["fp32"])[0],
                             batch_size)

    @property
    def precision(self) -> str:
        return self.fast.precision

    def use_precision(self, precision: str) -> None:
        self.fast.precision = precision

    def error(self, model: nn.Module, inplace: bool = False) -> float:
        """1 - the reward metric of an already repaired ``model`` (top-k accuracy or nll on the fast path)."""
        if self.evaluate is not None:
            return 1.0 - self.evaluate(model, self.reward_batches)
        return 1.0 - metric_value(self.fast.accuracy(model, inplace), self.metric)

    def __call__(self, pruned: nn.Module, refit_layers: dict | None = None) -> tuple[float, dict[str, float]]:
        """Repair ``pruned`` in place, score it (its BN is folded afterwards); (error, seconds per step)."""
        timings = self.repair(pruned, refit_layers)
        start = time.perf_counter()
        error = self.error(pruned, inplace=True)
        timings["eval"] = time.perf_counter() - start
        return error, timings
