"""Export a policy as a physically smaller checkpoint, to ONNX, and measure models."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from amc.checkpoint import PRUNED_FORMAT, save_checkpoint
from amc.errors import UserError
from amc.factory import Workspace
from amc.metrics import count_macs, count_nonzero_params, count_params, latency_report
from amc.quantization import storage_and_bitops


def measure(model: nn.Module, workspace: Workspace, splits: tuple[str, ...] = ("reward_val", "test")) -> dict:
    """MACs, parameters (all and non-zero), weight storage, BitOPs, latency (two batch sizes) and
    top-1 / top-5 (or the workspace's own metric) on the named splits."""
    model = model.to(workspace.device).eval()
    weight_bytes, bitops = storage_and_bitops(model, workspace.input_shape)
    out = {
        "macs": count_macs(model, workspace.input_shape),
        "weight_bytes": weight_bytes,
        "bitops": bitops,
        "params": count_params(model),
        "nonzero_params": count_nonzero_params(model),
        **latency_report(model, workspace.input_shape, workspace.cfg.latency),
    }
    for split in splits:
        out.update(workspace.split_metrics(model, split))
    return out


def prune_policy(workspace: Workspace, keep: list[int], calibration_seed: int | None = None) -> tuple[nn.Module, dict]:
    """The base model pruned to ``keep`` and repaired exactly as the search scores it (the scorer's
    ``Repair``: the config's calibration, on the same images). ``calibration_seed`` draws other
    calibration and reconstruction images than the run's (to measure how much a score depends on them)."""
    cfg = workspace.cfg
    model = workspace.base_model
    space = workspace.base_space
    if len(keep) != len(space.sizes):
        raise UserError(f"policy has {len(keep)} entries, the model has {len(space.sizes)} units", field="keep")
    pruned = copy.deepcopy(model)
    space.apply(pruned, keep)
    workspace.base_repair(calibration_seed)(pruned, space.refit_layers(keep))
    plan = space.plan(keep)
    plan["prune_residual"] = cfg.search.prune_residual
    return pruned.eval(), plan


def save_pruned(path: str | Path, spec: dict, input_shape: tuple[int, ...], model: nn.Module, plan: dict,
                metrics: dict) -> None:
    """Write a pruned checkpoint: architecture spec, plan, weights and metrics (plain data only)."""
    save_checkpoint(path, PRUNED_FORMAT, {
        "arch": spec, "input_shape": list(input_shape), "plan": plan,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "metrics": metrics,
    })


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval().requires_grad_(False)  # fake-quant ops trace only without autograd
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (torch.zeros(input_shape),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
