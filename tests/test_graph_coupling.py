"""Dependency groups beyond plain convs: unwrapped parameters (ConvNeXt's layer_scale), channel
shuffles (ShuffleNet), why a group is left whole, and torch-pruning's failures as one-line errors.
Each is checked on the physically pruned model (forward pass, thop, parameter count) and, where a
user sees it, through ``amc info`` or the environment's target check."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from amc.cli import main
from amc.cost import CostModel
from amc.errors import UserError
from amc.graph import GROUPED, REGROUPED, RESIDUAL, SE, find_units
from amc.metrics import count_macs, count_params, torch_threads
from amc.models import build_model, replace_first_conv
from amc.pruning import apply_channel_plan, channel_plan, prune_channels
from conftest import demo_dict, write_config
from test_graph_cost import grouped_conv_net
from test_graph_cost import make_env


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def tiny_convnext(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ConvNeXt at widths 8, 16, 32, one block per stage (~25k params): depthwise
    conv, channels-last LayerNorm, two Linears and a ``layer_scale`` nn.Parameter per residual block."""
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                     num_classes=num_classes)
    with torch.no_grad():  # distinct per-channel scales, so a wrongly sliced layer_scale shows
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand_like(p) + 0.5)
    return replace_first_conv(model, in_channels).eval()


class NumpyInForward(nn.Module):
    """Runs under no_grad (inference) but not under autograd, which torch-pruning traces with."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        scale = float(np.abs(x.numpy()).max()) + 1.0
        return self.fc(x.mean((2, 3)) / scale)


def random_keeps(graph, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(1, u.channels + 1)) for u in graph.units] for _ in range(n)]


def assert_exact(model: nn.Module, graph, keep: list[int], shape) -> nn.Module:
    """Prune physically, run it, and hold thop and the parameter count to the analytic cost model."""
    cost = CostModel(graph, model)
    assert cost.total_macs == count_macs(model, shape) and cost.total_params == count_params(model)
    pruned = prune_channels(model, graph, keep)
    with torch.no_grad():
        out = pruned(torch.randn(2, *shape[1:]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert count_macs(pruned, shape) == cost.macs(keep)
    assert count_params(pruned) == cost.params(keep)
    return pruned


def test_convnext_layer_scale_is_pruned_with_its_residual_group():
    shape = (1, 3, 32, 32)
    model = tiny_convnext()
    graph = find_units(model, shape, prune_residual=True)
    scales = {m.module: (unit, m) for unit in graph.units for m in unit.members if m.param_dim is not None}
    assert set(scales) == {"features.1.0.layer_scale", "features.3.0.layer_scale", "features.5.0.layer_scale"}
    assert all(unit.coupling == RESIDUAL for unit, _ in scales.values()) and not graph.skipped
    original = dict(model.named_parameters())
    for keep in random_keeps(graph, 6, seed=0):
        pruned = assert_exact(model, graph, keep, shape)
        params = dict(pruned.named_parameters())
        for name, (unit, _) in scales.items():  # the kept entries, at the kept channels
            kept = unit.kept_channels(keep[unit.index])
            assert torch.equal(params[name].detach(), original[name].detach()[kept])
        # a checkpoint's path: the stored plan replayed on a fresh model takes the pruned weights
        fresh = apply_channel_plan(tiny_convnext(), graph, channel_plan(graph, keep))
        fresh.load_state_dict(pruned.state_dict())
        x = torch.randn(1, *shape[1:])
        with torch.no_grad():
            assert torch.equal(fresh(x), pruned(x))


def test_convnext_tiny_torchvision_prunes_with_residual_groups():
    """The 28M-param torchvision net at 32x32 (a few seconds): every layer_scale goes with its stage."""
    shape = (1, 3, 32, 32)
    model = build_model("torchvision:convnext_tiny", 10, 3).eval()
    graph = find_units(model, shape, prune_residual=True)
    scales = [m for u in graph.units for m in u.members if m.param_dim is not None]
    assert len(scales) == 18 and not graph.skipped  # 3 + 3 + 9 + 3 blocks
    assert_exact(model, graph, [max(1, u.channels // 2) for u in graph.units], shape)


SHUFFLE_BLOCKS = [f"stage{s}.{b}" for s, n in ((2, 4), (3, 8), (4, 4)) for b in range(n)]
# the layers whose outputs a ShuffleNet v2 block concatenates and shuffles: both branches of a
# stride-2 block, the second branch of the others (the first passes half of the input through)
SHUFFLED = [f"{blk}.{branch}" for blk in SHUFFLE_BLOCKS
            for branch in (("branch1.2", "branch2.5") if blk.endswith(".0") else ("branch2.5",))]


def test_shufflenet_leaves_shuffled_groups_whole_and_prunes_the_branches():
    shape = (1, 3, 32, 32)
    torch.manual_seed(0)
    model = build_model("torchvision:shufflenet_v2_x0_5", 10, 3).eval()
    graph = find_units(model, shape)
    # every group that reaches a channel shuffle is left whole, in forward order ...
    assert graph.skipped_by_reason() == {REGROUPED: SHUFFLED}
    # ... the rest are units: the stem and each block's inner 1x1 -> depthwise -> 1x1 channels
    assert [u.name for u in graph.units] == ["conv1.0", *(f"{blk}.branch2.0" for blk in SHUFFLE_BLOCKS), "conv5.0"]
    for keep in random_keeps(graph, 4, seed=1):
        assert_exact(model, graph, keep, shape)


def test_pruning_a_shufflenet_branch_removes_exactly_the_chosen_channels():
    """Channels a block's inner group computes as exact zeros: pruning them leaves every output as it was."""
    shape = (1, 3, 32, 32)
    torch.manual_seed(0)
    model = build_model("torchvision:shufflenet_v2_x0_5", 10, 3).eval()
    branch = model.stage3[2].branch2
    dead = [1, 5, 6, 17]
    with torch.no_grad():
        for m in (branch[0], branch[1], branch[3], branch[4]):  # conv, BN, depthwise conv, BN
            m.weight[dead] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[dead] = 0
        branch[5].weight[:, dead] = 0
    graph = find_units(model, shape)
    unit = next(u for u in graph.units if u.name == "stage3.2.branch2.0")
    keep = [u.channels for u in graph.units]
    keep[unit.index] = unit.channels - len(dead)
    assert sorted(unit.removed_channels(keep[unit.index]).tolist()) == dead
    pruned = assert_exact(model, graph, keep, shape)
    assert pruned.stage3[2].branch2[0].out_channels == unit.channels - len(dead)
    x = torch.randn(4, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)


def test_skipped_groups_carry_their_reasons():
    shape = (1, 3, 32, 32)
    model = build_model("torchvision:mobilenet_v3_small", 10, 3).eval()
    plain = find_units(model, shape)
    by_reason = plain.skipped_by_reason()
    assert by_reason == {  # in forward order; a group is named by its first producer
        SE: ["features.0.0", *(f"features.{i}.block.0.0" for i in range(4, 12))],
        RESIDUAL: ["features.2.block.2.0", "features.4.block.3.0", "features.7.block.3.0", "features.9.block.3.0"],
    }
    # the stem feeds block 1's depthwise conv, whose output its squeeze-excitation gates
    assert plain.skipped[0].producers == ("features.0.0", "features.1.block.1.fc2")
    joint = find_units(model, shape, prune_residual=True)
    assert not joint.skipped
    assert {u.name: u.coupling for u in joint.units if u.coupling} == {
        s.root: s.reason for s in plain.skipped}
    assert len(joint.units) == len(plain.units) + len(plain.skipped)
    assert_exact(model, joint, random_keeps(joint, 1, seed=2)[0], shape)


def test_find_units_under_no_grad():
    model = build_model("resnet20", 10, 3).eval()
    with torch.no_grad():
        graph = find_units(model, (1, 3, 32, 32))
    assert len(graph.units) == 9


def info(tmp_path, capsys, model: str, **search) -> tuple[int, str, str]:
    raw = demo_dict(tmp_path)
    raw["model"]["name"] = model
    raw["search"].update(search)
    code = main(["info", str(write_config(tmp_path / "info.yaml", raw))])
    out, err = capsys.readouterr()
    return code, out, err


def test_amc_info_prints_each_reason_in_forward_order(tmp_path, capsys):
    code, out, err = info(tmp_path, capsys, "torchvision:mobilenet_v3_small")
    assert code == 0, err
    left = [line for line in out.splitlines() if line.startswith("left whole")]
    fix = "set search.prune_residual: true to prune each with one shared ratio"
    assert left == [
        f"left whole (SE-coupled; {fix}): features.0.0, " + ", ".join(f"features.{i}.block.0.0" for i in range(4, 12)),
        f"left whole (residual-coupled; {fix}): features.2.block.2.0, features.4.block.3.0, features.7.block.3.0, "
        "features.9.block.3.0",
    ]
    code, out, err = info(tmp_path, capsys, "torchvision:mobilenet_v3_small", prune_residual=True)
    assert code == 0 and "left whole" not in out and "SE-coupled" in out  # the units' coupling column
    code, out, err = info(tmp_path, capsys, "torchvision:shufflenet_v2_x0_5", prune_residual=True)
    assert code == 0, err
    left = [line for line in out.splitlines() if line.startswith("left whole")]
    assert left == [f"left whole ({REGROUPED}): {', '.join(SHUFFLED)}"]  # no prune_residual hint


@pytest.mark.parametrize("model, message", [
    ("test_graph_coupling:tiny_convnext", "model: ConvNeXt fails on a (1, 1, 8, 8) input (RuntimeError: "),
    ("test_graph_coupling:NumpyInForward",
     "model.name: torch-pruning cannot build the dependency graph of NumpyInForward (RuntimeError: "),
])
def test_model_and_torch_pruning_failures_are_one_line_errors(tmp_path, capsys, model, message):
    code, out, err = info(tmp_path, capsys, model)
    assert code == 2 and out == ""
    assert err.startswith("amc: error: ") and f"info.yaml: {message}" in err and err.count("\n") == 1, err


def test_unreachable_target_names_the_groups_left_whole():
    shape = (1, 3, 32, 32)
    model = build_model("resnet20", 10, 3).eval()
    with pytest.raises(UserError) as err:
        make_env(model, shape, target=0.05)
    message = str(err.value)
    print(message)
    # the layers whose output channels the three residual groups hold: the stem, every block's
    # second conv and the two projection shortcuts
    graph = find_units(model, shape)
    held = ["conv1", *(f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)),
            "layer2.0.downsample.0", "layer3.0.downsample.0"]
    share = sum(graph.layers[n].macs for n in held) / sum(layer.macs for layer in graph.layers.values())
    assert f"groups left whole (3 residual-coupled) keep the output channels of layers holding {share:.0%} " \
           "of the MACs; set search.prune_residual: true to prune the coupled ones" in message
    with pytest.raises(UserError) as err:  # nothing left whole: lbound alone
        make_env(model, shape, target=0.01, prune_residual=True)
    assert re.search(r"smallest reachable target is [0-9.]+$", str(err.value)), str(err.value)


def test_unreachable_target_with_grouped_convs_does_not_suggest_prune_residual():
    model = grouped_conv_net()
    with pytest.warns(UserWarning, match="grouped convs 3"), pytest.raises(UserError) as err:
        make_env(copy.deepcopy(model), (1, 3, 8, 8), target=0.1)
    message = str(err.value)
    assert f"groups left whole (2 {GROUPED}) keep the output channels of layers holding" in message
    assert "prune_residual" not in message
