"""Re-score a finished search's best episodes on the test split: does its ranking carry over?

The search keeps the policy with the best reward on the reward-val subset. With a small subset
and many episodes, part of the winner's margin is the luck of that subset (selection bias).
This takes the top-K distinct policies of a run, their mean policy (a selection candidate) and
the uniform policy at the same budget, exports each as `amc export` does (the search's own
repair), measures reward-val, selection-split and test top-1 and prints them with the Spearman
rank correlation of reward-val and test over the top-K.

It also asks which statistic of the reward-val images would rank the top-K as unseen images do:
top-1 accuracy (the reward), the mean probability of the true class and the mean log-probability
of the true class (minus the cross-entropy), each against top-1 on the selection split and on
test. Top-1 counts only the images that change sides; the other two also move with the margins
of every image, so they are less noisy, but they also reward confidence. The top-K were chosen
on reward-val top-1, so its own correlation is biased low; the other rows are not.

    python scripts/rescore.py runs/resnet20_fmnist --top 10 [--set search.reconstruct_ridge=0.01]

``--set`` re-scores the run's policies under another setting (e.g. another repair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from amc.baselines import baseline_policy
from amc.config import config_from_dict
from amc.errors import UserError
from amc.export import measure, prune_policy
from amc.fidelity import rank_correlation
from amc.factory import Workspace
from amc.report import table
from amc.search import load_run_config, read_episodes
from amc.selection import mean_candidate, top_policies


@torch.no_grad()
def true_class_statistics(model: torch.nn.Module, batches) -> dict[str, float]:
    """Top-1, mean probability and mean log-probability of the true class (fp32)."""
    model.eval()
    device = next(model.parameters()).device
    hits, log_p = [], []
    for x, y in batches:
        logits, y = model(x.to(device)).float(), y.to(device)
        hits.append(logits.argmax(dim=1).eq(y))
        log_p.append(torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0])
    hits, log_p = torch.cat(hits).double(), torch.cat(log_p).double()
    return {"top-1": hits.mean().item(), "p(true class)": log_p.exp().mean().item(),
            "log p(true class)": log_p.mean().item()}


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
    elsewhere = [split for split in splits if split != "reward_val"]
    rows, top1, statistics = [], {split: [] for split in splits}, []
    for label, reward, keep in [*((str(c.episode), f"{c.reward:.4f}", c.keep) for c in candidates),
                                *((label, "-", keep) for label, keep in references)]:  # outside the correlation
        model = prune_policy(workspace, keep)[0]
        m = measure(model, workspace, splits=splits)
        if reward != "-":
            for split in splits:
                top1[split].append(m[f"{split}_top1"])
            statistics.append(true_class_statistics(model, workspace.loader("reward_val")))
        rows.append([label, reward, *(f"{100 * m[f'{split}_top1']:.2f}" for split in splits),
                     f"{space.cost(keep) / full:.3f}"])
    print(table(["episode", "search reward", *(f"export {split.replace('_', '-')} (%)" for split in splits),
                 "cost ratio"], rows, markdown=True))
    print(f"\nSpearman rank correlation, reward-val vs test over the top {len(statistics)}: "
          f"{rank_correlation(top1['reward_val'], top1['test']):.2f}")
    print(f"\nSpearman rank correlation over the top {len(statistics)}, each reward-val statistic vs top-1 elsewhere:\n")
    correlations = []
    for name in statistics[0]:
        values = [s[name] for s in statistics]
        correlations.append([name, *(f"{rank_correlation(values, top1[split]):.2f}" for split in elsewhere)])
    print(table(["reward-val statistic", *(f"vs {split} top-1" for split in elsewhere)], correlations, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
