"""The AMC DDPG agent on stable-baselines3 (installed as ``amc.agents``)."""

from amc.agents.buffer import EpisodeRewardBuffer
from amc.agents.ddpg import AMCDDPG, rng_state, set_rng_state
from amc.agents.noise import TruncatedNormalNoise

__all__ = ["AMCDDPG", "EpisodeRewardBuffer", "TruncatedNormalNoise", "rng_state", "set_rng_state"]
