"""Benchmark the environment's episode cost against one bare evaluation pass.

For each calibration (none, bn, lsq, both) the same random clipped policies (same seeds) are
run through ``PruningEnv``; each episode's wall time (reset to the final reward) is compared
with one bare ``amc.metrics.accuracy`` pass of the same pruned model over the same cached
reward-val batches (the Scorer's ``reward_batches``), and split into the step timings the env
reports (copy / prune / reconstruct / calibrate / eval; ``steps`` is the rest: states and budget
clipping). Targets (the design doc): ``ratio`` <= 1.10 with calibration none; adaptive BN
costs at most about half an eval pass (``cal/eval`` <= 0.5).

    python scripts/bench_env.py [--config configs/resnet20_fmnist.yaml] [--episodes 5] [--target 0.5]

Uses the trained checkpoint when present, else an untrained model (timings do not depend on
the weights); uses the dataset when present, else random tensors of the same shape.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from amc.config import load_config
from amc.data import DataSplits, InMemoryImages
from amc.envs import run_episode
from amc.errors import UserError
from amc.factory import Workspace, seed_everything
from amc.metrics import accuracy

CALIBRATIONS = ("none", "bn", "lsq", "both")
PARTS = ("copy", "prune", "reconstruct", "calibrate", "eval")


def random_splits(ws: Workspace) -> DataSplits:
    """Random images and labels shaped like the configured data: enough for every split the env reads."""
    d, s = ws.cfg.data, ws.cfg.search
    channels, classes = ws.data_shape
    train_size = max(s.calib_batches * d.batch_size, s.reconstruct_samples, 1)
    n = d.reward_val_size + train_size
    generator = torch.Generator().manual_seed(ws.cfg.seed)
    images = torch.randn(n, channels, d.input_size, d.input_size, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    train = InMemoryImages(images, labels, torch.arange(d.reward_val_size, n))
    reward_val = InMemoryImages(images, labels, torch.arange(d.reward_val_size))
    return DataSplits(train=train, train_eval=train, reward_val=reward_val, select=reward_val, test=reward_val,
                      num_classes=classes, in_channels=channels)


def prepare(ws: Workspace) -> None:
    """Load the base model and data, or fall back (with a printed note) when either is missing."""
    try:
        ws.base_model
        print(f"model: trained checkpoint {ws.checkpoint_path}")
    except UserError as exc:
        print(f"note: {exc} -- using an untrained {ws.cfg.model.name} (timings do not depend on the weights)")
        ws.__dict__["base_model"] = ws.new_model().to(ws.device).eval()
    try:
        ws.splits
        print(f"data: {ws.cfg.data.name}, reward-val {len(ws.splits.reward_val)} images")
    except UserError as exc:
        print(f"note: {exc} -- using random tensors of the same shape")
        ws.__dict__["splits"] = random_splits(ws)


def random_episode(env, seed: int) -> tuple[float, dict]:
    """One episode of uniform random actions (clipped by the env); (wall seconds, final info)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    played = run_episode(env, lambda obs: np.array([rng.uniform()], dtype=np.float32))
    return time.perf_counter() - start, played.info


def bare_eval(env, keep: list[int]) -> float:
    """Seconds of one accuracy pass of the pruned model over the env's cached reward batches."""
    pruned = env.space.apply(copy.deepcopy(env.model), keep)
    start = time.perf_counter()
    accuracy(pruned, env.scorer.reward_batches)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/resnet20_fmnist.yaml")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--target", type=float, default=None, help="search.target (default: the config's)")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"search.target={args.target}"] if args.target is not None else [])
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    prepare(ws)
    print(f"device {ws.device}, torch threads {torch.get_num_threads()}, target {cfg.search.target}, "
          f"{args.episodes} episodes per calibration; medians over episodes, seconds")

    rows = []
    for calibration in CALIBRATIONS:
        cfg.search.calibration = calibration
        env = ws.env()
        accuracy(env.model, env.scorer.reward_batches[:1])  # warm up allocators and kernels
        episodes, evals, steps, errors, parts = [], [], [], [], {p: [] for p in PARTS}
        for i in range(args.episodes):
            wall, info = random_episode(env, cfg.seed + i)
            episodes.append(wall)
            evals.append(bare_eval(env, info["keep"]))
            errors.append(info["error"])
            steps.append(wall - sum(info["timings"].values()))
            for p in PARTS:
                parts[p].append(info["timings"].get(p, 0.0))
        med = {p: statistics.median(v) for p, v in parts.items()}
        episode, evaluation = statistics.median(episodes), statistics.median(evals)
        ratios = [w / e for w, e in zip(episodes, evals)]
        rows.append([
            calibration, episode, evaluation, statistics.median(ratios), min(ratios), max(ratios),
            *(med[p] for p in PARTS), statistics.median(steps), med["calibrate"] / evaluation,
            1 - statistics.mean(errors),
        ])

    header = ["calib", "episode", "bare_eval", "ratio", "min", "max", *PARTS, "steps", "cal/eval", "acc"]
    widths = [max(len(h), 6) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        cells = [row[0]] + [f"{v:.3f}" for v in row[1:]]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print(f"targets: ratio <= 1.10 for calib none; cal/eval <= 0.5 for bn "
          f"({cfg.search.calib_batches} batches of {cfg.data.batch_size})")


if __name__ == "__main__":
    main()
