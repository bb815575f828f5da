"""Build the objects a config describes: device, data, base model, space, scorer, environment."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amc.checkpoint import BASE_FORMAT, load_checkpoint, load_state
from amc.config import Config, load_config
from amc.data import DataSplits, data_shape, load_splits, make_loader
from amc.errors import UserError
from amc.graph import PrunableGraph, find_units
from amc.models import build_model, model_spec
from amc.scoring import Scorer
from amc.spaces import ChannelSpace, FineGrainedSpace, Space


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


def cached_batches(dataset, batch_size: int, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` batches of ``dataset`` in a fixed order, held in memory."""
    batches = []
    for x, y in make_loader(dataset, batch_size, shuffle=False, seed=0):
        batches.append((x, y))
        if limit is not None and len(batches) >= limit:
            break
    return batches


@dataclass
class Workspace:
    """A config and the things built from it, each on first use."""

    cfg: Config

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @cached_property
    def splits(self) -> DataSplits:
        return load_splits(self.cfg.data, self.cfg.seed)

    @cached_property
    def data_shape(self) -> tuple[int, int]:
        """(input channels, classes), known without loading the data."""
        return data_shape(self.cfg.data)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        size = self.cfg.data.input_size
        return (1, self.data_shape[0], size, size)

    @property
    def spec(self) -> dict:
        m = self.cfg.model
        return model_spec(m.name, self.data_shape[1], self.data_shape[0], m.kwargs)

    def new_model(self) -> nn.Module:
        """The config's architecture, freshly initialised; a bad name or kwargs names the config."""
        m = self.cfg.model
        try:
            return build_model(m.name, self.data_shape[1], self.data_shape[0], m.kwargs)
        except UserError as exc:
            raise UserError(str(exc), where=self.cfg.source, field="model") from None

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.model.checkpoint)

    @cached_property
    def base_model(self) -> nn.Module:
        """The trained base model, in eval mode on the device."""
        path = self.checkpoint_path
        if not path.is_file():
            raise UserError(f"trained base model not found; run `amc train {self.cfg.source}` first",
                            where=str(path))
        model = self.new_model()  # a bad model name or import path is the config's fault, not the checkpoint's
        data = load_checkpoint(path, BASE_FORMAT)
        if data["spec"] != self.spec:
            raise UserError(f"holds a {data['spec']['name']} model for {data['spec']['num_classes']} classes, "
                            f"the config asks for {self.spec['name']} with {self.spec['num_classes']}", where=str(path))
        load_state(model, data["state_dict"], str(path))
        return model.to(self.device).eval()

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None):
        dataset = getattr(self.splits, split)
        size = batch_size or (self.cfg.data.batch_size if shuffle else self.cfg.data.eval_batch_size)
        return make_loader(dataset, size, shuffle=shuffle, seed=self.cfg.seed, num_workers=self.cfg.data.num_workers)

    def graph(self, model: nn.Module) -> PrunableGraph:
        return find_units(model.cpu(), self.input_shape, self.cfg.search.prune_residual)

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
        s, d = self.cfg.search, self.cfg.data
        device = self.device
        reward = [(x.to(device), y.to(device)) for x, y in cached_batches(self.splits.reward_val, d.eval_batch_size)]
        calib = [x.to(device) for x, _ in cached_batches(
            self.splits.train_eval, d.batch_size, limit=s.calib_batches)] if s.calib_batches else []
        recon = None
        if s.calibration in ("lsq", "both"):
            recon = self.reconstruction_images()
        return Scorer(model, reward, calib, recon, s.calibration, s.reward_metric, self.cfg.seed)

    def repair(self, model: nn.Module) -> Callable[[nn.Module, dict], None]:
        """Repair a pruned copy of ``model`` in place as scoring does (``search.calibration``); built on first use."""
        scorer = cache(lambda: self.scorer(model))
        return lambda pruned, refit_layers: scorer().calibrate(pruned, refit_layers, {})

    def reconstruction_images(self) -> torch.Tensor:
        """A fixed sample of training images (never reward-val) for least-squares fits."""
        n = self.cfg.search.reconstruct_samples
        batch = make_loader(self.splits.train_eval, n, shuffle=True, seed=self.cfg.seed + 1)
        return next(iter(batch))[0].to(self.device)

    def env(self):
        from amc.envs import PruningEnv

        s = self.cfg.search
        model = self.base_model
        return PruningEnv(model, self.space(model), self.scorer(model), s.protocol, s.target, s.lbound, s.rbound,
                          s.fill_budget)


def env_from_config(config: str | Path | Config, overrides: list[str] | None = None):
    """Gymnasium entry point: ``gymnasium.make("amc/Pruning-v0", config="configs/x.yaml")``."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    seed_everything(cfg.seed)
    return Workspace(cfg).env()
