"""Budget clipping and filling for the resource-constrained protocol.

Clipping: before unit t is pruned, every later unit is assumed cut to its smallest keep count
(or bit width) and every earlier unit keeps what it chose; unit t may keep at most the largest
allowed value that still meets the target. Costs are monotone in each value, so a bisection
over the allowed values finds it exactly, and every episode ends at or under the target.

Filling: clipping only caps a policy, so an agent that cuts too much early ends under budget
and is scored on a smaller network than the budget allows (seen on ResNet-20: 46% of the FLOPs
for a 50% target). After the last unit, every unit grows by the same fraction of its headroom,
the largest fraction that still fits: the agent's allocation is kept, the budget is spent.

Fitting: a policy given as real values per unit (the mean of several policies) is rounded to
each unit's nearest allowed value, shrunk toward the floors by one shared fraction until it
fits, then filled as an episode is (``PruningEnv.nearest_policy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from amc.pruning import keep_count


def allowed_counts(size: int, step: int) -> np.ndarray:
    """Keep counts a unit can take: multiples of ``step`` up to ``size``, and ``size`` itself."""
    counts = np.arange(step, size + 1, step)
    return counts if counts.size and counts[-1] == size else np.append(counts, size)


def max_keep(
    cost: Callable[[Sequence[int]], float], chosen: Sequence[int], floor: Sequence[int],
    counts: np.ndarray, budget: float,
) -> int:
    """Largest of the ascending allowed ``counts`` for the next unit with ``chosen`` before it and ``floor`` after it.

    Returns 0 when even the smallest allowed count breaks the budget (only possible when the
    budget is infeasible from the start, which the environment rejects up front).
    """
    low, high = 0, len(counts)  # counts[:low] are known to fit
    while low < high:
        mid = (low + high) // 2
        if cost([*chosen, int(counts[mid]), *floor]) <= budget:
            low = mid + 1
        else:
            high = mid
    return int(counts[low - 1]) if low else 0


def nearest_allowed(value: float, allowed: np.ndarray, floor: int, ceiling: int) -> int:
    """The allowed value in [floor, ceiling] nearest ``value`` (the lower one on a tie); monotone in ``value``."""
    within = np.unique(np.concatenate([allowed[(allowed >= floor) & (allowed <= ceiling)], [floor, ceiling]]))
    return int(within[np.argmin(np.abs(within - value))])


def largest_feasible(
    policy: Callable[[float], list[int]], cost: Callable[[Sequence[int]], float], budget: float,
) -> list[int]:
    """``policy(knob)`` for the largest knob in [0, 1] whose cost meets the budget (bisection).

    ``policy`` must grow with the knob and ``policy(0)`` must fit.
    """
    low, high = 0.0, 1.0
    if cost(policy(high)) <= budget:
        return policy(high)
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(policy(mid)) <= budget else (low, mid)
    return policy(low)


def fill_budget(
    keep: Sequence[int], sizes: Sequence[int], ceiling: Sequence[int], step: int | Sequence[int],
    cost: Callable[[Sequence[int]], float], budget: float,
) -> list[int]:
    """Grow every unit by one shared fraction of its headroom (up to ``ceiling``) while the policy fits.

    ``step``: the rounding step of every unit, or one per unit (joint pruning + bit widths).
    """
    steps = [step] * len(keep) if isinstance(step, int) else list(step)

    def grown(fraction: float) -> list[int]:
        return [min(c, max(k, keep_count((k + fraction * (c - k)) / s, s, q)))
                for k, s, c, q in zip(keep, sizes, ceiling, steps)]

    return largest_feasible(grown, cost, budget) if cost(keep) <= budget else list(keep)
