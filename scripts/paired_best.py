"""Compare two searches' best policies on the same images: is the gap between them real?

Each run's best episode (by reward) is repaired as its search repaired it and scored image by
image on reward-val and the selection split. For each split this prints both accuracies, their
difference and the paired standard error of that difference (from the images on which the two
policies disagree). Two searches whose best policies differ by less than about two paired
standard errors found policies their reward cannot tell apart, and a lead on reward-val that
does not carry over to the selection split was the luck of the maximum.

    python scripts/paired_best.py RUN_A RUN_B [--splits reward_val select]

Both runs must share the base model and the data split (e.g. AMC and random search from one
benchmark row); otherwise the images differ and exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from amc.config import Config
from amc.data import split_signature
from amc.errors import UserError
from amc.factory import Workspace
from amc.report import table
from amc.search import load_run_config, read_episodes
from amc.selection import paired_standard_error, score_on_split, top_policies


def best_policy_hits(cfg: Config, run_dir: Path, splits: list[str]) -> dict[str, np.ndarray]:
    """The run's best policy's per-image hits on each split."""
    workspace = Workspace(cfg)
    space = workspace.base_space
    (best,) = top_policies(read_episodes(run_dir), space.names, space.sizes, 1)
    return {split: score_on_split(workspace, best.keep, split) for split in splits}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--splits", nargs="+", default=["reward_val", "select"], choices=["reward_val", "select", "test"])
    args = p.parse_args(argv)
    try:
        cfg_a, cfg_b = load_run_config(args.run_a), load_run_config(args.run_b)
        if (split_signature(cfg_a.data, cfg_a.seed), cfg_a.model) != (split_signature(cfg_b.data, cfg_b.seed), cfg_b.model):
            raise UserError(f"{args.run_b} searched another base model or data split than {args.run_a}; "
                            "their policies are not scored on the same images", field="run_b")
        hits_a = best_policy_hits(cfg_a, args.run_a, args.splits)
        hits_b = best_policy_hits(cfg_b, args.run_b, args.splits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for split in args.splits:
        a, b = hits_a[split], hits_b[split]
        rows.append([split.replace("_", "-"), f"{100 * a.mean():.2f}", f"{100 * b.mean():.2f}",
                     f"{100 * (a.mean() - b.mean()):+.2f}", f"{100 * paired_standard_error(a, b):.2f}",
                     f"{np.mean(a != b):.3f}"])
    print(table(["split", "A top-1 (%)", "B top-1 (%)", "A - B (points)", "paired SE (points)", "images they disagree on"],
                rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
