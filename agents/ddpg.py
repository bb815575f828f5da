"""The AMC agent: stable-baselines3's DDPG (or TD3) with AMC's exploration, learning rates and buffer.

What differs from plain SB3 DDPG, and where it lives:
- warmup episodes of uniform random actions, then the actor's output with truncated-normal
  noise whose sigma decays per episode (``act`` / ``_sample_action``, ``TruncatedNormalNoise``);
- separate actor and critic learning rates (``_update_learning_rate``: SB3 would reset both
  optimizers to one rate at every ``train()``);
- episode-final rewards and the moving-average baseline (``EpisodeRewardBuffer``);
- optionally, an actor cloned from the best warmup episodes when warmup ends (``end_warmup``);
- a full state dict of plain tensors and numbers for exact, pickle-free resume.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import TD3
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import update_learning_rate

from amc.agents.buffer import EpisodeRewardBuffer
from amc.agents.noise import TruncatedNormalNoise
from amc.config import AgentConfig


class AMCDDPG(TD3):
    def __init__(self, env, cfg: AgentConfig, steps_per_episode: int, seed: int = 0, device: str = "cpu"):
        self.cfg = cfg
        self.steps_per_episode = steps_per_episode
        noise = TruncatedNormalNoise(cfg.noise_sigma, cfg.noise_decay, cfg.warmup_episodes,
                                     float(env.action_space.low[0]), float(env.action_space.high[0]), seed=seed)
        td3 = cfg.algorithm == "td3"
        super().__init__(
            "MlpPolicy", env,
            learning_rate=cfg.actor_lr,
            buffer_size=cfg.buffer_episodes * steps_per_episode,
            learning_starts=cfg.warmup_episodes * steps_per_episode,
            batch_size=cfg.batch_size, tau=cfg.tau, gamma=cfg.gamma,
            train_freq=(1, "episode"), gradient_steps=-1,
            action_noise=noise,
            replay_buffer_class=EpisodeRewardBuffer,
            replay_buffer_kwargs={"baseline_alpha": cfg.baseline_alpha},
            policy_kwargs={"net_arch": list(cfg.hidden), "n_critics": 2 if td3 else 1},
            seed=seed, device=device,
            # DDPG is TD3 without its three changes (SB3 builds its DDPG the same way); TD3 adds
            # twin critics, a delayed actor update and target-policy smoothing against the critic's
            # over-estimation of noisy rewards.
            policy_delay=2 if td3 else 1,
            target_policy_noise=0.2 if td3 else 0.1,
            target_noise_clip=0.5 if td3 else 0.0,
        )
        self.set_logger(Logger(folder=None, output_formats=[]))  # SB3's configure() would leave an SB3-* temp dir
        self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
        self.rng = np.random.default_rng(seed)
        self.warmup_ended = False

    @property
    def noise(self) -> TruncatedNormalNoise:
        return self.action_noise

    def _update_learning_rate(self, optimizers) -> None:
        update_learning_rate(self.actor.optimizer, self.cfg.actor_lr)
        update_learning_rate(self.critic.optimizer, self.cfg.critic_lr)

    def act(self, obs: np.ndarray, warmup: bool) -> np.ndarray:
        """An exploration action in the env's action space: uniform during warmup, else noisy."""
        low, high = self.action_space.low, self.action_space.high
        if warmup:
            return self.rng.uniform(low, high).astype(np.float32)
        mu, _ = self.predict(obs, deterministic=True)
        return np.asarray(self.noise.sample(mu), dtype=np.float32).reshape(self.action_space.shape)

    def end_warmup(self) -> None:
        """Called before the first episode after warmup (again on resume: it acts once).

        With ``agent.clone_top_k``, fits the actor (and its target) to the actions of the best
        warmup episodes in the buffer, so that the agent explores around the policy those
        episodes share instead of spending its first hundreds of episodes rediscovering it (on
        MobileNet v1 at 25%, 100 random warmup episodes and the mean of their ten best already
        reach the answer the agent converges to after 300 more). Measured there it changed
        nothing (docs/benchmarks.md, session 21): AMC's first noise is almost as wide as warmup.
        """
        if self.warmup_ended:
            return
        self.warmup_ended = True
        if self.cfg.clone_top_k:
            self._clone(self.cfg.clone_top_k)

    def _clone(self, k: int, steps: int = 300, lr: float = 1e-3) -> None:
        """Behaviour cloning: regress the actor's output on the stored actions of the ``k`` best episodes."""
        buf, per = self.replay_buffer, self.steps_per_episode
        stored = buf.buffer_size if buf.full else buf.pos
        episode_rewards = buf.rewards[0:stored:per, 0]  # an episode's steps are contiguous and share its reward
        best = np.argsort(-episode_rewards, kind="stable")[:k]
        rows = (best[:, None] * per + np.arange(per)).ravel()
        obs = torch.as_tensor(buf.observations[rows, 0], device=self.device)
        target = torch.as_tensor(buf.actions[rows, 0], device=self.device)  # in the actor's scaled space
        optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(self.actor(obs), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.actor_target.load_state_dict(self.actor.state_dict())

    def _sample_action(self, learning_starts: int, action_noise=None, n_envs: int = 1):
        """SB3's hook, so ``learn()`` explores the AMC way too."""
        warmup = self.num_timesteps < learning_starts
        action = np.stack([self.act(self._last_obs[i], warmup) for i in range(n_envs)])
        return action, self.policy.scale_action(action)

    def _setup_learn(self, *args, **kwargs):
        """SB3 also resets the noise when ``learn()`` starts; AMC's noise steps only at episode ends."""
        noise, self.action_noise = self.action_noise, None
        try:
            return super()._setup_learn(*args, **kwargs)
        finally:
            self.action_noise = noise

    def store(self, obs, next_obs, action, reward: float, done: bool) -> None:
        self.replay_buffer.add(obs[None], next_obs[None], self.policy.scale_action(action)[None],
                               np.array([reward]), np.array([done]), [{}])

    def learn_episode(self) -> None:
        """One gradient step per transition of the episode just stored (AMC updates after each episode)."""
        self.train(gradient_steps=self.steps_per_episode, batch_size=self.batch_size)

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "actor_optimizer": self.actor.optimizer.state_dict(),
            "critic_optimizer": self.critic.optimizer.state_dict(),
            "buffer": self.replay_buffer.state_dict(),
            "noise": self.noise.state_dict(),
            "rng": self.rng.bit_generator.state,
            "n_updates": self._n_updates,
            "warmup_ended": self.warmup_ended,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.actor.optimizer.load_state_dict(state["actor_optimizer"])
        self.critic.optimizer.load_state_dict(state["critic_optimizer"])
        self.replay_buffer.load_state_dict(state["buffer"])
        self.noise.load_state_dict(state["noise"])
        self.rng.bit_generator.state = state["rng"]
        self._n_updates = int(state["n_updates"])
        self.warmup_ended = bool(state.get("warmup_ended", self._n_updates > 0))  # checkpoints before the flag


def rng_state() -> dict:
    """The global RNG states the search touches (SB3 samples its minibatches with numpy's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
