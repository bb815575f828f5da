"""``PruningEnv``: AMC's environment. One step per prunable unit, in forward order.

The agent answers each unit's state with an action in [0, 1], which the space's choice for that
step maps to a value: a preserve ratio in [lbound, rbound] rounded to the unit's allowed keep
counts, or a bit width in [min_bits, max_bits] (``amc.quant_spaces``). Under the
resource-constrained protocol the value is clipped so the episode can still end within budget,
and after the last unit the unused budget is spread over the units (``fill``, see ``amc.budget``). Steps cost nothing
but arithmetic (the analytic cost model); the last step prunes a copy of the model, calibrates
it, scores it on the reward-val subset and returns the episode's reward.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from torch import nn

from amc.budget import fill_budget, largest_feasible, max_keep, nearest_allowed
from amc.envs.rewards import REWARDS
from amc.envs.state import FEATURES, history_features, observation, static_features
from amc.errors import UserError
from amc.graph import COUPLED, PrunableGraph
from amc.scoring import Scorer
from amc.spaces import AnchoredChoice, Space


class PruningEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self, model: nn.Module, space: Space, scorer: Scorer, protocol: str = "resource",
        target: float = 0.5, lbound: float = 0.2, rbound: float = 1.0, fill: bool = True,
        state_history: bool = False, anchor: Sequence[int] | None = None, anchor_spread: float = 1.0,
    ):
        if protocol not in REWARDS:
            raise ValueError(f"protocol must be one of {sorted(REWARDS)}, got {protocol!r}")
        if not space.sizes:
            raise UserError("the model has no prunable unit (every conv/linear group is protected)",
                            field="model.name")
        self.model = model
        self.space = space
        self.scorer = scorer
        self.protocol = protocol
        self.reward_fn = REWARDS[protocol]
        self.lbound, self.rbound = lbound, rbound
        self.fill = fill and protocol == "resource"
        self.full_cost = space.cost(space.sizes)
        self.budget = target * self.full_cost
        self.choices = space.choices(lbound, rbound)
        if anchor is not None:  # a rule's policy (one value per unit): actions become deviations from it
            self.choices = [AnchoredChoice(choice, value, anchor_spread) for choice, value in zip(self.choices, anchor)]
        self.floor = [choice.floor for choice in self.choices]
        self.ceiling = [choice.ceiling for choice in self.choices]
        self.static = static_features(space.layers, space.unit_costs)
        flags = [np.asarray(column, dtype=np.float32) for column in space.step_flags.values()]
        self.flags = np.stack(flags, axis=1) if flags else np.zeros((len(space.sizes), 0), dtype=np.float32)
        self.total_unit_cost = float(sum(space.unit_costs)) or 1.0
        self.full_measures = space.measures(space.sizes)
        if protocol == "resource":
            reachable = space.cost(self.floor) / self.full_cost
            if reachable > target + 1e-12:
                bounds = " and ".join(sorted({choice.bound_text for choice in self.choices}))
                raise UserError(
                    f"target {target:g} is below what {bounds} allows; the smallest "
                    f"reachable target is {math.ceil(reachable * 1e4) / 1e4:g}{_left_whole(space)}",
                    field="search.target")
        self.state_history = state_history
        self.features = FEATURES + tuple(space.step_flags) + (history_features(self.num_units) if state_history else ())
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(self.features),), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.keep: list[int] = []

    @property
    def num_units(self) -> int:
        return len(self.space.sizes)

    def _observation(self) -> np.ndarray:
        t = min(len(self.keep), self.num_units - 1)
        rest = self.space.sizes[len(self.keep):]
        reduced = 1.0 - self.space.cost([*self.keep, *rest]) / self.full_cost
        later = sum(self.space.unit_costs[t + 1:]) / self.total_unit_cost
        a_prev = self.choices[len(self.keep) - 1].state(self.keep[-1]) if self.keep else 1.0
        history = self._history() if self.state_history else None
        return observation(self.static, t, reduced, later, a_prev, self.flags[t], history)

    def _history(self) -> np.ndarray:
        """Every earlier step's value in [0, 1], zeros for the steps not yet taken."""
        history = np.zeros(self.num_units, dtype=np.float32)
        history[:len(self.keep)] = [choice.state(value) for choice, value in zip(self.choices, self.keep)]
        return history

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.keep = []
        return self._observation(), {}

    def preserve_count(self, action: float) -> int:
        """The value for the current step: action -> the choice's value (count or bits), clipped to the budget."""
        t = len(self.keep)
        choice = self.choices[t]
        count = choice.pick(float(np.clip(action, 0.0, 1.0)))
        if self.protocol == "resource":
            limit = max_keep(self.space.cost, self.keep, self.floor[t + 1:], choice.allowed, self.budget)
            count = max(min(count, limit), choice.floor)
        return count

    def advance(self, action) -> tuple[np.ndarray, float | None, bool, dict]:
        """``step`` without the final scoring: ``(obs, reward, done, info)``.

        ``reward`` is 0.0 before the last unit, the worst reward after a non-finite action, and
        None once the last unit is answered: ``self.keep`` then awaits ``evaluate``, here or in a
        scoring worker (the parallel search walks a round's policies first, then scores them).
        """
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        if not math.isfinite(value):
            warnings.warn(f"non-finite action {value} at unit {len(self.keep)}: episode ends with the worst reward")
            return self._observation(), self.worst_reward(), True, {"nonfinite": True}
        self.keep.append(self.preserve_count(value))
        if len(self.keep) < self.num_units:
            return self._observation(), 0.0, False, {}
        self.keep = self.spend_budget(self.keep)
        return self._observation(), None, True, {}

    def spend_budget(self, keep: Sequence[int]) -> list[int]:
        """``keep`` with the unused budget spread over the units (``amc.budget.fill_budget``), when filling is on."""
        if not self.fill:
            return list(keep)
        return fill_budget(keep, self.space.sizes, self.ceiling, [c.step for c in self.choices],
                           self.space.cost, self.budget)

    def nearest_policy(self, values: Sequence[float]) -> list[int]:
        """The policy an episode could end with that is nearest ``values`` (one real value per unit).

        Each unit takes its nearest allowed value; under the resource protocol every unit is first
        moved toward its floor by the one shared fraction that makes the policy fit (the largest
        such), then the unused budget is spent as an episode spends it.
        """
        def policy(knob: float) -> list[int]:
            return [nearest_allowed(floor + knob * (value - floor), choice.allowed, floor, choice.ceiling)
                    for choice, floor, value in zip(self.choices, self.floor, values)]

        if self.protocol != "resource":
            return policy(1.0)
        return self.spend_budget(largest_feasible(policy, self.space.cost, self.budget))

    def step(self, action):
        obs, reward, done, info = self.advance(action)
        if reward is None:
            reward, info = self.evaluate(self.keep)
        return obs, reward, done, False, info

    def worst_reward(self) -> float:
        return self.reward_fn(1.0, self.full_measures[self.space.reward_measure])

    def evaluate(self, keep: list[int]) -> tuple[float, dict]:
        """Prune a copy of the model to ``keep``, calibrate and score it."""
        start = time.perf_counter()
        pruned = copy.deepcopy(self.model)
        timings = {"copy": time.perf_counter() - start}
        start = time.perf_counter()
        self.space.apply(pruned, keep)
        timings["prune"] = time.perf_counter() - start
        error, score_timings = self.scorer(pruned, self.space.refit_layers(keep))
        timings.update(score_timings)
        cost = self.space.cost(keep)
        measures = self.space.measures(keep)
        info = {
            "error": error,
            "keep": list(keep),
            "ratios": [choice.ratio(k) for choice, k in zip(self.choices, keep)],
            "cost_ratio": cost / self.full_cost,
            **{f"{name}_ratio": value / self.full_measures[name] for name, value in measures.items()},
            "timings": timings,
        }
        # AMC's -Error * log(FLOPs): priced in MACs (params, fine-grained) even when the budget is
        # latency, whose log is negative below 1 ms and would invert the reward.
        reward = self.reward_fn(error, measures[self.space.reward_measure])
        if not math.isfinite(reward):
            warnings.warn(f"non-finite reward for policy {info['ratios']}: scored as the worst reward")
            reward, info["nonfinite"] = self.worst_reward(), True
        return reward, info


def _left_whole(space: Space) -> str:
    """The groups a channel policy cannot cut, their share of the MACs and the fix, for the target message."""
    graph: PrunableGraph | None = getattr(space, "graph", None) if space.kind == "channel" else None
    if graph is None or not graph.skipped:
        return ""
    by_reason = graph.skipped_by_reason()
    share = graph.skipped_macs() / sum(layer.macs for layer in graph.layers.values())
    groups = ", ".join(f"{len(roots)} {reason}" for reason, roots in by_reason.items())
    note = f"; groups left whole ({groups}) keep the output channels of layers holding {share:.0%} of the MACs"
    if any(reason in COUPLED for reason in by_reason):
        note += "; set search.prune_residual: true to prune the coupled ones"
    return note


@dataclass
class Episode:
    """One walk over every unit: its transitions (obs, next_obs, action, reward, done), final reward and info.

    A walked but unscored episode has ``reward`` None and the ``keep`` counts to score; ``score``
    completes it (its last transition carries the final reward, which the buffer gives every step).
    """

    transitions: list[tuple[np.ndarray, np.ndarray, np.ndarray, float | None, bool]] = field(default_factory=list)
    reward: float | None = None
    info: dict = field(default_factory=dict)
    keep: list[int] | None = None

    def score(self, reward: float, info: dict) -> None:
        obs, next_obs, action, _, done = self.transitions[-1]
        self.transitions[-1] = (obs, next_obs, action, reward, done)
        self.reward, self.info = reward, info


def walk(env: PruningEnv, act: Callable[[np.ndarray], np.ndarray]) -> Episode:
    """Reset ``env`` and answer every state with ``act(obs)``, leaving the final scoring undone.

    The result's ``keep`` awaits ``env.evaluate`` (or a scoring worker); an episode that a
    non-finite action ended already has its (worst) reward and no ``keep``.
    """
    episode = Episode()
    obs, _ = env.reset()
    done = False
    while not done:
        action = act(obs)
        next_obs, reward, done, info = env.advance(action)
        episode.transitions.append((obs, next_obs, action, reward, done))
        obs = next_obs
    if reward is None:
        episode.keep = list(env.keep)
    else:
        episode.reward, episode.info = reward, info
    return episode


def run_episode(env: PruningEnv, act: Callable[[np.ndarray], np.ndarray]) -> Episode:
    """Walk ``env`` with ``act`` and score the policy in this process."""
    episode = walk(env, act)
    if episode.reward is None:
        episode.score(*env.evaluate(episode.keep))
    return episode
