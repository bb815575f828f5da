"""What would each finished search have answered had it stopped after N episodes?

A search's first N episodes do not depend on how many it was asked for (docs/benchmarks.md,
session 19: a 200-episode search walks exactly the first 200 episodes of a 400-episode one), so
one finished run answers for every shorter budget. For each run and each N this takes the first
N episodes, runs the selection step on them as the search does (the top-K distinct policies by
reward, their mean and the rules, repaired as export repairs them and scored on the selection
split, with the same margin) and measures the answer and the top-K on test. Paired by seed, AMC
against random search at equal episodes says whether the agent gets there sooner, not only
whether it gets further.

    python scripts/stop_early.py RUN_DIR... --episodes 100 200 300 400 --out curve.json [--rules results.json]
        [--top-k 10 40]

``--top-k`` also asks what each search would have answered with another number of candidates
(``search.select_top_k``; the run's own by default): more of the agent's concentrated best
policies give the selection split more to choose from, at one export and one pass over the
selection split (and here one over test) per extra candidate.

Records go to ``--out`` (shared by processes under a lock; finished (run, N, K) triples are
skipped, so a stopped measurement resumes); the table covers every record of the runs named, and
with the benchmark's results.json pairs each answer with the rules on its own base.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from amc.config import SearchConfig
from amc.errors import UserError
from amc.export import prune_policy
from amc.factory import Workspace
from amc.metrics import per_image_metric
from amc.report import table
from amc.search import load_run_config, protocol_reward, read_episodes, selection_candidates
from amc.selection import RULES, SEARCH_MEAN, select
from benchmark import differences_to_rule, mean_interval, read_records, stat, update_records


class PolicyScores:
    """Per policy, repaired once: its per-image values on the selection split and its test top-1."""

    def __init__(self, workspace: Workspace, split: str):
        self.workspace, self.split, self.cache = workspace, split, {}

    def __call__(self, keep: list[int]) -> tuple[np.ndarray, float]:
        key = tuple(keep)
        if key not in self.cache:
            ws = self.workspace
            model = prune_policy(ws, keep)[0]
            self.cache[key] = (per_image_metric(model, ws.loader(self.split), ws.cfg.search.reward_metric),
                               ws.split_metrics(model, "test")["test_top1"])
        return self.cache[key]


def method_of(cfg) -> str:
    """``random`` for a run whose every episode is a warmup episode (how benchmark.py runs random search)."""
    return "random" if cfg.agent.warmup_episodes >= cfg.search.episodes else "amc"


DEFAULT_TOP_K = SearchConfig.model_fields["select_top_k"].default


def top_k_of(record: dict) -> int:
    """The candidates' K of a record (records from before ``--top-k`` used the default)."""
    return record.get("top_k", DEFAULT_TOP_K)


def answers(run_dir: Path, todo: list[tuple[int, int]]) -> list[dict]:
    """One record per (episode budget N, K): the answer the selection step picks from the top K of
    the first N episodes."""
    cfg = load_run_config(run_dir)
    if cfg.search.protocol != "resource" or cfg.data.select_size == 0:
        raise UserError("needs a resource-constrained run with a selection split", where=str(run_dir))
    rows = read_episodes(run_dir)
    if len(rows) < max(n for n, _ in todo):
        raise UserError(f"has {len(rows)} episodes, fewer than {max(n for n, _ in todo)}", where=str(run_dir))
    workspace = Workspace(cfg)
    env = workspace.env()
    scores = PolicyScores(workspace, "select")
    records = []
    for n, k in sorted(set(todo)):
        candidates = selection_candidates(workspace, env, [r for r in rows if r["episode"] < n], k)
        top = [c for c in candidates if c.source == "search"]
        mean = next((c for c in candidates if c.source == SEARCH_MEAN), None)
        answer, _ = select(workspace, candidates, protocol_reward(env), "select", margin=cfg.search.select_margin,
                           scorer=lambda keep: scores(keep)[0])
        records.append({
            "run": str(run_dir), "method": method_of(cfg), "seed": cfg.agent.seed if cfg.agent.seed is not None
            else cfg.seed, "base": cfg.model.checkpoint, "episodes": n, "top_k": k, "best_reward": top[0].reward,
            "answer_source": answer.source, "answer_episode": answer.episode,
            "select_top1": answer.select_metric, "test_top1_before_ft": scores(answer.keep)[1],
            "test_top_k_mean": statistics.mean(scores(c.keep)[1] for c in top),
            "test_search_mean": scores(mean.keep)[1] if mean else None})
    return records


def with_new(new: list[dict]):
    """The results file's change: add the records of (run, N, K) another process has not added meanwhile."""
    def change(records: list[dict]) -> list[dict]:
        there = {(r["run"], r["episodes"], top_k_of(r)) for r in records}
        return records + [r for r in new if (r["run"], r["episodes"], top_k_of(r)) not in there]
    return change


def curve_table(records: list[dict], rule_records: list[dict] = ()) -> str:
    """Per episode budget and K: each method's answers and top-K on test, AMC minus random search paired
    by seed and, given the benchmark's rule records, each answer minus each rule on its own base."""
    rules = [rule for rule in RULES if any(r["method"] == rule for r in rule_records)]
    rows = []
    for n, k in sorted({(r["episodes"], top_k_of(r)) for r in records}):
        by = {m: {r["seed"]: r for r in records if (r["episodes"], top_k_of(r), r["method"]) == (n, k, m)}
              for m in ("amc", "random")}
        seeds = sorted(set(by["amc"]) & set(by["random"]))

        def diff(key: str) -> str:
            return mean_interval([100 * (by["amc"][s][key] - by["random"][s][key]) for s in seeds
                                  if by["amc"][s][key] is not None and by["random"][s][key] is not None])
        rows.append([n, k, *(stat([100 * r["test_top1_before_ft"] for r in by[m].values()]) for m in ("amc", "random")),
                     *(" ".join(sorted({str(r["answer_source"]).replace("search_", "") for r in by[m].values()}))
                       for m in ("amc", "random")),
                     diff("test_top1_before_ft"), diff("test_top_k_mean"), diff("test_search_mean"),
                     *(mean_interval(differences_to_rule(list(by[m].values()), [r for r in rule_records
                                                                                if r["method"] == rule],
                                                         "test_top1_before_ft"))
                       for m in ("amc", "random") for rule in rules)])
    return table(["episodes", "K", "AMC answer, test top-1", "random search answer", "AMC's answers from",
                  "random's answers from", "AMC - random: the answer", "top-K mean", "mean policy",
                  *(f"{m} - {rule}" for m in ("AMC", "random") for rule in rules)], rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--episodes", type=int, nargs="+", required=True, help="the budgets N to stop at")
    p.add_argument("--out", type=Path, required=True, help="the records' JSON file (resumed when it exists)")
    p.add_argument("--rules", type=Path, help="the benchmark's results.json: pair each answer with its base's rules")
    p.add_argument("--top-k", type=int, nargs="+", help="the selection's candidates K (default: each run's own)")
    args = p.parse_args(argv)
    try:
        if min(args.episodes) < 1:
            raise UserError("must be at least 1", field="--episodes")
        if args.top_k and min(args.top_k) < 1:
            raise UserError("must be at least 1", field="--top-k")
        if args.rules and not args.rules.is_file():
            raise UserError("no such file", where=str(args.rules), field="--rules")
        for run_dir in args.run_dirs:
            ks = args.top_k or [load_run_config(run_dir).search.select_top_k]
            done = {(r["episodes"], top_k_of(r)) for r in read_records(args.out) if r["run"] == str(run_dir)}
            if todo := [(n, k) for n in args.episodes for k in ks if (n, k) not in done]:
                update_records(args.out, with_new(answers(run_dir, todo)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = {str(d) for d in args.run_dirs}
    print(curve_table([r for r in read_records(args.out) if r["run"] in names],
                      read_records(args.rules) if args.rules else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
