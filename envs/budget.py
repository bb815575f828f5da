"""Budget clipping for the resource-constrained protocol.

Before unit t is pruned, every later unit is assumed cut to its smallest keep count and every
earlier unit keeps what it chose; unit t may keep at most the largest count that still meets
the target. Costs are monotone in each keep count, so a bisection over the allowed counts
finds it exactly, and every episode ends at or under the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def allowed_counts(size: int, step: int) -> np.ndarray:
    """Keep counts a unit can take: multiples of ``step`` up to ``size``, and ``size`` itself."""
    counts = np.arange(step, size + 1, step)
    return counts if counts.size and counts[-1] == size else np.append(counts, size)


def max_keep(
    cost: Callable[[Sequence[int]], float], chosen: Sequence[int], floor: Sequence[int],
    size: int, step: int, budget: float,
) -> int:
    """Largest allowed count for the next unit with ``chosen`` before it and ``floor`` after it.

    Returns 0 when even the smallest allowed count breaks the budget (only possible when the
    budget is infeasible from the start, which the environment rejects up front).
    """
    counts = allowed_counts(size, step)
    low, high = 0, len(counts)  # counts[:low] are known to fit
    while low < high:
        mid = (low + high) // 2
        if cost([*chosen, int(counts[mid]), *floor]) <= budget:
            low = mid + 1
        else:
            high = mid
    return int(counts[low - 1]) if low else 0
