"""The AMC DDPG agent's parts, on real tensors, and the search beating the uniform policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces

from amc.agents import AMCDDPG, EpisodeRewardBuffer, TruncatedNormalNoise
from amc.baselines import uniform_policy
from amc.config import AgentConfig, load_config
from amc.errors import UserError
from amc.envs import run_episode
from amc.factory import Workspace
from amc.search import search


def test_truncated_noise_stays_in_bounds_and_decays_after_warmup():
    noise = TruncatedNormalNoise(sigma=0.5, decay=0.9, warmup=2, seed=0)
    samples = np.array([noise.sample(np.array([0.95])) for _ in range(2000)]).ravel()
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert 0.6 < samples.mean() < 0.9  # mass pulled inside, not piled on the bound
    assert (samples == 1.0).mean() < 0.01
    noise.reset(); noise.reset()
    assert noise.sigma == 0.5
    noise.reset()
    assert noise.sigma == pytest.approx(0.45)


def test_buffer_writes_the_final_reward_back_and_subtracts_the_baseline():
    obs_space = spaces.Box(0, 1, (3,), np.float32)
    act_space = spaces.Box(-1, 1, (1,), np.float32)
    buffer = EpisodeRewardBuffer(10, obs_space, act_space, device="cpu", baseline_alpha=0.5)
    for t, done in enumerate([False, False, True]):
        obs = np.full((1, 3), t, np.float32)
        buffer.add(obs, obs + 1, np.zeros((1, 1), np.float32), np.array([0.0 if not done else -0.25]),
                   np.array([done]), [{}])
        assert buffer.size() == (3 if done else 0)  # held until the episode ends
    assert np.all(buffer.rewards[:3] == -0.25)
    batch = buffer.sample(4)
    assert buffer.baseline == pytest.approx(-0.25)
    assert np.allclose(batch.rewards.numpy(), 0.0)
    state = buffer.state_dict()
    other = EpisodeRewardBuffer(10, obs_space, act_space, device="cpu")
    other.load_state_dict(state)
    assert other.size() == 3 and other.baseline == buffer.baseline


def test_actor_and_critic_keep_their_own_learning_rates(demo_cfg):
    env = Workspace(demo_cfg).env()
    agent = AMCDDPG(env, AgentConfig(warmup_episodes=1, batch_size=4), env.num_units, seed=0)
    for _ in range(2):
        obs, _ = env.reset()
        done = False
        while not done:
            action = agent.act(obs, warmup=True)
            next_obs, reward, done, _, _ = env.step(action)
            agent.store(obs, next_obs, action, reward, done)
            obs = next_obs
    agent.learn_episode()
    assert agent.actor.optimizer.param_groups[0]["lr"] == 1e-4
    assert agent.critic.optimizer.param_groups[0]["lr"] == 1e-3
    assert agent._n_updates == env.num_units


@pytest.mark.parametrize("algorithm, critics, delay", [("ddpg", 1, 1), ("td3", 2, 2)])
def test_ddpg_or_td3(demo_cfg, algorithm, critics, delay):
    env = Workspace(demo_cfg).env()
    agent = AMCDDPG(env, AgentConfig(algorithm=algorithm, warmup_episodes=1, batch_size=4), env.num_units, seed=0)
    assert len(agent.critic.q_networks) == critics and agent.policy_delay == delay
    assert (agent.target_noise_clip > 0) == (algorithm == "td3")  # DDPG: no target smoothing
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    for _ in range(2):
        for transition in run_episode(env, lambda obs: agent.act(obs, warmup=True)).transitions:
            agent.store(*transition)
    agent.learn_episode()
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


def test_clone_top_k_starts_the_actor_at_the_best_warmup_episodes(demo_cfg):
    """Every episode's first state is the same, so the cloned actor's first action is the mean of
    the k best episodes' first actions; without cloning the actor is left as it was."""
    env = Workspace(demo_cfg).env()
    agents = {k: AMCDDPG(env, AgentConfig(warmup_episodes=12, clone_top_k=k), env.num_units, seed=0) for k in (0, 3)}
    episodes = [run_episode(env, lambda obs: agents[0].act(obs, warmup=True)) for _ in range(12)]
    for agent in agents.values():
        for episode in episodes:
            for transition in episode.transitions:
                agent.store(*transition)
    first_obs = episodes[0].transitions[0][0]
    before = {k: agent.predict(first_obs, deterministic=True)[0] for k, agent in agents.items()}
    for agent in agents.values():
        agent.end_warmup()
    best = sorted(episodes, key=lambda e: -e.reward)[:3]
    mean_first = np.mean([e.transitions[0][2] for e in best], axis=0)
    cloned = agents[3].predict(first_obs, deterministic=True)[0]
    assert np.abs(cloned - mean_first).max() < 0.03 < np.abs(before[3] - mean_first).max()
    assert np.array_equal(agents[0].predict(first_obs, deterministic=True)[0], before[0])
    assert torch.equal(agents[3].actor_target.mu[-2].weight, agents[3].actor.mu[-2].weight)
    resumed = AMCDDPG(env, AgentConfig(warmup_episodes=12, clone_top_k=3), env.num_units, seed=0)
    resumed.load_state_dict(agents[3].state_dict())
    resumed.end_warmup()  # once per search, also across a resume
    assert np.array_equal(resumed.predict(first_obs, deterministic=True)[0], cloned)


def test_sb3_learn_explores_the_amc_way(demo_cfg):
    env = Workspace(demo_cfg).env()
    cfg = AgentConfig(warmup_episodes=2, batch_size=8)
    agent = AMCDDPG(env, cfg, env.num_units, seed=0)
    agent.learn(total_timesteps=5 * env.num_units)
    assert agent.replay_buffer.size() == 5 * env.num_units
    assert agent.noise.episodes == 5 and agent.noise.sigma == pytest.approx(0.5 * cfg.noise_decay ** 3)


def test_presets_fill_what_the_config_leaves_out(demo_cfg, tmp_path):
    assert (AgentConfig().gamma, AgentConfig().noise_decay) == (0.0, 0.99)
    amc = AgentConfig(preset="amc")
    assert (amc.gamma, amc.noise_decay) == (1.0, 0.95)  # the official code's DDPG
    env = Workspace(demo_cfg).env()
    agent = AMCDDPG(env, amc, env.num_units, seed=0)
    assert agent.gamma == 1.0 and agent.noise.decay == 0.95
    assert AgentConfig(preset="amc", noise_decay=0.9).noise_decay == 0.9  # an explicit field wins
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**demo_cfg.to_dict(), "agent": {"preset": "amc"}}))
    cfg = load_config(path, ["agent.gamma=0.5"])
    assert (cfg.agent.preset, cfg.agent.gamma, cfg.agent.noise_decay) == ("amc", 0.5, 0.95)
    with pytest.raises(UserError, match="agent.preset"):
        load_config(path, ["agent.preset=ddpg"])


def test_search_beats_the_uniform_policy_on_demo(demo_cfg, tmp_path):
    cfg = demo_cfg.model_copy(update={
        "search": demo_cfg.search.model_copy(update={"episodes": 120}),
        "agent": demo_cfg.agent.model_copy(update={"warmup_episodes": 40}),
    })
    best = search(cfg, tmp_path / "run", progress=False)
    env = Workspace(cfg).env()
    uniform = uniform_policy(env.space.sizes, env.space.round_to, env.space.cost, env.budget, cfg.search.lbound)
    _, uniform_info = env.evaluate(uniform)
    print(f"searched: error {best['error']:.4f} at {best['macs_ratio']:.3f} FLOPs; "
          f"uniform: error {uniform_info['error']:.4f} at {uniform_info['macs_ratio']:.3f} FLOPs")
    assert best["macs_ratio"] <= 0.5 and uniform_info["macs_ratio"] <= 0.5
    assert best["error"] < uniform_info["error"]
