"""PruningEnv on the trained demo model and the real digits data: Gymnasium API, state, rewards,
budget clipping, calibration, fine-grained mode, determinism."""

from __future__ import annotations

import copy
import math

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import amc.envs
from amc.baselines import baseline_policy, uniform_policy
from amc.config import config_from_dict
from amc.envs.state import FEATURES
from amc.budget import nearest_allowed
from amc.factory import Workspace, env_from_config
from amc.metrics import count_macs, count_nonzero_params, count_params, torch_threads
from amc.pruning import keep_count
from amc.spaces import ChannelSpace, FineGrainedSpace
from conftest import write_config

TIMING_KEYS = {"copy", "prune", "calibrate", "reconstruct", "eval"}
INPUT_SHAPE = (1, 1, 8, 8)


@pytest.fixture(scope="session", autouse=True)
def base_trained_on_one_thread(request):
    # Session fixtures are set up before function ones, so train the shared base here, on one
    # thread: on 2 cores shared with other jobs, 2 torch threads made it ~8x slower (80 s vs 10 s).
    with torch_threads(1):
        request.getfixturevalue("trained_base")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on 8x8 digits: one thread is fastest, and avoids oversubscribing a busy machine.
    with torch_threads(1):
        yield


def env_with(demo_raw, tmp_path, name="variant", **search):
    """An env built from the demo config with ``search`` overrides (same trained checkpoint)."""
    raw = copy.deepcopy(demo_raw)
    raw["search"].update(search)
    path = write_config(tmp_path / f"{name}.yaml", raw)
    return env_from_config(config_from_dict(raw, source=str(path)))


def run_episode(env, actions):
    """Step through one episode; returns (observations, rewards, last info)."""
    obs, _ = env.reset()
    observations, rewards = [obs], []
    for i, a in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(np.array([a], dtype=np.float32))
        rewards.append(reward)
        assert not truncated
        assert terminated == (i == len(actions) - 1)
        if not terminated:
            observations.append(obs)
    return observations, rewards, info


def test_check_env_and_gymnasium_make(demo_cfg):
    env = env_from_config(demo_cfg)
    assert isinstance(env, amc.envs.PruningEnv) and isinstance(env.space, ChannelSpace)
    check_env(env, skip_render_check=True)
    made = gymnasium.make(amc.envs.ENV_ID, config=demo_cfg)
    assert made.unwrapped.num_units == env.num_units == 4  # demo_cnn: 4 convs, classifier protected
    obs, _ = made.reset(seed=0)
    assert made.observation_space.contains(obs)
    done = False
    while not done:
        obs, reward, done, _, info = made.step(made.action_space.sample())
    assert -1.0 <= reward <= 0.0 and info["macs_ratio"] <= demo_cfg.search.target
    made.close()


def test_observation_rewards_and_info_along_an_episode(demo_raw, tmp_path):
    env = env_with(demo_raw, tmp_path, fill_budget=False)  # info["keep"]: the counts the agent chose
    n = env.num_units
    actions = [0.9, 0.1, 0.6, 0.3]
    observations, rewards, info = run_episode(env, actions)
    assert len(rewards) == n == len(observations)
    assert len(FEATURES) == 11
    for obs in observations:
        assert obs.shape == (11,) and obs.dtype == np.float32
        assert np.all((obs >= 0.0) & (obs <= 1.0))
        assert env.observation_space.contains(obs)
    t, rest, reduced, a_prev = (np.array([o[FEATURES.index(f)] for o in observations])
                                for f in ("t", "rest", "reduced", "a_prev"))
    assert a_prev[0] == 1.0 and reduced[0] == 0.0 and t[0] == 0.0 and t[-1] == 1.0
    assert np.all(np.diff(t) > 0)
    assert np.all(np.diff(rest) < 0) and rest[-1] == 0.0  # the units after t cost less and less
    assert np.all(np.diff(reduced) >= 0)
    np.testing.assert_allclose(a_prev[1:], np.array(info["keep"][:-1]) / np.array(env.space.sizes[:-1]), rtol=1e-6)
    assert rewards[:-1] == [0.0] * (n - 1)
    assert rewards[-1] == -info["error"] and 0.0 <= info["error"] <= 1.0
    assert len(info["ratios"]) == n and all(0.0 < r <= 1.0 for r in info["ratios"])
    assert set(info["timings"]) == TIMING_KEYS and all(v >= 0.0 for v in info["timings"].values())
    assert info["macs_ratio"] <= 0.5
    print("error", info["error"], "ratios", info["ratios"], "macs_ratio", info["macs_ratio"])


def test_state_history_carries_every_earlier_value_after_the_papers_features(demo_raw, tmp_path):
    paper = env_with(demo_raw, tmp_path, "paper", fill_budget=False)
    env = env_with(demo_raw, tmp_path, "history", fill_budget=False, state_history=True)
    n = env.num_units
    assert env.features == FEATURES + tuple(f"a_{u}" for u in range(n)) and env.observation_space.shape == (11 + n,)
    check_env(env, skip_render_check=True)
    actions = [0.9, 0.1, 0.6, 0.3]
    observations, _, info = run_episode(env, actions)
    paper_observations, _, paper_info = run_episode(paper, actions)
    assert info["keep"] == paper_info["keep"]
    ratios = np.array(info["keep"]) / np.array(env.space.sizes)
    for t, (obs, paper_obs) in enumerate(zip(observations, paper_observations)):
        np.testing.assert_array_equal(obs[:11], paper_obs)  # the paper's features are untouched
        np.testing.assert_allclose(obs[11:11 + t], ratios[:t], rtol=1e-6)  # what was cut before t
        assert not obs[11 + t:].any()  # nothing yet for t and the units after it


@pytest.mark.parametrize("rule", ["uniform", "global"])
def test_an_anchored_walk_starts_at_the_rule_and_explores_around_it(demo_raw, tmp_path, rule):
    env = env_with(demo_raw, tmp_path, rule, anchor=rule, fill_budget=False)
    check_env(env, skip_render_check=True)
    workspace = Workspace(config_from_dict({**demo_raw, "search": {**demo_raw["search"], "anchor": "none"}}))
    rule_keep = baseline_policy(workspace.cfg, rule, workspace)
    *_, info = run_episode(env, [0.5] * env.num_units)
    assert info["keep"] == rule_keep  # the middle action is the rule, which fits the budget as it is
    for t, choice in enumerate(env.choices):  # the ends: half and twice the rule's value, within the bounds
        assert choice.pick(0.0) == nearest_allowed(rule_keep[t] / 2, choice.allowed, choice.floor, choice.ceiling)
        assert choice.pick(1.0) == nearest_allowed(rule_keep[t] * 2, choice.allowed, choice.floor, choice.ceiling)
        assert choice.pick(0.0) <= rule_keep[t] <= choice.pick(1.0)
    *_, low = run_episode(env, [0.0] * env.num_units)
    assert low["keep"] == [choice.pick(0.0) for choice in env.choices]  # under the budget: nothing clipped


def test_unused_budget_is_spread_over_the_units(demo_raw, tmp_path):
    clipped_only = env_with(demo_raw, tmp_path, "clip", fill_budget=False)
    filled = env_with(demo_raw, tmp_path, "fill")
    assert filled.fill and filled.budget == clipped_only.budget
    for actions in ([0.0] * 4, [0.9, 0.1, 0.6, 0.3], [0.2, 0.0, 0.1, 0.0]):
        *_, chosen = run_episode(clipped_only, actions)
        *_, info = run_episode(filled, actions)
        assert all(f >= c for f, c in zip(info["keep"], chosen["keep"]))
        assert 0.45 < info["macs_ratio"] <= 0.5, (chosen["macs_ratio"], info["macs_ratio"])
        pruned = filled.space.apply(copy.deepcopy(filled.model), info["keep"])
        assert count_macs(pruned, INPUT_SHAPE) <= filled.budget
    assert chosen["keep"] != info["keep"] and chosen["macs_ratio"] < 0.3  # low actions: most budget unused
    accuracy_env = env_with(demo_raw, tmp_path, "accuracy", protocol="accuracy")
    *_, info = run_episode(accuracy_env, [0.0] * 4)
    assert info["keep"] == accuracy_env.floor  # no budget to fill


def test_nearest_policy_fits_real_values_to_the_budget_as_an_episode_does(demo_raw, tmp_path):
    """``nearest_policy`` turns one real value per unit (e.g. the mean of several policies) into a
    policy an episode could end with: allowed values, within budget, the budget spent."""
    env = env_with(demo_raw, tmp_path, "fill")
    rng = np.random.default_rng(0)
    episodes = [run_episode(env, rng.uniform(0.0, 1.0, env.num_units))[2]["keep"] for _ in range(6)]
    for keep in episodes:  # an episode's own policy is the nearest to itself
        assert env.nearest_policy(keep) == keep
    mean = np.mean(episodes, axis=0)
    fitted = env.nearest_policy(mean)
    print("mean", mean.round(1), "fitted", fitted, "sizes", env.space.sizes)
    assert all(f in c.allowed and c.floor <= f <= c.ceiling for f, c in zip(fitted, env.choices))
    assert 0.45 < env.space.cost(fitted) / env.full_cost <= 0.5
    assert np.abs(np.array(fitted) - mean).max() <= 1  # the mean almost fits: rounding, then filling
    everything = env.nearest_policy(env.space.sizes)  # over budget: every unit shrinks by one fraction
    assert env.space.cost(everything) <= env.budget and everything == env.spend_budget(everything)
    assert 0.45 < env.space.cost(everything) / env.full_cost
    accuracy_env = env_with(demo_raw, tmp_path, "accuracy", protocol="accuracy")  # no budget: only rounding
    assert accuracy_env.nearest_policy(np.array(env.space.sizes) - 0.4) == list(env.space.sizes)
    assert accuracy_env.nearest_policy([0] * env.num_units) == accuracy_env.floor


def test_budget_holds_on_random_episodes(demo_cfg):
    env = env_from_config(demo_cfg)
    assert demo_cfg.search.target == 0.5
    full_macs = count_macs(env.model, INPUT_SHAPE)
    rng = np.random.default_rng(0)
    ratios = []
    for episode in range(30):
        _, rewards, info = run_episode(env, rng.uniform(0.0, 1.0, env.num_units))
        assert info["macs_ratio"] <= 0.5, info
        ratios.append(info["macs_ratio"])
        if episode < 3:  # the reported ratio is the physically pruned model's
            pruned = env.space.apply(copy.deepcopy(env.model), info["keep"])
            assert count_macs(pruned, INPUT_SHAPE) / full_macs == info["macs_ratio"]
    print(f"30 episodes: MACs ratio {min(ratios):.3f}..{max(ratios):.3f}")
    assert max(ratios) > 0.45  # clipping lets the budget be used, not just respected


def test_accuracy_guaranteed_protocol(demo_raw, tmp_path):
    env = env_with(demo_raw, tmp_path, protocol="accuracy", target=0.5)
    _, rewards, info = run_episode(env, [1.0] * env.num_units)  # no clipping: everything kept
    assert info["keep"] == env.space.sizes and info["macs_ratio"] == 1.0
    assert rewards[-1] == pytest.approx(-info["error"] * math.log(env.full_cost))
    assert env.full_cost == count_macs(env.model, INPUT_SHAPE)
    _, rewards, info = run_episode(env, [0.0] * env.num_units)
    assert info["keep"] == env.floor
    macs = env.space.cost(info["keep"])
    assert rewards[-1] == pytest.approx(-info["error"] * math.log(macs))
    print("lbound everywhere:", info["error"], info["macs_ratio"], rewards[-1])
    low = env_with(demo_raw, tmp_path, name="low", protocol="accuracy", target=0.01)
    assert low.budget < low.space.cost(low.floor)  # not rejected: this protocol never clips
    _, _, info = run_episode(low, [1.0] * low.num_units)
    assert info["keep"] == low.space.sizes


@pytest.mark.parametrize("resource", ["params", "latency"])
def test_accuracy_protocol_prices_the_log_in_macs_whatever_the_budgeted_resource(demo_raw, tmp_path, resource):
    raw = copy.deepcopy(demo_raw)
    raw["latency"] = {"repeats": 2, "warmup": 1}
    raw["model"]["checkpoint"] = demo_raw["model"]["checkpoint"]
    env = env_with(raw, tmp_path, name=resource, protocol="accuracy", resource=resource)
    _, rewards, info = run_episode(env, [0.0] * env.num_units)
    macs = env.space.measures(info["keep"])["macs"]
    assert rewards[-1] == pytest.approx(-info["error"] * math.log(macs))
    assert env.worst_reward() == pytest.approx(-math.log(env.full_measures["macs"]))
    assert env.worst_reward() <= rewards[-1] <= 0.0


def test_making_an_env_leaves_the_global_rngs_alone(demo_cfg):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    gymnasium.make("amc/Pruning-v0", config=demo_cfg)
    assert np.random.rand() == expected


def test_calibration_lowers_the_error_of_a_pruned_model(demo_raw, tmp_path):
    errors = {}
    for calibration in ("none", "bn", "lsq"):
        env = env_with(demo_raw, tmp_path, name=calibration, calibration=calibration)
        space = env.space
        keep = uniform_policy(space.sizes, space.round_to, space.cost, 0.5 * env.full_cost, env.lbound)
        assert 0.45 < space.cost(keep) / env.full_cost <= 0.5
        reward, info = env.evaluate(keep)
        errors[calibration] = info["error"]
        assert reward == -info["error"]
        if calibration == "lsq":
            assert info["timings"]["reconstruct"] > 0.0
        if calibration == "none":
            full_error = env.evaluate(space.sizes)[1]["error"]
    print("uniform 50% FLOPs, reward-val error:", errors, "unpruned:", full_error)
    assert full_error < 0.1
    assert errors["none"] > full_error + 0.2  # magnitude pruning alone wrecks the model ...
    assert errors["bn"] < errors["none"] - 0.2  # ... adaptive BN repairs most of it
    assert errors["lsq"] < errors["none"] - 0.2  # ... and so does least-squares reconstruction


def test_fine_grained_mode(demo_raw, tmp_path):
    env = env_with(demo_raw, tmp_path, mode="fine_grained", resource="params", target=0.5)
    space = env.space
    assert isinstance(space, FineGrainedSpace)
    modules = dict(env.model.named_modules())
    assert space.names == [n for n, m in env.model.named_modules()
                           if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = count_params(env.model)
    assert env.full_cost == total
    for density in (0.3, 0.55, 1.0):
        keep = [keep_count(density, size) for size in space.sizes]
        pruned = space.apply(copy.deepcopy(env.model), keep)
        pruned_modules = dict(pruned.named_modules())
        for name, k, size in zip(space.names, keep, space.sizes):
            weight = pruned_modules[name].weight
            assert weight.shape == modules[name].weight.shape and weight.numel() == size
            assert int(torch.count_nonzero(weight)) == k == max(1, int(np.floor(density * size + 0.5)))
            kept = weight != 0  # the largest-magnitude weights survive, unchanged
            original = modules[name].weight.detach()
            assert torch.equal(weight[kept], original[kept])
            if k < size:
                assert original[kept].abs().min() >= original[~kept].abs().max()
        assert count_nonzero_params(pruned) <= space.cost(keep)
        assert space.cost(keep) == total - sum(space.sizes) + sum(keep)
    rng = np.random.default_rng(0)
    for episode in range(10):
        _, _, info = run_episode(env, rng.uniform(0.0, 1.0, env.num_units))
        assert info["params_ratio"] <= 0.5 and info["macs_ratio"] == 1.0
        pruned = space.apply(copy.deepcopy(env.model), info["keep"])
        assert count_nonzero_params(pruned) <= 0.5 * total
        for name, k in zip(space.names, info["keep"]):
            assert int(torch.count_nonzero(dict(pruned.named_modules())[name].weight)) == k


def test_same_policy_same_error(demo_cfg):
    env = env_from_config(demo_cfg)
    keep = [8, 20, 40, 30]
    first = env.evaluate(keep)
    second = env.evaluate(keep)
    assert first[0] == second[0] and first[1]["error"] == second[1]["error"]
    assert first[1]["macs_ratio"] == second[1]["macs_ratio"]
    again = env_from_config(demo_cfg).evaluate(keep)  # a fresh env scores it the same too
    assert again[1]["error"] == first[1]["error"]


def test_non_finite_action_ends_the_episode_with_the_worst_reward(demo_cfg):
    env = env_from_config(demo_cfg)
    for bad in (np.nan, np.inf):
        env.reset()
        env.step(np.array([0.5], dtype=np.float32))
        with pytest.warns(UserWarning, match="non-finite action"):
            obs, reward, terminated, truncated, info = env.step(np.array([bad]))
        assert terminated and not truncated and info.get("nonfinite")
        assert reward == env.worst_reward() == -1.0
        assert env.observation_space.contains(obs)
