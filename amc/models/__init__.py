"""Model zoo and the one entry point that turns a model name into an ``nn.Module``.

A model name is one of

* a zoo name: ``resnet20``, ``resnet32``, ``resnet56``, ``plain20``, ``vgg16_cifar``,
  ``mobilenet_v1``, ``demo_cnn``, ``branchy_cnn`` (see ``ZOO``);
* ``torchvision:<name>``: any torchvision classification model, always built with
  ``weights=None`` (never downloads); for ``in_channels != 3`` its first ``Conv2d`` is replaced;
* ``timm:<name>``: any timm model (the optional ``timm`` extra), built without pretrained weights;
* ``package.module:factory``: an importable callable returning an ``nn.Module``; it gets
  ``num_classes=`` / ``in_channels=`` when its signature accepts them, plus ``kwargs``.

Pretrained weights (``model.weights``) are loaded by ``amc.models.pretrained``.

Every user mistake (unknown name, failing import, bad kwargs) is raised as a one-line ``UserError``.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from torch import nn

from amc.config import OBJECT_PREFIX
from amc.errors import UserError
from amc.imports import import_object
from amc.models.common import check_sizes, init_weights
from amc.models.mobilenet import mobilenet_v1
from amc.models.resnet_cifar import plain20, resnet20, resnet32, resnet56
from amc.models.small import branchy_cnn, demo_cnn
from amc.models.vgg import vgg16_cifar

__all__ = ["ZOO", "build_model", "model_spec", "build_from_spec", "replace_first_conv"]

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "plain20": plain20,
    "vgg16_cifar": vgg16_cifar,
    "mobilenet_v1": mobilenet_v1,
    "demo_cnn": demo_cnn,
    "branchy_cnn": branchy_cnn,
}

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def build_model(name: str, num_classes: int, in_channels: int, kwargs: dict | None = None) -> nn.Module:
    """Build the model ``name`` (zoo name, ``torchvision:<name>`` or ``package.module:factory``)."""
    kwargs = _check_kwargs(name, kwargs)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith(OBJECT_PREFIX):
        raise UserError(f"{name!r} is a model object given to amc.compress(), which a name cannot rebuild: call "
                        "amc.compress again (same run_dir), or amc.load_pruned(path, model=YourModel())")
    check_sizes(name, num_classes, in_channels)
    if name in ZOO:
        return _call(name, ZOO[name], {"num_classes": num_classes, "in_channels": in_channels, **kwargs})
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name, name[len(TORCHVISION_PREFIX):].strip(), num_classes, in_channels, kwargs)
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name, name[len(TIMM_PREFIX):].strip(), num_classes, in_channels, kwargs)
    if ":" in name:
        return _build_from_import_path(name, num_classes, in_channels, kwargs)
    raise UserError(
        f"unknown model {name!r}; known zoo models: {', '.join(ZOO)}; "
        "or use 'torchvision:<name>' or 'package.module:factory'"
    )


def model_spec(name: str, num_classes: int, in_channels: int, kwargs: dict | None = None) -> dict:
    """A plain JSON-serialisable description of a model, enough for ``build_from_spec``."""
    kwargs = _check_kwargs(name, kwargs)
    try:
        kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as e:
        raise UserError(f"model {name!r}: kwargs must be JSON-serialisable ({e})") from e
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": kwargs}


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild the architecture described by ``model_spec`` (e.g. the one stored in a checkpoint)."""
    if not isinstance(spec, dict):
        raise UserError(f"model spec must be a mapping, got {type(spec).__name__}")
    missing = [k for k in ("name", "num_classes", "in_channels") if k not in spec]
    if missing:
        raise UserError(f"model spec is missing {', '.join(missing)}")
    return build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec.get("kwargs") or {})


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the model's first ``nn.Conv2d`` for a freshly initialised one taking ``in_channels``."""
    for qualname, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise UserError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be changed")
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise UserError(f"{type(model).__name__}: first conv {qualname!r} is grouped; cannot change its input channels")
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    init_weights(new)
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _check_kwargs(name: Any, kwargs: Any) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"model {name!r}: kwargs must be a mapping of names to values, got {kwargs!r}")
    clash = [k for k in ("num_classes", "in_channels") if k in kwargs]
    if clash:
        raise UserError(f"model {name!r}: kwargs must not set {' or '.join(clash)} (it is set from the data set)")
    return dict(kwargs)


def _call(name: str, factory: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    """Call ``factory(**kwargs)``; a signature mismatch becomes a ``UserError`` naming the model."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            accepted = [p for p in sig.parameters if p not in ("num_classes", "in_channels")]
            raise UserError(
                f"model {name!r}: bad kwargs: {e} (accepted: {', '.join(accepted) or 'none'})"
            ) from e
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r}: bad kwargs: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r}: factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_torchvision(name: str, tv_name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in known:
        raise UserError(
            f"unknown torchvision classification model {tv_name!r} in {name!r}; "
            f"see torchvision.models.list_models() (e.g. {', '.join(k for k in known if k.startswith(('resnet', 'mobilenet')))})"
        )
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise UserError(f"model {name!r}: kwargs.{key} is not allowed; models are built untrained (weights=None)")
        kwargs.pop(key, None)

    def factory(**kw: Any) -> nn.Module:
        return torchvision.models.get_model(tv_name, weights=None, **kw)

    try:
        model = _call(name, factory, {"num_classes": num_classes, **kwargs})
    except ValueError as e:  # torchvision's own argument checks
        raise UserError(f"model {name!r}: bad kwargs: {e}") from e
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def timm_module():
    """timm, or a UserError saying how to install it (an optional extra)."""
    try:
        import timm
    except ImportError:
        raise UserError("timm:<name> models need timm: pip install 'amc-search[timm]'") from None
    return timm


def _build_timm(name: str, timm_name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    timm = timm_module()
    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{timm_name}*")[:5]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise UserError(f"unknown timm model {timm_name!r} in {name!r}; see timm.list_models(){hint}")
    if "pretrained" in kwargs:
        raise UserError(f"model {name!r}: kwargs.pretrained is not allowed; set model.weights: DEFAULT")

    def factory(**kw: Any) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, **kw)

    return _call(name, factory, {"num_classes": num_classes, "in_chans": in_channels, **kwargs})


def _build_from_import_path(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    obj = import_object(name, f"model {name!r}")
    call_kwargs = dict(kwargs)
    try:
        params = inspect.signature(obj).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepts = {k for k in ("num_classes", "in_channels") if var_kw or k in params}
    except (TypeError, ValueError):  # no introspectable signature: pass both
        accepts = {"num_classes", "in_channels"}
    sizes = {"num_classes": num_classes, "in_channels": in_channels}
    for k in accepts:
        call_kwargs[k] = sizes[k]
    return _call(name, obj, call_kwargs)
