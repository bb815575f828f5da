"""Model zoo: every builder runs a real forward pass; name resolution; errors; MAC/param counts."""

from __future__ import annotations

import copy
import json

import pytest
import thop
import torch
from torch import nn

from amc.errors import UserError
from amc.models import ZOO, build_from_spec, build_model, model_spec, replace_first_conv


def tiny_factory(num_classes: int, in_channels: int, hidden: int = 4) -> nn.Module:
    """Used through the 'module:factory' import path (this test module is importable by pytest)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


def no_size_factory() -> nn.Module:
    """A factory that takes neither num_classes nor in_channels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def not_a_model_factory(num_classes: int) -> str:
    return "nope"


def _forward(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(*shape))


CIFAR_ZOO = ["resnet20", "resnet32", "resnet56", "plain20", "vgg16_cifar", "branchy_cnn"]


def test_zoo_names():
    assert set(ZOO) == {
        "resnet20", "resnet32", "resnet56", "plain20", "vgg16_cifar", "mobilenet_v1", "demo_cnn", "branchy_cnn",
    }


@pytest.mark.parametrize("name", CIFAR_ZOO)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_cifar_zoo_forward(name, in_channels):
    out = _forward(build_model(name, 10, in_channels), (1, in_channels, 32, 32))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels", [3, 1])
def test_mobilenet_cifar_forward(in_channels):
    model = build_model("mobilenet_v1", 100, in_channels, {"cifar": True})
    assert _forward(model, (1, in_channels, 32, 32)).shape == (1, 100)
    assert model.stem[0].stride == (1, 1)


def test_mobilenet_imagenet_forward_and_width():
    model = build_model("mobilenet_v1", 1000, 3, {"width_mult": 0.25})
    assert _forward(model, (1, 3, 224, 224)).shape == (1, 1000)
    assert model.stem[0].stride == (2, 2)
    assert model.stem[0].out_channels == 8 and model.classifier.in_features == 256
    # the stride-2 layout brings 224 down to 7 before the global pool
    assert model.features(model.stem(torch.randn(1, 3, 224, 224))).shape[-1] == 7


def test_vgg16_width():
    model = build_model("vgg16_cifar", 10, 1, {"width_mult": 0.25})
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64] + [128] * 6
    assert model.classifier.in_features == 128
    assert _forward(model, (2, 1, 32, 32)).shape == (2, 10)


def test_demo_cnn_forward():
    assert _forward(build_model("demo_cnn", 10, 1), (2, 1, 8, 8)).shape == (2, 10)


def test_branchy_cnn_has_cat_and_residual():
    model = build_model("branchy_cnn", 4, 3)
    assert _forward(model, (1, 3, 8, 8)).shape == (1, 4)
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.cat in targets
    assert any(getattr(t, "__name__", "") == "add" for t in targets)


def test_resnet_projection_shortcuts_only_where_shape_changes():
    model = build_model("resnet20", 10, 3)
    projections = [n for n, m in model.named_modules() if n.endswith("downsample") and m is not None]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample"]
    conv = model.layer2[0].downsample[0]
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    plain = build_model("plain20", 10, 3)
    assert not any(n.endswith("downsample") for n, _ in plain.named_modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 19


def test_weight_init():
    model = build_model("resnet20", 10, 3)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))
    std = model.layer1[0].conv1.weight.std().item()
    expected = (2.0 / (16 * 9)) ** 0.5  # kaiming normal, fan_out, ReLU
    assert 0.8 * expected < std < 1.2 * expected


@pytest.mark.parametrize("tv_name", ["mobilenet_v2", "resnet18"])
def test_torchvision_in_channels_1(tv_name):
    model = build_model(f"torchvision:{tv_name}", 7, 1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert _forward(model, (1, 1, 32, 32)).shape == (1, 7)


def test_replace_first_conv_keeps_geometry():
    model = build_model("demo_cnn", 10, 3)
    old = model.features[0]
    replace_first_conv(model, 5)
    new = model.features[0]
    assert new.in_channels == 5
    assert (new.out_channels, new.kernel_size, new.stride, new.padding) == (
        old.out_channels, old.kernel_size, old.stride, old.padding)


def test_import_path_factory():
    model = build_model(f"{__name__}:tiny_factory", 6, 2, {"hidden": 3})
    assert model[0].in_channels == 2 and model[0].out_channels == 3
    assert _forward(model, (1, 2, 8, 8)).shape == (1, 6)
    # a factory without num_classes / in_channels parameters is called without them
    assert _forward(build_model(f"{__name__}:no_size_factory", 10, 3), (1, 3, 2, 2)).shape == (1, 5)


def test_spec_roundtrip():
    spec = model_spec("mobilenet_v1", 10, 1, {"width_mult": 0.25, "cifar": True})
    assert json.loads(json.dumps(spec)) == spec
    assert spec == {"name": "mobilenet_v1", "num_classes": 10, "in_channels": 1,
                    "kwargs": {"width_mult": 0.25, "cifar": True}}
    a = build_model("mobilenet_v1", 10, 1, {"width_mult": 0.25, "cifar": True})
    b = build_from_spec(spec)
    b.load_state_dict(a.state_dict())  # same architecture: every key and shape matches
    x = torch.randn(1, 1, 32, 32)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("resnet99", None, "known zoo models: resnet20"),
        ("torchvision:no_such_net", None, "no_such_net"),
        ("no_such_pkg.mod:factory", None, "cannot import module 'no_such_pkg.mod'"),
        ("json:no_such_attr", None, "has no attribute 'no_such_attr'"),
        ("resnet20", {"width": 2}, "model 'resnet20': bad kwargs"),
        ("mobilenet_v1", {"widht_mult": 0.5}, "widht_mult"),
        ("torchvision:resnet18", {"bogus": 1}, "bogus"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights"),
        ("resnet20", {"num_classes": 3}, "num_classes"),
        ("mobilenet_v1", {"width_mult": 0}, "width_mult"),
        ("vgg16_cifar", {"width_mult": "half"}, "vgg16_cifar: width_mult must be a number > 0"),
        (f"{__name__}:tiny_factory", {"hiddn": 2}, "hiddn"),
        (f"{__name__}:not_a_model_factory", None, "not a torch.nn.Module"),
    ],
)
def test_user_errors(name, kwargs, fragment):
    with pytest.raises(UserError) as info:
        build_model(name, 10, 3, kwargs)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_sizes_and_spec():
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet20", 0, 3)
    with pytest.raises(UserError, match="in_channels"):
        build_model("resnet20", 10, "3")
    with pytest.raises(UserError, match="missing"):
        build_from_spec({"name": "resnet20"})
    with pytest.raises(UserError, match="JSON"):
        model_spec("resnet20", 10, 3, {"x": object()})


def _profile(model: nn.Module, size: int) -> tuple[float, float]:
    macs, params = thop.profile(copy.deepcopy(model), inputs=(torch.randn(1, 3, size, size),), verbose=False)
    return float(macs), float(params)


@pytest.mark.parametrize(
    "name, ref_macs, ref_params",
    [("resnet20", 40.8e6, 0.27e6), ("resnet56", 125.8e6, 0.853e6)],
)
def test_resnet_macs_and_params(name, ref_macs, ref_params):
    model = build_model(name, 10, 3)
    macs, params = _profile(model, 32)
    print(f"{name}: {macs:.0f} MACs, {params:.0f} params")
    assert abs(macs / ref_macs - 1) < 0.03
    assert abs(params / ref_params - 1) < 0.03
    assert params == sum(p.numel() for p in model.parameters())
    assert not any("total_ops" in k for k in model.state_dict())  # profiled a copy


def test_branchy_cnn_prunable_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    model = build_model("branchy_cnn", 10, 3)
    x = torch.randn(1, 3, 16, 16)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[model.classifier],
    )
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < before
    assert _forward(model, x.shape).shape == (1, 10)
