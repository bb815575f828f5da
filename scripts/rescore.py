"""Re-score a finished search's best episodes on the test split: does its ranking carry over?

The search keeps the policy with the best reward on the reward-val subset. With a small subset
and many episodes, part of the winner's margin is the luck of that subset (selection bias).
This takes the top-K distinct policies of a run and the uniform policy at the same budget,
exports each as `amc export` does (least squares + BN re-estimation), measures reward-val and
test top-1 and prints them with the Spearman rank correlation of the two.

    python scripts/rescore.py runs/resnet20_fmnist --top 10
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from amc.baselines import baseline_policy
from amc.errors import UserError
from amc.export import measure, prune_policy
from amc.factory import Workspace
from amc.report import table
from amc.search import load_run_config, read_episodes


def top_policies(rows: list[dict], names: list[str], sizes: list[int], top: int) -> list[tuple[str, float | None, list[int]]]:
    """(episode, search top-1, keep counts) of the ``top`` best episodes with distinct policies."""
    seen, best = set(), []
    for row in sorted((r for r in rows if not math.isnan(r["error"])), key=lambda r: r["error"]):
        keep = tuple(round(row[n] * s) for n, s in zip(names, sizes))
        if keep not in seen and len(best) < top:
            seen.add(keep)
            best.append((str(int(row["episode"])), 1.0 - row["error"], list(keep)))
    return best


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(x)).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.run_dir)
        workspace = Workspace(cfg)
        space = workspace.space(workspace.base_model)
        candidates = top_policies(read_episodes(args.run_dir), space.names, space.sizes, args.top)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    candidates.append(("uniform", None, baseline_policy(cfg, "uniform", workspace)))
    full = space.cost(space.sizes)
    rows, searched, tested = [], [], []
    for episode, search_top1, keep in candidates:
        m = measure(prune_policy(workspace, keep)[0], workspace, splits=("reward_val", "test"))
        if search_top1 is not None:  # the uniform reference stays out of the correlation
            searched.append(m["reward_val_top1"])
            tested.append(m["test_top1"])
        rows.append([episode, "-" if search_top1 is None else f"{100 * search_top1:.2f}",
                     f"{100 * m['reward_val_top1']:.2f}", f"{100 * m['test_top1']:.2f}",
                     f"{space.cost(keep) / full:.3f}"])
    print(table(["episode", "search reward-val (%)", "export reward-val (%)", "export test (%)", "cost ratio"],
                rows, markdown=True))
    print(f"\nSpearman rank correlation, reward-val vs test over the top {len(searched)}: "
          f"{spearman(searched, tested):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
