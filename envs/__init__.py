"""The AMC Gymnasium environment (installed as ``amc.envs``)."""

import gymnasium

from amc.envs.pruning_env import Episode, PruningEnv, run_episode, walk

ENV_ID = "amc/Pruning-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="amc.factory:env_from_config")

__all__ = ["ENV_ID", "Episode", "PruningEnv", "run_episode", "walk"]
