"""Prunable units, the analytic cost model and budget clipping, checked against thop on the
physically pruned models (zoo and torchvision nets, random clipped policies)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from amc.envs import PruningEnv
from amc.budget import allowed_counts, fill_budget
from amc.errors import UserError
from amc.graph import GROUPED, RESIDUAL, find_units
from amc.metrics import count_macs, count_params, torch_threads
from amc.models import build_model
from amc.pruning import keep_count, prune_channels
from amc.scoring import Scorer
from amc.spaces import ChannelSpace

TARGET = 0.5

# name -> (model name, kwargs, input shape, policies drawn, policies checked against thop).
# Every drawn policy is checked analytically; the first ``checked`` are also pruned physically
# (a pruned copy plus thop's own deep copy cost ~0.2-0.5 s per policy on 2 busy cores).
MODELS = {
    "resnet20": ("resnet20", {}, (1, 3, 32, 32), 50, 50),
    "resnet56": ("resnet56", {}, (1, 3, 32, 32), 50, 10),
    "mobilenet_v1": ("mobilenet_v1", {"cifar": True}, (1, 3, 32, 32), 50, 20),
    "mobilenet_v2": ("torchvision:mobilenet_v2", {}, (1, 3, 64, 64), 50, 8),
    "resnet18": ("torchvision:resnet18", {}, (1, 3, 64, 64), 50, 10),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny batch-1 forwards: one thread is fastest, and avoids oversubscribing a busy machine.
    with torch_threads(1):
        yield


def make_env(model: nn.Module, shape, target=TARGET, round_to=1, prune_residual=False, lbound=0.2):
    graph = find_units(model, shape, prune_residual)
    space = ChannelSpace(model, graph, "flops", round_to)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
    scorer = Scorer(model, [(x, torch.tensor([0, 1]))])
    return PruningEnv(model, space, scorer, "resource", target, lbound, 1.0)


def random_policy(env: PruningEnv, rng: np.random.Generator) -> list[int]:
    """One episode of uniform random actions through the env's own clipping and budget filling."""
    env.reset()
    for _ in range(env.num_units):
        env.keep.append(env.preserve_count(float(rng.uniform(0.0, 1.0))))
    return fill_budget(env.keep, env.space.sizes, env.ceiling, env.space.round_to, env.space.cost, env.budget)


def check_pruned(model: nn.Module, env: PruningEnv, keep: list[int], shape) -> tuple[int, int]:
    """Prune physically, run it, and compare thop / parameter counts with the analytic model."""
    graph, cost = env.space.graph, env.space.cost_model
    pruned = prune_channels(model, graph, keep)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        out = pruned.eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    modules = dict(pruned.named_modules())
    first, last = list(graph.layers)[0], list(graph.layers)[-1]
    assert _in_features(modules[first]) == shape[1]  # the image is never pruned
    assert _out_features(modules[last]) == 10  # nor the classes
    for unit, k in zip(graph.units, keep):  # every unit's producer(s) keep exactly k channels
        for m in unit.members:
            if m.dim == "out" and m.module in graph.layers:
                assert _out_features(modules[m.module]) == k, (unit.name, m.module)
    macs = count_macs(pruned, shape)
    assert macs == cost.macs(keep)
    assert count_params(pruned) == cost.params(keep)
    return macs, count_params(pruned)


def _in_features(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _out_features(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


@pytest.mark.parametrize("key", list(MODELS))
def test_random_clipped_policies_meet_the_budget_and_match_thop(key):
    name, kwargs, shape, drawn, checked = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, 10, 3, kwargs).eval()
    env = make_env(model, shape)
    cost = env.space.cost_model
    original_macs = count_macs(model, shape)
    assert cost.total_macs == original_macs
    assert cost.total_params == count_params(model)
    assert len(env.space.sizes) > 0
    rng = np.random.default_rng(1)
    policies = [random_policy(env, rng) for _ in range(drawn)]
    for keep in policies:  # analytic budget on every drawn policy
        assert len(keep) == env.num_units
        assert all(f <= k <= s for f, k, s in zip(env.floor, keep, env.space.sizes))
        assert cost.macs(keep) <= TARGET * cost.total_macs
    assert len({tuple(k) for k in policies}) > drawn // 2  # really different policies
    ratios = []
    for keep in policies[:checked]:  # physically pruned: thop agrees exactly, budget holds
        macs, _ = check_pruned(model, env, keep, shape)
        assert macs <= TARGET * original_macs
        ratios.append(macs / original_macs)
    print(f"{key}: {env.num_units} units, {checked}/{drawn} policies checked with thop, "
          f"MACs ratio {min(ratios):.3f}..{max(ratios):.3f} of {cost.total_macs}")
    # the env's own step() path gives the same clipped policy and reports the same budget
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    expected = random_policy(env, rng_a)
    env.reset()
    done = False
    while not done:
        _, reward, done, _, info = env.step(np.array([rng_b.uniform(0.0, 1.0)], dtype=np.float64))
    assert info["keep"] == expected
    assert info["macs_ratio"] == pytest.approx(cost.macs(expected) / cost.total_macs)
    assert info["macs_ratio"] <= TARGET


def test_resnet20_residual_groups_share_one_ratio_and_match_thop():
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = build_model("resnet20", 10, 3).eval()
    plain = find_units(model, shape)
    env = make_env(model, shape, prune_residual=True)
    graph = env.space.graph
    residual = [u for u in graph.units if u.coupling == RESIDUAL]
    assert not graph.skipped and len(residual) == len(plain.skipped) == 3  # one group per stage
    assert plain.skipped_by_reason() == {RESIDUAL: ["conv1", "layer2.0.conv2", "layer3.0.conv2"]}  # forward order
    assert len(graph.units) == len(plain.units) + len(residual)
    stem_group = next(u for u in residual if u.name == "conv1")
    producers = {m.module for m in stem_group.members if m.dim == "out" and m.module in graph.layers}
    assert producers == {"conv1", *(f"layer1.{i}.conv2" for i in range(3))}
    rng = np.random.default_rng(3)
    for _ in range(5):
        keep = random_policy(env, rng)
        assert env.space.cost_model.macs(keep) <= TARGET * env.space.cost_model.total_macs
        check_pruned(model, env, keep, shape)  # includes: every producer of a group keeps k


@pytest.mark.parametrize("prune_residual", [False, True])
def test_branchy_cnn_concat_and_residual(prune_residual):
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    model = build_model("branchy_cnn", 10, 3).eval()
    env = make_env(model, shape, prune_residual=prune_residual)
    graph = env.space.graph
    names = [u.name for u in graph.units]
    branches = [f"block{b}.branch_{s}.0" for b in (1, 2) for s in "ab"]
    assert set(branches) <= set(names)
    if prune_residual:
        assert len(names) == 6 and not graph.skipped
    else:
        assert names == branches and graph.skipped_by_reason() == {RESIDUAL: ["stem.0", "down.0"]}
    rng = np.random.default_rng(5)
    for _ in range(20):
        keep = random_policy(env, rng)
        check_pruned(model, env, keep, shape)
        pruned = prune_channels(model, graph, keep)
        kept = dict(zip(names, keep))
        for b in (1, 2):  # the 1x1 merge conv sees the concatenation of both pruned branches
            merge = dict(pruned.named_modules())[f"block{b}.merge"]
            assert merge.in_channels == kept[f"block{b}.branch_a.0"] + kept[f"block{b}.branch_b.0"]


def test_keep_count_rounding():
    for step in (1, 2, 4, 8, 16):
        for size in (1, 3, 7, 8, 12, 16, 20, 64, 100):
            counts = set(allowed_counts(size, step).tolist())
            for ratio in np.linspace(0.0, 1.0, 41):
                k = keep_count(float(ratio), size, step)
                assert 1 <= k <= size
                if size <= step:
                    assert k == size
                else:
                    assert k == size or k % step == 0
                    assert k >= step
                    assert abs(k - ratio * size) <= step / 2 + 1e-9 or k in (step, size)
                assert k in counts
    assert keep_count(0.5, 64) == 32 and keep_count(0.5, 64, 8) == 32
    assert keep_count(0.01, 64, 8) == 8 and keep_count(1.0, 20, 8) == 20 and keep_count(0.3, 5, 8) == 5
    assert keep_count(0.45, 20, 8) == 8 and keep_count(0.65, 20, 8) == 16


def odd_widths_net() -> nn.Module:
    """Convs of 20, 12, 6 and 30 channels: not all multiples of 8."""
    layers, c = [], 3
    for width in (20, 12, 6, 30):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.mark.parametrize("name", ["resnet20", "odd"])
def test_round_to_8_keeps_multiples_and_the_budget(name):
    torch.manual_seed(0)
    shape = (1, 3, 32, 32) if name == "resnet20" else (1, 3, 16, 16)
    model = (build_model("resnet20", 10, 3) if name == "resnet20" else odd_widths_net()).eval()
    env = make_env(model, shape, round_to=8)
    sizes = env.space.sizes
    if name == "odd":
        assert sizes == [20, 12, 6, 30]
    rng = np.random.default_rng(11)
    seen = set()
    for i in range(30):
        keep = random_policy(env, rng)
        seen.update(keep)
        assert all(k % 8 == 0 or k == s for k, s in zip(keep, sizes)), keep
        assert all(k >= min(8, s) for k, s in zip(keep, sizes))
        assert env.space.cost_model.macs(keep) <= TARGET * env.space.cost_model.total_macs
        if i < 5:
            check_pruned(model, env, keep, shape)
    assert len(seen) > 2


@pytest.mark.parametrize("model,shape", [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 1, 8, 8)),
    (nn.Linear(64, 10), (1, 64)),
])
def test_no_prunable_unit_is_a_user_error(model, shape):
    with pytest.raises(UserError, match="no prunable unit"):
        make_env(model.eval(), shape)


def test_impossible_budget_names_the_smallest_reachable_target():
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = build_model("resnet20", 10, 3).eval()
    with pytest.raises(UserError, match="smallest reachable target") as err:
        make_env(model, shape, target=0.05)
    print(err.value)
    reachable = float(re.search(r"smallest reachable target is ([0-9.e-]+)", str(err.value)).group(1))
    assert 0.05 < reachable < 1.0
    env = make_env(model, shape, target=reachable)  # the reported target is feasible ...
    cost = env.space.cost_model
    assert cost.macs(env.floor) <= reachable * cost.total_macs < cost.macs(env.floor) + 1e-4 * cost.total_macs
    keep = random_policy(env, np.random.default_rng(0))
    assert cost.macs(keep) <= reachable * cost.total_macs
    with pytest.raises(UserError, match="smallest reachable target"):
        make_env(model, shape, target=reachable - 1e-3)


def grouped_conv_net() -> nn.Module:
    """Conv -> grouped conv (groups=2) -> conv -> classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def test_grouped_convs_are_left_unpruned_with_a_warning():
    model = grouped_conv_net()
    with pytest.warns(UserWarning, match=r"grouped convs 3"):
        graph = find_units(model, (1, 3, 8, 8))
    assert [u.name for u in graph.units] == ["6"]
    assert graph.skipped_by_reason() == {GROUPED: ["0", "3"]}
    space = ChannelSpace(model, graph)
    keep = [5]
    pruned = prune_channels(model, graph, keep)
    assert pruned(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    assert count_macs(pruned, (1, 3, 8, 8)) == space.cost_model.macs(keep)
