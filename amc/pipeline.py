"""The steps a user runs: train, info, export, fine-tune, evaluate, and the whole pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import nn

from amc.checkpoint import BASE_FORMAT, PRUNED_FORMAT, load_model, save_checkpoint
from amc.config import Config, run_dir_for
from amc.distributed import launched
from amc.errors import UserError
from amc.export import export_onnx, measure, prune_policy, save_pruned
from amc.factory import Workspace, seed_everything
from amc.metrics import accuracy
from amc.report import human, plot_episodes, plot_policy, summary_table, table
from amc.search import BEST_FILE, load_run_config, read_episodes, search
from amc.train import fit


def train_base(cfg: Config, epochs: int | None = None, progress: bool = True) -> dict:
    """Train the base model the config names and write its checkpoint; returns test accuracy."""
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    model = ws.new_model().to(ws.device)
    t = cfg.train
    started = time.perf_counter()
    fit(model, ws.loader("train", shuffle=True), epochs or t.epochs, t.lr, t.momentum, t.weight_decay,
        t.label_smoothing, desc="train", progress=progress)
    test = accuracy(model, ws.loader("test"))
    metrics = {"test_top1": test["top1"], "test_top5": test["top5"], "epochs": epochs or t.epochs,
               "seconds": time.perf_counter() - started}
    save_checkpoint(ws.checkpoint_path, BASE_FORMAT, {
        "spec": ws.spec, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "metrics": metrics})
    return metrics


def info(cfg: Config) -> str:
    """The model's prunable units with channels, MACs and params, and the totals."""
    ws = Workspace(cfg)
    model = ws.new_model()
    space = ws.space(model)
    graph, cost = space.graph, space.cost_model
    rows = []
    for unit in graph.units:
        layer = unit.layer
        rows.append([unit.index, unit.name, unit.channels, layer.in_channels, f"{layer.in_hw[0]}x{layer.in_hw[1]}",
                     layer.kernel, layer.stride, human(layer.macs), "yes" if unit.residual else ""])
    lines = [table(["#", "unit", "channels", "in", "input", "k", "stride", "MACs", "residual"], rows)]
    if graph.skipped:
        lines.append(f"left whole (residual-coupled; set search.prune_residual: true to prune): {', '.join(graph.skipped)}")
    lines.append(f"total: {human(cost.total_macs)} MACs ({cost.total_macs:,}), {human(cost.total_params)} params "
                 f"({cost.total_params:,}), {len(graph.layers)} conv/linear layers, {len(graph.units)} prunable units")
    return "\n".join(lines)


def read_policy(run_dir: Path, policy: str) -> dict:
    path = run_dir / BEST_FILE if policy == "best" else Path(policy)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError("policy file not found", where=str(path)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable policy file ({exc})", where=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("keep"), list):
        raise UserError("a policy file needs a 'keep' list of per-unit keep counts", where=str(path))
    return data


def export_run(run_dir: Path, policy: str = "best", out: Path | None = None, onnx: Path | None = None) -> tuple[Path, dict]:
    """Prune the base model to a run's policy, measure it and write the pruned checkpoint."""
    cfg = load_run_config(run_dir)
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    chosen = read_policy(run_dir, policy)
    model, plan = prune_policy(ws, [int(k) for k in chosen["keep"]])
    metrics = measure(model, ws)
    out = out or run_dir / "pruned.pt"
    save_pruned(out, ws.spec, ws.input_shape, model, plan, metrics)
    if onnx:
        export_onnx(model, ws.input_shape, onnx)
    rows = read_episodes(run_dir)
    if rows:
        plot_episodes(rows, run_dir / "episodes.png")
    if policy == "best":
        plot_policy(chosen, run_dir / "best_policy.png")
    return out, metrics


def finetune_model(model: nn.Module, ws: Workspace, kind: str, epochs: int | None = None,
                   distill: bool | None = None, progress: bool = True) -> nn.Module:
    """Fine-tune a pruned model in place as the config says; fine-grained zeros stay zero."""
    f = ws.cfg.finetune
    use_distill = f.distill if distill is None else distill
    masks = None
    if kind == "fine_grained":
        masks = {n: (p != 0) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    return fit(model, ws.loader("train", shuffle=True), f.epochs if epochs is None else epochs, f.lr, f.momentum,
               f.weight_decay, teacher=ws.base_model if use_distill else None, temperature=f.temperature,
               distill_weight=f.distill_weight, desc="finetune", progress=progress, masks=masks, seed=ws.cfg.seed)


def finetune(path: Path, cfg: Config, epochs: int | None = None, distill: bool | None = None,
             out: Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Train a pruned checkpoint on the config's data; optionally distil from the base model.

    Under ``torchrun --nproc_per_node K`` the K processes train data-parallel; rank 0 measures
    and writes the checkpoint, the other ranks return empty metrics.
    """
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    out = out or path.with_name(path.stem + "_ft.pt")
    with launched(ws.device) as rank:
        model, data = load_model(path, (PRUNED_FORMAT,))
        model.to(ws.device)
        finetune_model(model, ws, data["plan"].get("kind", "channel"), epochs, distill, progress and rank == 0)
    if rank:
        return out, {}
    metrics = measure(model, ws)
    save_pruned(out, ws.spec, ws.input_shape, model, data["plan"], metrics)
    return out, metrics


def evaluate(path: Path, cfg: Config) -> dict:
    ws = Workspace(cfg)
    model, _ = load_model(path)
    return measure(model, ws, splits=("test",))


def run_all(cfg: Config, episodes: int | None = None, progress: bool = True) -> str:
    """Train the base model if missing, search, export, fine-tune, evaluate; the summary table."""
    if episodes is not None:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"episodes": episodes})})
    ws = Workspace(cfg)
    if not ws.checkpoint_path.is_file():
        print(f"training the base model -> {ws.checkpoint_path}")
        train_base(cfg, progress=progress)
    run_dir = run_dir_for(cfg)
    resume = (run_dir / "agent.pt").is_file()
    print(f"{'resuming' if resume else 'searching'}: {cfg.search.episodes} episodes -> {run_dir}")
    search(cfg, run_dir, resume=resume, progress=progress)
    pruned_path, pruned = export_run(run_dir)
    tuned_path, tuned = finetune(pruned_path, cfg, progress=progress)
    original = measure(ws.base_model, ws)
    print(f"pruned checkpoint: {pruned_path}\nfine-tuned checkpoint: {tuned_path}")
    return summary_table({"original": original, "pruned": pruned, "fine-tuned": tuned})
