"""Rule-based policies to compare AMC against, all priced by the same cost model and exported
through the same reconstruction, calibration and measurement path.

- uniform: one preserve ratio for every unit, the largest that meets the budget (bisection);
- random: as many random episodes as the search, through the same env and clipping; best kept;
- global: channels ranked by magnitude across all units (each unit's importances divided by
  their mean, as torch-pruning's global pruning normalises groups), the least important cut
  until the budget is met, no unit below lbound; in fine-grained mode, global magnitude pruning
  (one threshold on |w| over every prunable layer, the standard unstructured baseline);
- deep / shallow: the AMC paper's handcrafted plain-net policies, preserve ratio falling
  linearly with depth (deep: prune deep layers more) or rising with it (shallow).

Bit-width spaces (quantize, joint) have their own rules, uniform and sensitivity
(``amc.quant_baselines``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amc.config import Config, run_dir_for
from amc.errors import UserError
from amc.export import measure, prune_policy, save_pruned
from amc.budget import largest_feasible
from amc.envs import run_episode
from amc.factory import Workspace, seed_everything
from amc.pruning import keep_count
from amc.quant_baselines import sensitivity_policy, uniform_bits_policy
from amc.quant_spaces import QUANT_MODES


def _largest_feasible(policy: Callable[[float], list[int]], cost: Callable[[list[int]], float], budget: float) -> list[int]:
    if cost(policy(0.0)) > budget:
        raise UserError(f"even the smallest policy costs {cost(policy(0.0)):.4g} > budget {budget:.4g}",
                        field="search.target")
    return largest_feasible(policy, cost, budget)


def uniform_policy(sizes, step, cost, budget, lbound=0.0) -> list[int]:
    return _largest_feasible(lambda r: [keep_count(max(r, lbound), s, step) for s in sizes], cost, budget)


def depth_policy(sizes, step, cost, budget, lbound, deep: bool) -> list[int]:
    """Ratios linear in depth from 1 to r (deep) or r to 1 (shallow); r found by bisection."""
    depth = np.linspace(0.0, 1.0, len(sizes)) if deep else np.linspace(1.0, 0.0, len(sizes))

    def policy(r: float) -> list[int]:
        ratios = 1.0 - depth * (1.0 - max(r, lbound))
        return [keep_count(q, s, step) for q, s in zip(ratios, sizes)]

    return _largest_feasible(policy, cost, budget)


def global_policy(units, step, cost, budget, lbound) -> list[int]:
    scores = [u.importance / max(u.importance.mean(), 1e-12) for u in units]
    floors = [keep_count(lbound, u.channels, step) for u in units]
    top = max(float(s.max()) for s in scores)

    def policy(knob: float) -> list[int]:  # knob 1: keep all; 0: cut everything under the top score
        threshold = (1.0 - knob) * top
        return [max(f, keep_count(float((s >= threshold).mean()), len(s), step)) for s, f in zip(scores, floors)]

    return _largest_feasible(policy, cost, budget)


def global_magnitude_policy(model: nn.Module, names: list[str], sizes: list[int], cost, budget: float,
                            lbound: float) -> list[int]:
    """Fine-grained global magnitude pruning: keep every weight with |w| above one threshold
    shared by all layers (raw magnitudes, not normalised per layer), each layer at least lbound."""
    modules = dict(model.named_modules())
    magnitudes = [modules[name].weight.detach().abs().flatten().float().cpu() for name in names]
    ranked = torch.cat(magnitudes).sort(descending=True).values
    floors = [keep_count(lbound, size) for size in sizes]

    def policy(knob: float) -> list[int]:  # knob: the fraction of all weights above the threshold
        threshold = ranked[min(len(ranked) - 1, int(knob * len(ranked)))]
        return [max(f, int((m >= threshold).sum())) for m, f in zip(magnitudes, floors)]

    return _largest_feasible(policy, cost, budget)


def random_search(cfg: Config, workspace: Workspace) -> list[int]:
    env = workspace.env()
    rng = np.random.default_rng(cfg.seed if cfg.agent.seed is None else cfg.agent.seed)
    best_reward, best_keep = -np.inf, None
    for _ in range(cfg.search.episodes):
        played = run_episode(env, lambda obs: rng.uniform(0, 1, size=1).astype(np.float32))
        reward, info = played.reward, played.info
        if "keep" in info and reward > best_reward:
            best_reward, best_keep = reward, info["keep"]
    if best_keep is None:
        raise UserError(f"none of {cfg.search.episodes} random episodes produced a scorable policy "
                        "(every one had a non-finite action or reward)", field="search.episodes")
    return best_keep


def baseline_policy(cfg: Config, method: str, workspace: Workspace) -> list[int]:
    s = cfg.search
    if method == "random":
        return random_search(cfg, workspace)
    if s.protocol != "resource":
        raise UserError(f"the {method} baseline needs a budget: set search.protocol: resource", field="search.protocol")
    space = workspace.base_space
    budget = s.target * space.cost(space.sizes)
    if method == "sensitivity" and space.kind != "quantize":
        raise UserError("the sensitivity baseline sets bit widths only: use search.mode: quantize", field="search.mode")
    if space.kind in QUANT_MODES:
        return quant_policy(method, workspace, space, budget)
    if method == "uniform":
        return uniform_policy(space.sizes, space.round_to, space.cost, budget, s.lbound)
    if method in ("deep", "shallow"):
        return depth_policy(space.sizes, space.round_to, space.cost, budget, s.lbound, deep=method == "deep")
    if space.kind == "fine_grained":
        return global_magnitude_policy(workspace.base_model, space.names, space.sizes, space.cost, budget, s.lbound)
    return global_policy(space.graph.units, space.round_to, space.cost, budget, s.lbound)


def quant_policy(method: str, workspace: Workspace, space, budget: float) -> list[int]:
    s = workspace.cfg.search
    choices = space.choices(s.lbound, s.rbound)
    if method == "uniform":
        return uniform_bits_policy(choices, space.cost, budget)
    if method == "sensitivity":
        env = workspace.env()
        return sensitivity_policy(choices, space.cost, budget, lambda keep: env.evaluate(keep)[1]["error"], space.sizes)
    raise UserError(f"the {method} baseline sets channels: in {space.kind} mode use uniform, sensitivity or random",
                    field="search.mode")


def run_baseline(cfg: Config, method: str, out: Path | None = None) -> tuple[Path, dict]:
    seed_everything(cfg.seed)
    workspace = Workspace(cfg)
    keep = baseline_policy(cfg, method, workspace)
    model, plan = prune_policy(workspace, keep)
    metrics = measure(model, workspace)
    out = out or run_dir_for(cfg) / f"baseline_{method}.pt"
    save_pruned(out, workspace.spec, workspace.input_shape, model, plan, {**metrics, "keep": keep})
    return out, metrics
