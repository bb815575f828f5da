"""The knobs that trade accuracy of a measurement for time: fewer reward images, fewer fine-tuning steps."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amc.config import config_from_dict
from amc.factory import Workspace
from amc.train import fit


def test_reward_images_scores_on_a_prefix_of_reward_val_and_keeps_the_split(demo_raw):
    full = Workspace(config_from_dict(demo_raw))
    demo_raw["data"]["reward_images"] = 50
    ws = Workspace(config_from_dict(demo_raw))
    assert len(ws.splits.reward_val) == 50
    first = [int(y) for _, y in (ws.splits.reward_val[i] for i in range(50))]
    assert first == [int(full.splits.reward_val[i][1]) for i in range(50)]
    assert len(ws.splits.select) == len(full.splits.select) and len(ws.splits.train) == len(full.splits.train)
    scorer = ws.scorer(ws.base_model)  # the base model loads: its recorded split still matches
    assert len(scorer.fast.labels) == 50


def test_max_steps_stops_training_and_ends_the_schedule_there():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(80, 4), torch.randint(0, 3, (80,)))
    loader = DataLoader(data, batch_size=8)  # 10 batches per epoch
    model = nn.Linear(4, 3)
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(m.training))
    before = model.weight.detach().clone()
    fit(model, loader, epochs=3, lr=0.1, progress=False, max_steps=13)
    assert forwards.count(True) == 13  # one epoch and three batches of the second
    assert not torch.equal(model.weight, before)
    forwards.clear()
    fit(model, loader, epochs=1, lr=0.1, progress=False, max_steps=100)  # more than the epochs hold
    assert forwards.count(True) == 10
