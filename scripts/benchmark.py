"""Benchmark AMC against the rule-based baselines on one config: does the search earn its cost?

Every method prunes the same trained base model to the same target, goes through the same
export path (least squares + BN re-estimation), is measured before fine-tuning on the
reward-val subset, fine-tuned for the same epochs and measured on the test split. Seeds vary
the agent and the random search only: the data split (and so the base model's training set)
stays the one the base model was trained with.

    python scripts/benchmark.py --config configs/resnet20_fmnist.yaml --targets 0.5 0.25 \\
        --seeds 0 1 --out docs/results/resnet20_fmnist

writes OUT/results.json (one record per method x target x seed) and OUT/results.md (mean and
standard deviation over seeds), and prints the table. The (method, target, seed) jobs are
independent: ``--workers N`` runs N at once in local processes, ``--backend ray`` on Ray tasks
(a cluster: ``RAY_ADDRESS`` or ``--ray-address``; OUT, the config's checkpoint and data must be
at the same paths on every node). A search inside a job still scores with ``search.workers``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

from amc.baselines import baseline_policy
from amc.files import atomic_write_json, atomic_write_text
from amc.config import apply_overrides, config_from_dict, read_yaml
from amc.export import measure, prune_policy
from amc.factory import Workspace, seed_everything
from amc.metrics import accuracy
from amc.parallel import run_jobs
from amc.pipeline import finetune_model
from amc.report import plot_policy, table
from amc.search import read_episodes, search

METHODS = ("amc", "uniform", "random", "global")
HANDCRAFTED = ("deep", "shallow")


def configure(args, target: float, seed: int, out: Path):
    raw = apply_overrides(read_yaml(args.config), args.overrides + [
        f"search.target={target}", f"agent.seed={seed}", f"search.run_dir={out / f'runs/t{target}_s{seed}'}"])
    if args.episodes:
        raw["search"]["episodes"] = args.episodes
    return config_from_dict(raw, source=args.config)


def policy_for(method: str, cfg, workspace: Workspace, run_dir: Path) -> tuple[list[int], float, dict]:
    """(keep counts, search seconds, per-episode cost split) of one method."""
    started = time.perf_counter()
    if method == "amc":
        resume = (run_dir / "agent.pt").is_file()
        best = search(cfg, run_dir, resume=resume, progress=False)
        plot_policy(best, run_dir.parent.parent / f"best_policy_t{cfg.search.target}_s{cfg.agent.seed}.png")
        rows = read_episodes(run_dir)
        seconds = sum(r["seconds"] for r in rows)
        scoring = sum(r["eval_seconds"] + r["calibrate_seconds"] for r in rows)
        return best["keep"], seconds, {"episodes": len(rows), "seconds_per_episode": seconds / len(rows),
                                       "eval_share": sum(r["eval_seconds"] for r in rows) / seconds,
                                       "scoring_share": scoring / seconds}
    keep = baseline_policy(cfg, method, workspace)
    return keep, time.perf_counter() - started, {}


def evaluate(cfg, keep: list[int], workspace: Workspace, epochs: int) -> dict:
    """Export ``keep``, measure it on reward-val and test, fine-tune it as users do, measure test again.

    Test top-1 before fine-tuning is the unbiased view of the search: the search picked its best
    policy on the reward-val subset, which flatters every searched method there.
    """
    model, plan = prune_policy(workspace, keep)
    before = measure(model, workspace, splits=("reward_val", "test"))
    after = before["test_top1"]
    if epochs:  # fine-tuning changes weights, not shape: only accuracy needs measuring again
        seed_everything(cfg.agent.seed)
        finetune_model(model, workspace, plan["kind"], epochs, progress=False)
        after = accuracy(model, workspace.loader("test"))["top1"]
    return {"macs": before["macs"], "params": before["params"], "nonzero_params": before["nonzero_params"],
            "latency_ms": before["latency_ms"], "reward_val_top1_before_ft": before["reward_val_top1"],
            "test_top1_before_ft": before["test_top1"], "test_top1_after_ft": after}


def append_record(path: Path, record: dict) -> None:
    """Add one record to the results file under a lock, so several benchmark processes can share it."""
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        atomic_write_json(path, read_records(path) + [record])
    finally:
        os.close(directory)


def read_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def summarize(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["target"], r["method"]), []).append(r)

    def stat(rs: list[dict], key: str, scale: float = 1.0, digits: int = 2) -> str:
        """Mean (± standard deviation over seeds) of ``key``; "-" where no record has it."""
        values = [r[key] * scale for r in rs if key in r]
        if not values:
            return "-"
        mean = f"{statistics.mean(values):.{digits}f}"
        return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean

    rows = []
    for (target, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], (METHODS + HANDCRAFTED).index(kv[0][1]))):
        rows.append([method, f"{target:.4g}", f"{statistics.mean(r['macs'] for r in rs) / 1e6:.2f}M",
                     f"{statistics.mean(r.get('nonzero_params', r['params']) for r in rs) / 1e3:.1f}K",
                     stat(rs, "latency_ms"), stat(rs, "reward_val_top1_before_ft", 100),
                     stat(rs, "test_top1_before_ft", 100),
                     stat([r for r in rs if r["finetune_epochs"]], "test_top1_after_ft", 100),
                     stat(rs, "search_seconds", digits=0), len(rs)])
    return table(["method", "target", "MACs", "non-zero params", "latency (ms)", "reward-val top-1 before FT (%)",
                  "test top-1 before FT (%)", "test top-1 after FT (%)", "search (s)", "seeds"], rows, markdown=True)


def recorded(path: Path) -> set[tuple]:
    return {(r["method"], r["target"], r["seed"]) for r in read_records(path)}


def run_job(args: argparse.Namespace, method: str, target: float, seed: int) -> dict | None:
    """One (method, target, seed): its policy, exported, measured and fine-tuned; appended to the results.

    None when another benchmark process sharing the results file has recorded it meanwhile.
    """
    if (method, target, seed) in recorded(args.out / "results.json"):
        return None
    cfg = configure(args, target, seed, args.out)
    workspace = Workspace(cfg)
    epochs = cfg.finetune.epochs if args.finetune_epochs is None else args.finetune_epochs
    keep, seconds, extra = policy_for(method, cfg, workspace, Path(cfg.search.run_dir))
    record = {"method": method, "target": target, "seed": seed, "keep": keep, "search_seconds": seconds,
              "finetune_epochs": epochs, **extra, **evaluate(cfg, keep, workspace, epochs)}
    append_record(args.out / "results.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + HANDCRAFTED)
    p.add_argument("--episodes", type=int, help="search episodes (AMC and random search alike)")
    p.add_argument("--finetune-epochs", type=int, help="default: the config's finetune.epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1, help="jobs run at once (1: one after another in this process)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (RAY_ADDRESS or --ray-address joins a cluster)")
    p.add_argument("--threads", type=int, help="torch threads per job (default: cores / workers)")
    p.add_argument("--ray-address")
    args = p.parse_args(argv)

    results_path = args.out / "results.json"
    args.out.mkdir(parents=True, exist_ok=True)
    done = recorded(results_path)
    jobs = [(args, method, target, seed) for target in args.targets for seed in args.seeds for method in args.methods
            if (method, target, seed) not in done]
    for record in run_jobs(run_job, jobs, args.backend, args.workers, args.threads, args.ray_address):
        if record is not None:
            print(json.dumps({k: v for k, v in record.items() if k != "keep"}), flush=True)
    markdown = summarize(read_records(results_path))
    atomic_write_text(args.out / "results.md", markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
