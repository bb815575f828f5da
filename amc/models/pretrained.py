"""Pretrained weights of ``torchvision:`` and ``timm:`` models (``model.weights``).

torchvision's weights come from its cache, ``$TORCH_HOME/hub/checkpoints/<file of the weights' url>``
(``~/.cache/torch/hub/checkpoints`` by default): offline works once the file is there, and a
download that fails is one line naming the url and where the file belongs. timm's come from the
Hugging Face cache the same way timm itself finds them.

The weights are copied into the model built for the data (``build_model``): a tensor whose shape
differs (the classifier of another number of classes, the first conv of another number of input
channels) stays freshly initialised, and the caller decides whether that is acceptable (``amc
train`` starts from it; a base model used as it is must fit entirely).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from amc.errors import UserError
from amc.models import TIMM_PREFIX, TORCHVISION_PREFIX, build_model, timm_module

DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a blocked network fails instead of hanging


def pretrained_model(name: str, weights: str, num_classes: int, in_channels: int,
                     kwargs: dict | None = None) -> tuple[nn.Module, list[str]]:
    """The model ``name`` for the data, holding the pretrained ``weights`` wherever they fit.

    Returns the model and the state-dict keys left freshly initialised because the weights'
    tensor has another shape (or is absent).
    """
    model = build_model(name, num_classes, in_channels, kwargs)
    state = _pretrained_state(name.strip(), weights, kwargs or {})
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    return model, [k for k in own if k not in fits]


def pretrained_classes(name: str, weights: str) -> int:
    """How many classes the pretrained weights were trained for."""
    name = name.strip()
    if name.startswith(TORCHVISION_PREFIX):
        return len(_torchvision_weights(name, weights).meta["categories"])
    return int(_timm_config(name, weights).num_classes)


def preprocessing(name: str, weights: str | None) -> dict[str, Any] | None:
    """The image preprocessing that goes with the weights: mean, std, resize ratio, interpolation.

    ``resize_ratio`` is the resize side over the crop side (torchvision 256 / 224); None when
    there are no pretrained weights.
    """
    if weights is None:
        return None
    name = name.strip()
    if name.startswith(TORCHVISION_PREFIX):
        t = _torchvision_weights(name, weights).transforms()
        return {"mean": tuple(t.mean), "std": tuple(t.std), "resize_ratio": t.resize_size[0] / t.crop_size[0],
                "interpolation": t.interpolation.value}
    c = _timm_config(name, weights)
    return {"mean": tuple(c.mean), "std": tuple(c.std), "resize_ratio": 1.0 / c.crop_pct,
            "interpolation": c.interpolation or "bilinear"}


def torchvision_cache_file(url: str) -> Path:
    """Where torchvision looks for (and downloads) the weights at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _pretrained_state(name: str, weights: str, kwargs: dict) -> dict[str, torch.Tensor]:
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        chosen = _torchvision_weights(name, weights)
        _ensure_cached(chosen.url)
        # torchvision's own builder: it finds the cached file (no network) and applies its per-model key fixes
        return torchvision.models.get_model(name[len(TORCHVISION_PREFIX):].strip(), weights=chosen,
                                            **kwargs).state_dict()
    timm = timm_module()
    config = _timm_config(name, weights)
    file = _timm_cached_file(config)
    if file is None:
        _check_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), "the Hugging Face cache (HF_HOME)")
    model = timm.create_model(f"{config.architecture}.{config.tag}" if config.tag else config.architecture,
                              pretrained=True, pretrained_cfg_overlay={"file": file} if file else None, **kwargs)
    return model.state_dict()


def _torchvision_weights(name: str, weights: str):
    import torchvision

    tv_name = name[len(TORCHVISION_PREFIX):].strip()
    try:
        options = torchvision.models.get_model_weights(tv_name)
    except (KeyError, ValueError):
        raise UserError(f"torchvision has no pretrained weights for {tv_name!r}", field="model.weights") from None
    try:
        return options[weights]
    except KeyError:
        raise UserError(f"{weights!r} is not a weights name of {tv_name}; choose {', '.join(options.__members__)}",
                        field="model.weights") from None


def _timm_config(name: str, weights: str):
    timm = timm_module()
    architecture = name[len(TIMM_PREFIX):].strip()
    full = architecture if weights == "DEFAULT" else f"{architecture}.{weights}"
    if not timm.is_model(architecture):
        build_model(name, 1, 3)  # the unknown-model message, with suggestions
    try:
        config = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:  # an unknown tag
        config = None
    if config is None:
        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{architecture}.*")]
        raise UserError(f"timm has no pretrained weights {weights!r} for {architecture}; choose DEFAULT"
                        f"{' or a tag: ' + ', '.join(tags[:8]) if tags else ''}", field="model.weights")
    return config


def _timm_cached_file(config) -> str | None:
    """The weights file timm would read, when it is already in the Hugging Face (or torch hub) cache."""
    if config.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(config.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    if config.url and torchvision_cache_file(config.url).is_file():
        return str(torchvision_cache_file(config.url))
    return None


def _check_reachable(endpoint: str, cache: str) -> None:
    """Fail in one line, within seconds, when ``endpoint`` cannot be reached (a download would retry for a minute)."""
    host = urlparse(endpoint)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach {host.hostname} to download the weights ({exc}); offline, they must be in "
                        f"{cache}", field="model.weights") from None


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if before is None else before)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _ensure_cached(url: str) -> None:
    """Download the weights at ``url`` into torchvision's cache unless they are there already."""
    path = torchvision_cache_file(url)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # URLError, HTTPError, timeouts, a full disk
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot download {url} ({reason}); offline, put that file at {path} "
                        "(the cache is $TORCH_HOME/hub/checkpoints)", field="model.weights") from None
