"""Checkpoint files: atomic writes, versioned formats, loading with ``weights_only=True``.

Every checkpoint is a dict of plain data (strings, numbers, lists, tensors) with a ``format``
name and a ``version``; nothing needs pickled classes, so ``torch.load(weights_only=True)``
reads all of them. A pruned checkpoint holds the original architecture spec and the pruning
plan: the loader rebuilds the original model (or takes a fresh instance of it from the caller),
replays the plan structurally, then loads the weights.

A base model's weights may also be the files users already have (``read_weights``): a plain
state_dict saved with ``torch.save`` (the ``module.`` prefix of DataParallel and the
``_orig_mod.`` prefix of ``torch.compile`` removed) or a ``.safetensors`` file.
A quantized plan (``quantize``, ``joint``) also names the folded BatchNorms and each layer's
bit widths; its weights are stored as packed integer codes with their scales and are
dequantized on load (``amc.quantization``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amc.config import OBJECT_PREFIX
from amc.errors import UserError
from amc.files import atomic_write
from amc.graph import find_units
from amc.models import build_from_spec
from amc.pruning import apply_channel_plan
from amc.quantization import apply_quant_plan

BASE_FORMAT = "amc-base"
PRUNED_FORMAT = "amc-pruned"
AGENT_FORMAT = "amc-agent"
VERSIONS = {BASE_FORMAT: 1, PRUNED_FORMAT: 1, AGENT_FORMAT: 1}


def save_checkpoint(path: str | Path, fmt: str, payload: dict[str, Any]) -> None:
    data = {"format": fmt, "version": VERSIONS[fmt], **payload}
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_checkpoint(path: str | Path, fmt: str | tuple[str, ...]) -> dict[str, Any]:
    """Read a checkpoint of format ``fmt`` (or any of several); any problem is a one-line ``UserError``."""
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, dict) or data.get("format") not in VERSIONS:
        raise UserError("not an amc checkpoint (no amc format field)", where=str(path))
    return _checked_format(data, fmt, path)


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles it is about to refuse anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"not a readable checkpoint ({_unreadable_reason(exc)})", where=str(path)) from None


def _checked_format(data: dict[str, Any], fmt: str | tuple[str, ...], path: Path) -> dict[str, Any]:
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if data["format"] not in formats:
        raise UserError(f"is an {data['format']} checkpoint, expected {' or '.join(formats)}", where=str(path))
    version, supported = data.get("version"), VERSIONS[data["format"]]
    if not isinstance(version, int) or version > supported:
        raise UserError(
            f"format version {version} is newer than this amc supports ({supported}); upgrade amc-search",
            where=str(path))
    return data


def _unreadable_reason(exc: Exception) -> str:
    """A short reason for ``torch.load``'s failure (its own messages are paragraphs about weights_only)."""
    text = str(exc)
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:
        return f"it holds a pickled {pickled[1]} object; amc loads only plain-data checkpoints"
    if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text:
        return "the file is truncated or corrupted"
    return "not a file written by torch.save"


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def replay_quant_plan(model: nn.Module, plan: dict, where: str) -> None:
    """Fold and swap in the quantized layers a plan names; a plan that does not fit is the file's fault."""
    modules = dict(model.named_modules())
    bits = plan.get("bits", {})
    unknown = [n for n in [n for pair in plan.get("folded", []) for n in pair] + list(bits) if n not in modules]
    bad = [n for n, b in bits.items()
           if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(2 <= v <= 8 or v == 32 for v in b)]
    if unknown:
        raise UserError(f"quantization plan names layers the architecture does not have: {unknown[:3]}", where=where)
    if bad or not bits:
        raise UserError(f"quantization plan has impossible bit widths for {bad[:3] or 'every layer'}", where=where)
    apply_quant_plan(model, plan)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A base model's weights from an amc checkpoint, a plain state_dict or a ``.safetensors`` file.

    Returns the state_dict and the amc checkpoint's other entries (spec, split), or None for a
    file that records nothing but tensors. A plain state_dict may also sit under a
    ``"state_dict"`` or ``"model"`` key, as training scripts often save it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
        meta = None
    else:
        data = _torch_load(path)
        if isinstance(data, dict) and data.get("format") in VERSIONS:
            data = _checked_format(data, BASE_FORMAT, path)
            return data["state_dict"], {k: v for k, v in data.items() if k != "state_dict"}
        state = next((c for c in (data, *_nested(data)) if _is_state_dict(c)), None)
        if state is None:
            raise UserError("neither an amc checkpoint nor a state_dict (a mapping of parameter names to tensors)",
                            where=str(path))
        meta = None
    return _unwrapped(state), meta


def _nested(data: Any) -> list[Any]:
    return [data[k] for k in ("state_dict", "model") if k in data] if isinstance(data, dict) else []


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"not a readable safetensors file ({exc})", where=str(path)) from None


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict without the prefix every key of a wrapped model carries."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return _unwrapped({k[len(prefix):]: v for k, v in state.items()})
    return dict(state)


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state_dict`` into ``model`` exactly; a mismatch names the first keys that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = [f"{label} {_first(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected)) if keys]
    problems += [f"{k} is {tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                 for k in reshaped[:2]]
    if problems:
        raise UserError(f"weights do not fit the {type(model).__name__}: {'; '.join(problems)}", where=where)
    model.load_state_dict(state_dict)


def _first(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_pruned(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A pruned model from its checkpoint: architecture, plan replay, weights.

    ``model`` is a fresh instance of the original architecture, needed when the checkpoint was
    pruned from a model object given to ``amc.compress`` (the checkpoint cannot rebuild it); the
    plan is replayed on it (in place) and the pruned weights loaded, as Torch-Pruning does.
    """
    return load_model(path, (PRUNED_FORMAT,), model)[0]


def load_model(path: str | Path, formats: tuple[str, ...] = (BASE_FORMAT, PRUNED_FORMAT),
               model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """A base or pruned checkpoint -> (model in eval mode, the stored data without weights).

    ``model``: the original architecture to load into instead of the one the checkpoint's spec builds.
    """
    data = load_checkpoint(path, formats)
    spec = data["spec"] if data["format"] == BASE_FORMAT else data["arch"]
    model = build_from_spec(spec) if model is None else _check_instance(model, spec, path)
    if data["format"] == PRUNED_FORMAT:
        plan = data["plan"]
        if plan.get("kind") in ("channel", "joint"):
            graph = find_units(model, tuple(data["input_shape"]), bool(plan.get("prune_residual", False)))
            unknown = set(plan["channels"]) - {u.name for u in graph.units}
            if unknown:
                raise UserError(f"plan names units the architecture does not have: {sorted(unknown)[:3]}",
                                where=str(path))
            apply_channel_plan(model, graph, plan["channels"], inplace=True)
        if plan.get("kind") in ("quantize", "joint"):
            replay_quant_plan(model, plan, str(path))
    load_state(model, data["state_dict"], str(path))
    return model.eval(), {k: v for k, v in data.items() if k != "state_dict"}


def _check_instance(model: nn.Module, spec: dict, path: str | Path) -> nn.Module:
    """Refuse a model object of another class than the one the checkpoint was made from."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}", field="model")
    name = spec.get("name", "")
    if name.startswith(OBJECT_PREFIX) and name != object_name(model):
        given = object_name(model)[len(OBJECT_PREFIX):]
        raise UserError(f"was pruned from a {name[len(OBJECT_PREFIX):]}, not a {given}", where=str(path))
    return model


def object_name(obj: object) -> str:
    """``python:<module>.<qualname>`` of an object's class: how a run records a model or data set given from Python."""
    cls = type(obj)
    return f"{OBJECT_PREFIX}{cls.__module__}.{cls.__qualname__}"
