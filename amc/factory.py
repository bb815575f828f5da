"""Build the objects a config describes: device, data, base model, space, scorer, environment.

A ``Workspace`` may also be handed objects a config cannot describe (``amc.compress``): the
user's trained model, their data and their metric. They pre-empt what the config would build,
and everything downstream (search, selection, export, fine-tuning) is the same code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from amc.calibration import Repair
from amc.checkpoint import load_state, read_weights
from amc.config import Config, load_config
from amc.data import (DataSplits, ImagePreprocessing, data_shape, load_splits, make_loader, split_signature,
                      to_device)
from amc.errors import UserError
from amc.graph import PrunableGraph, find_units
from amc.inference import fp32_accuracy, repair_dtype
from amc.metrics import metric_value
from amc.models import build_model, model_spec
from amc.scoring import Scorer
from amc.spaces import ChannelSpace, FineGrainedSpace, Space

Metric = Callable[[nn.Module, Iterable], float]  # evaluate(model, batches) -> higher is better


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("cuda was asked for but no GPU is available", field="device")
    return torch.device(name)


def cached_batches(dataset, batch_size: int, limit: int | None = None,
                   seed: int | None = None) -> list[tuple[torch.Tensor, Any]]:
    """The first ``limit`` batches of ``dataset`` held in memory: in order, or with ``seed`` in
    the order of a shuffle seeded by it (the same batches on every call)."""
    loader = make_loader(dataset, batch_size, shuffle=seed is not None, seed=seed or 0)
    return [(x, y) for x, y in islice(loader, limit)]


def _check_split(path: Path, recorded: dict[str, Any] | None, cfg: Config) -> None:
    """Refuse a base model that may have trained on one of the config's held-out images.

    Its rewards would be flattered by an unknown amount. The held-out images are the head of
    one seeded permutation (reward-val first, then selection), so a config on the same
    permutation whose reward-val + selection images number at most the base's holds out a
    subset of the images the base never saw: the pool may be divided anew without retraining.
    A checkpoint from before the split was recorded loads with a warning.
    """
    wanted = split_signature(cfg.data, cfg.seed)
    if recorded is None:
        warnings.warn(f"{path}: no record of the split it was trained on (written by an older amc), so it cannot "
                      f"be checked against the config's; `amc train {cfg.source}` records it", stacklevel=4)
        return
    sizes = ("reward_val_size", "select_size")
    held = lambda signature: sum(signature.get(k, 0) for k in sizes)  # noqa: E731
    differ = [k for k in {**recorded, **wanted} if k not in sizes and recorded.get(k) != wanted.get(k)]
    if not differ and held(wanted) <= held(recorded):
        return
    keys = ["dataset"] + [k for k in differ if k != "dataset"] + ([] if differ else list(sizes))
    show = lambda signature: ", ".join(f"{k}={signature.get(k, 0 if k in sizes else None)}" for k in keys)  # noqa: E731
    fix = (f"hold out at most {held(recorded)} images in all" if not differ else
           "restore the setting" + (" (agent.seed changes the search without moving the split)" if "seed" in differ else ""))
    raise UserError(f"trained with the split {show(recorded)}; the config asks for {show(wanted)}, which holds out "
                    f"images the base trained on; retrain (amc train {cfg.source}) or {fix}",
                    where=str(path))


@dataclass
class Workspace:
    """A config and the things built from it, each on first use.

    ``model``, ``data``, ``evaluate`` and ``loss`` are objects given from Python (``amc.compress``);
    each replaces what the config would build: the trained base model, the data splits, top-1
    (or top-5) accuracy as the metric the search maximises, and cross-entropy as the training
    loss. ``example_input`` sets the input shape the model is traced at (default: the config's
    ``input_size``, else a training sample's).
    """

    cfg: Config
    model: nn.Module | None = None
    data: DataSplits | None = None
    evaluate: Metric | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    example_input: torch.Tensor | None = None
    _base_repairs: dict[int | None, Repair] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @cached_property
    def splits(self) -> DataSplits:
        splits = self.data if self.data is not None else load_splits(self.cfg.data, self.cfg.seed,
                                                                     self._preprocessing())
        n = self.cfg.data.reward_images
        if n is not None and n < len(splits.reward_val):
            splits = dataclasses.replace(splits, reward_val=Subset(splits.reward_val, range(n)))
        return splits

    def _preprocessing(self) -> ImagePreprocessing | None:
        """The pretrained weights' preprocessing, for an image folder (the other built-in sets have their own)."""
        m = self.cfg.model
        if self.cfg.data.name != "imagefolder" or m.weights is None:
            return None
        from amc.models.pretrained import preprocessing

        return ImagePreprocessing(**preprocessing(m.name, m.weights))

    @cached_property
    def data_shape(self) -> tuple[int, int]:
        """(input channels, classes): known without loading a built-in data set."""
        if self.data is None and self.cfg.data.builtin:
            return data_shape(self.cfg.data)
        return self.splits.in_channels, self.splits.num_classes

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input (batch 1) the model is traced and measured at."""
        if self.example_input is not None:
            return (1, *self.example_input.shape[1:])
        size = self.cfg.data.input_size
        if size is not None:
            return (1, self.data_shape[0], size, size)
        return (1, *self.splits.train_eval[0][0].shape)

    @property
    def spec(self) -> dict:
        m = self.cfg.model
        return model_spec(m.name, self.data_shape[1], self.data_shape[0], m.kwargs)

    def new_model(self) -> nn.Module:
        """The config's architecture, freshly initialised (a copy of the given model object); a bad
        name or kwargs names the config."""
        if self.model is not None:
            return copy.deepcopy(self.model)
        m = self.cfg.model
        channels, classes = self.data_shape  # a data problem is not the model's
        try:
            return build_model(m.name, classes, channels, m.kwargs)
        except UserError as exc:
            raise UserError(str(exc), where=self.cfg.source, field="model") from None

    def initial_model(self) -> nn.Module:
        """What ``amc train`` starts from: the pretrained ``model.weights`` where they fit, else fresh weights."""
        m = self.cfg.model
        if m.weights is None:
            return self.new_model()
        from amc.models.pretrained import pretrained_model

        model, fresh = pretrained_model(m.name, m.weights, self.data_shape[1], self.data_shape[0], m.kwargs)
        if fresh:
            warnings.warn(f"{m.name} {m.weights}: freshly initialised where the weights do not fit the data: "
                          f"{', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''}", stacklevel=2)
        return model

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.cfg.model.checkpoint is None else Path(self.cfg.model.checkpoint)

    @cached_property
    def base_model(self) -> nn.Module:
        """The trained base model, in eval mode on the device: the given model object (a copy), or
        the weights of ``model.checkpoint`` (any format ``read_weights`` reads), or ``model.weights``."""
        if self.model is not None:
            model = copy.deepcopy(self.model)
        elif self.checkpoint_path is not None:
            model = self._checkpoint_model(self.checkpoint_path)
        elif self.cfg.model.weights is not None:
            model = self._pretrained_model()
        else:
            self.new_model()  # a name that cannot be built says so first
            raise UserError("no trained weights: set model.checkpoint (written by `amc train`, or your own "
                            "state_dict / .safetensors) or model.weights (torchvision / timm)",
                            where=self.cfg.source, field="model")
        return model.to(self.device).eval()

    def _checkpoint_model(self, path: Path) -> nn.Module:
        if not path.is_file():
            raise UserError(f"trained base model not found; run `{self.cfg.command('train')}` first", where=str(path))
        model = self.new_model()  # a bad model name or import path is the config's fault, not the checkpoint's
        state, record = read_weights(path)
        if record is not None:  # an amc checkpoint says what it was trained as, and on which split
            if record["spec"] != self.spec:
                raise UserError(f"holds a {record['spec']['name']} model for {record['spec']['num_classes']} classes, "
                                f"the config asks for {self.spec['name']} with {self.spec['num_classes']}",
                                where=str(path))
            _check_split(path, record.get("split"), self.cfg)
        load_state(model, state, str(path))
        return model

    def _pretrained_model(self) -> nn.Module:
        """``model.weights`` as the base model: they must fit entirely (a fresh classifier is not a trained model)."""
        from amc.models.pretrained import pretrained_classes, pretrained_model

        m = self.cfg.model
        model, fresh = pretrained_model(m.name, m.weights, self.data_shape[1], self.data_shape[0], m.kwargs)
        if fresh:
            classes = pretrained_classes(m.name, m.weights)
            raise UserError(f"the {m.weights} weights of {m.name} do not fit {', '.join(fresh[:3])} of the model for "
                            f"this data (they are for {classes} classes; the data has {self.data_shape[1]} classes and "
                            f"{self.data_shape[0]} input channels); set model.checkpoint and run "
                            f"`{self.cfg.command('train')}` to fine-tune them to your data",
                            where=self.cfg.source, field="model.weights")
        return model

    def metric(self, model: nn.Module, batches: Iterable) -> float:
        """What the run maximises on held-out data: ``metric_value`` of the reward metric, or ``evaluate``'s value."""
        if self.evaluate is None:
            return metric_value(fp32_accuracy(model, batches), self.cfg.search.reward_metric)
        with torch.no_grad():
            value = self.evaluate(model.eval(), batches)
        if not isinstance(value, numbers.Real) and not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise UserError("evaluate(model, loader) must return a float (higher is better), "
                            f"got {type(value).__name__}")
        value = float(value)
        if self.cfg.search.protocol == "accuracy" and value > 1 and math.isfinite(value):
            raise UserError(f"evaluate returned {value:g}; the accuracy protocol's reward -(1 - metric) * log(FLOPs) "
                            "needs a metric <= 1 (like an accuracy): rescale it or use protocol: resource",
                            field="search.protocol")
        return value

    @property
    def metric_name(self) -> str:
        """``top1`` / ``top5`` / ``nll``, or ``evaluate`` for a given metric."""
        return self.cfg.search.reward_metric if self.evaluate is None else "evaluate"

    def split_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """``<split>_top1`` and ``<split>_top5``, or ``<split>_metric`` with a given ``evaluate``."""
        if self.evaluate is not None:
            return {f"{split}_metric": self.metric(model, self.loader(split))}
        acc = fp32_accuracy(model, self.loader(split))
        return {f"{split}_top1": acc["top1"], f"{split}_top5": acc["top5"]}

    @property
    def report_splits(self) -> tuple[str, ...]:
        """The splits a pruned model is measured on: the held-out ones, and test when there is one."""
        return self.held_out_splits + (("test",) if self.splits.test is not None else ())

    @property
    def held_out_splits(self) -> tuple[str, ...]:
        """The splits held out of training: reward-val, and the selection split when there is one."""
        return ("reward_val", "select") if self.cfg.data.select_size else ("reward_val",)

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None):
        dataset = getattr(self.splits, split)
        size = batch_size or (self.cfg.data.batch_size if shuffle else self.cfg.data.loader_batch_size)
        return make_loader(dataset, size, shuffle=shuffle, seed=self.cfg.seed, num_workers=self.cfg.data.num_workers)

    def graph(self, model: nn.Module) -> PrunableGraph:
        try:
            return find_units(model.cpu(), self.input_shape, self.cfg.search.prune_residual)
        except UserError as exc:  # the model the config names cannot be traced: the config's problem
            raise UserError(str(exc), where=self.cfg.source) from None

    @cached_property
    def base_space(self) -> Space:
        """The space of the base model, traced once (policies of a run all refer to it)."""
        return self.space(self.base_model)

    def space(self, model: nn.Module) -> Space:
        s = self.cfg.search
        graph = self.graph(model)
        model.to(self.device)
        if s.mode == "fine_grained":
            return FineGrainedSpace(model, graph)
        if s.mode in ("quantize", "joint"):
            from amc.quant_spaces import MixedPrecisionSpace

            channels = ChannelSpace(model, graph, "flops", s.round_to) if s.mode == "joint" else None
            return MixedPrecisionSpace(model, graph, s.resource, s.min_bits, s.max_bits, s.quantize_activations,
                                       self.reconstruction_images, channels,
                                       self.repair(model) if channels is not None else None)
        latency = None
        if s.resource == "latency":
            from amc.latency import LatencyModel

            latency = LatencyModel.for_model(model, graph, self.input_shape, self.cfg.latency, self.spec)
        return ChannelSpace(model, graph, s.resource, s.round_to, latency)

    def scorer(self, model: nn.Module) -> Scorer:
        """Scores policies of ``model``; its ``repair`` is also the one export applies."""
        s, d = self.cfg.search, self.cfg.data
        device = self.device
        reward = [to_device(batch, device) for batch in cached_batches(self.splits.reward_val, d.loader_batch_size)]
        repair = self.base_repair() if model is self.base_model else self.repair(model)
        # a cross-entropy's last bits depend on the batch size (top-k does not): nll keeps one for the run
        batch_size = None if d.eval_batch_size == "auto" and s.reward_metric != "nll" else d.loader_batch_size
        try:
            return Scorer(model, reward, repair, s.reward_metric, s.precision, batch_size,
                          evaluate=None if self.evaluate is None else self.metric,
                          fold=s.mode not in ("quantize", "joint"))
        except UserError as exc:
            raise UserError(str(exc), where=self.cfg.source) from None

    def repair(self, model: nn.Module, calibration_seed: int | None = None) -> Repair:
        """How pruned copies of ``model`` are repaired, for scoring and export alike.

        ``calibration_seed`` draws other calibration and reconstruction images than the run's.
        """
        s = self.cfg.search
        recon = None
        if s.calibration in ("lsq", "both"):
            recon = self.reconstruction_images(None if calibration_seed is None else calibration_seed + 1)
        calib = calibration_batches(self, seed=calibration_seed) if s.calibration in ("bn", "both") else []
        return Repair(model, s.calibration, calib, recon, self.cfg.seed, repair_dtype(s.precision, self.device),
                      s.reconstruct_ridge)

    def base_repair(self, calibration_seed: int | None = None) -> Repair:
        """``repair(base_model, calibration_seed)``, built once per seed: selection and export call it per policy."""
        if calibration_seed not in self._base_repairs:
            self._base_repairs[calibration_seed] = self.repair(self.base_model, calibration_seed)
        return self._base_repairs[calibration_seed]

    def reconstruction_images(self, seed: int | None = None) -> torch.Tensor:
        """A fixed sample of training images (never reward-val) for least-squares fits."""
        n = self.cfg.search.reconstruct_samples
        seed = self.cfg.seed + 1 if seed is None else seed
        batch = make_loader(self.splits.train_eval, n, shuffle=True, seed=seed)
        return next(iter(batch))[0].to(self.device)

    def env(self):
        from amc.envs import PruningEnv

        s = self.cfg.search
        model = self.base_model
        anchor = None
        if s.anchor != "none":
            from amc.baselines import baseline_policy

            anchor = baseline_policy(self.cfg, s.anchor, self)
        return PruningEnv(model, self.base_space, self.scorer(model), s.protocol, s.target, s.lbound, s.rbound,
                          s.fill_budget, s.state_history, anchor, s.anchor_spread)


def calibration_batches(workspace: Workspace, count: int | None = None, seed: int | None = None) -> list[torch.Tensor]:
    """The images that re-estimate BatchNorm statistics (adaptive BN), on the device.

    ``count`` batches (default ``search.calib_batches``) of ``data.batch_size`` training images,
    never reward-val ones, in the order of a shuffle seeded by the config's seed: every policy of
    a run, scored or exported, is calibrated on the same images (a smaller count takes the first
    of them). Shuffled because a training split may be sorted by class (``imagefolder``): its
    first batches would hold two or three classes, whose statistics fit no other class. Another
    ``seed`` draws another sample (to measure how much a score depends on it).
    """
    cfg = workspace.cfg
    count = cfg.search.calib_batches if count is None else count
    seed = cfg.seed if seed is None else seed
    batches = cached_batches(workspace.splits.train_eval, cfg.data.batch_size, limit=count, seed=seed)
    return [x.to(workspace.device) for x, _ in batches]


def env_from_config(config: str | Path | Config, overrides: list[str] | None = None):
    """Gymnasium entry point: ``gymnasium.make("amc/Pruning-v0", config="configs/x.yaml")``."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    return Workspace(cfg).env()  # seeds nothing global: the data split and calibration draw their own
