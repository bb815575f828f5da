"""Benchmark AMC against random search and the rules on one config: does the search earn its cost?

Searched methods (AMC, and random search: the same search with every episode a warmup episode,
so no learning) run the same episode count and end in the same selection step (their top-K
policies and the rules re-scored on the selection split, amc/selection.py). Rules (uniform,
global magnitude, and the paper's deep / shallow) are deterministic and run once. Every answer
goes through the same export (the search's repair), is measured on test before fine-tuning,
fine-tuned for the same epochs and measured on test again. Seeds vary the agent and the random
search only: the data split (and so the base model's training set) stays the one the base model
was trained with. With ``--vary-base`` a seed also stands for a base model: seed s trains (when
missing) and uses the base at ``model.checkpoint`` with ``{seed}`` replaced by s, trained with
config ``seed: s`` (its own held-out images, initialisation and batch order; a base already
there must record the config's training epochs); the rules then run on every seed's base and
each search is compared with the rules on its own base. One base is one
sample: how well a rule survives pruning differs from base to base by more than the searches do.

    python scripts/benchmark.py --config configs/resnet20_fmnist.yaml --targets 0.5 0.25 \\
        --seeds 0 1 2 --episodes 400 --out docs/results/resnet20_fmnist
    python scripts/benchmark.py --config configs/vgg16_fmnist.yaml --targets 0.25 --seeds 0 1 2 \\
        --episodes 400 --vary-base --set model.checkpoint=checkpoints/vgg16_fmnist_s{seed}.pt --out ...

writes OUT/results.json (one record per method x target x seed; finished records are skipped,
so an interrupted benchmark resumes) and OUT/results.md: mean ± standard deviation over seeds,
and each searched method's paired difference to the best rule with its 95% interval, the
searches' diagnostics, and AMC minus random search paired by seed. ``--refresh`` re-derives
the diagnostics of recorded searches from OUT/runs (for records written before one existed).
The (method, target, seed) jobs are independent: ``--workers N`` runs N at once in local
processes, ``--backend ray`` on Ray tasks (a cluster: ``RAY_ADDRESS`` or ``--ray-address``; OUT,
the config's checkpoint and data must be at the same paths on every node). A search inside a
job still scores with ``search.workers``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scipy import stats

from amc.baselines import baseline_policy
from amc.checkpoint import read_weights
from amc.config import apply_overrides, config_from_dict, read_yaml
from amc.errors import UserError
from amc.export import measure, prune_policy
from amc.factory import Workspace, seed_everything
from amc.files import atomic_write_json, atomic_write_text
from amc.metrics import accuracy
from amc.parallel import run_jobs
from amc.pipeline import finetune_model, train_base
from amc.report import plot_policy, table
from amc.search import load_run_config, read_episodes, search
from amc.selection import SEARCH_MEAN, is_rule

SEARCHED = ("amc", "random")
RULES = ("uniform", "global")
HANDCRAFTED = ("deep", "shallow")
METHODS = SEARCHED + RULES
BIT_RULES = ("sensitivity",)  # quantize mode (uniform is the uniform bit width there)


def run_folder(out: Path, method: str, target: float, seed: int) -> Path:
    return out / "runs" / f"{method}_t{target}_s{seed}"


BASE_SEED = "{seed}"  # in model.checkpoint under --vary-base: the seed of the base model


def configure(args, method: str, target: float, seed: int, out: Path):
    overrides = [f"search.target={target}", f"agent.seed={seed}",
                 f"search.run_dir={run_folder(out, method, target, seed)}"]
    if args.episodes:
        overrides.append(f"search.episodes={args.episodes}")
    raw = base_raw(args, seed, overrides)
    if method == "random":  # random search = the same loop, every episode a uniform-random warmup episode
        raw.setdefault("agent", {})["warmup_episodes"] = raw["search"].get("episodes", 300)
    return config_from_dict(raw, source=args.config)


def base_raw(args, seed: int, overrides: list[str] = ()) -> dict:
    """The config as a dict with the command line's overrides; under ``--vary-base`` on seed's base."""
    raw = apply_overrides(read_yaml(args.config), args.overrides + list(overrides))
    if args.vary_base:
        checkpoint = raw.get("model", {}).get("checkpoint")
        if not isinstance(checkpoint, str) or BASE_SEED not in checkpoint:
            raise UserError(f"--vary-base needs a path with {BASE_SEED} in it (one base per seed), got {checkpoint!r}",
                            where=args.config, field="model.checkpoint")
        raw["seed"] = seed
        raw["model"]["checkpoint"] = checkpoint.replace(BASE_SEED, str(seed))
    return raw


def prepare_base(args, seed: int) -> dict | None:
    """Train seed's base model (``amc train``'s recipe) unless its checkpoint exists; its test metrics.

    An existing base must have been trained for the config's epochs: a row whose bases were
    trained differently would compare rules and searches across recipes, not across samples."""
    cfg = config_from_dict(base_raw(args, seed), source=args.config)
    path = Path(cfg.model.checkpoint)
    if not path.is_file():
        return {"seed": seed, "checkpoint": str(path), **train_base(cfg, progress=False)}
    _, record = read_weights(path)
    epochs = ((record or {}).get("metrics") or {}).get("epochs")
    if epochs is not None and epochs != cfg.train.epochs:
        raise UserError(f"trained for {epochs} epochs, the config trains {cfg.train.epochs}: every seed's base must "
                        f"follow one recipe (retrain it, or --set train.epochs={epochs})", where=str(path))
    return None


def policy_for(method: str, cfg, workspace: Workspace) -> tuple[list[int], dict]:
    """(keep counts, what to record about how they were found) of one method."""
    started = time.perf_counter()
    if method not in SEARCHED:
        return baseline_policy(cfg, method, workspace), {"search_seconds": time.perf_counter() - started}
    run_dir = Path(cfg.search.run_dir)
    answer = search(cfg, run_dir, resume=(run_dir / "agent.pt").is_file(), progress=False)
    plot_policy(answer, run_dir.parent.parent / f"best_policy_{method}_t{cfg.search.target}_s{cfg.agent.seed}.png")
    rows = read_episodes(run_dir)
    seconds = sum(r["seconds"] for r in rows)
    return answer["keep"], {
        "answer_source": answer["source"], "episodes": len(rows), "search_seconds": time.perf_counter() - started,
        "seconds_per_episode": seconds / len(rows), "eval_share": sum(r["eval_seconds"] for r in rows) / seconds,
        "scoring_share": sum(r["eval_seconds"] + r["calibrate_seconds"] for r in rows) / seconds,
        "reward_noise": answer["noise"], **search_diagnostics(answer, rows), **top_k_top1(answer, workspace)}


def search_diagnostics(answer: dict, rows: list[dict]) -> dict:
    """Why the answer is what it is: the search's best reward against the rules' rewards (scored as
    the search scores episodes), and the best searched candidate's lead over the best rule on the
    selection split (with the paired standard error the margin compared it to, where it led). These
    are in the run's reward metric (``metric``: top-1 points, or nats of cross-entropy for nll)."""
    candidates = answer["selection"]["candidates"]
    rules = [c for c in candidates if is_rule(c)]
    searched = [c["select_metric"] for c in candidates if c["source"] in ("search", SEARCH_MEAN)]
    best_rule = max(rules, key=lambda c: c["select_metric"])
    margin = answer["selection"].get("margin", {})
    return {"metric": answer["selection"].get("metric", "top1"), "best_reward": max(r["reward"] for r in rows),
            "rule_rewards": {c["source"]: c["reward"] for c in rules},
            "select_lead": max(searched) - best_rule["select_metric"], "select_lead_se": margin.get("paired_se"),
            "select_top_k": sum(c["source"] == "search" for c in candidates)}


def top_k_top1(answer: dict, workspace: Workspace) -> dict:
    """The search's top-K policies (its candidates in the selection step), each exported as export
    does and measured in top-1 on the selection split and on test, whatever the reward metric.

    ``select_top_k_mean`` / ``test_top_k_mean`` are their means: the answer is one of K policies
    the selection split cannot tell apart; their mean is what the search finds on unseen images
    with the luck of which one was returned averaged away, so it compares two searches with
    fewer seeds. ``test_top_k`` holds each one's test score (best reward first),
    ``select_search_mean`` / ``test_search_mean`` their mean policy's. Reported only: nothing is
    chosen on test."""
    split = answer["selection"]["split"]  # reward-val for a run without a selection split

    def top1(keep: list[int]) -> tuple[float, float]:  # accuracy only: measure() would also time and count it
        model = prune_policy(workspace, keep)[0]
        return workspace.split_metrics(model, split)[f"{split}_top1"], workspace.split_metrics(model, "test")["test_top1"]

    candidates = answer["selection"]["candidates"]
    scores = [top1(c["keep"]) for c in candidates if c["source"] == "search"]
    mean = [top1(c["keep"]) for c in candidates if c["source"] == SEARCH_MEAN]
    return {"select_top_k_mean": statistics.mean(s for s, _ in scores),
            "test_top_k_mean": statistics.mean(t for _, t in scores), "test_top_k": [t for _, t in scores],
            "select_search_mean": mean[0][0] if mean else None, "test_search_mean": mean[0][1] if mean else None}


def refresh_diagnostics(out: Path) -> None:
    """Re-derive the searched records' diagnostics from their run folders (where they are still
    there), so a results file written before a diagnostic existed gains it without new searches
    (the top-K's top-1 where missing: 2K measurements, with the run's own config, made before the
    results file is locked so that benchmarks sharing it are not held up)."""
    def key(record: dict) -> tuple:
        return record["method"], record["target"], record["seed"]

    def refreshed(record: dict) -> dict:
        run_dir = run_folder(out, *key(record))
        if record["method"] not in SEARCHED or not (run_dir / "best_policy.json").is_file():
            return record
        answer = json.loads((run_dir / "best_policy.json").read_text())
        measured = ({} if {"select_top_k_mean", "test_top_k_mean"} <= set(record)
                    else top_k_top1(answer, Workspace(load_run_config(run_dir))))
        return {**record, **search_diagnostics(answer, read_episodes(run_dir)), **measured}

    fresh = {key(r): refreshed(r) for r in read_records(out / "results.json")}
    update_records(out / "results.json", lambda records: [fresh.get(key(r), r) for r in records])


def evaluate(cfg, keep: list[int], workspace: Workspace, epochs: int) -> dict:
    """Export ``keep``, measure it (held-out splits and test), fine-tune it as users do, measure test again."""
    model, plan = prune_policy(workspace, keep)
    before = measure(model, workspace, splits=workspace.held_out_splits + ("test",))
    after = before["test_top1"]
    if epochs:  # fine-tuning changes weights, not shape: only accuracy needs measuring again
        seed_everything(cfg.agent.seed)
        started = time.perf_counter()
        finetune_model(model, workspace, plan, epochs, progress=False)
        before["finetune_seconds"] = time.perf_counter() - started
        after = accuracy(model, workspace.loader("test"))["top1"]
    return {**{f"{k}_before_ft" if k.endswith("_top1") else k: v for k, v in before.items() if not k.endswith("_top5")},
            "test_top1_after_ft": after}


def update_records(path: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    """Rewrite the results file under a lock, so several benchmark processes can share it."""
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        atomic_write_json(path, change(read_records(path)))
    finally:
        os.close(directory)


def append_record(path: Path, record: dict) -> None:
    update_records(path, lambda records: records + [record])


def read_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def stat(values: list[float], digits: int = 2) -> str:
    """Mean ± standard deviation over seeds (the mean alone for one value)."""
    if not values:
        return "-"
    mean = f"{statistics.mean(values):.{digits}f}"
    return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def measured(records: list[dict], key: str) -> list[dict]:
    """The records that have ``key``; "after FT" only where they fine-tuned."""
    return [r for r in records if key in r and (key != "test_top1_after_ft" or r["finetune_epochs"])]


def summarize(records: list[dict]) -> str:
    """One row per (target, method); searched methods also get their paired difference to the best rule."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["target"], r["method"]), []).append(r)

    def pct(rs: list[dict], key: str) -> list[float]:
        return [100 * r[key] for r in measured(rs, key)]

    order = METHODS + HANDCRAFTED + BIT_RULES
    quantized = any(r.get("bitops", 1024 * r["macs"]) < 1024 * r["macs"] for r in records)  # below 32x32-bit MACs
    rows = []
    for (target, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], order.index(kv[0][1]))):
        rules = {m: groups[(target, m)] for m in RULES + HANDCRAFTED + BIT_RULES if (target, m) in groups}
        diffs = []
        for key in ("test_top1_before_ft", "test_top1_after_ft"):
            scored = {m: rr_measured for m, rr in rules.items() if (rr_measured := measured(rr, key))}
            best_rule = max(scored, key=lambda m: statistics.mean(pct(scored[m], key)), default=None)
            diffs.append(mean_interval(differences_to_rule(measured(rs, key), scored[best_rule], key), f" ({best_rule})")
                         if method in SEARCHED and best_rule else "-")
        rows.append([method, f"{target:.4g}", f"{statistics.mean(r['macs'] for r in rs) / 1e6:.2f}M",
                     f"{statistics.mean(r.get('nonzero_params', r['params']) for r in rs) / 1e3:.1f}K",
                     *([stat([r["weight_bytes"] / 1e3 for r in rs], 1), stat([r["bitops"] / 1e9 for r in rs], 3)]
                       if quantized else []),
                     stat(pct(rs, "select_top1_before_ft")), stat(pct(rs, "test_top1_before_ft")), diffs[0],
                     stat(pct(rs, "test_top1_after_ft")), diffs[1],
                     stat([r["search_seconds"] + r.get("finetune_seconds", 0.0) for r in rs], digits=0),
                     " ".join(sorted({r.get("answer_source", "") for r in rs})) or "-", len(rs)])
    results = table(["method", "target", "MACs", "non-zero params", *(["weights (KB)", "BitOPs (G)"] if quantized else []),
                     "select top-1 (%)", "test before FT (%)",
                     "vs best rule", "test after FT (%)", "vs best rule", "wall (s)", "answer from", "seeds"],
                    rows, markdown=True)
    return results + diagnostics_table(groups) + versus_random_table(groups)


def reward_units(records: list[dict]) -> tuple[float, int, str]:
    """How the reward-metric diagnostics of searched ``records`` print: (factor, digits, unit),
    points of top-1 / top-5, or nats of cross-entropy for nll."""
    metrics = {r.get("metric", "top1") for r in records}  # records from before it was kept ran top-1
    if len(metrics) > 1:
        raise UserError(f"the searches recorded here use different reward metrics ({', '.join(sorted(metrics))}); "
                        "give each metric its own --out", field="search.reward_metric")
    return (1.0, 4, "nats") if metrics == {"nll"} else (100.0, 2, "points")


def diagnostics_table(groups: dict[tuple, list[dict]]) -> str:
    """Searched methods: best reward against the rules' (the search's own objective), and the lead
    over the best rule on the selection split that the margin judged (in the reward metric's units)."""
    rows = []
    for (target, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        rs = [r for r in rs if "best_reward" in r]
        if method not in SEARCHED or not rs:
            continue
        factor, digits, unit = reward_units(rs)
        rule_rewards = {rule: statistics.mean(r["rule_rewards"][rule] for r in rs) for rule in rs[0]["rule_rewards"]}
        rows.append([method, f"{target:.4g}", stat([r["best_reward"] for r in rs], 4),
                     " ".join(f"{k} {v:.4f}" for k, v in rule_rewards.items()),
                     f"{stat([factor * r['select_lead'] for r in rs], digits)} {unit}",
                     stat([factor * r["select_lead_se"] for r in rs if r["select_lead_se"] is not None], digits),
                     f"{sum(r.get('answer_source') in ('search', SEARCH_MEAN) for r in rs)}/{len(rs)}"])
    if not rows:
        return ""
    return "\n\n" + table(["method", "target", "best reward", "rules' rewards", "select lead over best rule",
                            "its paired SE", "answers from search"], rows, markdown=True)


def differences_to_rule(searched: list[dict], rule_records: list[dict], key: str) -> list[float]:
    """Each searched record's ``key`` minus the rule's on the same base model, in points. A rule is
    deterministic on one base, so it has one record per base (``--vary-base``: a base it has not
    run on yet is left out); a record from before ``base`` was kept is on the benchmark's one base."""
    def same_base(a: dict, b: dict) -> bool:
        return a.get("base") is None or b.get("base") is None or a["base"] == b["base"]

    pairs = [(r, next((q for q in rule_records if same_base(q, r)), None)) for r in searched]
    return [100 * (r[key] - rule[key]) for r, rule in pairs if rule is not None]


def mean_interval(diffs: list[float], suffix: str = "", digits: int = 2) -> str:
    """Mean of paired differences with its 95% t interval (the mean alone for one)."""
    if not diffs:
        return "-"
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.{digits}f}{suffix}"
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]{suffix}"


def versus_random_table(groups: dict[tuple, list[dict]]) -> str:
    """AMC minus random search, paired by seed (the same seed walks the same warmup policies), with
    95% intervals: does the agent find more than the same number of random episodes? The best
    reward in its metric's units, every other column in points of top-1. The mean policy column
    compares each search's mean of its top-K (a selection candidate): averaging scattered random
    samples can land where the agent converges (docs/benchmarks.md, session 19)."""
    rows = []
    for target in sorted({t for t, _ in groups}, reverse=True):
        amc = {r["seed"]: r for r in groups.get((target, "amc"), [])}
        rand = {r["seed"]: r for r in groups.get((target, "random"), [])}
        seeds = sorted(set(amc) & set(rand))
        if not seeds:
            continue
        factor, digits, unit = reward_units([amc[s] for s in seeds] + [rand[s] for s in seeds])
        tuned = [s for s in seeds if amc[s]["finetune_epochs"] and rand[s]["finetune_epochs"]]
        rows.append([f"{target:.4g}", " ".join(map(str, seeds)),
                     f"{mean_interval(point_differences(amc, rand, 'best_reward', seeds, factor), digits=digits)} {unit}",
                     *(mean_interval(point_differences(amc, rand, key, seeds)) for key in
                       ("select_top_k_mean", "test_top_k_mean", "test_search_mean", "select_top1_before_ft",
                        "test_top1_before_ft")),
                     mean_interval(point_differences(amc, rand, "test_top1_after_ft", tuned))])
    if not rows:
        return ""
    return "\n\n" + table(["target", "seeds", "AMC - random: best reward", "top-K mean select top-1",
                            "top-K mean test top-1", "mean policy test top-1", "select top-1", "test before FT",
                            "test after FT"], rows,
                           markdown=True)


def point_differences(a: dict[int, dict], b: dict[int, dict], key: str, seeds: list[int],
                      factor: float = 100.0) -> list[float]:
    """Per seed, ``a``'s value of ``key`` minus ``b``'s, times ``factor`` (points by default); seeds
    where either lacks it (an older record, or no mean policy among the candidates) are left out."""
    return [factor * (a[s][key] - b[s][key]) for s in seeds if a[s].get(key) is not None and b[s].get(key) is not None]


def recorded(path: Path) -> set[tuple]:
    return {(r["method"], r["target"], r["seed"]) for r in read_records(path)}


def run_job(args: argparse.Namespace, method: str, target: float, seed: int) -> dict | None:
    """One (method, target, seed): its policy, exported, measured and fine-tuned; appended to the results.

    None when another benchmark process sharing the results file has recorded it meanwhile.
    """
    if (method, target, seed) in recorded(args.out / "results.json"):
        return None
    cfg = configure(args, method, target, seed, args.out)
    workspace = Workspace(cfg)
    epochs = cfg.finetune.epochs if args.finetune_epochs is None else args.finetune_epochs
    try:
        keep, found = policy_for(method, cfg, workspace)
    except UserError as exc:  # the paper's fixed-shape policies cannot reach every budget
        if method not in HANDCRAFTED:
            raise
        print(f"{method} at target {target}: skipped: {exc}", file=sys.stderr, flush=True)
        return None
    record = {"method": method, "target": target, "seed": seed, "base": cfg.model.checkpoint, "keep": keep,
              "finetune_epochs": epochs,
              "finetune_max_steps": cfg.finetune.max_steps, **found, **evaluate(cfg, keep, workspace, epochs)}
    append_record(args.out / "results.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + HANDCRAFTED + BIT_RULES)
    p.add_argument("--episodes", type=int, help="search episodes (AMC and random search alike)")
    p.add_argument("--finetune-epochs", type=int, help="default: the config's finetune.epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1, help="jobs run at once (1: one after another in this process)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (RAY_ADDRESS or --ray-address joins a cluster)")
    p.add_argument("--threads", type=int, help="torch threads per job (default: cores / workers)")
    p.add_argument("--ray-address")
    p.add_argument("--vary-base", action="store_true",
                   help=f"seed s also trains and uses its own base model: model.checkpoint with {BASE_SEED} -> s, config seed s")
    p.add_argument("--refresh", action="store_true",
                   help="re-derive the recorded searches' diagnostics from OUT/runs before the table")
    args = p.parse_args(argv)
    try:
        return run_benchmark(args)
    except UserError as exc:  # a user's mistake: one line, and the records written so far stay
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2


def run_benchmark(args) -> int:
    """Bases first (every job of a seed needs its base, and two jobs must not both train it), then
    the jobs not yet recorded; a finished job's record is already in results.json, so a rerun
    resumes after the one that failed. Then the tables."""
    for base in run_jobs(prepare_base, [(args, seed) for seed in args.seeds if args.vary_base],
                         args.backend, args.workers, args.threads, args.ray_address):
        if base is not None:
            print(json.dumps({"base": base}), flush=True)
    results_path = args.out / "results.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refresh:
        refresh_diagnostics(args.out)
    done = recorded(results_path)
    jobs = [(args, method, target, seed) for target in args.targets for method in args.methods
            # rules are deterministic on one base: once, or on every seed's base
            for seed in (args.seeds if method in SEARCHED or args.vary_base else args.seeds[:1])
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
