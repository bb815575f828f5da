"""AMC's replay buffer: episode-final rewards and a moving-average reward baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples


class EpisodeRewardBuffer(ReplayBuffer):
    """Holds an episode's transitions until it ends, then stores them all with its final reward.

    AMC rewards only the whole policy, so every step of an episode is credited with the reward
    of its last step. ``sample`` subtracts a moving-average baseline ``b <- b + alpha * (mean
    minibatch reward - b)`` from each minibatch's rewards (the official code's variance
    reduction).
    """

    def __init__(self, *args, baseline_alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline_alpha = baseline_alpha
        self.baseline: float | None = None
        self.pending: list[tuple] = []

    def add(self, obs, next_obs, action, reward, done, infos: list[dict[str, Any]]) -> None:
        self.pending.append((obs, next_obs, action, done, infos))
        if not np.all(done):
            return
        final = np.asarray(reward, dtype=np.float32)
        for obs_t, next_t, action_t, done_t, infos_t in self.pending:
            super().add(obs_t, next_t, action_t, final, done_t, infos_t)
        self.pending = []

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        data = super().sample(batch_size, env)
        mean = float(data.rewards.mean())
        self.baseline = mean if self.baseline is None else self.baseline + self.baseline_alpha * (mean - self.baseline)
        return data._replace(rewards=data.rewards - self.baseline)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        n = self.buffer_size if self.full else self.pos
        arrays = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
        return {
            **{name: torch.from_numpy(getattr(self, name)[:n].copy()) for name in arrays},
            "pos": self.pos, "full": self.full, "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(state["rewards"])
        for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            getattr(self, name)[:n] = state[name].numpy()
        self.pos, self.full, self.baseline = int(state["pos"]), bool(state["full"]), state["baseline"]
        self.pending = []
