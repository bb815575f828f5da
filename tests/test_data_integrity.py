"""Data that silently changes results: the held-out split a base model was trained on, the images
BatchNorm is calibrated on, and the memory layout of augmented batches. Real data, real models."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amc.calibration import recalibrate_batchnorm
from amc.checkpoint import BASE_FORMAT, load_checkpoint, save_checkpoint
from amc.cli import main
from amc.config import config_from_dict
from amc.data import split_signature
from amc.errors import UserError
from amc.export import prune_policy
from amc.factory import Workspace, calibration_batches
from amc.pipeline import train_base
from conftest import demo_dict, write_config

# --------------------------------------------------------------------------- the split in the base checkpoint


def test_the_base_checkpoint_records_its_split(demo_raw) -> None:
    data = torch.load(demo_raw["model"]["checkpoint"], weights_only=True)  # plain data
    assert data["split"] == {"dataset": "digits", "seed": 0, "reward_val_size": 300, "select_size": 300}
    cfg = config_from_dict(demo_raw)
    assert data["split"] == split_signature(cfg.data, cfg.seed)


@pytest.mark.parametrize("setting, value, shown", [
    ("seed", 1, "seed=0; the config asks for dataset=digits, seed=1"),
    ("reward_val_size", 400, "reward_val_size=300, select_size=300; the config asks for dataset=digits, "
                             "reward_val_size=400, select_size=300"),
])
def test_a_base_model_trained_on_another_split_is_refused(demo_raw, setting, value, shown) -> None:
    """seed 1 on a seed-0 model: 238 of the 300 reward-val images would be training images."""
    if setting == "seed":
        demo_raw["seed"] = value
    else:
        demo_raw["data"]["reward_val_size"] = value
    with pytest.raises(UserError) as info:
        Workspace(config_from_dict(demo_raw, source="demo.yaml")).base_model
    message = str(info.value)
    assert message.startswith(f"{demo_raw['model']['checkpoint']}: trained with the split dataset=digits, ")
    fix = "restore the setting (agent.seed changes" if setting == "seed" else "hold out at most 600 images in all"
    assert shown in message and f"retrain (amc train demo.yaml) or {fix}" in message and "\n" not in message


@pytest.mark.parametrize("reward_val_size, select_size", [(450, 150), (600, 0), (200, 300)])
def test_the_held_out_pool_may_be_divided_anew(demo_raw, reward_val_size, select_size) -> None:
    """300 + 300 images held out of the base's training: any division of at most 600 of them
    holds out only images it never saw, so the base loads as it is."""
    held = lambda data: {int(i) for split in (data.reward_val, data.select) for i in split.indices}  # noqa: E731
    base_held = held(Workspace(config_from_dict(demo_raw)).splits)
    demo_raw["data"].update(reward_val_size=reward_val_size, select_size=select_size)
    ws = Workspace(config_from_dict(demo_raw))
    assert held(ws.splits) <= base_held and len(held(ws.splits)) == reward_val_size + select_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(ws.base_model, nn.Module)


def test_the_cli_refuses_another_split_before_writing_anything(demo_raw, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["search", str(config), "--set", "seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amc: error: ") and "seed=0" in err[0] and "seed=1" in err[0]
    assert not Path(demo_raw["search"]["run_dir"]).exists()


def test_agent_seed_does_not_move_the_split(demo_raw) -> None:
    demo_raw["agent"]["seed"] = 5
    ws = Workspace(config_from_dict(demo_raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(ws.base_model, nn.Module)


def test_a_checkpoint_without_a_split_record_loads_with_a_warning(demo_raw) -> None:
    path = demo_raw["model"]["checkpoint"]
    data = load_checkpoint(path, BASE_FORMAT)
    save_checkpoint(path, BASE_FORMAT, {k: v for k, v in data.items() if k not in ("format", "version", "split")})
    with pytest.warns(UserWarning, match=r"base\.pt: no record of the split it was trained on") as record:
        Workspace(config_from_dict(demo_raw)).base_model
    assert "\n" not in str(record[0].message)


# --------------------------------------------------------------------------- calibration images


def write_sorted_folder(root: Path, classes: int = 10, per_class: int = 6) -> None:
    """An ImageFolder whose class k is plain images of grey level 25k: an image shows its class."""
    from PIL import Image

    for split, n in (("train", per_class), ("val", 1)):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((10, 10, 3), 25 * k, dtype=np.uint8)).save(root / split / f"c{k}" / f"{i}.png")


def classes_in(batches: list[torch.Tensor]) -> int:
    grey = torch.cat([x[:, 0, 0, 0] for x in batches]) * 0.229 + 0.485  # undo the ImageNet normalisation
    return len(set(torch.round(grey * 255 / 25).int().tolist()))


def test_scorer_and_export_calibrate_on_many_classes_of_a_class_sorted_folder(tmp_path) -> None:
    """The first 16 images of the class-sorted training split hold 4 of the 10 classes; 16
    shuffled ones hold 9."""
    write_sorted_folder(tmp_path / "data")
    raw = demo_dict(tmp_path)
    raw["data"] = {"name": "imagefolder", "root": str(tmp_path / "data"), "input_size": 8, "reward_val_size": 10,
                   "batch_size": 8}
    raw["search"]["calib_batches"] = 2
    cfg = config_from_dict(raw)
    train_base(cfg, epochs=1, progress=False)
    ws = Workspace(cfg)

    calib = calibration_batches(ws)
    assert [len(x) for x in calib] == [8, 8] and classes_in(calib) >= 6
    assert all(torch.equal(a, b) for a, b in zip(calibration_batches(Workspace(cfg)), calib))  # deterministic
    scorer = ws.scorer(ws.base_model)
    repair = scorer.repair
    assert len(repair.calib_batches) == 2 and all(torch.equal(a, b) for a, b in zip(repair.calib_batches, calib))

    # export: the pruned model's BN statistics are those of the same images
    keep = ws.space(ws.base_model).sizes
    exported, _ = prune_policy(ws, list(keep))
    expected = copy.deepcopy(ws.base_model)
    recalibrate_batchnorm(expected, calib, repair.dtype)
    for a, b in zip(exported.modules(), expected.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)

    # an image folder is its root: the same images elsewhere are another dataset to the record
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(UserError, match=r"the config asks for dataset=imagefolder, root=.*moved"):
        Workspace(cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(tmp_path / "moved")})})).base_model


# --------------------------------------------------------------------------- a model that flattens with .view


class ViewCNN(nn.Module):
    """Flattens with ``.view``, which needs standard (NCHW-contiguous) activations."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def view_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return ViewCNN(num_classes, in_channels)


def test_amc_train_feeds_augmented_batches_a_view_model_can_flatten(tmp_path) -> None:
    raw = demo_dict(tmp_path)
    raw["model"]["name"] = f"{__name__}:view_cnn"
    cfg = config_from_dict(raw)
    assert cfg.data.augment
    metrics = train_base(cfg, epochs=2, progress=False)
    assert metrics["test_top1"] > 0.3  # it learnt something (chance is 0.1)
