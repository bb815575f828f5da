"""YAML config -> validated, typed ``Config``.

Every section is a pydantic model that forbids unknown keys, so a typo is an error rather than
a silently ignored setting. ``load_config`` turns every validation problem into a one-line
``UserError`` naming the file, the dotted field and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amc.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(description="zoo name, 'torchvision:<name>', or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str = Field(description="trained weights of the base model (written by `amc train`)")


class DataConfig(Section):
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"]
    root: str | None = None
    input_size: int = Field(gt=0, description="images are padded or resized to this side length")
    mean: list[float] | None = None
    std: list[float] | None = None
    reward_val_size: int = Field(gt=0, description="images held out of the training split to score policies")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(0, ge=0)
    augment: bool = True

    @model_validator(mode="after")
    def _mean_std(self) -> "DataConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std entries must be > 0")
        return self


class TrainConfig(Section):
    epochs: int = Field(30, gt=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class SearchConfig(Section):
    protocol: Literal["resource", "accuracy"] = "resource"
    mode: Literal["channel", "fine_grained"] = "channel"
    resource: Literal["flops", "params", "latency"] = "flops"
    target: float = Field(0.5, gt=0, le=1, description="fraction of the original resource to keep")
    lbound: float = Field(0.2, gt=0, le=1)
    rbound: float = Field(1.0, gt=0, le=1)
    round_to: int = Field(1, gt=0)
    episodes: int = Field(300, gt=0)
    prune_residual: bool = False
    fill_budget: bool = Field(True, description=(
        "resource protocol: after the last unit, spread unused budget over the units (false: AMC's clipping only)"))
    calibration: Literal["bn", "lsq", "both", "none"] = "bn"
    calib_batches: int = Field(16, ge=0)
    reconstruct_samples: int = Field(
        512, gt=0, description="images whose feature maps fit the least-squares reconstruction"
    )
    reward_metric: Literal["top1", "top5"] = "top1"
    run_dir: str | None = None
    workers: int = Field(1, gt=0, description="episodes per round, scored in parallel (1: in this process)")
    backend: Literal["local", "ray"] = Field("local", description="where workers run: local processes or Ray actors")
    worker_threads: int | None = Field(None, gt=0, description="torch threads per worker (default: cores / workers)")
    worker_timeout: float = Field(600.0, gt=0, description=(
        "seconds a worker may take to score one policy (to start: at least 300) before the search stops, resumably"))

    @model_validator(mode="after")
    def _bounds(self) -> "SearchConfig":
        if self.lbound > self.rbound:
            raise ValueError(f"lbound ({self.lbound}) must be <= rbound ({self.rbound})")
        if self.mode == "fine_grained" and self.resource != "params":
            raise ValueError("fine_grained mode budgets non-zero parameters: set resource: params")
        return self


class AgentConfig(Section):
    seed: int | None = Field(None, description="seed of the agent and its exploration (default: the top-level seed)")
    hidden: list[int] = Field(default_factory=lambda: [300, 300], min_length=1)
    actor_lr: float = Field(1e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    tau: float = Field(0.01, gt=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    batch_size: int = Field(64, gt=0)
    buffer_episodes: int = Field(100, gt=0)
    warmup_episodes: int = Field(100, ge=0)
    noise_sigma: float = Field(0.5, ge=0)
    noise_decay: float = Field(0.95, gt=0, le=1)
    baseline_alpha: float = Field(0.5, ge=0, le=1)


class FinetuneConfig(Section):
    epochs: int = Field(10, ge=0)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    distill: bool = False
    temperature: float = Field(4.0, gt=0)
    distill_weight: float = Field(0.9, ge=0, le=1)


class LatencyConfig(Section):
    batch_size: int = Field(1, gt=0)
    threads: int = Field(1, gt=0)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(20, gt=0)


class RayConfig(Section):
    address: str | None = Field(None, description="a Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")


class Config(Section):
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    source: str = Field("<memory>", exclude=True, description="the file this config came from")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<top level>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg}, got {err['input']!r}"
    return f"{field}: {msg.removeprefix('Value error, ')}"


def config_from_dict(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a plain dict; the first problem becomes a ``UserError`` naming ``source``."""
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of sections", where=source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_error(exc.errors()[0]), where=source) from None
    cfg.source = source
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"search.target=0.3"`` -> (["search", "target"], 0.3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key.sub=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError("config file not found", where=str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read config: {exc.strerror}", where=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{line}invalid YAML: {getattr(exc, 'problem', exc)}", where=str(path)) from None
    return raw if raw is not None else {}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return config_from_dict(raw, source=str(path))


def run_dir_for(cfg: Config) -> Path:
    """The search run directory: ``search.run_dir`` or ``runs/<config file stem>``."""
    if cfg.search.run_dir:
        return Path(cfg.search.run_dir)
    return Path("runs") / Path(cfg.source).stem
