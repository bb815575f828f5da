"""Score a pruned copy: calibrate it (adaptive BN, least squares, both or none), then measure
its error on the reward-val subset. All data is held in memory as fixed batches, so the same
policy always gets the same reward and no data loading happens inside an episode.

The error is 1 - top-1 (or top-5) accuracy, or 1 - ``evaluate(model, batches)`` for a user's
metric (higher is better): the resource protocol's reward ``-error`` is then ``metric - 1``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from amc.calibration import reconstruct, recalibrate_batchnorm
from amc.metrics import accuracy

CALIBRATIONS = ("bn", "lsq", "both", "none")


class Scorer:
    def __init__(
        self, original: nn.Module, reward_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        calib_batches: Sequence[torch.Tensor] = (), recon_images: torch.Tensor | None = None,
        calibration: str = "bn", metric: str = "top1", seed: int = 0,
        evaluate: Callable[[nn.Module, Sequence], float] | None = None,
    ):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if calibration in ("lsq", "both") and recon_images is None:
            raise ValueError("least-squares calibration needs reconstruction images")
        self.original = original
        self.reward_batches = list(reward_batches)
        self.calib_batches = list(calib_batches)
        self.recon_images = recon_images
        self.calibration = calibration
        self.metric = metric
        self.seed = seed
        self.evaluate = evaluate

    def calibrate(self, pruned: nn.Module, refit_layers: dict, timings: dict[str, float]) -> None:
        start = time.perf_counter()
        if self.calibration in ("lsq", "both") and refit_layers:
            reconstruct(self.original, pruned, refit_layers, self.recon_images, seed=self.seed)
        timings["reconstruct"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.calibration in ("bn", "both"):
            recalibrate_batchnorm(pruned, self.calib_batches)
        timings["calibrate"] = time.perf_counter() - start

    def error(self, model: nn.Module) -> float:
        if self.evaluate is not None:
            return 1.0 - self.evaluate(model, self.reward_batches)
        return 1.0 - accuracy(model, self.reward_batches)[self.metric]

    def __call__(self, pruned: nn.Module, refit_layers: dict | None = None) -> tuple[float, dict[str, float]]:
        """Calibrate ``pruned`` in place and return (error, timings in seconds)."""
        timings: dict[str, float] = {}
        self.calibrate(pruned, refit_layers, timings)
        start = time.perf_counter()
        error = self.error(pruned)
        timings["eval"] = time.perf_counter() - start
        return error, timings
