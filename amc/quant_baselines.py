"""Rule-based bit-width policies to compare the search against, priced by the same cost model and
exported through the same path (``amc baseline --method uniform|sensitivity`` in quantize or
joint mode).

- uniform: one bit width for every step whose width is priced (the widest that fits; in joint
  mode the widest for which uniform pruning down to lbound can meet the budget, then the
  largest uniform preserve ratio at that width). Unpriced steps (input widths under a size
  budget) stay at max_bits.
- sensitivity: each step is quantized alone to min_bits (everything else fp32) and scored; then,
  starting from max_bits everywhere, bits are taken one at a time from the least sensitive
  step that still saves cost, until the budget is met (quantize mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from amc.budget import largest_feasible
from amc.errors import UserError
from amc.quant_spaces import BitsChoice


def _priced(choices: Sequence, cost: Callable[[list[int]], float]) -> list[bool]:
    """Whether lowering each bit-width step (all else at its ceiling) lowers the cost."""
    top = [c.ceiling for c in choices]
    full = cost(top)
    return [isinstance(c, BitsChoice) and cost(top[:i] + [c.floor] + top[i + 1:]) < full
            for i, c in enumerate(choices)]


def uniform_bits_policy(choices: Sequence, cost: Callable[[list[int]], float], budget: float) -> list[int]:
    priced = _priced(choices, cost)
    bits = [c for c in choices if isinstance(c, BitsChoice)][0]
    for width in range(bits.ceiling, bits.floor - 1, -1):
        def policy(knob: float, width: int = width) -> list[int]:
            return [(width if p else c.ceiling) if isinstance(c, BitsChoice) else c.pick(knob)
                    for c, p in zip(choices, priced)]

        if cost(policy(0.0)) <= budget:
            return largest_feasible(policy, cost, budget)
    raise UserError(f"even {bits.floor} bits everywhere cost more than the budget", field="search.target")


def sensitivity_policy(choices: Sequence, cost: Callable[[list[int]], float], budget: float,
                       error: Callable[[list[int]], float], full: Sequence[int]) -> list[int]:
    """``error(policy)`` scores a policy; ``full`` is the untouched one (every step at 32 bits)."""
    sensitivity = [error([*full[:i], c.floor, *full[i + 1:]]) for i, c in enumerate(choices)]
    order = sorted(range(len(choices)), key=lambda i: sensitivity[i])
    values = [c.ceiling for c in choices]
    while cost(values) > budget:
        for i in order:
            lowered = [*values[:i], values[i] - 1, *values[i + 1:]]
            if values[i] > choices[i].floor and cost(lowered) < cost(values):
                values = lowered
                break
        else:
            raise UserError(f"even {choices[0].floor} bits everywhere cost more than the budget", field="search.target")
    return values
