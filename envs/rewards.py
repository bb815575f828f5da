"""AMC's rewards. ``error`` is 1 - accuracy on the reward-val subset, in [0, 1]."""

from __future__ import annotations

import math


def error_reward(error: float, cost: float) -> float:
    """Resource-constrained protocol: the budget is enforced by clipping, so only error counts."""
    return -error


def error_log_cost_reward(error: float, cost: float) -> float:
    """Accuracy-guaranteed protocol: -Error * log(FLOPs) (or log(#params), fine-grained).

    ``cost`` is MACs or parameters, never the budgeted resource: a latency in milliseconds has
    a negative log below 1 ms, which would make pruning everything the best policy.
    """
    return -error * math.log(cost)


REWARDS = {"resource": error_reward, "accuracy": error_log_cost_reward}
