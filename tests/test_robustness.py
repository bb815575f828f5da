"""Robustness: bad input through the real CLI, unsafe checkpoints, impossible budgets, NaNs.

Every user mistake must end with one line naming the file, the field and the problem, exit
status 2, and nothing written or changed on disk.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amc.checkpoint import load_checkpoint, save_checkpoint
from amc.cli import main
from amc.errors import UserError
from amc.factory import Workspace
from conftest import write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """The real CLI entry point, in process (a subprocess adds seconds of imports per call)."""
    monkeypatch.chdir(tmp_path)

    def run(_cwd: Path, *args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_the_process_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "amc.cli", "info", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert_user_error(result, "nope.yaml: config file not found")


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amc: error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD_CONFIGS = {
    "unknown key": (lambda r: r["search"].update(budget=0.5), ["search.budget", "unknown key"]),
    "wrong type": (lambda r: r["search"].update(lbound="low"), ["search.lbound", "number"]),
    "missing section": (lambda r: r.pop("model"), ["model", "missing"]),
    "target out of range": (lambda r: r["search"].update(target=1.5), ["search.target"]),
    "lbound > rbound": (lambda r: r["search"].update(lbound=0.8, rbound=0.4), ["search", "lbound"]),
    "unknown model": (lambda r: r["model"].update(name="resnet7"), ["model", "unknown model 'resnet7'"]),
    "failing import path": (lambda r: r["model"].update(name="not_a_pkg.models:build"), ["not_a_pkg"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_and_nothing_is_written(demo_raw, tmp_path, case, cli):
    mutate, needles = BAD_CONFIGS[case]
    mutate(demo_raw)
    config = write_config(tmp_path / "bad.yaml", demo_raw)
    before = snapshot(tmp_path)
    message = assert_user_error(cli(tmp_path, "search", str(config)), *needles)
    if case != "missing section":
        assert "bad.yaml" in message
    assert snapshot(tmp_path) == before


def test_empty_dataset_root(demo_raw, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    demo_raw["data"].update(name="fashion_mnist", root=str(tmp_path / "empty"), input_size=32)
    demo_raw["model"]["name"] = "resnet20"
    config = write_config(tmp_path / "bad.yaml", demo_raw)
    before = snapshot(tmp_path)
    assert_user_error(cli(tmp_path, "train", str(config)), "data.root", str(tmp_path / "empty"))
    assert snapshot(tmp_path) == before


def test_impossible_budget_names_the_smallest_reachable_target(demo_raw, tmp_path, cli):
    demo_raw["search"]["target"] = 0.01
    config = write_config(tmp_path / "bad.yaml", demo_raw)
    before = snapshot(tmp_path)
    message = assert_user_error(cli(tmp_path, "search", str(config)), "search.target", "smallest reachable target")
    reachable = float(message.rsplit(" ", 1)[-1])
    assert 0.01 < reachable < 0.5
    assert snapshot(tmp_path) == before
    demo_raw["search"].update(target=reachable, episodes=2)
    ok = cli(tmp_path, "search", str(write_config(tmp_path / "ok.yaml", demo_raw)))
    assert ok.returncode == 0, ok.stderr


def test_unwritable_run_directory_fails_at_start(demo_raw, tmp_path, cli):
    (tmp_path / "a_file").write_text("not a directory")
    demo_raw["search"]["run_dir"] = str(tmp_path / "a_file" / "run")
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert_user_error(cli(tmp_path, "search", str(config)), "run directory is not writable")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "newer", "wrong kind"])
def test_damaged_checkpoints_are_refused(demo_raw, tmp_path, damage, cli):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    base = Path(demo_raw["model"]["checkpoint"])
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif damage == "newer":
        data = load_checkpoint(base, "amc-base")
        torch.save({**data, "version": 99}, path)
    else:
        save_checkpoint(path, "amc-agent", {"agent": {}})
    expected = {"truncated": "not a readable checkpoint", "garbage": "not a readable checkpoint",
                "foreign": "not an amc checkpoint", "newer": "format version 99 is newer",
                "wrong kind": "is an amc-agent checkpoint"}[damage]
    before = snapshot(tmp_path)
    assert_user_error(cli(tmp_path, "eval", str(path), "--config", str(config)), str(path), expected)
    assert snapshot(tmp_path) == before


def test_pickled_objects_are_not_loaded(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"format": "amc-pruned", "version": 1, "obj": argparse.Namespace(run="code")}, path)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path, "amc-pruned")


def test_nan_in_evaluation_gets_the_worst_reward(demo_cfg):
    env = Workspace(demo_cfg).env()
    with torch.no_grad():
        next(env.model.parameters()).fill_(float("nan"))
    env.reset()
    with pytest.warns(UserWarning, match="non-finite reward"):
        done = False
        while not done:
            _, reward, done, _, info = env.step(np.array([0.5], dtype=np.float32))
    assert reward == env.worst_reward() and info["nonfinite"]


def test_full_disk_fails_at_start(demo_raw, tmp_path, cli, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert_user_error(cli(tmp_path, "search", str(config)), "only 1 MiB free")
    assert not (Path(demo_raw["search"]["run_dir"]) / "episodes.csv").exists()
