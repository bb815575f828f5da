"""The CLI end to end on the demo: run, export + load_pruned + ONNX, fine-tune, eval, bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amc
from amc.checkpoint import load_checkpoint
from amc.cli import main
from amc.metrics import count_macs, count_params
from conftest import ROOT, write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amc.cli", *args], capture_output=True, text=True, cwd=cwd, env=ENV)


def test_run_export_finetune_eval(demo_raw, tmp_path, capsys):
    demo_raw["search"]["episodes"] = 20
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\n", out.index("fine-tuned checkpoint")) + 1:].splitlines()
    assert "test after FT" in table[0] and "select" in table[0]
    names = [line.split("  ")[0] for line in table[2:-3]]
    assert names[0] == "original" and names[2:] == ["uniform", "global"]
    assert names[1].startswith("AMC (episode ") or names[1].startswith("answer: ")
    assert table[-3].startswith("answer: ") and "on the select split" in table[-3]
    assert table[-2].startswith("reward noise: ±")
    best = json.loads((Path(demo_raw["search"]["run_dir"]) / "best_policy.json").read_text())
    assert ("paired standard error" in table[-3]) == bool(best["selection"].get("margin"))
    rewards = {c["source"]: c["reward"] for c in best["selection"]["candidates"][-3:]}
    top = max(c["reward"] for c in best["selection"]["candidates"] if c["source"] == "search")
    assert table[-1] == (f"rewards as the search scores them: best episode {top:.4f}, mean of the best "
                         f"{rewards['search_mean']:.4f}, uniform {rewards['uniform']:.4f}, global {rewards['global']:.4f}")
    run_dir = Path(demo_raw["search"]["run_dir"])
    for name in ("pruned.pt", "pruned_ft.pt", "rule_uniform.pt", "rule_uniform_ft.pt", "rule_global_ft.pt",
                 "best_policy.png", "episodes.png", "episodes.csv"):
        assert (run_dir / name).is_file(), name
    for rule in ("uniform", "global"):  # the rules at the same budget, measured the same way
        assert load_checkpoint(run_dir / f"rule_{rule}.pt", "amc-pruned")["metrics"]["macs"] <= \
            0.5 * count_macs(amc.checkpoint.load_model(demo_raw["model"]["checkpoint"])[0], (1, 1, 8, 8))

    # the exported checkpoint: weights_only, and physically what the policy predicts
    data = torch.load(run_dir / "pruned.pt", weights_only=True)
    best = json.loads((run_dir / "best_policy.json").read_text())
    model = amc.load_pruned(run_dir / "pruned.pt")
    shape = tuple(data["input_shape"])
    assert count_macs(model, shape) == data["metrics"]["macs"]
    assert count_params(model) == data["metrics"]["params"]
    base = load_checkpoint(demo_raw["model"]["checkpoint"], "amc-base")
    assert data["metrics"]["macs"] / count_macs(amc.checkpoint.load_model(demo_raw["model"]["checkpoint"])[0], shape) \
        == pytest.approx(best["macs_ratio"])
    assert best["macs_ratio"] <= 0.5
    assert base["spec"] == data["arch"]

    # eval prints JSON metrics
    assert main(["eval", str(run_dir / "pruned_ft.pt"), "--config", str(config)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"test_top1", "test_top5", "macs", "params", "latency_ms"} <= set(metrics)
    assert metrics["test_top1"] > 0.8


def test_export_onnx_runs_in_a_fresh_process(demo_raw, tmp_path, capsys):
    demo_raw["search"]["episodes"] = 3
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["search", str(config)]) == 0
    run_dir = Path(demo_raw["search"]["run_dir"])
    onnx_path = tmp_path / "pruned.onnx"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "p.pt"), "--onnx", str(onnx_path)]) == 0
    capsys.readouterr()
    check = (
        "import numpy as np, onnxruntime as ort, torch, amc\n"
        f"s = ort.InferenceSession({str(onnx_path)!r})\n"
        "x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)\n"
        "y = s.run(None, {'input': x})[0]\n"
        f"ref = amc.load_pruned({str(tmp_path / 'p.pt')!r})(torch.from_numpy(x)).detach().numpy()\n"
        "assert y.shape == (3, 10), y.shape\n"
        "assert np.allclose(y, ref, atol=1e-4)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=ENV)
    assert result.stdout.strip() == "ok", result.stderr


def test_finetune_with_distillation(demo_raw, tmp_path, capsys):
    demo_raw["search"]["episodes"] = 2
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["search", str(config)]) == 0
    run_dir = Path(demo_raw["search"]["run_dir"])
    assert main(["export", str(run_dir)]) == 0
    capsys.readouterr()
    out = tmp_path / "tuned.pt"
    assert main(["finetune", str(run_dir / "pruned.pt"), "--config", str(config), "--epochs", "2",
                 "--distill", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    tuned = amc.load_pruned(out)
    assert result["macs"] == count_macs(tuned, (1, 1, 8, 8))
    assert result["test_top1"] > 0.8


def test_script_wrappers_accept_config_flag(demo_raw, tmp_path):
    demo_raw["search"]["episodes"] = 2
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "search.py"), "--config", str(config)],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    answer = json.loads((Path(printed["run_dir"]) / "best_policy.json").read_text())
    # with 2 episodes a rule may win the selection step: then the answer has no episode
    assert printed["episode"] in ((0, 1) if answer["source"] == "search" else (None,))
    assert answer["source"] in ("search", "uniform", "global")


@pytest.mark.parametrize("args, expected", [
    (["info", "missing.yaml"], "missing.yaml: config file not found"),
    (["eval", "nope.pt", "--config", "configs/demo_digits.yaml"], "nope.pt: checkpoint not found"),
    (["search", "--resume", "no_such_run"], "no_such_run: no such directory; `amc search --resume` needs"),
    (["train", "configs/demo_digits.yaml", "--epochs", "0"], "--epochs: must be a positive integer"),
    (["info", "configs/demo_digits.yaml", "--set", "model.name=resnet999"], "unknown model"),
    (["info", "configs/demo_digits.yaml", "--set", "model.name=no_such_pkg.mod:factory"], "no_such_pkg"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amc: error: ")
    assert expected in lines[0]


def test_fine_grained_export_and_finetune_keep_the_zeros(demo_raw, tmp_path, capsys):
    demo_raw["search"].update(mode="fine_grained", resource="params", target=0.3, episodes=3)
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["search", str(config)]) == 0
    run_dir = Path(demo_raw["search"]["run_dir"])
    candidates = json.loads((run_dir / "best_policy.json").read_text())["selection"]["candidates"]
    assert {c["source"] for c in candidates} >= {"uniform", "global"}  # global magnitude is a rule here too
    assert main(["export", str(run_dir)]) == 0
    exported = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert exported["nonzero_params"] <= 0.3 * exported["params"] + 1
    assert main(["finetune", str(run_dir / "pruned.pt"), "--config", str(config), "--epochs", "1"]) == 0
    tuned = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert tuned["nonzero_params"] <= exported["nonzero_params"]
    assert tuned["test_top1"] > 0.5


def test_help_documents_every_option(capsys):
    from amc.cli import BASELINES, _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("amc", parser), *commands.choices.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"baseline prune or quantize by a rule ({', '.join(BASELINES)})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("quiet", ["none", "flag before", "flag after", "env"])
def test_quiet_turns_off_progress_bars(demo_raw, tmp_path, capsys, monkeypatch, quiet):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    args = ["train", str(config), "--epochs", "1"]
    if quiet == "flag before":
        args.insert(0, "--quiet")
    elif quiet == "flag after":
        args.append("-q")
    elif quiet == "env":
        monkeypatch.setenv("AMC_NO_PROGRESS", "1")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("train" in err and "%|" in err) == (quiet == "none"), err


def test_warnings_print_one_line_each(demo_raw, tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("a file where the latency cache directory should be")
    monkeypatch.setenv("AMC_CACHE_DIR", str(tmp_path / "cache"))
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["info", str(config), "--set", "search.resource=latency"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amc: warning: latency table not cached ("), lines


def test_eval_split_and_latency_at_two_batches(demo_raw, tmp_path, capsys):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    base = demo_raw["model"]["checkpoint"]
    results = {}
    for split in ("test", "reward_val", None):
        assert main(["eval", base, "--config", str(config), *(["--split", split] if split else [])]) == 0
        results[split] = json.loads(capsys.readouterr().out)
    assert results[None].keys() == results["test"].keys()
    assert "test_top1" in results["test"] and "reward_val_top1" not in results["test"]
    assert "reward_val_top1" in results["reward_val"] and "test_top1" not in results["reward_val"]
    assert results["reward_val"]["reward_val_top1"] > 0.9 and results["test"]["test_top1"] > 0.9
    # latency per batch of 1 and of 64 (latency.large_batch): the larger batch costs more per pass
    assert 0 < results["test"]["latency_ms"] < results["test"]["latency_ms_b64"]
    # --set on eval: a config field for this command only
    assert main(["eval", base, "--config", str(config), "--set", "latency.large_batch=4"]) == 0
    assert "latency_ms_b4" in json.loads(capsys.readouterr().out)
