"""How much does the repair's own sample move a finished search's best policies, and their order?

A policy's reward depends on the images its pruned copy is repaired with (least squares and
adaptive BN on a fixed sample of training images) as well as on the reward-val images. This
takes the top-K distinct policies of a run and the rules at the same budget, repairs each with
the run's own sample and with ``--samples - 1`` others (``amc.export.prune_policy``'s
``calibration_seed``, as the run's noise record does for its answer), scores them on the
selection split, and prints, over the searched policies: the mean score, the mean standard
deviation of a policy's score across samples, the same for the difference between two
policies (what reorders them), and the mean Spearman correlation between samples.
``--set`` changes the repair (e.g. ``search.reconstruct_samples=1024``) to compare settings on
the same policies.

    python scripts/repair_noise.py runs/vgg16_fmnist --top 10 --set search.reconstruct_samples=1024
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from amc.config import config_from_dict
from amc.errors import UserError
from amc.factory import Workspace
from amc.report import table
from amc.search import CONFIG_FILE, read_episodes, read_run_yaml
from amc.selection import metric_on_split, rule_candidates, top_policies


def noise_summary(scores: np.ndarray) -> dict[str, float]:
    """``scores[policy, sample]`` in points: how much the repair sample moves them and their order."""
    pairs = itertools.combinations(range(len(scores)), 2)
    samples = itertools.combinations(range(scores.shape[1]), 2)
    return {"mean": float(scores.mean()),
            "policy_sd": float(scores.std(axis=1, ddof=1).mean()),
            "difference_sd": float(np.mean([np.std(scores[i] - scores[j], ddof=1) for i, j in pairs])),
            "spearman": float(np.mean([stats.spearmanr(scores[:, a], scores[:, b])[0] for a, b in samples]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--top", type=int, default=10, help="searched policies (distinct, best reward first)")
    p.add_argument("--samples", type=int, default=4, help="repair samples: the run's own and this many minus one others")
    p.add_argument("--split", default="select", help="where the repaired policies are scored (select, reward_val, test)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    path = args.run_dir / CONFIG_FILE
    try:
        if args.top < 2 or args.samples < 2:
            raise UserError("--top and --samples must be at least 2 (a spread needs two)")
        if not path.is_file():
            raise UserError("not a run directory (no config.yaml)", where=str(args.run_dir))
        cfg = config_from_dict(read_run_yaml(path), source=str(path), overrides=args.overrides)
        workspace = Workspace(cfg)
        space = workspace.base_space
        candidates = top_policies(read_episodes(args.run_dir), space.names, space.sizes, args.top)
        candidates += rule_candidates(workspace)
        seeds = [None, *range(1, args.samples)]
        scores = np.array([[100 * metric_on_split(workspace, c.keep, args.split, seed) for seed in seeds]
                           for c in candidates])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [[str(c.episode) if c.source == "search" else c.source, *(f"{v:.2f}" for v in row),
             f"{row.std(ddof=1):.2f}"] for c, row in zip(candidates, scores)]
    print(table(["policy", "run's sample", *(f"sample {s}" for s in seeds[1:]), "sd"], rows, markdown=True))
    searched = scores[[c.source == "search" for c in candidates]]
    if len(searched) > 1:
        s = noise_summary(searched)
        print(f"\nsearched policies on {args.split} (points): mean {s['mean']:.2f}; a policy's sd across repair "
              f"samples {s['policy_sd']:.2f}; a difference's sd {s['difference_sd']:.2f}; "
              f"Spearman between samples {s['spearman']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
