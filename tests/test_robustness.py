"""Robustness: bad input through the real CLI, unsafe checkpoints, impossible budgets, NaNs.

Every user mistake must end with one line naming the file, the field and the problem, exit
status 2, and nothing written or changed on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
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


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text", "pickled object", "foreign", "newer", "wrong kind"])
def test_damaged_checkpoints_are_refused(demo_raw, tmp_path, damage, cli):
    import argparse

    config = write_config(tmp_path / "demo.yaml", demo_raw)
    base = Path(demo_raw["model"]["checkpoint"])
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "text":
        path.write_text("seed: 0\n")
    elif damage == "pickled object":
        torch.save({"format": "amc-base", "version": 1, "obj": argparse.Namespace(run="code")}, path)
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif damage == "newer":
        data = load_checkpoint(base, "amc-base")
        torch.save({**data, "version": 99}, path)
    else:
        save_checkpoint(path, "amc-agent", {"agent": {}})
    expected = {"truncated": "not a readable checkpoint (the file is truncated or corrupted)",
                "garbage": "not a readable checkpoint (not a file written by torch.save)",
                "text": "not a readable checkpoint (not a file written by torch.save)",
                "pickled object": "not a readable checkpoint (it holds a pickled argparse.Namespace object; "
                                  "amc loads only plain-data checkpoints)",
                "foreign": "not an amc checkpoint", "newer": "format version 99 is newer",
                "wrong kind": "is an amc-agent checkpoint"}[damage]
    before = snapshot(tmp_path)
    message = assert_user_error(cli(tmp_path, "eval", str(path), "--config", str(config)), str(path), expected)
    assert "weights_only" not in message and len(message) < 200  # not torch's paragraph
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


def uniform_checkpoint(cli, tmp_path: Path, config: Path) -> Path:
    out = tmp_path / "uniform.pt"
    assert cli(tmp_path, "baseline", str(config), "--method", "uniform", "--out", str(out)).returncode == 0
    return out


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_checkpoint_for_another_config_is_refused(demo_raw, tmp_path, cli, command):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    pruned = uniform_checkpoint(cli, tmp_path, config)
    base = Path(demo_raw["model"]["checkpoint"])
    other = write_config(tmp_path / "other.yaml", {**demo_raw, "model": {**demo_raw["model"], "name": "branchy_cnn"}})
    before = snapshot(tmp_path)
    # a pruned checkpoint with 16x16 inputs (the shape the checkpoint stores), a base one with another model
    assert_user_error(cli(tmp_path, command, str(pruned), "--config", str(config), "--set", "data.input_size=16"),
                      f"{pruned}: holds demo_cnn for 10 classes on 1x8x8 inputs, but {config} describes "
                      f"demo_cnn for 10 classes on 1x16x16 inputs")
    if command == "eval":
        assert_user_error(cli(tmp_path, "eval", str(base), "--config", str(other)),
                          f"{base}: holds demo_cnn for 10 classes, but {other} describes branchy_cnn for 10 classes")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, expected", [
    (["info", "{config}", "--set", "search.target=abc"], "--set search.target=abc: search.target: "),
    (["info", "{config}", "--set", "serach.target=0.3"], "--set serach.target=0.3: serach: unknown key (did you mean search?)"),
    (["info", "{config}", "--set", "search.targt=0.3"], "search.targt: unknown key (did you mean search.target?)"),
    (["info", "{config}", "--set", "search.target=[0.3"], "--set search.target=[0.3: the value is not valid YAML"),
])
def test_set_mistakes_blame_the_set_flag(demo_raw, tmp_path, cli, args, expected):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    message = assert_user_error(cli(tmp_path, *[a.format(config=config) for a in args]), expected)
    assert str(config) not in message


def test_unknown_key_in_the_file_suggests_the_close_one(demo_raw, tmp_path, cli):
    demo_raw["serach"] = demo_raw.pop("search")
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert_user_error(cli(tmp_path, "info", str(config)), f"{config}: serach: unknown key (did you mean search?)")


@pytest.mark.parametrize("command", ["export", "resume"])
@pytest.mark.parametrize("kind", ["missing", "file", "not a run"])
def test_run_directory_messages_name_the_command(tmp_path, cli, command, kind):
    path = tmp_path / "somewhere"
    if kind == "file":
        path.write_text("x")
    elif kind == "not a run":
        path.mkdir()
        (path / "episodes.csv").write_text("")
    args = ["export", str(path)] if command == "export" else ["search", "--resume", str(path)]
    needs = "`amc export` needs" if command == "export" else "`amc search --resume` needs"
    problem = {"missing": "no such directory", "file": "not a directory",
               "not a run": "not a run directory (no config.yaml)"}[kind]
    message = assert_user_error(cli(tmp_path, *args), f"{path}: {problem}; {needs} a run directory")
    assert "resume" not in message or command == "resume"


@pytest.mark.parametrize("command", ["search", "run"])
def test_ctrl_c_says_how_to_resume(demo_raw, tmp_path, cli, command):
    """A real KeyboardInterrupt in the main thread once two episodes are written, as Ctrl-C raises it."""
    import _thread
    import signal
    import threading
    import time

    demo_raw["search"]["episodes"] = 10_000
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    run_dir = Path(demo_raw["search"]["run_dir"])
    csv, finished = run_dir / "episodes.csv", threading.Event()

    def press_ctrl_c() -> None:
        while not finished.is_set():
            if csv.is_file() and len(csv.read_text().splitlines()) >= 3:  # header + 2 rows
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    # Python's own Ctrl-C handler, also where the runner inherited SIGINT ignored (a shell's
    # background job), to which interrupt_main() does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=press_ctrl_c)
    watcher.start()
    try:
        result = cli(tmp_path, "--quiet", command, str(config))
    finally:
        finished.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"amc: interrupted; continue with `amc search --resume {run_dir}`"]
    done = len(csv.read_text().splitlines()) - 1
    resume = shlex.split(lines[0].split("`")[1])[1:]
    resumed = cli(tmp_path, "--quiet", *resume, "--episodes", str(done + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert len(csv.read_text().splitlines()) - 1 == done + 1


def test_missing_base_model_hint_keeps_the_overrides(demo_raw, tmp_path, cli):
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    sets = ["--set", "model.checkpoint=elsewhere/base.pt", "--set", "train.epochs=1"]
    message = assert_user_error(cli(tmp_path, "search", str(config), *sets), "trained base model not found")
    hint = message.split("`")[1]
    assert hint == f"amc train {config} {' '.join(sets)}"
    assert cli(tmp_path, "--quiet", *shlex.split(hint)[1:]).returncode == 0  # the hint, run as given
    assert (tmp_path / "elsewhere" / "base.pt").is_file()


def test_export_set_may_change_only_what_does_not_change_the_result(demo_raw, tmp_path, cli):
    demo_raw["search"]["episodes"] = 2
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert cli(tmp_path, "--quiet", "search", str(config)).returncode == 0
    run_dir = demo_raw["search"]["run_dir"]
    before = snapshot(tmp_path)
    assert_user_error(cli(tmp_path, "export", run_dir, "--set", "search.target=0.3"),
                      "--set search.target=0.3: export uses the run's config; --set may change only device, ")
    assert snapshot(tmp_path) == before
    ok = cli(tmp_path, "export", run_dir, "--set", "latency.large_batch=8", "--set", "data.eval_batch_size=100")
    assert ok.returncode == 0, ok.stderr
    assert "latency_ms_b8" in json.loads(ok.stdout)
