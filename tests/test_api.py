"""``amc.compress``: the README example, a user's own metric driving the search, resume, load_pruned."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.cli import main
from amc.errors import UserError
from amc.metrics import accuracy, count_macs
from conftest import ROOT

# a short search: 6 episodes of which 3 warmup, one fine-tuning epoch, a quick latency measurement
QUICK = {"agent": {"warmup_episodes": 3}, "finetune": {"epochs": 1}, "latency": {"repeats": 3, "warmup": 1},
         "progress": False}


class MyNet(nn.Module):
    """A user's model: nothing amc knows about, made for 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32 * 4, 10)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(d.target)


def trained_mynet(images, labels, epochs: int = 8) -> MyNet:
    torch.manual_seed(0)
    model = MyNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for x, y in DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    images, labels = digits()
    base = trained_mynet(images, labels)
    monkeypatch.chdir(tmp_path)
    torch.save(base.state_dict(), "mynet.pt")
    code = readme_example()
    assert "episodes=300" in code
    code = code.replace("episodes=300", "episodes=6, **QUICK")
    namespace = {"MyNet": MyNet, "images": images, "labels": labels, "QUICK": QUICK}
    exec(compile(code, "README.md", "exec"), namespace)

    result, pruned = namespace["result"], namespace["pruned"]
    assert result.run_dir == Path("runs/mynet") and result.checkpoint == Path("runs/mynet/pruned_ft.pt")
    full = count_macs(base, (1, 1, 8, 8))
    assert result.metrics["macs"] == count_macs(result.model, (1, 1, 8, 8)) <= 0.5 * full
    assert result.metrics["original"]["macs"] == full
    assert result.policy["source"] in ("search", "uniform", "global") and len(result.policy["keep"]) == 2
    assert result.metrics["select_top1"] > 0.8 and result.metrics["original"]["select_top1"] > 0.9
    assert set(result.metrics["pruned"]["rules"]) == {"uniform", "global"}
    x = images[:32]
    assert torch.equal(pruned(x), result.model.cpu()(x))  # the plan replayed on a fresh MyNet, same weights
    config = (result.run_dir / "config.yaml").read_text()
    assert "name: python:test_api.MyNet" in config and "python:torch.utils.data.dataset.TensorDataset" in config
    with open(result.run_dir / "episodes.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6


class Regressor(nn.Module):
    """A small regression net on vectors (no convolution, no classes)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def regression_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, :4].sum(1, keepdim=True) - x[:, 4:].prod(1, keepdim=True)))


def neg_mse(model, batches) -> float:
    total = count = 0
    for x, y in batches:
        total += F.mse_loss(model(x), y, reduction="sum").item()
        count += y.numel()
    return -total / count


def test_a_custom_metric_drives_the_search(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    train, reward_val, select = regression_data(400, 0), regression_data(100, 1), regression_data(100, 2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.mse_loss(model(train.tensors[0]), train.tensors[1]).backward()
        optimizer.step()
    calls = []

    def metric(m, batches):
        calls.append(1)
        return neg_mse(m, batches)

    result = amc.compress(model, DataLoader(train, batch_size=50), target=0.5, episodes=6, evaluate=metric,
                          loss=F.mse_loss, reward_val=reward_val, select=select, run_dir=tmp_path / "run",
                          example_input=torch.zeros(1, 8), **QUICK)

    with open(tmp_path / "run" / "episodes.csv", newline="") as f:
        episodes = list(csv.DictReader(f))
    assert all(float(e["error"]) > 1 and float(e["reward"]) == -float(e["error"]) for e in episodes)  # 1 + MSE
    answer = result.policy
    assert answer["selection"]["metric"] == "evaluate" and answer["noise"]["bootstrap_se"] is None
    candidates = answer["selection"]["candidates"]
    winner = max(candidates, key=lambda c: c["score"])
    assert (answer["source"], answer["keep"]) == (winner["source"], winner["keep"])
    assert all(c["score"] == pytest.approx(c["select_metric"] - 1) for c in candidates)
    # export repairs the answer exactly as selection scored it: the same metric on the same split
    assert result.metrics["pruned"]["select_metric"] == pytest.approx(winner["select_metric"])
    assert result.metrics["select_metric"] == pytest.approx(neg_mse(result.model.cpu(), [select.tensors]))
    assert result.metrics["original"]["select_metric"] == pytest.approx(neg_mse(model, [select.tensors]))
    assert "select_top1" not in result.metrics
    assert len(calls) >= 6 + len(candidates)  # every episode and every candidate was scored by it
    assert json.loads((tmp_path / "run" / "inputs.json").read_text())["evaluate"].endswith("metric")


def test_repeating_the_call_resumes_and_other_inputs_are_refused(tmp_path):
    images, labels = digits()
    model, data = trained_mynet(images, labels, epochs=2), TensorDataset(images, labels)
    run = tmp_path / "run"
    amc.compress(model, data, episodes=4, run_dir=run, **{**QUICK, "finetune": {"epochs": 0}})
    first = (run / "episodes.csv").read_text().splitlines()
    result = amc.compress(model, data, episodes=6, run_dir=run, **{**QUICK, "finetune": {"epochs": 0}})
    rows = (run / "episodes.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[:5] == first  # continued, not restarted
    assert result.checkpoint == run / "pruned.pt"  # no fine-tuning asked for

    other = trained_mynet(images, labels, epochs=1)
    with pytest.raises(UserError, match=r"inputs.json: the run was started with other inputs \(weights_sha256"):
        amc.compress(other, data, episodes=6, run_dir=run, **QUICK)
    with pytest.raises(UserError, match=r"inputs.json: the run was started with other inputs \(data: \{'train': "):
        amc.compress(model, TensorDataset(images[:1000], labels[:1000]), episodes=6, run_dir=run, **QUICK)
    with pytest.raises(UserError, match="config differs from the run's in search.target"):
        amc.compress(model, data, target=0.4, episodes=6, run_dir=run, **{**QUICK, "finetune": {"epochs": 0}})


def test_load_pruned_needs_the_original_class(tmp_path, capsys):
    images, labels = digits()
    result = amc.compress(trained_mynet(images, labels, epochs=1), TensorDataset(images, labels), episodes=2,
                          run_dir=tmp_path / "run", **{**QUICK, "finetune": {"epochs": 0}})
    with pytest.raises(UserError, match=r"'python:test_api.MyNet' is a model object given to amc.compress\(\), which a "
                                        r"name cannot rebuild"):
        amc.load_pruned(result.checkpoint)
    with pytest.raises(UserError, match="pruned.pt: was pruned from a test_api.MyNet, not a test_api.Regressor"):
        amc.load_pruned(result.checkpoint, model=Regressor())
    assert main(["export", str(result.run_dir)]) == 2  # the CLI cannot rebuild the objects: one line says so
    assert "amc: error: data.name: python:torch.utils.data.dataset.TensorDataset is data given to amc.compress(), " \
           "which a name cannot load: call amc.compress again (same run_dir)\n" in capsys.readouterr().err
    again = amc.load_pruned(result.checkpoint, model=MyNet())
    assert accuracy(again, [(images, labels)])["top1"] == pytest.approx(
        accuracy(result.model.cpu(), [(images, labels)])["top1"])


@pytest.mark.parametrize("call, message", [
    (lambda m, d: amc.compress("resnet20", d), "amc.compress: model must be a torch.nn.Module, got str"),
    (lambda m, d: amc.compress(m, d, target=1.5),
     "amc.compress: search.target: Input should be less than or equal to 1"),
    (lambda m, d: amc.compress(m, d, serach={"episodes": 3}),
     "amc.compress: serach: unknown key (did you mean search?)"),
    (lambda m, d: amc.compress(m, [1, 2, 3]), "data: train: a sample must be a pair (input tensor, target), got a int"),
    (lambda m, d: amc.compress(m, d, select=d), "amc.compress: select was given without reward_val"),
    (lambda m, d: amc.compress(m, d, data={"name": "digits"}), "data.name is the data given to compress"),
])
def test_mistakes_are_one_line_user_errors(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, labels = digits()
    with pytest.raises(UserError) as info:
        call(MyNet(), TensorDataset(images, labels))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not Path("runs").exists()  # nothing written


def test_the_accuracy_protocol_refuses_a_metric_above_one(tmp_path):
    torch.manual_seed(0)
    data = regression_data(200, 0)
    with pytest.raises(UserError, match=r"evaluate returned 3; the accuracy protocol's reward .* needs a metric <= 1"):
        amc.compress(Regressor(), data, evaluate=lambda m, b: 3.0, episodes=2, run_dir=tmp_path / "run",
                     search={"protocol": "accuracy"}, **QUICK)
