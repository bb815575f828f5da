"""scripts/benchmark.py on the demo: every method meets the budget, records are complete, and
runs split across processes (seeds here) share one results file and resume without repeats."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amc.checkpoint import BASE_FORMAT, load_checkpoint, load_model
from amc.export import prune_policy
from amc.factory import Workspace
from amc.metrics import accuracy, count_macs
from amc.search import load_run_config, read_episodes
from conftest import ROOT, write_config

sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402
import pool_rows  # noqa: E402


def run(config: Path, out: Path, *extra: str) -> list[dict]:
    assert benchmark.main(["--config", str(config), "--targets", "0.5", "--episodes", "3",
                           "--set", "agent.warmup_episodes=2", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_benchmark_records_every_method_and_resumes(demo_raw, tmp_path):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    out = tmp_path / "bench"
    run(config, out, "--seeds", "0", "--methods", "amc", "uniform", "--finetune-epochs", "1")
    records = run(config, out, "--seeds", "0", "1", "--finetune-epochs", "1")

    assert sorted((r["method"], r["seed"]) for r in records) == [  # rules are deterministic: run once
        ("amc", 0), ("amc", 1), ("global", 0), ("random", 0), ("random", 1), ("uniform", 0)]
    full = count_macs(load_model(demo_raw["model"]["checkpoint"])[0], (1, 1, 8, 8))
    for r in records:
        assert r["macs"] <= 0.5 * full
        assert 0.5 < r["select_top1_before_ft"] <= 1 and 0.5 < r["test_top1_before_ft"] <= 1
        assert r["test_top1_after_ft"] > 0.5 and r["finetune_epochs"] == 1
    searched = [r for r in records if r["method"] in ("amc", "random")]
    assert all(r["episodes"] == 3 and 0 < r["eval_share"] <= r["scoring_share"] <= 1 for r in searched)
    assert all(r["answer_source"] in ("search", "search_mean", "uniform", "global")
               and r["reward_noise"]["bootstrap_se"] > 0 for r in searched)
    random_run = read_episodes(out / "runs" / "random_t0.5_s0")  # random search never learns: all warmup
    assert len(random_run) == 3
    for r in searched:  # why the answer is what it is, recorded per run
        episodes = read_episodes(out / "runs" / f"{r['method']}_t0.5_s{r['seed']}")
        assert r["best_reward"] == max(e["reward"] for e in episodes)
        assert sorted(r["rule_rewards"]) == ["global", "uniform"] and all(-1 < v < 0 for v in r["rule_rewards"].values())
        assert r["select_lead"] > 0 or r["answer_source"] != "search"
        selection = json.loads((out / "runs" / f"{r['method']}_t0.5_s{r['seed']}" / "best_policy.json").read_text())
        searched_scores = [c["select_metric"] for c in selection["selection"]["candidates"] if c["source"] == "search"]
        assert r["select_top_k"] == len(searched_scores) and r["select_top_k_mean"] == pytest.approx(
            sum(searched_scores) / len(searched_scores))
        assert len(r["test_top_k"]) == len(searched_scores) and r["test_top_k_mean"] == pytest.approx(
            sum(r["test_top_k"]) / len(searched_scores))
        means = [c for c in selection["selection"]["candidates"] if c["source"] == "search_mean"]
        assert (r["select_search_mean"], r["test_search_mean"] is None) == (
            (means[0]["select_metric"], False) if means else (None, True))
    table, diagnostics, versus = (out / "results.md").read_text().strip().split("\n\n")
    (versus_row,) = [line.split("|")[1:-1] for line in versus.splitlines()[2:]]  # AMC - random, paired by seed
    by = {(r["method"], r["seed"]): r for r in records}
    gap = sum(100 * (by["amc", s]["best_reward"] - by["random", s]["best_reward"]) for s in (0, 1)) / 2
    assert versus_row[1].strip() == "0 1" and versus_row[2].strip().startswith(f"{gap:+.2f} [")
    top_k_gap = sum(100 * (by["amc", s]["select_top_k_mean"] - by["random", s]["select_top_k_mean"]) for s in (0, 1)) / 2
    assert "top-K mean select top-1" in versus and versus_row[3].strip().startswith(f"{top_k_gap:+.2f} [")
    for r in searched:  # the search's K policies, each exported and measured on test
        run_dir = out / "runs" / f"{r['method']}_t0.5_s{r['seed']}"
        keeps = [c["keep"] for c in json.loads((run_dir / "best_policy.json").read_text())["selection"]["candidates"]
                 if c["source"] == "search"]
        if r["answer_source"] == "search":
            assert r["keep"] in keeps
        assert 0.5 < r["test_top_k_mean"] <= 1
    test_gap = sum(100 * (by["amc", s]["test_top_k_mean"] - by["random", s]["test_top_k_mean"]) for s in (0, 1)) / 2
    assert "top-K mean test top-1" in versus and versus_row[4].strip().startswith(f"{test_gap:+.2f} [")
    mean_gaps = [100 * (by["amc", s]["test_search_mean"] - by["random", s]["test_search_mean"]) for s in (0, 1)
                 if by["amc", s]["test_search_mean"] is not None and by["random", s]["test_search_mean"] is not None]
    assert "mean policy test top-1" in versus and versus_row[5].strip() == (
        benchmark.mean_interval(mean_gaps) if mean_gaps else "-")

    # a results file written before a diagnostic existed gains it from the run folders
    stripped = [{k: v for k, v in r.items() if k not in ("select_top_k_mean", "select_top_k", "test_top_k_mean")}
                for r in records]
    (out / "results.json").write_text(json.dumps(stripped))
    refreshed = run(config, out, "--seeds", "0", "1", "--finetune-epochs", "1", "--refresh")
    assert refreshed == records
    assert [line.split("|")[1].strip() for line in diagnostics.splitlines()[2:]] == ["amc", "random"]
    assert "best reward" in diagnostics and "select lead" in diagnostics
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["amc", "random", "uniform", "global"]
    assert "test before FT" in lines[0] and "vs best rule" in lines[0]
    amc_row = lines[2].split("|")
    assert "[" in amc_row[7] and amc_row[7].strip().endswith(")")  # paired difference with its 95% interval
    assert (out / "best_policy_amc_t0.5_s1.png").is_file()


def test_fine_grained_benchmark_keeps_the_density_through_fine_tuning(demo_raw, tmp_path):
    demo_raw["search"].update(mode="fine_grained", resource="params")
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    records = run(config, tmp_path / "bench", "--seeds", "0", "--methods", "uniform", "--finetune-epochs", "1")
    (uniform,) = records
    assert uniform["nonzero_params"] <= 0.5 * uniform["params"]
    assert uniform["test_top1_after_ft"] > 0.5


def markdown_tables(out: str) -> list[list[list[str]]]:
    """The markdown tables printed in ``out``, each as its rows of stripped cells (header first)."""
    return [[[cell.strip() for cell in line.split("|")[1:-1]] for line in block.splitlines() if line.startswith("| ")]
            for block in out.split("\n\n") if block.startswith("| ")]


def test_an_nll_benchmark_reports_the_top_k_in_top1_and_its_reward_diagnostics_in_nats(demo_raw, tmp_path, capsys):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    out = tmp_path / "bench"
    (record,) = run(config, out, "--seeds", "0", "--methods", "amc", "--finetune-epochs", "0",
                    "--set", "search.reward_metric=nll")
    run_dir = out / "runs" / "amc_t0.5_s0"
    candidates = json.loads((run_dir / "best_policy.json").read_text())["selection"]["candidates"]
    searched = [c for c in candidates if c["source"] == "search"]
    workspace = Workspace(load_run_config(run_dir))
    top1 = [accuracy(prune_policy(workspace, c["keep"])[0], workspace.loader("select"))["top1"] for c in searched]
    assert record["metric"] == "nll" and record["select_top_k_mean"] == pytest.approx(np.mean(top1))
    assert record["select_top_k_mean"] != pytest.approx(np.mean([c["select_metric"] for c in searched]))  # 1 - CE
    lead = (max(c["select_metric"] for c in candidates if c["source"] in ("search", "search_mean"))
            - max(c["select_metric"] for c in candidates if c["source"] in ("uniform", "global")))
    assert record["select_lead"] == pytest.approx(lead)
    diagnostics = markdown_tables((out / "results.md").read_text())[1]
    assert diagnostics[1][4] == f"{lead:.4f} nats"  # one search: the lead alone, in nats of cross-entropy

    capsys.readouterr()  # a top-1 search beside it would mix units in one table: refused in one line
    assert benchmark.main(["--config", str(config), "--targets", "0.5", "--episodes", "3", "--seeds", "0",
                           "--methods", "random", "--finetune-epochs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different reward metrics (nll, top1)" in err


def test_rescore_measures_the_best_episodes_on_test(demo_raw, tmp_path, capsys):
    import rescore

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run(config, tmp_path / "bench", "--seeds", "0", "--methods", "amc", "--finetune-epochs", "0")
    capsys.readouterr()
    assert rescore.main([str(tmp_path / "bench" / "runs" / "amc_t0.5_s0"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    header, *rows = markdown_tables(out)[0]
    assert header[2:] == ["export reward-val (%)", "export select (%)", "export test (%)", "cost ratio"]
    assert [r[0] for r in rows][3:] == ["mean of the top", "uniform"]  # the three best, their mean, the rule
    for row in rows:
        assert all(50 < float(v) <= 100 for v in row[2:5]) and 0.45 < float(row[5]) <= 0.5
    assert "Spearman rank correlation, reward-val vs test" in out
    header, *correlations = markdown_tables(out)[1]  # each reward-val statistic against top-1 on the other splits
    assert header == ["reward-val statistic", "vs select top-1", "vs test top-1"]
    assert [r[0] for r in correlations] == ["top-1", "p(true class)", "log p(true class)"]
    assert all(-1 <= float(v) <= 1 for r in correlations for v in r[1:] if v != "nan")
    assert rescore.main([str(tmp_path / "missing")]) == 2

    run_dir = str(tmp_path / "bench" / "runs" / "amc_t0.5_s0")  # the same policies under another repair
    assert rescore.main([run_dir, "--top", "3", "--set", "search.calibration=none"]) == 0
    unrepaired = markdown_tables(capsys.readouterr().out)[0][1:]
    assert [r[0] for r in unrepaired] == [r[0] for r in rows] and [r[4] for r in unrepaired] != [r[4] for r in rows]
    assert rescore.main([run_dir, "--set", "search.no_such_field=1"]) == 2


def test_stop_early_reselects_from_the_first_episodes_and_reproduces_the_full_answer(demo_raw, tmp_path, capsys):
    import stop_early

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    records = run(config, tmp_path / "bench", "--seeds", "0", "--episodes", "6", "--finetune-epochs", "0")
    runs = [tmp_path / "bench" / "runs" / f"{m}_t0.5_s0" for m in ("amc", "random")]
    out = tmp_path / "curve.json"
    capsys.readouterr()
    assert stop_early.main([*map(str, runs), "--episodes", "2", "6", "--out", str(out),
                            "--rules", str(tmp_path / "bench" / "results.json")]) == 0
    curve = {(r["method"], r["episodes"]): r for r in json.loads(out.read_text())}
    assert sorted(curve) == [("amc", 2), ("amc", 6), ("random", 2), ("random", 6)]
    for r in (r for r in records if r["method"] in ("amc", "random")):  # stopped at the full length, the
        # selection step gives the search's own answer
        full = curve[r["method"], 6]
        assert (full["answer_source"], full["test_top1_before_ft"], full["test_top_k_mean"], full["best_reward"]) == (
            r["answer_source"], r["test_top1_before_ft"], pytest.approx(r["test_top_k_mean"]), r["best_reward"])
        episodes = read_episodes(tmp_path / "bench" / "runs" / f"{r['method']}_t0.5_s0")
        assert curve[r["method"], 2]["best_reward"] == max(e["reward"] for e in episodes[:2])
        assert curve[r["method"], 2]["answer_episode"] in (None, 0, 1)
    # both warmups walk the same first episodes under one seed: stopped there, they answer alike
    assert {k: v for k, v in curve["amc", 2].items() if k not in ("run", "method")} == {
        k: v for k, v in curve["random", 2].items() if k not in ("run", "method")}
    header, *rows = markdown_tables(capsys.readouterr().out)[0]
    assert header[:2] == ["episodes", "K"] and [row[:2] for row in rows] == [["2", "10"], ["6", "10"]]
    assert rows[0][6] == "+0.00"  # AMC - random on one seed: no interval
    assert rows[1][6] == f"{100 * (curve['amc', 6]['test_top1_before_ft'] - curve['random', 6]['test_top1_before_ft']):+.2f}"
    rules = {r["method"]: r["test_top1_before_ft"] for r in records if r["method"] in ("uniform", "global")}
    assert header[9:] == ["AMC - uniform", "AMC - global", "random - uniform", "random - global"]
    assert rows[1][9:] == [f"{100 * (curve[m, 6]['test_top1_before_ft'] - rules[rule]):+.2f}"
                           for m in ("amc", "random") for rule in ("uniform", "global")]

    assert stop_early.main([*map(str, runs), "--episodes", "2", "6", "--out", str(out)]) == 0  # resumes: no repeats
    assert len(json.loads(out.read_text())) == 4
    # another K: only the new (run, N, K) are measured; K=1 leaves the best episode and the rules
    capsys.readouterr()
    assert stop_early.main([*map(str, runs), "--episodes", "6", "--top-k", "1", "10", "--out", str(out)]) == 0
    one = {r["method"]: r for r in json.loads(out.read_text()) if r["top_k"] == 1}
    assert len(json.loads(out.read_text())) == 6 and sorted(one) == ["amc", "random"]
    for method, r in one.items():
        assert r["test_search_mean"] is None and r["best_reward"] == curve[method, 6]["best_reward"]
        assert r["answer_source"] in ("search", "uniform", "global")
    header, *rows = markdown_tables(capsys.readouterr().out)[0]
    assert [row[:2] for row in rows] == [["2", "10"], ["6", "1"], ["6", "10"]]
    assert stop_early.main([str(runs[0]), "--episodes", "7", "--out", str(out)]) == 2
    assert "has 6 episodes, fewer than 7" in capsys.readouterr().err
    assert stop_early.main([str(runs[0]), "--episodes", "6", "--out", str(out), "--rules", str(tmp_path / "no.json")]) == 2


def test_repair_noise_rescores_the_best_policies_with_other_repair_samples(demo_raw, tmp_path, capsys):
    import repair_noise

    demo_raw["search"]["calibration"] = "both"  # least squares and adaptive BN: both draw a sample
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run(config, tmp_path / "bench", "--seeds", "0", "--methods", "amc", "--finetune-epochs", "0")
    run_dir = tmp_path / "bench" / "runs" / "amc_t0.5_s0"
    capsys.readouterr()
    assert repair_noise.main([str(run_dir), "--top", "2", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    rows = {r[0].strip(): [float(v) for v in r[1:]] for r in
            (line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| "))
            if r[0].strip() != "policy"}
    assert len(rows) == 4 and {"uniform", "global"} <= set(rows)
    selection = json.loads((run_dir / "best_policy.json").read_text())["selection"]["candidates"]
    for rule in ("uniform", "global"):  # the run's own sample reproduces the selection step's scores
        (recorded,) = [c["select_metric"] for c in selection if c["source"] == rule]
        assert rows[rule][0] == pytest.approx(100 * recorded, abs=0.006)
    assert any(row[-1] > 0 for row in rows.values())  # other samples move the scores
    assert "Spearman between samples" in out
    assert repair_noise.main([str(run_dir), "--samples", "1"]) == 2
    assert repair_noise.main([str(tmp_path / "missing")]) == 2


def test_paired_best_scores_two_searches_best_policies_on_the_same_images(demo_raw, tmp_path, capsys):
    import paired_best
    import yaml

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run(config, tmp_path / "bench", "--seeds", "0", "--methods", "amc", "--finetune-epochs", "0")
    run(config, tmp_path / "bench", "--seeds", "1", "--methods", "random", "--finetune-epochs", "0")
    runs = [tmp_path / "bench" / "runs" / name for name in ("amc_t0.5_s0", "random_t0.5_s1")]
    capsys.readouterr()
    assert paired_best.main([str(r) for r in runs]) == 0
    rows = {r[0].strip(): [float(v) for v in r[1:]] for r in
            (line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| "))
            if r[0].strip() != "split"}
    assert set(rows) == {"reward-val", "select"}
    for run_dir, column in zip(runs, (0, 1)):  # each best policy scores as the run's selection step scored it
        searched = [c for c in json.loads((run_dir / "best_policy.json").read_text())["selection"]["candidates"]
                    if c["source"] == "search"]
        best = max(searched, key=lambda c: c["reward"])
        assert rows["select"][column] == pytest.approx(100 * best["select_metric"], abs=0.006)
    for a, b, diff, se, disagree in rows.values():
        assert diff == pytest.approx(a - b, abs=0.011) and se >= 0 and 0 <= disagree <= 1
        assert (se > 0) == (disagree > 0)

    other = tmp_path / "other_base"  # the same weights under another path: another base model to the runs
    shutil.copytree(runs[1], other)
    raw = yaml.safe_load((other / "config.yaml").read_text())
    shutil.copy(raw["model"]["checkpoint"], tmp_path / "base_copy.pt")
    raw["model"]["checkpoint"] = str(tmp_path / "base_copy.pt")
    (other / "config.yaml").write_text(yaml.safe_dump(raw))
    assert paired_best.main([str(runs[0]), str(other)]) == 2
    assert "another base model or data split" in capsys.readouterr().err
    assert paired_best.main([str(runs[0]), str(tmp_path / "missing")]) == 2


def test_critic_fit_trains_critics_on_the_saved_buffer_of_the_last_episodes(demo_raw, tmp_path, capsys):
    import critic_fit

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert benchmark.main(["--config", str(config), "--targets", "0.5", "--episodes", "12", "--seeds", "0",
                           "--methods", "amc", "--finetune-epochs", "0", "--set", "agent.warmup_episodes=4",
                           "--set", "agent.buffer_episodes=10", "--out", str(tmp_path / "bench")]) == 0
    run_dir = tmp_path / "bench" / "runs" / "amc_t0.5_s0"
    capsys.readouterr()
    assert critic_fit.main([str(run_dir), "--splits", "2"]) == 0
    (row,) = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
              if line.startswith("| amc")]
    last = [e["reward"] for e in read_episodes(run_dir)][-10:]  # the buffer keeps the last 10 episodes
    assert row[1] == "10" and float(row[2]) == pytest.approx(100 * float(np.std(last, ddof=1)), abs=0.006)
    assert len(row) == 6  # as the agent sees them, standardised, with the earlier actions in the state
    for cell in row[3:]:
        mean, sd = (float(v) for v in cell.split(" ± "))
        assert -1 <= mean <= 1 and sd >= 0
    two_episodes = torch.arange(1.0, 7.0).view(-1, 1)  # three units each, one action per row
    assert critic_fit.earlier_actions(two_episodes, 3).tolist() == [
        [0, 0, 0], [1, 0, 0], [1, 2, 0], [0, 0, 0], [4, 0, 0], [4, 5, 0]]

    short = tmp_path / "short"
    assert benchmark.main(["--config", str(config), "--targets", "0.5", "--episodes", "5", "--seeds", "0",
                           "--methods", "amc", "--finetune-epochs", "0", "--set", "agent.warmup_episodes=2",
                           "--out", str(short)]) == 0
    assert critic_fit.main([str(short / "runs" / "amc_t0.5_s0")]) == 2
    assert "holds 5 episodes; held-out correlations need at least 10" in capsys.readouterr().err
    assert critic_fit.main([str(tmp_path / "missing")]) == 2


def test_quantize_benchmark_compares_search_uniform_and_sensitivity(demo_raw, tmp_path):
    demo_raw["search"].update(mode="quantize", resource="size")
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    records = run(config, tmp_path / "bench", "--targets", "0.1", "--seeds", "0",
                  "--methods", "amc", "uniform", "sensitivity", "--finetune-epochs", "1")
    assert [r["method"] for r in records] == ["amc", "uniform", "sensitivity"]
    full_bytes = 4 * sum(p.numel() for n, p in load_model(demo_raw["model"]["checkpoint"])[0].named_parameters()
                         if n.endswith("weight") and p.dim() > 1)
    for r in records:
        assert r["weight_bytes"] <= 0.1 * full_bytes and r["test_top1_after_ft"] > 0.5
    assert "weights (KB)" in (tmp_path / "bench" / "results.md").read_text()


def test_benchmark_jobs_on_two_local_workers_give_the_serial_records(demo_raw, tmp_path):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    jobs = ("--seeds", "0", "--methods", "amc", "uniform", "--finetune-epochs", "1")
    serial = run(config, tmp_path / "serial", *jobs)
    parallel = run(config, tmp_path / "parallel", *jobs, "--workers", "2")
    same = ("method", "seed", "keep", "select_top1_before_ft", "test_top1_before_ft", "test_top1_after_ft")

    def ordered(records: list[dict]) -> list[dict]:
        return sorted(({k: r[k] for k in same} for r in records), key=lambda r: r["method"])

    assert ordered(parallel) == ordered(serial)


def test_a_handcrafted_rule_that_cannot_reach_the_budget_is_skipped(demo_raw, tmp_path, capsys):
    """The paper's deep policy keeps the first layer whole: at 15% of the FLOPs it cannot fit, and
    the benchmark says so in one line and records the other methods."""
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    records = run(config, tmp_path / "bench", "--seeds", "0", "--methods", "uniform", "deep",
                  "--finetune-epochs", "0", "--targets", "0.15")
    assert [r["method"] for r in records] == ["uniform"]
    assert "deep at target 0.15: skipped: search.target: even the smallest policy costs" in capsys.readouterr().err


def test_vary_base_trains_a_base_per_seed_and_pairs_searches_with_rules_on_their_base(demo_raw, tmp_path, capsys):
    """--vary-base: seed s prunes its own base (trained when missing, on the split of config seed s),
    the rules run on every base, and a search's difference to the best rule is paired by base."""
    shutil.copy(demo_raw["model"]["checkpoint"], tmp_path / "base_s0.pt")  # the fixture's base: seed 0's
    seed0_bytes = (tmp_path / "base_s0.pt").read_bytes()
    demo_raw["model"]["checkpoint"] = str(tmp_path / "base_s{seed}.pt")
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    out = tmp_path / "bench"
    records = run(config, out, "--seeds", "0", "1", "--methods", "amc", "uniform", "--finetune-epochs", "0",
                  "--vary-base")

    assert (tmp_path / "base_s0.pt").read_bytes() == seed0_bytes  # present: not retrained
    assert load_checkpoint(tmp_path / "base_s1.pt", BASE_FORMAT)["split"]["seed"] == 1
    by = {(r["method"], r["seed"]): r for r in records}
    assert sorted(by) == [("amc", 0), ("amc", 1), ("uniform", 0), ("uniform", 1)]  # the rule on both bases
    for (method, seed), r in by.items():
        assert r["base"] == str(tmp_path / f"base_s{seed}.pt")
    assert by["uniform", 0]["keep"] != by["uniform", 1]["keep"] or by["uniform", 0]["test_top1_before_ft"] != by[
        "uniform", 1]["test_top1_before_ft"]  # two bases, two measurements of the rule
    gap = sum(100 * (by["amc", s]["test_top1_before_ft"] - by["uniform", s]["test_top1_before_ft"]) for s in (0, 1)) / 2
    amc_row = (out / "results.md").read_text().splitlines()[2].split("|")
    assert amc_row[1].strip() == "amc" and amc_row[7].strip().startswith(f"{gap:+.2f} [")

    # pooling rows pairs each search with the rule on its own base, row by row, then over all bases
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    records[0:0] = [dict(by["amc", 0], seed=5, base="elsewhere")]  # a search without its rule is left out
    (copy / "results.json").write_text(json.dumps(records))
    capsys.readouterr()
    assert pool_rows.main([str(out), str(copy), "--target", "0.5"]) == 0
    lines = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()[2:]]
    uniform_before = [line for line in lines if line[:2] == ["AMC - uniform", "test before FT"]]
    diffs = [100 * (by["amc", s]["test_top1_before_ft"] - by["uniform", s]["test_top1_before_ft"]) for s in (0, 1)]
    assert [row[3:5] for row in uniform_before] == [["2", benchmark.mean_interval(diffs)]] * 2 + [
        ["4", benchmark.mean_interval(diffs * 2)]]
    assert [row[4] for row in lines if row[0] == "AMC - random"] == ["-"] * 6  # no random search here
    assert pool_rows.main([str(tmp_path / "mixed")]) == 2
    assert "mixed: no results.json" in capsys.readouterr().err

    # a base trained with another recipe than the config's is refused before anything runs
    assert benchmark.main(["--config", str(config), "--vary-base", "--seeds", "0", "1", "--set", "train.epochs=3",
                           "--out", str(tmp_path / "mixed")]) == 2
    assert "base_s0.pt: trained for 15 epochs, the config trains 3" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()

    demo_raw["model"]["checkpoint"] = str(tmp_path / "base.pt")  # one file cannot be a base per seed
    config = write_config(tmp_path / "one_base.yaml", demo_raw)
    assert benchmark.main(["--config", str(config), "--vary-base", "--out", str(tmp_path / "other")]) == 2
    assert "model.checkpoint: --vary-base needs a path with {seed} in it" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_copied_search_continues_longer_and_a_job_error_is_one_line(demo_raw, tmp_path, capsys):
    """A finished benchmark's run folders, copied to a new OUT, continue to more episodes (a longer
    search branched from a shorter one); a job that cannot run stops the benchmark in one line."""
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    short, longer, changed = tmp_path / "short", tmp_path / "longer", tmp_path / "changed"
    run(config, short, "--seeds", "0", "--methods", "amc", "random", "--finetune-epochs", "0")
    for out in (longer, changed):
        shutil.copytree(short / "runs", out / "runs")

    records = run(config, longer, "--seeds", "0", "--methods", "amc", "random", "--finetune-epochs", "0",
                  "--episodes", "5")
    assert sorted(r["method"] for r in records) == ["amc", "random"]
    for r in records:  # random search's warmup lengthens with it: every episode stays random
        first, continued = (read_episodes(out / "runs" / f"{r['method']}_t0.5_s0") for out in (short, longer))
        assert r["episodes"] == 5 and len(continued) == 5
        assert [e["reward"] for e in continued[:3]] == [e["reward"] for e in first]

    assert benchmark.main(["--config", str(config), "--targets", "0.5", "--episodes", "3", "--seeds", "0",
                           "--methods", "amc", "--set", "agent.warmup_episodes=2", "--set", "agent.tau=0.1",
                           "--out", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "config differs from the run's in agent.tau" in err and "Traceback" not in err
    assert len(read_episodes(changed / "runs" / "amc_t0.5_s0")) == 3
