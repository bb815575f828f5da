"""`amc finetune` under torchrun: 2 processes on CPU (gloo), DistributedDataParallel, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from amc.baselines import run_baseline
from amc.config import load_config
from conftest import write_config


def test_finetune_under_torchrun_trains_data_parallel_and_rank_0_writes(demo_raw, tmp_path):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    pruned, before = run_baseline(load_config(config), "uniform", tmp_path / "pruned.pt")
    tuned = tmp_path / "tuned.pt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "amc.cli", "finetune", str(pruned), "--config", str(config), "--epochs", "2", "--out", str(tuned)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "data-parallel on 2 processes (gloo); rank 0 writes" in result.stderr
    (line,) = result.stdout.strip().splitlines()  # one result: the other rank prints nothing
    metrics = json.loads(line)
    assert metrics["checkpoint"] == str(tuned) and metrics["test_top1"] >= before["test_top1"] - 0.02
    assert metrics["test_top1"] > 0.8
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["base.pt", "pruned.pt", "tuned.pt"]
    old, new = torch.load(pruned, weights_only=True), torch.load(tuned, weights_only=True)
    assert any(not torch.equal(old["state_dict"][k], new["state_dict"][k]) for k in old["state_dict"])
    assert new["metrics"]["test_top1"] == metrics["test_top1"]
