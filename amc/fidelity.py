"""The fidelity check: may rewards be scored in reduced precision, or must they be fp32?

At search start the base model and a few random clipped policies are scored on the fast path
and in plain fp32 (eager, BN unfolded: the reference). A reduced precision is kept only if its
mean |error difference| stays under a quarter of the reward's own sampling error at the
reward-val size (binomial for top-k accuracy; for nll the per-image spread of the cross-entropy
over the square root of the images) and it reorders no two policies that fp32 separates by
more than that; otherwise the search scores in fp32 and says so in one warning line. (Two
policies closer than that are tied at the reward's resolution: a rank correlation counted their
swap, e.g. two VGG-16 policies 2 images apart in 5,000, and sent whole searches to fp32.)

The policies come from a private generator and the env's own episodes: the search's random
streams are not touched, so a resumed search makes the same decision and the same rewards.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
from torch import nn

from amc.calibration import Repair
from amc.envs import PruningEnv, run_episode
from amc.files import atomic_write_json
from amc.metrics import accuracy, in_units, metric_value, per_image_metric

TOLERANCE = 0.25  # of the reward's binomial standard error
POLICIES = 5
REFERENCE_BATCH_SIZE = 256  # fp32 results do not depend on it


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties; 1.0 when both are constant, NaN when one is."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 1.0 if np.ptp(x) == np.ptp(y) == 0 else math.nan

    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return ((ends - counts + ends + 1) / 2.0)[inverse]  # average 1-based rank of each tie group

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def reference_model(env: PruningEnv, keep: list[int], repair: Repair | None = None) -> nn.Module:
    """The policy pruned and repaired by ``repair`` (default: the scorer's own, so that only the
    evaluation differs from the reward), to be evaluated in plain fp32 (eager, BN unfolded)."""
    pruned = env.space.apply(copy.deepcopy(env.model), keep)
    (repair or env.scorer.repair)(pruned, env.space.refit_layers(keep))
    return pruned


def reference_error(env: PruningEnv, keep: list[int], repair: Repair | None = None) -> float:
    """The policy's reward error in plain fp32 (eager, BN unfolded) after ``repair``."""
    scorer = env.scorer
    return 1.0 - metric_value(accuracy(reference_model(env, keep, repair), scorer.fast.batches(REFERENCE_BATCH_SIZE)),
                              scorer.metric)


def sampling_error(env: PruningEnv, keep: list[int], mean_error: float, repair: Repair | None = None) -> float:
    """The reward's own standard error at the reward-val size: binomial at ``mean_error`` for top-k
    accuracy; for nll the spread of ``keep``'s per-image cross-entropy over the square root of the images."""
    scorer = env.scorer
    images = len(scorer.fast.labels)
    if scorer.metric != "nll":
        return max(math.sqrt(mean_error * (1.0 - mean_error) / images), 1.0 / images)
    values = per_image_metric(reference_model(env, keep, repair), scorer.fast.batches(REFERENCE_BATCH_SIZE), "nll")
    return float(values.std(ddof=1) / math.sqrt(images))


def reordered_pairs(fast: list[float], reference: list[float], gap: float) -> int:
    """Pairs of policies that ``reference`` separates by more than ``gap`` and ``fast`` does not
    order the same way (a tie there counts: it lost the order)."""
    n = len(reference)
    return sum(1 for i in range(n) for j in range(i + 1, n)
               if abs(reference[i] - reference[j]) > gap and (fast[i] - fast[j]) * (reference[i] - reference[j]) <= 0)


def compare(fast: list[float], reference: list[float], se: float, tolerance: float) -> dict:
    """The numbers the decision rests on (``se``: the reward's own standard error), and the decision."""
    diffs = [abs(f - r) for f, r in zip(fast, reference)]
    allowed = tolerance * se
    mean_diff = float(np.mean(diffs))
    reordered = reordered_pairs(fast, reference, allowed)
    return {"errors": fast, "spearman": rank_correlation(fast, reference), "reordered_pairs": reordered,
            "mean_abs_diff": mean_diff, "max_abs_diff": float(max(diffs)), "standard_error": se,
            "allowed_mean_abs_diff": allowed, "passed": bool(reordered == 0 and mean_diff < allowed)}


def check_fidelity(env: PruningEnv, path: str | Path | None = None, policies: int = POLICIES, seed: int = 0,
                   tolerance: float = TOLERANCE, reference_repair: Repair | None = None) -> dict:
    """Pick the precision of ``env``'s rewards (set on its scorer); the numbers go to ``path`` (JSON).

    Candidates are the scorer's (``search.precision``: auto tries the hardware's native reduced
    precisions in order; fp32 has none and is not checked). The reference repairs each policy
    with the scorer's repair (which export shares) unless ``reference_repair`` is given, and
    evaluates it in plain fp32. A strict ``mean < tolerance * SE`` means a zero tolerance always
    falls back to fp32.
    """
    scorer = env.scorer
    started = time.perf_counter()
    images = len(scorer.fast.labels)
    report: dict = {"candidates": {}, "reward_val_images": images, "policies": policies, "seed": seed}
    if scorer.candidates:
        rng = np.random.default_rng(seed)
        scorer.use_precision(scorer.candidates[0])
        played = [run_episode(env, lambda obs: rng.uniform(0.0, 1.0, size=1).astype(np.float32)).info
                  for _ in range(policies)]
        keeps = [list(env.space.sizes)] + [info["keep"] for info in played]
        first = [env.evaluate(keeps[0])[1]["error"]] + [info["error"] for info in played]
        reference = [reference_error(env, keep, reference_repair) for keep in keeps]
        se = sampling_error(env, keeps[0], float(np.mean(reference)), reference_repair)
        report.update(keeps=keeps, fp32_errors=reference)
        for precision in scorer.candidates:
            scorer.use_precision(precision)
            fast = first if precision == scorer.candidates[0] else [env.evaluate(k)[1]["error"] for k in keeps]
            report["candidates"][precision] = compare(fast, reference, se, tolerance)
            if report["candidates"][precision]["passed"]:
                break
        else:
            worst = report["candidates"][scorer.candidates[-1]]
            warnings.warn(
                f"fidelity check: {', '.join(scorer.candidates)} would change the rewards ({worst['reordered_pairs']} "
                f"pairs of policies reordered, mean |{scorer.metric} difference| {in_units(worst['mean_abs_diff'], scorer.metric)}, "
                f"allowed < {in_units(worst['allowed_mean_abs_diff'], scorer.metric)}); rewards are scored in fp32")
            scorer.use_precision("fp32")
    report.update(precision=scorer.precision, seconds=time.perf_counter() - started)
    if path is not None:
        atomic_write_json(path, report)
    return report
