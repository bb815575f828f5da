"""Benchmark an episode and its evaluation pass: today's fp32 eager pass against the fast path.

For each calibration (none, bn, lsq, both) the same random clipped policies (same seeds) are
run through ``PruningEnv``, which scores them on the fast path (``amc.inference``: BN folded,
channels_last, measured batch size, the hardware's reduced precision). For each policy the
same repaired model is also evaluated as the reward was before the fast path (fp32, eager, BN
unfolded, the config's ``data.eval_batch_size``; 512 when that is ``auto``), which gives the
speedup and the fidelity (largest |top-1 difference|, fast vs fp32, over the policies).

Columns (medians over episodes, seconds): ``episode`` wall time, ``fp32_eval`` the old pass,
``fast_eval`` the fast pass as the episode timed it, ``speedup``, the step timings (copy /
prune / reconstruct / calibrate; ``steps`` is the rest: states and budget clipping),
``cal/fast`` and ``rec/fast`` (calibration and reconstruction over the fast pass), ``GMAC/s``
of the fast pass and ``%peak`` of a large matmul in the same dtype measured in this run,
``max|d|`` in top-1 points and ``acc`` (mean reward-val top-1 of the policies, fast path).

    python scripts/bench_env.py [--config configs/resnet20_fmnist.yaml] [--episodes 3] [--threads 2]
        [--target 0.5] [--set data.reward_val_size=2000 ...] [--policies 50]

``--policies N`` adds the fidelity study: the search's check (``amc.fidelity``) on N random
clipped policies with the config's calibration (Spearman, mean and max |top-1 difference|),
against policies repaired and evaluated in fp32 throughout (the search's own check shares the
repair and compares the evaluation only).
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
from amc.fidelity import check_fidelity
from amc.inference import DTYPES
from amc.metrics import accuracy, count_macs, metric_value

CALIBRATIONS = ("none", "bn", "lsq", "both")
PARTS = ("copy", "prune", "reconstruct", "calibrate")


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


def peak_macs_per_second(precision: str, device: torch.device, size: int = 2048) -> float:
    """MACs per second of a large square matmul in ``precision``: the machine's practical peak."""
    dtype = DTYPES[precision] or torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return size ** 3 / best


def fp32_pass(env, keep: list[int], batch_size: int) -> tuple[float, float, int]:
    """The reward pass as it was: repaired in fp32, evaluated fp32 eager, BN unfolded. (seconds, error, MACs)."""
    scorer = env.scorer
    pruned = env.space.apply(copy.deepcopy(env.model), keep)
    scorer.repair.in_fp32()(pruned, env.space.refit_layers(keep))
    start = time.perf_counter()
    top1 = metric_value(accuracy(pruned, scorer.fast.batches(batch_size)), scorer.metric)
    seconds = time.perf_counter() - start
    return seconds, 1.0 - top1, count_macs(pruned, (1, *scorer.fast.images.shape[1:]))


def bench(env, episodes: int, seed: int, old_batch_size: int, peak: float) -> list:
    """One table row: medians over ``episodes`` random clipped policies."""
    env.evaluate(env.space.sizes)  # warm up kernels and measure the fast path's batch size
    images = len(env.scorer.fast.labels)
    rows = {k: [] for k in ("episode", "fp32", "fast", "steps", "diff", "rate", "acc", *PARTS)}
    for i in range(episodes):
        rng = np.random.default_rng(seed + i)
        start = time.perf_counter()
        info = run_episode(env, lambda obs: np.array([rng.uniform()], dtype=np.float32)).info
        rows["episode"].append(time.perf_counter() - start)
        timings = info["timings"]
        rows["steps"].append(rows["episode"][-1] - sum(timings.values()))
        for part in PARTS:
            rows[part].append(timings.get(part, 0.0))
        rows["fast"].append(timings["eval"])
        seconds, error, macs = fp32_pass(env, info["keep"], old_batch_size)
        rows["fp32"].append(seconds)
        rows["diff"].append(abs(error - info["error"]))
        rows["rate"].append(macs * images / timings["eval"])
        rows["acc"].append(1.0 - info["error"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    return [med["episode"], med["fp32"], med["fast"], med["fp32"] / med["fast"], *(med[p] for p in PARTS),
            med["steps"], med["calibrate"] / med["fast"], med["reconstruct"] / med["fast"], med["rate"] / 1e9,
            100 * med["rate"] / peak, 100 * max(rows["diff"]), statistics.mean(rows["acc"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/resnet20_fmnist.yaml")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--target", type=float, default=None, help="search.target (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.reward_val_size=2000 (repeatable)")
    parser.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=CALIBRATIONS)
    parser.add_argument("--policies", type=int, default=0, help="also run the fidelity study on N policies")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = args.overrides + ([f"search.target={args.target}"] if args.target is not None else [])
    cfg = load_config(args.config, overrides)
    old_batch_size = cfg.data.loader_batch_size
    cfg.data.eval_batch_size = "auto"
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    prepare(ws)
    calibration = cfg.search.calibration
    print(f"device {ws.device}, torch threads {torch.get_num_threads()}, target {cfg.search.target}, "
          f"{args.episodes} episodes per calibration; medians over episodes, seconds")

    rows, peaks = [], {}
    for name in args.calibrations:
        cfg.search.calibration = name
        env = ws.env()
        fast = env.scorer.fast
        if fast.precision not in peaks:
            peaks[fast.precision] = peak_macs_per_second(fast.precision, ws.device)
        rows.append([name, *bench(env, args.episodes, cfg.seed, old_batch_size, peaks[fast.precision])])
        print(f"{name}: fast path {fast.precision}, batch {fast.batch_size(env.model)}, "
              f"channels_last {fast.channels_last}, {len(fast.pairs)} BatchNorms folded; "
              f"fp32 pass at batch {old_batch_size}")

    header = ["calib", "episode", "fp32_eval", "fast_eval", "speedup", *PARTS, "steps", "cal/fast", "rec/fast",
              "GMAC/s", "%peak", "max|d|", "acc"]
    widths = [max(len(h), 6) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        cells = [row[0]] + [f"{v:.3f}" for v in row[1:]]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print("peak (matmul 2048^3): " + ", ".join(f"{p} {r / 1e9:.1f} GMAC/s" for p, r in peaks.items())
          + f"; calibration {cfg.search.calib_batches} batches of {cfg.data.batch_size}, "
          f"reconstruction {cfg.search.reconstruct_samples} images")

    if args.policies:
        cfg.search.calibration = calibration
        env = ws.env()
        started = time.perf_counter()
        report = check_fidelity(env, policies=args.policies, seed=cfg.seed,
                                reference_repair=env.scorer.repair.in_fp32())
        print(f"fidelity ({calibration}, {args.policies} random clipped policies + the base model, "
              f"{time.perf_counter() - started:.1f} s):")
        for precision, c in report["candidates"].items():
            print(f"  {precision} vs fp32: Spearman {c['spearman']:.4f}, {c['reordered_pairs']} pairs reordered "
                  f"beyond the allowed difference, mean |top-1 difference| "
                  f"{100 * c['mean_abs_diff']:.3f} points (allowed < {100 * c['allowed_mean_abs_diff']:.3f}), "
                  f"max {100 * c['max_abs_diff']:.3f}, passed {c['passed']}")
        if not report["candidates"]:
            print("  nothing to check: rewards are fp32 on this machine")


if __name__ == "__main__":
    main()
