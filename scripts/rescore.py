"""Re-score a finished search's best episodes on the test split: does its ranking carry over?

The search keeps the policy with the best reward on the reward-val subset. With a small subset
and many episodes, part of the winner's margin is the luck of that subset (selection bias).
This takes the top-K distinct policies of a run, their mean policy (a selection candidate) and
the uniform policy at the same budget, exports each as `amc export` does (the search's own
repair), measures reward-val, selection-split and test top-1 and prints them with the Spearman
rank correlation of reward-val and test over the top-K.

    python scripts/rescore.py runs/resnet20_fmnist --top 10 [--set search.reconstruct_ridge=0.01]

``--set`` re-scores the run's policies under another setting (e.g. another repair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from amc.baselines import baseline_policy
from amc.config import config_from_dict
from amc.errors import UserError
from amc.export import measure, prune_policy
from amc.factory import Workspace
from amc.report import table
from amc.search import load_run_config, read_episodes
from amc.selection import mean_candidate, top_policies


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(x)).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="score under another setting than the run's, e.g. search.reconstruct_ridge=0.01")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.run_dir)
        cfg = config_from_dict(cfg.to_dict(), source=str(args.run_dir), overrides=args.overrides)
        workspace = Workspace(cfg)
        space = workspace.base_space
        candidates = top_policies(read_episodes(args.run_dir), space.names, space.sizes, args.top)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    full = space.cost(space.sizes)
    splits = [*workspace.held_out_splits, "test"]
    mean = mean_candidate(candidates, workspace.env())
    references = [("mean of the top", mean.keep)] if mean else []
    references.append(("uniform", baseline_policy(cfg, "uniform", workspace)))
    rows, searched, tested = [], [], []
    for label, reward, keep in [*((str(c.episode), f"{c.reward:.4f}", c.keep) for c in candidates),
                                *((label, "-", keep) for label, keep in references)]:  # outside the correlation
        m = measure(prune_policy(workspace, keep)[0], workspace, splits=splits)
        if reward != "-":
            searched.append(m["reward_val_top1"])
            tested.append(m["test_top1"])
        rows.append([label, reward, *(f"{100 * m[f'{split}_top1']:.2f}" for split in splits),
                     f"{space.cost(keep) / full:.3f}"])
    print(table(["episode", "search reward", *(f"export {split.replace('_', '-')} (%)" for split in splits),
                 "cost ratio"], rows, markdown=True))
    print(f"\nSpearman rank correlation, reward-val vs test over the top {len(searched)}: "
          f"{spearman(searched, tested):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
