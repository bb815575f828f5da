"""Shared fixtures: a demo config and a base model trained once per test session (~10 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from amc.config import Config, config_from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo_digits.yaml"
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(1)  # 2 cores shared with subprocesses: one thread is fastest


def demo_dict(tmp: Path, **sections) -> dict:
    """The demo config with its checkpoint and run dir under ``tmp``; sections merged in."""
    raw = read_yaml(DEMO_CONFIG)
    raw["model"]["checkpoint"] = str(tmp / "base.pt")
    raw["search"]["run_dir"] = str(tmp / "run")
    raw["train"]["epochs"] = 15
    raw["search"]["episodes"] = 30
    raw["agent"]["warmup_episodes"] = 10
    raw["finetune"]["epochs"] = 1
    raw["latency"] = {"repeats": 3, "warmup": 1}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory) -> Path:
    """A demo_cnn trained on digits (checkpoint path); copied per test by ``demo_config``."""
    from amc.pipeline import train_base

    tmp = tmp_path_factory.mktemp("base")
    cfg = config_from_dict(demo_dict(tmp), source=str(DEMO_CONFIG))
    metrics = train_base(cfg, progress=False)
    assert metrics["test_top1"] > 0.9
    return Path(cfg.model.checkpoint)


@pytest.fixture
def demo_raw(tmp_path, trained_base) -> dict:
    shutil.copy(trained_base, tmp_path / "base.pt")
    return demo_dict(tmp_path)


@pytest.fixture
def demo_cfg(demo_raw, tmp_path) -> Config:
    path = write_config(tmp_path / "demo.yaml", demo_raw)
    return config_from_dict(demo_raw, source=str(path))
