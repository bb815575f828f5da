"""Checkpoint files: atomic writes, versioned formats, loading with ``weights_only=True``.

Every checkpoint is a dict of plain data (strings, numbers, lists, tensors) with a ``format``
name and a ``version``; nothing needs pickled classes, so ``torch.load(weights_only=True)``
reads all of them. A pruned checkpoint holds the original architecture spec and the pruning
plan: the loader rebuilds the original model, replays the plan structurally, then loads the
weights. A quantized plan (``quantize``, ``joint``) also names the folded BatchNorms and each
layer's bit widths; its weights are stored as packed integer codes with their scales and are
dequantized on load (``amc.quantization``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    formats = (fmt,) if isinstance(fmt, str) else fmt
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or a pickle needing arbitrary classes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"not a readable checkpoint ({reason[:160]})", where=str(path)) from None
    if not isinstance(data, dict) or data.get("format") not in VERSIONS:
        raise UserError("not an amc checkpoint (no amc format field)", where=str(path))
    if data["format"] not in formats:
        raise UserError(f"is an {data['format']} checkpoint, expected {' or '.join(formats)}", where=str(path))
    version, supported = data.get("version"), VERSIONS[data["format"]]
    if not isinstance(version, int) or version > supported:
        raise UserError(
            f"format version {version} is newer than this amc supports ({supported}); upgrade amc-search",
            where=str(path))
    return data


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"weights do not fit the model: {' '.join(first[:2])[:200]}", where=where) from None


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


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned model from its checkpoint alone: architecture, plan replay, weights."""
    return load_model(path, (PRUNED_FORMAT,))[0]


def load_model(path: str | Path, formats: tuple[str, ...] = (BASE_FORMAT, PRUNED_FORMAT)) -> tuple[nn.Module, dict]:
    """A base or pruned checkpoint -> (model in eval mode, the stored data without weights)."""
    data = load_checkpoint(path, formats)
    if data["format"] == BASE_FORMAT:
        model = build_from_spec(data["spec"])
    else:
        model = build_from_spec(data["arch"])
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
