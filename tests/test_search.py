"""The search run: outputs, exact resume, and SIGKILL at several points."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from amc.checkpoint import AGENT_FORMAT, load_checkpoint
from amc.config import RECONSTRUCT_RIDGE, config_from_dict
from amc.errors import UserError
from amc.search import AGENT_FILE, load_run_config, search
from conftest import ROOT, write_config


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "episodes.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(f)]


def test_search_writes_the_run_directory(demo_cfg, tmp_path):
    run_dir = tmp_path / "run"
    best = search(demo_cfg, run_dir, progress=False)
    table = rows(run_dir)
    assert [int(r["episode"]) for r in table] == list(range(demo_cfg.search.episodes))
    assert all(float(r["macs_ratio"]) <= demo_cfg.search.target + 1e-9 for r in table)
    saved = json.loads((run_dir / "best_policy.json").read_text())
    assert saved == json.loads(json.dumps(best)) and len(saved["keep"]) == len(saved["units"])
    searched = [c for c in saved["selection"]["candidates"] if c["source"] == "search"]
    assert searched[0]["reward"] == max(float(r["reward"]) for r in table)  # the search's best is a candidate
    assert (run_dir / "config.yaml").is_file() and (run_dir / "agent.pt").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    sigmas = [float(r["sigma"]) for r in table]  # decays only after warmup
    warmup = demo_cfg.agent.warmup_episodes
    assert sigmas[warmup] == pytest.approx(demo_cfg.agent.noise_sigma)  # the sigma each episode explored with
    assert sigmas[warmup + 1] == pytest.approx(demo_cfg.agent.noise_sigma * demo_cfg.agent.noise_decay)
    assert sigmas[-1] < sigmas[warmup]


def test_the_answer_is_chosen_on_the_selection_split(demo_cfg, tmp_path):
    """Top-K distinct policies by reward plus uniform and global, repaired as export repairs
    them and scored on the held-out selection split; the best of them is the run's answer."""
    from amc.export import prune_policy
    from amc.factory import Workspace
    from amc.fidelity import check_fidelity
    from amc.metrics import accuracy

    cfg = demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"select_top_k": 4,
                                                                                  "select_margin": 0.0})})
    answer = search(cfg, tmp_path / "run", progress=False)
    candidates = answer["selection"]["candidates"]
    assert answer["selection"]["split"] == "select" and answer["selection"]["metric"] == "top1"
    assert [c["source"] for c in candidates] == ["search"] * 4 + ["search_mean", "uniform", "global"]
    assert len({tuple(c["keep"]) for c in candidates}) == 7
    rewards = [c["reward"] for c in candidates if c["source"] == "search"]
    assert rewards == sorted(rewards, reverse=True)
    winner = max(candidates, key=lambda c: c["score"])
    assert (answer["source"], answer["keep"]) == (winner["source"], winner["keep"])
    workspace = Workspace(cfg)
    for c in (winner, candidates[-1]):  # recomputed independently: export's repair, fp32, selection split
        model, _ = prune_policy(workspace, c["keep"])
        assert accuracy(model, workspace.loader("select"))["top1"] == pytest.approx(c["select_metric"])
    assert answer["macs_ratio"] <= cfg.search.target + 1e-9
    env = workspace.env()
    check_fidelity(env)  # the precision the search's rewards were scored in
    for added in candidates[-3:]:  # the mean's and the rules' rewards are the search's, for the same comparison
        assert added["reward"] == pytest.approx(env.evaluate(added["keep"])[0])
    mean = candidates[4]  # the top-K's mean policy, fitted to the budget
    assert mean["keep"] == env.nearest_policy(np.mean([c["keep"] for c in candidates[:4]], axis=0))
    noise = answer["noise"]
    p, n = noise["reward_val_metric"], cfg.data.reward_val_size
    assert noise["bootstrap_se"] == pytest.approx((p * (1 - p) / n) ** 0.5, rel=0.3)
    assert len(noise["calibration_metric"]) == 3 and noise["calibration_spread"] >= 0


def test_nll_rewards_and_selects_by_the_cross_entropy_of_the_true_class(demo_cfg, tmp_path):
    """reward_metric nll: the error is the mean cross-entropy, in the rewards, the selection step
    (per image, for the margin) and the noise, and the summary speaks of nats. Rewards in fp32: on
    hardware with native bf16 the fidelity check may keep bf16, whose rewards differ from the fp32
    reference below by up to its tolerance."""
    import torch
    import torch.nn.functional as F

    from amc.export import prune_policy
    from amc.factory import Workspace
    from amc.fidelity import check_fidelity
    from amc.metrics import accuracy, per_image_metric
    from amc.pipeline import answer_note

    cfg = demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"reward_metric": "nll",
                                                                                  "precision": "fp32"})})
    answer = search(cfg, tmp_path / "run", progress=False)
    assert answer["selection"]["metric"] == "nll" and answer["noise"]["metric"] == "nll"
    workspace = Workspace(cfg)
    env = workspace.env()
    check_fidelity(env)
    model, _ = prune_policy(workspace, answer["keep"])
    batches = list(workspace.loader("select"))
    logits = torch.cat([model(x) for x, _ in batches])
    cross_entropy = F.cross_entropy(logits, torch.cat([y for _, y in batches])).item()
    (chosen,) = [c for c in answer["selection"]["candidates"] if (c["source"], c["keep"]) == (answer["source"], answer["keep"])]
    assert chosen["select_metric"] == pytest.approx(1 - cross_entropy, abs=1e-6)
    assert per_image_metric(model, batches, "nll").mean() == pytest.approx(1 - cross_entropy, abs=1e-6)
    reward_val = accuracy(model, workspace.loader("reward_val"))
    assert answer["noise"]["reward_val_error"] == pytest.approx(reward_val["nll"], abs=1e-6)
    assert answer["reward"] == pytest.approx(env.evaluate(answer["keep"])[0])  # the search's own score
    assert answer["reward"] == pytest.approx(-reward_val["nll"], abs=1e-4)  # resource protocol: -cross-entropy
    assert " nats" in answer_note(answer) and "points" not in answer_note(answer)


def test_a_searched_policy_must_lead_the_best_rule_by_the_margin(demo_cfg):
    """The margin rule: the searched policy with the best selection score is the answer only when
    its lead over the best rule exceeds ``margin`` paired standard errors on the same images."""
    from amc.baselines import baseline_policy
    from amc.factory import Workspace
    from amc.pipeline import answer_note
    from amc.selection import (RULES, SEARCH_MEAN, Candidate, images_to_separate, paired_standard_error,
                               score_on_split, select)

    ws = Workspace(demo_cfg)
    policies = {m: baseline_policy(demo_cfg, m, ws) for m in ("uniform", "global", "deep", "shallow", "random")}
    hits = {m: score_on_split(ws, keep, "select") for m, keep in policies.items()}
    # select() knows a rule by its source, not its policy, and the demo's ranking of these policies
    # depends on the machine the base trained on: the best plays a searched policy, the next two
    # distinct scores play the two rules
    first_with_score = {}
    for m in sorted(policies, key=lambda m: -hits[m].mean()):
        first_with_score.setdefault(hits[m].mean(), m)
    assert len(first_with_score) >= 3  # the demo's policies differ on the selection split
    top, second, third = list(first_with_score.values())[:3]
    rule, other = RULES

    def candidates():
        return [Candidate("search", policies[top], episode=7, reward=-0.1), Candidate(rule, policies[second]),
                Candidate(other, policies[third])]

    lead = hits[top].mean() - hits[second].mean()
    se = paired_standard_error(hits[top], hits[second])
    diff = hits[top] - hits[second]
    assert se == pytest.approx(diff.std(ddof=1) / len(diff) ** 0.5) and se > 0
    for margin, kept_rule in ((0.0, False), (0.999 * lead / se, False), (1.001 * lead / se, True)):
        answer, decision = select(ws, candidates(), lambda error, keep: -error, margin=margin)
        assert answer.source == (rule if kept_rule else "search")
        assert decision["kept_rule"] is kept_rule and decision["rule"] == rule and decision["search_episode"] == 7
        assert decision["search_lead"] == pytest.approx(lead) and decision["paired_se"] == pytest.approx(se)
        needed = images_to_separate(decision)
        if kept_rule:  # the lead would just clear the margin on that many images, the SE falling as 1/sqrt(n)
            assert decision["images"] == len(diff) < needed
            assert margin * se * (len(diff) / needed) ** 0.5 <= lead < margin * se * (len(diff) / (needed - 1)) ** 0.5
            note = answer_note({"source": rule, "episode": None, "noise": {"bootstrap_se": 0.01, "calibration_spread": 0.0},
                                "selection": {"split": "select", "margin": decision,
                                              "candidates": [asdict(c) for c in candidates()]}})
            assert f"about {needed} selection images (now {len(diff)})" in note
        else:
            assert needed is None
    answer, decision = select(ws, candidates()[1:], lambda error, keep: -error, margin=100.0)
    assert answer.source == rule and decision == {}  # a rule won outright: nothing to decide
    mean = Candidate(SEARCH_MEAN, policies[top], reward=-0.1)  # the top-K's mean is searched, held to the margin too
    answer, decision = select(ws, [mean, *candidates()[1:]], lambda error, keep: -error, margin=0.0)
    assert answer.source == SEARCH_MEAN and decision["search_source"] == SEARCH_MEAN and not decision["kept_rule"]
    answer, decision = select(ws, [mean, *candidates()[1:]], lambda error, keep: -error, margin=1.001 * lead / se)
    note = answer_note({"source": rule, "episode": None, "noise": {"bootstrap_se": 0.01, "calibration_spread": 0.0},
                        "selection": {"split": "select", "margin": decision,
                                      "candidates": [asdict(c) for c in (mean, *candidates())]}})
    assert answer.source == rule and "best of 1 searched policies and their mean and 2 rules" in note
    assert "the search's best (mean of the best) led" in note


def test_run_files_follow_the_umask_and_no_temp_dir_is_left(demo_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    previous = os.umask(0o022)
    try:
        search(demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"episodes": 2})}),
               tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    for name in ("config.yaml", "episodes.csv", "best_policy.json", "agent.pt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
    assert list((tmp_path / "tmp").iterdir()) == []  # SB3's logger used to leave SB3-<timestamp> here


def test_resume_matches_an_uninterrupted_run(demo_raw, tmp_path):
    whole = config_from_dict({**demo_raw, "search": {**demo_raw["search"], "run_dir": str(tmp_path / "a")}})
    search(whole, tmp_path / "a", progress=False)
    half = whole.model_copy(update={"search": whole.search.model_copy(update={"episodes": 17})})
    search(half, tmp_path / "b", progress=False)
    assert len(rows(tmp_path / "b")) == 17
    search(whole, tmp_path / "b", resume=True, progress=False)
    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    assert b"\r" not in (tmp_path / "b" / "episodes.csv").read_bytes()  # one line ending after a resume
    assert json.loads((tmp_path / "b" / "best_policy.json").read_text()) == \
        json.loads((tmp_path / "a" / "best_policy.json").read_text())


def test_a_second_search_into_the_same_run_dir_is_refused(demo_cfg, tmp_path):
    search(demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"episodes": 2})}),
           tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="already holds a search"):
        search(demo_cfg, tmp_path / "run", progress=False)
    changed = demo_cfg.model_copy(update={"seed": 7})
    with pytest.raises(UserError, match="differs from the run's in seed"):
        search(changed, tmp_path / "run", progress=False)


def amc(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "amc.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_rows(csv_path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv_path.is_file() and csv_path.read_text().count("\n") - 1 >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"search ended early: {process.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("search too slow")


# fp32 rewards: the fidelity check would otherwise rerun at every one of the four process starts
JOINT = {"mode": "joint", "resource": "bitops", "target": 0.03, "quantize_activations": True, "precision": "fp32"}


# a kill before the first episode is the same in every variant: the serial channel search covers it
@pytest.mark.parametrize("workers, mode, episodes, kills", [(1, {}, 20, (0, 4, 15)), (2, {}, 20, (4, 15)),
                                                            (1, JOINT, 12, (4, 11))],
                         ids=["channels", "2-workers", "joint"])
def test_sigkill_at_several_points_then_resume_matches_uninterrupted(demo_raw, tmp_path, workers, mode, episodes,
                                                                     kills):
    """One search killed with SIGKILL as soon as its run dir exists, during warmup and while
    learning; each time resumed with the real CLI; the result equals an uninterrupted run.
    With 2 workers the search runs in rounds of 2 scored by worker processes, resumed per round.
    Joint mode (a pruning step and two bit-width steps per unit) resumes alike."""
    demo_raw["search"].update(episodes=episodes, workers=workers, **mode)
    reference = config_from_dict({**demo_raw, "search": {**demo_raw["search"], "run_dir": str(tmp_path / "ref")}})
    search(reference, tmp_path / "ref", progress=False)

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run_dir = Path(demo_raw["search"]["run_dir"])
    process = amc("search", str(config), cwd=tmp_path)
    for kill_after in kills:  # warmup is 10 episodes: the last kill is while learning
        if kill_after:
            wait_for_rows(run_dir / "episodes.csv", kill_after, process)
        else:
            wait_for_rows(run_dir / "config.yaml", -1, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process = amc("search", "--resume", str(run_dir), cwd=tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert rows(run_dir) == rows(tmp_path / "ref")
    assert json.loads(out.strip().splitlines()[-1])["episode"] == \
        json.loads((tmp_path / "ref" / "best_policy.json").read_text())["episode"]


def test_amc_run_on_an_existing_run_refuses_a_changed_config(demo_raw, tmp_path, monkeypatch):
    """The check lives in search() itself, so `amc run` (and the benchmark) cannot bypass it."""
    from amc.cli import main

    monkeypatch.chdir(tmp_path)
    demo_raw["search"]["episodes"] = 4
    demo_raw["agent"]["warmup_episodes"] = 2
    demo_raw["finetune"]["epochs"] = 0
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run_dir = Path(demo_raw["search"]["run_dir"])
    assert main(["run", str(config)]) == 0
    saved = (run_dir / "config.yaml").read_text()
    assert main(["run", str(config), "--set", "search.target=0.3", "--episodes", "6"]) == 2
    assert main(["run", str(config), "--episodes", "2"]) == 2  # fewer than the run already has
    assert (run_dir / "config.yaml").read_text() == saved and len(rows(run_dir)) == 4
    assert main(["run", str(config), "--episodes", "5"]) == 0  # more episodes: the run continues
    assert len(rows(run_dir)) == 5


def test_a_search_with_the_state_history_learns_from_the_longer_state(demo_cfg, tmp_path):
    def run(name: str, state_history: bool) -> tuple[list[dict], dict]:
        search_cfg = demo_cfg.search.model_copy(update={"episodes": demo_cfg.agent.warmup_episodes + 3,
                                                         "state_history": state_history})
        search(demo_cfg.model_copy(update={"search": search_cfg}), tmp_path / name, progress=False)
        return rows(tmp_path / name), load_checkpoint(tmp_path / name / AGENT_FILE, AGENT_FORMAT)

    paper, paper_state = run("paper", False)
    history, history_state = run("history", True)
    units = len(history_state["best"]["units"])
    buffer = history_state["agent"]["buffer"]["observations"]
    assert buffer.shape[-1] == 11 + units and paper_state["agent"]["buffer"]["observations"].shape[-1] == 11
    actor_inputs = [w.shape[1] for k, w in history_state["agent"]["policy"].items() if k.endswith("0.weight")]
    assert set(actor_inputs) == {11 + units, 11 + units + 1}  # actors; critics also take the action
    warmup = demo_cfg.agent.warmup_episodes
    policy = [k for k in history[0] if k not in ("episode", "reward", "error", "sigma") and "ratio" not in k]
    assert [[r[k] for k in policy] for r in history[:warmup]] == [[r[k] for k in policy] for r in paper[:warmup]]
    assert [[r[k] for k in policy] for r in history[warmup:]] != [[r[k] for k in policy] for r in paper[warmup:]]


def test_resume_refuses_a_changed_config(demo_cfg, tmp_path):
    run_dir = tmp_path / "run"
    search(demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"episodes": 3})}),
           run_dir, progress=False)
    result = subprocess.run([sys.executable, "-m", "amc.cli", "search", "--resume", str(run_dir),
                             "--set", "search.target=0.3", "--set", "agent.tau=0.1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "search.target" in result.stderr and "agent.tau" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(rows(run_dir)) == 3


def test_a_run_recorded_before_the_ridge_keeps_plain_least_squares(demo_cfg, tmp_path):
    """A run whose config.yaml predates search.reconstruct_ridge was repaired without it: it reads
    as 0 (so export repairs as the search scored), and continuing it under the new default is refused."""
    short = demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"episodes": 2})})
    search(short, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["search"].pop("reconstruct_ridge") == RECONSTRUCT_RIDGE > 0
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_run_config(tmp_path / "run").search.reconstruct_ridge == 0
    with pytest.raises(UserError, match="differs from the run's in search.reconstruct_ridge"):
        search(demo_cfg, tmp_path / "run", resume=True, progress=False)
    plain = demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"reconstruct_ridge": 0.0})})
    search(plain, tmp_path / "run", resume=True, progress=False)
    assert len(rows(tmp_path / "run")) == demo_cfg.search.episodes


def test_an_all_warmup_run_continues_with_a_longer_warmup(demo_cfg, tmp_path):
    """Random search is a run whose every episode is warmup: it continues to more episodes with the
    warmup lengthened to match, and equals one started that long; a run past its warmup may not."""
    def run(episodes, warmup, where, resume=False):
        cfg = demo_cfg.model_copy(update={"search": demo_cfg.search.model_copy(update={"episodes": episodes}),
                                          "agent": demo_cfg.agent.model_copy(update={"warmup_episodes": warmup})})
        search(cfg, tmp_path / where, resume=resume, progress=False)

    run(5, 5, "whole")
    run(3, 3, "extended")
    run(5, 5, "extended", resume=True)
    assert rows(tmp_path / "extended") == rows(tmp_path / "whole")
    run(3, 2, "learning")  # its third episode followed the agent
    with pytest.raises(UserError, match="differs from the run's in agent.warmup_episodes"):
        run(5, 5, "learning", resume=True)


def test_resume_may_move_the_search_to_another_device_and_folder(demo_cfg, tmp_path):
    """A search started with one device setting continues under another (a GPU run finished on a
    CPU), and in another folder (a run copied to branch it into a longer one); here both devices
    are the CPU, so the continued run equals an uninterrupted one."""
    def episodes(cfg, n, run_dir):
        return cfg.model_copy(update={"search": cfg.search.model_copy(update={"episodes": n, "run_dir": str(run_dir)})})

    started = demo_cfg.model_copy(update={"device": "auto"})
    search(episodes(started, 5, tmp_path / "whole"), tmp_path / "whole", progress=False)
    search(episodes(started, 3, tmp_path / "first"), tmp_path / "first", progress=False)
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    moved = started.model_copy(update={"device": "cpu"})
    search(episodes(moved, 5, tmp_path / "moved"), tmp_path / "moved", resume=True, progress=False)
    assert rows(tmp_path / "moved") == rows(tmp_path / "whole")
    assert len(rows(tmp_path / "first")) == 3  # the original is untouched
    shutil.copytree(tmp_path / "first", tmp_path / "again")  # `amc search --resume` reads the run's config
    assert load_run_config(tmp_path / "again").search.run_dir == str(tmp_path / "again")
