"""Honest selection: the run's answer is chosen on images the search never scored.

The search keeps the policy with the best reward, but that reward is the maximum of many noisy
scores on one reward-val subset, so part of the winner's margin is luck (docs/benchmarks.md
measured a Spearman correlation of 0.04 between reward-val and test ranks among the ten best).
After the search, the top-K distinct policies by reward, their mean policy and the rule
policies at the same budget (uniform, global magnitude) are repaired exactly as export repairs
them and scored on a separate selection split, held out of training and disjoint from
reward-val and test. The best of them is the run's answer; when a rule wins, the run says so.
The test split stays for reporting only.

The selection split is noisy too: measured on ResNet-20 (docs/benchmarks.md), searched policies
that beat the global rule there by 0.1-0.2 points lost to it on test by 0.4-0.8. So a searched
policy displaces the best rule only when its paired margin over that rule on the same images
exceeds ``search.select_margin`` standard errors of the paired difference; otherwise the rule
is the answer, and the record says by how much the search led.

The run also measures its reward's noise: the bootstrap standard error of the answer's
reward-val accuracy over images, and the spread of its score when it is repaired with other
calibration samples. Margins between policies smaller than these are not evidence.

The mean policy averages each unit's value over the top-K (then fits the budget as an episode
does): every one of them is a noisy draw near the best region the search found, and their
mean cancels part of the per-layer noise, as one step of the cross-entropy method does.
It is a candidate like the others, chosen only when it scores best on the selection split.

With a user's metric (``amc.compress(evaluate=...)``) the same steps rank by that metric; it
is one number per split, so there is no bootstrap over images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from amc.baselines import baseline_policy
from amc.errors import UserError
from amc.export import prune_policy
from amc.factory import Workspace
from amc.metrics import per_image_metric

RULES = ("uniform", "global")
SEARCH_MEAN = "search_mean"  # the source of the top-K's mean policy
BOOTSTRAP_SAMPLES = 1000
CALIBRATION_REDRAWS = 3


@dataclass
class Candidate:
    source: str  # "search" (an episode), SEARCH_MEAN or a rule's name
    keep: list[int]
    episode: int | None = None
    reward: float | None = None  # the reward as the search scores it (the rules are scored the same way)
    select_metric: float | None = None  # the run's metric (metric_value, or the user's) on the selection split
    score: float | None = None  # what selection ranks: the protocol's reward on the selection split


def top_policies(rows: list[dict], names: list[str], sizes: list[int], k: int) -> list[Candidate]:
    """The ``k`` best episodes of episodes.csv with distinct policies, best reward first."""
    seen, best = set(), []
    for row in sorted((r for r in rows if math.isfinite(r["reward"])), key=lambda r: -r["reward"]):
        keep = tuple(int(round(row[n] * s)) for n, s in zip(names, sizes))
        if keep not in seen:
            seen.add(keep)
            best.append(Candidate("search", list(keep), int(row["episode"]), float(row["reward"])))
        if len(best) == k:
            break
    return best


def mean_candidate(top: list[Candidate], env) -> Candidate | None:
    """The mean of the ``top`` policies, fitted to the budget (``PruningEnv.nearest_policy``); None
    for fewer than two policies or when the mean is one of them."""
    if len(top) < 2:
        return None
    keep = env.nearest_policy(np.mean([c.keep for c in top], axis=0))
    return None if any(keep == c.keep for c in top) else Candidate(SEARCH_MEAN, keep)


def is_rule(candidate: Candidate | dict) -> bool:
    return (candidate.source if isinstance(candidate, Candidate) else candidate.get("source")) in RULES


def origin(candidate: Candidate | dict) -> str:
    """Where a candidate came from, in words: "episode 213", "mean of the best", "uniform rule"."""
    c = candidate if isinstance(candidate, dict) else asdict(candidate)
    if is_rule(c):
        return f"{c['source']} rule"
    return "mean of the best" if c.get("source") == SEARCH_MEAN else f"episode {c.get('episode')}"


def rule_candidates(workspace: Workspace) -> list[Candidate]:
    """The rules at the same budget; none for the accuracy protocol (no budget to match)."""
    cfg = workspace.cfg
    if cfg.search.protocol != "resource":
        return []
    methods = RULES if cfg.search.mode in ("channel", "fine_grained") else ("uniform",)
    return [Candidate(method, baseline_policy(cfg, method, workspace)) for method in methods]


def paired_standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """The standard error of mean(a) - mean(b) for per-image scores of two models on the same images."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf


def score_on_split(workspace: Workspace, keep: list[int], split: str, seed: int | None = None) -> np.ndarray:
    """Per-image values of the run's metric (``per_image_metric``) of ``keep`` repaired as export
    repairs it, on ``split`` (fp32)."""
    model, _ = prune_policy(workspace, keep, calibration_seed=seed)
    return per_image_metric(model, workspace.loader(split), workspace.cfg.search.reward_metric)


def metric_on_split(workspace: Workspace, keep: list[int], split: str, seed: int | None = None) -> float:
    """The run's metric (``Workspace.metric``) of ``keep`` repaired as export repairs it, on ``split`` (fp32)."""
    if workspace.evaluate is None:
        return float(score_on_split(workspace, keep, split, seed).mean())
    model, _ = prune_policy(workspace, keep, calibration_seed=seed)
    return workspace.metric(model, workspace.loader(split))


def select(workspace: Workspace, candidates: list[Candidate], reward_of: Callable[[float, list[int]], float],
           split: str = "select", progress: bool = False, margin: float = 0.0,
           scorer: Callable[[list[int]], np.ndarray] | None = None) -> tuple[Candidate, dict]:
    """Score every candidate on ``split``; the best score wins (the earlier candidate on a tie),
    except that a searched winner must beat the best rule by more than ``margin`` standard errors
    of their paired difference (per image; a user's metric gives one number, so no margin).

    ``reward_of(error, keep)`` is the protocol's reward, so the accuracy-guaranteed protocol
    still trades error against cost here. ``scorer(keep)`` gives a policy's per-image values on
    ``split`` (``score_on_split`` by default; a caller that selects many times may cache it).
    Returns the answer and how the margin decided.
    """
    if not candidates:
        raise UserError("no policy to select from", field="search")
    scorer = scorer or (lambda keep: score_on_split(workspace, keep, split))
    hits = {}
    for i, c in enumerate(tqdm(candidates, desc=f"select on {split}", disable=not progress, leave=False)):
        if workspace.evaluate is None:
            hits[i] = scorer(c.keep)
            c.select_metric = float(hits[i].mean())
        else:
            c.select_metric = metric_on_split(workspace, c.keep, split)
        c.score = reward_of(1.0 - c.select_metric, c.keep)
    best = max(range(len(candidates)), key=lambda i: candidates[i].score)
    rules = [i for i, c in enumerate(candidates) if is_rule(c)]
    if is_rule(candidates[best]) or not rules or not hits:
        return candidates[best], {}
    rule = max(rules, key=lambda i: candidates[i].score)
    lead = candidates[best].select_metric - candidates[rule].select_metric  # rules exist under a budget: same order
    se = paired_standard_error(hits[best], hits[rule])
    decision = {"rule": candidates[rule].source, "search_lead": lead, "paired_se": se, "margin": margin,
                "search_source": candidates[best].source, "search_episode": candidates[best].episode,
                "kept_rule": bool(lead <= margin * se), "images": len(hits[best])}
    return candidates[rule if decision["kept_rule"] else best], decision


def images_to_separate(decision: dict) -> int | None:
    """Selection images on which the search's lead over the kept rule would clear the margin, if it held.

    The paired standard error falls as one over the square root of the images, so a positive lead
    that fell short of ``margin`` standard errors would clear it on about
    ``images * (margin * se / lead) ** 2`` images. None when the search won or did not lead.
    """
    if not decision.get("kept_rule") or decision["search_lead"] <= 0 or "images" not in decision:
        return None
    return math.ceil(decision["images"] * (decision["margin"] * decision["paired_se"] / decision["search_lead"]) ** 2)


def reward_noise(workspace: Workspace, keep: list[int], seed: int = 0) -> dict:
    """How much a policy's reward moves by chance: over reward-val images (a bootstrap; none for a
    user's metric, which is one number), and over calibration samples."""
    bootstrap_se = None
    if workspace.evaluate is None:
        values = score_on_split(workspace, keep, "reward_val")
        value = float(values.mean())
        rng = np.random.default_rng(seed)
        boot = values[rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
        bootstrap_se = float(boot.std(ddof=1))
    else:
        value = metric_on_split(workspace, keep, "reward_val")
    redraws = [metric_on_split(workspace, keep, "reward_val", seed=workspace.cfg.seed + 1000 + i)
               for i in range(CALIBRATION_REDRAWS)]
    return {"metric": workspace.metric_name, "reward_val_metric": value, "reward_val_error": 1.0 - value,
            "bootstrap_se": bootstrap_se, "calibration_metric": redraws,
            "calibration_spread": float(np.std([value, *redraws], ddof=1))}


def as_records(candidates: list[Candidate]) -> list[dict]:
    return [asdict(c) for c in candidates]
