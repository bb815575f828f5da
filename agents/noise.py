"""AMC's exploration noise: a truncated normal around the actor's output, sigma decaying per episode."""

from __future__ import annotations

import numpy as np
from scipy.stats import truncnorm
from stable_baselines3.common.noise import ActionNoise


class TruncatedNormalNoise(ActionNoise):
    """Samples ``a ~ N(mu, sigma^2)`` truncated to ``[low, high]`` (the action bounds).

    Unlike SB3's additive noise, which is added in the scaled space and then clipped (piling
    actions on the bounds), the truncated normal keeps its mass inside the bounds. SB3 calls
    ``reset()`` at the end of every episode; after ``warmup`` episodes each call multiplies
    sigma by ``decay``, as AMC's official code does.
    """

    def __init__(self, sigma: float = 0.5, decay: float = 0.95, warmup: int = 0,
                 low: float = 0.0, high: float = 1.0, seed: int | None = None):
        super().__init__()
        self.initial_sigma = sigma
        self.sigma = sigma
        self.decay = decay
        self.warmup = warmup
        self.low, self.high = low, high
        self.episodes = 0
        self.rng = np.random.default_rng(seed)

    def sample(self, mu: np.ndarray) -> np.ndarray:
        mu = np.clip(np.asarray(mu, dtype=np.float64), self.low, self.high)
        if self.sigma <= 0:
            return mu
        a, b = (self.low - mu) / self.sigma, (self.high - mu) / self.sigma
        return truncnorm.rvs(a, b, loc=mu, scale=self.sigma, random_state=self.rng)

    def __call__(self) -> np.ndarray:
        raise NotImplementedError("truncated noise depends on the action: use sample(mu)")

    def reset(self) -> None:
        self.episodes += 1
        if self.episodes > self.warmup:
            self.sigma *= self.decay

    def state_dict(self) -> dict:
        return {"sigma": self.sigma, "episodes": self.episodes, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.sigma, self.episodes = float(state["sigma"]), int(state["episodes"])
        self.rng.bit_generator.state = state["rng"]
