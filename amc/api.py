"""``amc.compress``: the search on your own model, data and metric, from Python.

It is the CLI's pipeline with the user's objects injected into the ``Workspace``: the same
``search`` (run directory, resume, selection), the same export and the same fine-tuning. What a
config cannot hold is recorded: the run's ``config.yaml`` names the model's and the data's
classes (``python:<module>.<class>``), and ``inputs.json`` describes the objects (parameter
count and a hash of the weights, dataset sizes, the metric and loss functions), so that the
same call repeated with the same ``run_dir`` resumes the search and a call with other objects
is refused instead of mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from amc.checkpoint import load_pruned, object_name
from amc.config import OBJECT_PREFIX, Config, config_from_dict
from amc.data import DataSplits, dataset_splits
from amc.errors import UserError
from amc.export import measure
from amc.factory import Workspace
from amc.files import atomic_write_json
from amc.pipeline import export_answer, finetune_file
from amc.search import AGENT_FILE, search

INPUTS_FILE = "inputs.json"
MAX_HELD_OUT = 1000  # default reward-val and selection sizes: a tenth of the training data, at most this many


@dataclass
class CompressResult:
    """What ``compress`` returns.

    ``model``: the pruned (and, unless ``finetune={"epochs": 0}``, fine-tuned) model, loaded back
    from ``checkpoint``; ``policy``: the run's answer (``best_policy.json``); ``metrics``: the
    model's MACs, parameters, latency and metric on the held-out splits (and test, when given),
    with ``original`` (the model given) and ``pruned`` (before fine-tuning, with the ``rules``
    it was selected against) beside them; ``run_dir``: the run directory.
    """

    model: nn.Module
    policy: dict
    metrics: dict
    run_dir: Path
    checkpoint: Path


def compress(
    model: nn.Module, train_data: Dataset | DataLoader, *, target: float = 0.5, resource: str | None = None,
    mode: str = "channel", episodes: int = 300, evaluate: Callable[[nn.Module, Iterable], float] | None = None,
    example_input: torch.Tensor | None = None, run_dir: str | Path | None = None,
    reward_val: Dataset | None = None, select: Dataset | None = None, test_data: Dataset | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None, progress: bool = True, **overrides: Any,
) -> CompressResult:
    """Search a pruning policy for ``model`` (trained), export it and fine-tune it on ``train_data``.

    ``train_data``: a Dataset (or a DataLoader, whose dataset and batch size are used) of
    ``(input tensor, target)`` pairs. The reward-val and selection subsets are held out of it by
    a permutation seeded by ``seed`` unless ``reward_val`` (and ``select``) are given.
    ``evaluate(model, batches) -> float`` (higher is better; the batches are ``(inputs,
    targets)``, possibly on the CPU) replaces top-1 accuracy, and ``loss(outputs, targets)``
    replaces cross-entropy for fine-tuning: with both, any task works. ``target`` is the fraction
    of ``resource`` (``flops``, ``params`` or ``latency``; default ``flops``, ``params`` for
    ``mode="fine_grained"``) to keep. ``example_input``: one batch the model is traced at
    (default: a training sample). ``overrides`` are config sections or top-level fields, e.g.
    ``agent={"warmup_episodes": 20}, finetune={"epochs": 2}, seed=1, device="cpu"``.

    The run goes to ``run_dir`` (default ``runs/<model class>``); the same call again resumes it.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}", where="amc.compress")
    train, batch_size, workers = _dataset_of(train_data)
    if select is not None and reward_val is None:
        raise UserError("select was given without reward_val; give both, or neither to hold both out of train_data",
                        where="amc.compress")
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / type(model).__name__.lower()
    cfg = _config(model, train, reward_val, select, batch_size, workers, run_dir, overrides, target=target,
                  resource=resource or ("params" if mode == "fine_grained" else "flops"), mode=mode, episodes=episodes)
    held_out = None if reward_val is None else (reward_val, select)
    splits = dataset_splits(train, test_data, _classes(train), _channels(train), cfg.data, cfg.seed, held_out)
    if example_input is not None and not (isinstance(example_input, torch.Tensor) and example_input.dim() >= 2):
        raise UserError("example_input must be one batch of inputs, a tensor of shape (batch, ...)",
                        where="amc.compress")
    ws = Workspace(cfg, model=model, data=splits, evaluate=evaluate, loss=loss, example_input=example_input)
    _record_inputs(run_dir, describe_inputs(model, splits, evaluate, loss))

    answer = search(cfg, run_dir, resume=True, progress=progress, workspace=ws)
    pruned_path, pruned = export_answer(ws, run_dir)
    checkpoint, metrics = pruned_path, pruned
    if cfg.finetune.epochs > 0:
        checkpoint, metrics = finetune_file(pruned_path, ws, progress=progress, splits=ws.report_splits)
    original = measure(ws.base_model, ws, splits=ws.report_splits)
    result_model = load_pruned(checkpoint, model=ws.new_model()).to(ws.device)
    return CompressResult(result_model, answer, {**metrics, "original": original, "pruned": pruned}, run_dir,
                          checkpoint)


def _dataset_of(data: Dataset | DataLoader) -> tuple[Dataset, int, int]:
    """(dataset, batch size, workers): a DataLoader gives its own; amc makes its own seeded loaders."""
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size or 128, data.num_workers
    return data, 128, 0


def _classes(train: Dataset) -> int | None:
    """The number of classes when the dataset says (torchvision's ``classes``); only recorded."""
    classes = getattr(train, "classes", None)
    return len(classes) if classes is not None else None


def _channels(train: Dataset) -> int:
    sample = train[0][0] if len(train) and isinstance(train[0], (tuple, list)) else None
    return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.dim() else 1


def _config(model: nn.Module, train: Dataset, reward_val: Dataset | None, select: Dataset | None, batch_size: int,
            workers: int, run_dir: Path, overrides: dict[str, Any], **search: Any) -> Config:
    """The run's config: what was given, amc's defaults, then ``overrides`` (validated like a YAML file)."""
    if reward_val is not None:
        held = {"reward_val_size": len(reward_val), "select_size": len(select) if select is not None else 0}
    else:
        size = min(MAX_HELD_OUT, max(1, len(train) // 10))
        held = {"reward_val_size": size, "select_size": size}
    raw: dict[str, Any] = {
        "model": {"name": object_name(model)},
        "data": {"name": object_name(train), **held, "batch_size": batch_size, "num_workers": workers},
        "search": {**search, "run_dir": str(run_dir)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    for section, field in (("model", "name"), ("data", "name")):
        if not str(raw[section].get(field, "")).startswith(OBJECT_PREFIX):
            raise UserError(f"{section}.{field} is the {section} given to compress; it cannot be overridden",
                            where="amc.compress")
    return config_from_dict(raw, source="amc.compress")


def describe_inputs(model: nn.Module, splits: DataSplits, evaluate: Callable | None, loss: Callable | None) -> dict:
    """What a run records of the objects it was given, to recognise them when the call is repeated."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    sizes = {split: None if getattr(splits, split) is None else len(getattr(splits, split))
             for split in ("train", "reward_val", "select", "test")}
    return {"model": object_name(model)[len(OBJECT_PREFIX):], "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": digest.hexdigest(), "data": sizes,
            "evaluate": _qualname(evaluate), "loss": _qualname(loss)}


def _qualname(fn: Callable | None) -> str | None:
    return None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _record_inputs(run_dir: Path, inputs: dict) -> None:
    """Write ``inputs.json``; when the run directory holds a search already, refuse other inputs."""
    path = run_dir / INPUTS_FILE
    if (run_dir / AGENT_FILE).is_file():
        if not path.is_file():
            raise UserError("holds a search started from a config, not by amc.compress; choose another run_dir",
                            where=str(run_dir))
        recorded = json.loads(path.read_text())
        differ = [k for k in inputs if recorded.get(k) != inputs[k]]
        if differ:
            shown = "; ".join(f"{k}: {str(recorded.get(k))[:40]} then, {str(inputs[k])[:40]} now" for k in differ[:2])
            raise UserError(f"the run was started with other inputs ({shown}); repeat the same call to resume it, "
                            "or choose another run_dir", where=str(path))
        return
    atomic_write_json(path, inputs)
