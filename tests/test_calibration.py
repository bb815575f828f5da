"""Least-squares reconstruction: never solved under-determined, sampled patches as unfold has them,
and the original's outputs kept between policies without changing any fit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amc.calibration import Reconstructor, _patches, reconstruct
from amc.config import RECONSTRUCT_RIDGE
from amc.graph import find_units
from amc.spaces import ChannelSpace

SHAPE = (1, 1, 8, 8)


def conv_flatten_linear() -> nn.Module:
    """conv 3x3/8 -> BN -> ReLU -> flatten -> Linear(512, 10): the Linear reads every position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    nn.init.normal_(model[4].weight, 0.0, 0.05)
    return model.eval()


def pruned_copy(model: nn.Module, keep: int) -> tuple[nn.Module, dict]:
    space = ChannelSpace(model, find_units(model, SHAPE))
    assert space.sizes == [8]
    pruned = space.apply(copy.deepcopy(model), [keep])
    layers = space.refit_layers([keep])
    assert set(layers) == {"4"} and pruned[4].in_features == keep * 64
    return pruned, layers


def output_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).mean())


def test_least_squares_leaves_an_underdetermined_linear_layer_alone():
    model = conv_flatten_linear()
    generator = torch.Generator().manual_seed(1)
    few, many, held_out = (torch.randn(n, *SHAPE[1:], generator=generator) for n in (64, 1024, 256))
    pruned, layers = pruned_copy(model, 6)  # the Linear keeps 384 inputs: 64 images give 64 rows
    untouched = output_error(pruned, model, held_out)

    with pytest.warns(UserWarning, match="64 reconstruction images are too few to refit 4"):
        reconstruct(model, refit_few := copy.deepcopy(pruned), layers, few)
    assert torch.equal(refit_few[4].weight, pruned[4].weight)

    with torch.no_grad():  # what fitting it anyway would do: interpolate the 64 images, worse elsewhere
        forced = copy.deepcopy(pruned)
        solution = torch.linalg.lstsq(pruned[:4](few).double(), (model(few) - model[4].bias).double()).solution
        forced[4].weight.copy_(solution.T.float())
    assert output_error(forced, model, held_out) > untouched

    reconstruct(model, refit_many := copy.deepcopy(pruned), layers, many)  # 1024 rows >= 1.5 x 384: refit
    assert not torch.equal(refit_many[4].weight, pruned[4].weight)
    assert output_error(refit_many, model, held_out) < 0.5 * untouched


def test_the_ridge_pulls_a_barely_determined_fit_toward_the_pruned_weights():
    """600 images for the Linear's 384 inputs: plain least squares fits those images best and the
    rest worse; the default ridge trades a little of the fit for less error on other images, with
    smaller weights; a huge ridge keeps the pruned weights."""
    model = conv_flatten_linear()
    generator = torch.Generator().manual_seed(1)
    fit, held_out = (torch.randn(n, *SHAPE[1:], generator=generator) for n in (600, 512))
    pruned, layers = pruned_copy(model, 6)
    refit = {ridge: copy.deepcopy(pruned) for ridge in (0.0, RECONSTRUCT_RIDGE, 1e3)}
    for ridge, copied in refit.items():
        reconstruct(model, copied, layers, fit, ridge=ridge)
    plain, ridged = refit[0.0], refit[RECONSTRUCT_RIDGE]
    assert output_error(plain, model, fit) < output_error(ridged, model, fit)
    assert output_error(ridged, model, held_out) < 0.8 * output_error(plain, model, held_out)
    assert ridged[4].weight.norm() < plain[4].weight.norm()
    assert torch.allclose(refit[1e3][4].weight, pruned[4].weight, atol=1e-3)


def test_sampled_patches_are_unfolds_columns():
    conv = nn.Conv2d(3, 4, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2))
    x = torch.randn(2, 3, 9, 11)
    columns = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C*kh*kw, L)
    positions = torch.stack([torch.randperm(columns.shape[2])[:7] for _ in range(2)])
    expected = torch.cat([columns[i][:, positions[i]].T for i in range(2)])
    assert torch.equal(_patches(conv, x, positions), expected)
    with torch.no_grad():  # and the conv's output at those positions is patch @ weight + bias
        y = conv(x).flatten(2)
        rows = torch.cat([y[i][:, positions[i]].T for i in range(2)])
        assert torch.allclose(expected @ conv.weight.flatten(1).T + conv.bias, rows, atol=1e-5)


def test_kept_targets_give_the_same_fits_as_a_fresh_reconstructor():
    model = conv_flatten_linear()
    images = torch.randn(1024, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    shared = Reconstructor(model, images)
    for keep in (6, 4):
        pruned, layers = pruned_copy(model, keep)
        reused, fresh = copy.deepcopy(pruned), copy.deepcopy(pruned)
        shared(reused, layers)
        Reconstructor(model, images)(fresh, layers)
        assert torch.equal(reused[4].weight, fresh[4].weight)
    assert set(shared.targets) == {"4"}
