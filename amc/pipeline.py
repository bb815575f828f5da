"""The steps a user runs: train, info, export, fine-tune, evaluate, and the whole pipeline."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from amc.checkpoint import BASE_FORMAT, PRUNED_FORMAT, load_model, save_checkpoint
from amc.config import EVAL_SPLITS, EXPORT_SETTABLE, Config, config_from_dict, parse_override, run_dir_for
from amc.data import split_signature
from amc.distributed import launched
from amc.errors import UserError
from amc.export import export_onnx, measure, prune_policy, save_pruned
from amc.factory import Workspace, seed_everything
from amc.graph import COUPLED
from amc.metrics import accuracy, in_units
from amc.quantization import refold_batchnorm, unfold_batchnorm
from amc.report import comparison_table, human, plot_episodes, plot_policy, table
from amc.search import BEST_FILE, load_run_config, read_episodes, search
from amc.selection import SEARCH_MEAN, images_to_separate, is_rule, origin
from amc.train import fit


def train_base(cfg: Config, epochs: int | None = None, progress: bool = True) -> dict:
    """Train the base model the config names (from ``model.weights`` when set) and write its checkpoint;
    returns test accuracy."""
    if cfg.model.checkpoint is None:
        raise UserError("required to train: the file `amc train` writes the trained model to",
                        where=cfg.source, field="model.checkpoint")
    seed_everything(cfg.seed)
    ws = Workspace(cfg)
    model = ws.initial_model().to(ws.device)
    t = cfg.train
    started = time.perf_counter()
    fit(model, ws.loader("train", shuffle=True), epochs or t.epochs, t.lr, t.momentum, t.weight_decay,
        t.label_smoothing, desc="train", progress=progress, loss_fn=ws.loss)
    test = accuracy(model, ws.loader("test"))
    metrics = {"test_top1": test["top1"], "test_top5": test["top5"], "epochs": epochs or t.epochs,
               "seconds": time.perf_counter() - started}
    save_checkpoint(ws.checkpoint_path, BASE_FORMAT, {
        "spec": ws.spec, "split": split_signature(cfg.data, cfg.seed),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "metrics": metrics})
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
                     layer.kernel, layer.stride, human(layer.macs), unit.coupling])
    lines = [table(["#", "unit", "channels", "in", "input", "k", "stride", "MACs", "coupling"], rows)]
    for reason, roots in graph.skipped_by_reason().items():
        fix = "; set search.prune_residual: true to prune each with one shared ratio" if reason in COUPLED else ""
        lines.append(f"left whole ({reason}{fix}): {', '.join(roots)}")
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


def export_run(run_dir: Path, policy: str = "best", out: Path | None = None, onnx: Path | None = None,
               overrides: Sequence[str] = ()) -> tuple[Path, dict]:
    """Prune the base model to a run's policy, measure it and write the pruned checkpoint.

    With the run's own answer (``policy="best"``), the rules it was selected against (uniform,
    global) are exported beside it as ``rule_<name>.pt`` and measured the same way, under
    ``metrics["rules"]``, so the user sees whether the search paid off. ``overrides`` (``--set``)
    may change only the fields in ``EXPORT_SETTABLE``.
    """
    cfg = load_run_config(run_dir)
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not any(key == f or key.startswith(f + ".") for f in EXPORT_SETTABLE):
            raise UserError(f"export uses the run's config; --set may change only {', '.join(EXPORT_SETTABLE)}",
                            where=f"--set {text}")
    if overrides:
        cfg = config_from_dict(cfg.to_dict(), cfg.source, overrides)
    seed_everything(cfg.seed)
    return export_answer(Workspace(cfg), run_dir, policy, out, onnx)


def export_answer(ws: Workspace, run_dir: Path, policy: str = "best", out: Path | None = None,
                  onnx: Path | None = None) -> tuple[Path, dict]:
    """``export_run`` with the run's workspace already built (the API's holds the user's objects)."""
    chosen = read_policy(run_dir, policy)
    out = out or run_dir / "pruned.pt"
    metrics = export_policy(ws, chosen["keep"], out, onnx)
    if policy == "best":
        rules = [c for c in chosen.get("selection", {}).get("candidates", []) if is_rule(c)]
        metrics["rules"] = {c["source"]: export_policy(ws, c["keep"], rule_path(out, c["source"])) for c in rules}
    rows = read_episodes(run_dir)
    if rows:
        plot_episodes(rows, run_dir / "episodes.png")
    if policy == "best":
        plot_policy(chosen, run_dir / "best_policy.png")
    return out, metrics


def rule_path(pruned: Path, rule: str) -> Path:
    return pruned.with_name(f"rule_{rule}.pt")


def export_policy(ws: Workspace, keep: list[int], out: Path, onnx: Path | None = None) -> dict:
    """Prune, repair and measure one policy (fp32); write its checkpoint (and ONNX)."""
    model, plan = prune_policy(ws, [int(k) for k in keep])
    metrics = measure(model, ws, splits=ws.report_splits)
    save_pruned(out, ws.spec, ws.input_shape, model, plan, metrics)
    if onnx:
        export_onnx(model, ws.input_shape, onnx)
    return metrics


def finetune_model(model: nn.Module, ws: Workspace, plan: dict, epochs: int | None = None,
                   distill: bool | None = None, progress: bool = True) -> nn.Module:
    """Fine-tune a pruned model in place as the config says; fine-grained zeros stay zero.

    A quantized model (``plan["kind"]`` quantize or joint) trains quantization-aware: bit widths,
    scales and shapes stay, weights learn through the straight-through estimator, with its
    BatchNorms unfolded for training and folded back after.
    """
    f = ws.cfg.finetune
    use_distill = f.distill if distill is None else distill
    kind = plan.get("kind", "channel")
    masks = None
    if kind == "fine_grained":
        masks = {n: (p != 0) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    loader = ws.loader("train", shuffle=True)
    folded = plan.get("folded", []) if kind in ("quantize", "joint") else []
    if folded:  # statistics of the batches training will see (augmented), so training starts where the model is
        batches = itertools.islice(loader, max(ws.cfg.search.calib_batches, 1))
        unfold_batchnorm(model, folded, torch.cat([x for x, _ in batches]).to(ws.device))
    fit(model, loader, f.epochs if epochs is None else epochs, f.lr, f.momentum,
        f.weight_decay, teacher=ws.base_model if use_distill else None, temperature=f.temperature,
        distill_weight=f.distill_weight, desc="finetune", progress=progress, masks=masks, loss_fn=ws.loss,
        seed=ws.cfg.seed, max_steps=f.max_steps)
    if folded:
        refold_batchnorm(model, folded)
    return model.eval()


def finetune(path: Path, cfg: Config, epochs: int | None = None, distill: bool | None = None,
             out: Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Train a pruned checkpoint on the config's data; optionally distil from the base model."""
    seed_everything(cfg.seed)
    return finetune_file(path, Workspace(cfg), epochs, distill, out, progress)


def finetune_file(path: Path, ws: Workspace, epochs: int | None = None, distill: bool | None = None,
                  out: Path | None = None, progress: bool = True,
                  splits: tuple[str, ...] = ("reward_val", "test")) -> tuple[Path, dict]:
    """``finetune`` in a workspace already built; the result is measured on ``splits``.

    Under ``torchrun --nproc_per_node K`` the K processes train data-parallel; rank 0 measures
    and writes the checkpoint, the other ranks return empty metrics.
    """
    out = out or path.with_name(path.stem + "_ft.pt")
    with launched(ws.device) as rank:
        model, data = load_for_config(path, ws, (PRUNED_FORMAT,))
        model.to(ws.device)
        finetune_model(model, ws, data["plan"], epochs, distill, progress and rank == 0)
    if rank:
        return out, {}
    metrics = measure(model, ws, splits)
    save_pruned(out, ws.spec, ws.input_shape, model, data["plan"], metrics)
    return out, metrics


def evaluate(path: Path, cfg: Config, split: str = "test") -> dict:
    """A base or pruned checkpoint's costs and accuracy on one split (``EVAL_SPLITS``) of the config's data."""
    if split not in EVAL_SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}", field="split")
    if split == "select" and not cfg.data.select_size:
        raise UserError("the config holds out no selection split (data.select_size is 0)", field="--split")
    ws = Workspace(cfg)
    model, _ = load_for_config(path, ws)
    return measure(model, ws, splits=(split,))


def load_for_config(path: Path, ws: Workspace, formats: tuple[str, ...] = (BASE_FORMAT, PRUNED_FORMAT)
                    ) -> tuple[nn.Module, dict]:
    """Load a checkpoint, refusing one made for another architecture or data shape than the config's.

    Without this check a checkpoint evaluated (or fine-tuned) with an unrelated config runs on
    the wrong data and reports a meaningless accuracy.
    """
    model, data = load_model(path, formats, ws.new_model() if ws.model is not None else None)
    spec = data["spec"] if data["format"] == BASE_FORMAT else data["arch"]
    shape = tuple(data["input_shape"]) if "input_shape" in data else None  # a base checkpoint stores none
    if spec != ws.spec or shape not in (None, ws.input_shape):
        raise UserError(f"holds {_describe(spec, shape)}, but {ws.cfg.source} describes "
                        f"{_describe(ws.spec, ws.input_shape)}", where=str(path))
    return model, data


def _describe(spec: dict, input_shape: tuple[int, ...] | None) -> str:
    kwargs = f" {json.dumps(spec['kwargs'])}" if spec.get("kwargs") else ""
    inputs = f" on {'x'.join(str(n) for n in input_shape[1:])} inputs" if input_shape else ""
    return f"{spec['name']}{kwargs} for {spec['num_classes']} classes{inputs}"


def run_all(cfg: Config, episodes: int | None = None, progress: bool = True) -> str:
    """Train the base model if missing, search, export, fine-tune, evaluate; the comparison table.

    The search's answer and the rules it was selected against get the same fine-tuning, so the
    table shows what the search earned at the same budget.
    """
    if episodes is not None:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"episodes": episodes})})
    ws = Workspace(cfg)
    if ws.checkpoint_path is not None and not ws.checkpoint_path.is_file():
        print(f"training the base model -> {ws.checkpoint_path}")
        train_base(cfg, progress=progress)
    run_dir = run_dir_for(cfg)
    resume = (run_dir / "agent.pt").is_file()
    print(f"{'resuming' if resume else 'searching'}: {cfg.search.episodes} episodes -> {run_dir}")
    answer = search(cfg, run_dir, resume=resume, progress=progress)
    pruned_path, pruned = export_run(run_dir)
    tuned_path, tuned = finetune(pruned_path, cfg, progress=progress)
    rows = {"original": measure(ws.base_model, ws, splits=ws.held_out_splits + ("test",)),
            answer_label(answer): {**pruned, "finetuned_test_top1": tuned["test_top1"]}}
    for rule, metrics in pruned.get("rules", {}).items():
        _, rule_tuned = finetune(rule_path(pruned_path, rule), cfg, progress=progress)
        rows[rule] = {**metrics, "finetuned_test_top1": rule_tuned["test_top1"]}
    print(f"pruned checkpoint: {pruned_path}\nfine-tuned checkpoint: {tuned_path}")
    return f"{comparison_table(rows, quantized=cfg.search.mode in ('quantize', 'joint'))}\n{answer_note(answer)}"


def answer_label(answer: dict) -> str:
    return f"answer: {answer['source']}" if is_rule(answer) else f"AMC ({origin(answer)})"


def answer_note(answer: dict) -> str:
    """Lines on where the answer came from, how noisy the reward was, and how the rules scored in the search."""
    selection, noise = answer["selection"], answer["noise"]
    metric = selection.get("metric", "top1")
    searched = sum(c["source"] == "search" for c in selection["candidates"])
    mean = " and their mean" if any(c["source"] == SEARCH_MEAN for c in selection["candidates"]) else ""
    rules = [c["source"] for c in selection["candidates"] if is_rule(c)]
    answered = (f"the {answer['source']} rule" if is_rule(answer) else
                f"the mean of the search's {searched} best policies" if answer["source"] == SEARCH_MEAN
                else f"the search's episode {answer['episode']}")
    lines = [f"answer: {answered}, best of {searched} searched policies{mean} and {len(rules)} rules "
             f"({', '.join(rules) or 'none'}) on the {selection['split'].replace('_', '-')} split"]
    if margin := selection.get("margin"):
        best = {"source": margin.get("search_source", "search"), "episode": margin["search_episode"]}
        leader = f"the search's best ({origin(best)})" if margin["kept_rule"] else "it"
        lines[0] += (f"; {leader} led the {margin['rule']} rule by {in_units(margin['search_lead'], metric)}, "
                     f"{'not ' if margin['kept_rule'] else ''}more than {margin['margin']:g} x "
                     f"{in_units(margin['paired_se'], metric)} (paired standard error)")
        if needed := images_to_separate(margin):
            lines.append(f"a lead this size would clear the margin on about {needed} selection images "
                         f"(now {margin['images']}): raise data.select_size (taken from reward-val, no retraining; "
                         "beyond the base's held-out images, retrain it with them held out)")
    over_images = "" if noise["bootstrap_se"] is None else f"±{in_units(noise['bootstrap_se'], metric)} over images, "
    lines.append(f"reward noise: {over_images}±{in_units(noise['calibration_spread'], metric)} over calibration samples")
    if rewards := best_rewards(selection["candidates"]):
        names = {"search": "best episode", SEARCH_MEAN: "mean of the best"}
        lines.append("rewards as the search scores them: " + ", ".join(
            f"{names.get(c['source'], c['source'])} {c['reward']:.4f}" for c in rewards))
    return "\n".join(lines)


def best_rewards(candidates: list[dict]) -> list[dict]:
    """The best searched candidate by reward, the searched mean, then each rule (older runs recorded no rule rewards)."""
    searched = [c for c in candidates if c["source"] == "search"]
    others = [c for c in candidates if c["source"] != "search" and c.get("reward") is not None]
    rules = [c for c in others if is_rule(c)]
    return ([max(searched, key=lambda c: c["reward"])] if searched and rules else []) + (others if rules else [])
