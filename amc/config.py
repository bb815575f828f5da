"""YAML config -> validated, typed ``Config``.

Every section is a pydantic model that forbids unknown keys, so a typo is an error rather than
a silently ignored setting. ``load_config`` turns every validation problem into a one-line
``UserError`` naming the file, the dotted field and the problem.
"""

from __future__ import annotations

import copy
import difflib
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amc.errors import UserError


DEFAULT_EVAL_BATCH_SIZE = 512
RECONSTRUCT_RIDGE = 1e-2  # search.reconstruct_ridge; runs recorded before it existed fit with 0


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The data sets amc reads itself; any other data comes from a 'package.module:factory'.
BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
# Model and data names of objects handed to ``amc.compress``: recorded in a run's config, never rebuilt from it.
OBJECT_PREFIX = "python:"
PRETRAINED_PREFIXES = ("torchvision:", "timm:")


def is_import_path(name: str) -> bool:
    """``package.module:attr`` (dotted identifiers on both sides of one colon)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and all(part.isidentifier() for text in (module, attr) for part in text.split("."))


class ModelConfig(Section):
    name: str = Field(description="zoo name, 'torchvision:<name>', 'timm:<name>' or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = Field(None, description=(
        "trained weights of the base model: an amc checkpoint (written by `amc train`), a plain "
        "state_dict (.pt/.pth) or a .safetensors file"))
    weights: str | None = Field(None, description=(
        "pretrained weights of a torchvision: or timm: model: DEFAULT or a weights name (torchvision's enum, "
        "timm's tag); the base model itself when there is no checkpoint, the starting point of `amc train` otherwise"))

    @model_validator(mode="after")
    def _weights(self) -> "ModelConfig":
        if self.weights is not None and not self.name.strip().startswith(PRETRAINED_PREFIXES):
            raise ValueError("weights: only torchvision:<name> and timm:<name> models have pretrained weights; "
                             "give your own as model.checkpoint")
        return self


class DataConfig(Section):
    name: str = Field(description=f"{', '.join(BUILTIN_DATASETS)}, or 'package.module:factory' returning "
                                  "(train, test, num_classes, in_channels)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a data factory")
    root: str | None = None
    input_size: int | None = Field(None, gt=0, description=(
        "built-in data sets: images are padded or resized to this side length (other data: its own sample shape)"))
    mean: list[float] | None = None
    std: list[float] | None = None
    reward_val_size: int = Field(gt=0, description="images held out of the training split to score policies")
    select_size: int = Field(0, ge=0, description=(
        "images held out of the training split (disjoint from reward-val) to choose the run's answer "
        "among the best policies and the rules; 0: choose on reward-val"))
    reward_images: int | None = Field(None, gt=0, description=(
        "score policies on the first N reward-val images (default: all): faster episodes, noisier rewards; "
        "the rest stay held out, so the base model's split is unchanged"))
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int | Literal["auto"] = Field(
        "auto", description="batch size of evaluation passes; auto: the fastest, measured per model for rewards")
    num_workers: int = Field(0, ge=0)
    augment: bool = True

    @field_validator("eval_batch_size", mode="before")
    @classmethod
    def _eval_batch_size(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"must be a positive integer or auto, got {value!r}")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        name = name.strip()
        if name in BUILTIN_DATASETS or is_import_path(name) or name.startswith(OBJECT_PREFIX):
            return name
        close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown data set {name!r}; {hint}built in: {', '.join(BUILTIN_DATASETS)}; or your own "
                         "as 'package.module:factory'")

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_DATASETS

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> "DataConfig":
        if self.builtin:
            if self.input_size is None:
                raise ValueError(f"input_size: required for the built-in data set {self.name}")
            if self.kwargs:
                raise ValueError("kwargs: only a data factory ('package.module:factory') takes kwargs")
        elif self.mean is not None or self.root is not None or self.input_size is not None:
            field = next(f for f in ("mean", "root", "input_size") if getattr(self, f) is not None)
            raise ValueError(f"{field}: applies to the built-in data sets only; your factory prepares its own data")
        return self

    @model_validator(mode="after")
    def _mean_std(self) -> "DataConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std entries must be > 0")
        return self

    @property
    def loader_batch_size(self) -> int:
        """The batch size of data loaders over evaluation splits (``auto`` measures only rewards)."""
        return DEFAULT_EVAL_BATCH_SIZE if self.eval_batch_size == "auto" else self.eval_batch_size


class TrainConfig(Section):
    epochs: int = Field(30, gt=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class SearchConfig(Section):
    protocol: Literal["resource", "accuracy"] = "resource"
    mode: Literal["channel", "fine_grained", "quantize", "joint"] = "channel"
    resource: Literal["flops", "params", "latency", "size", "bitops"] = Field("flops", description=(
        "size: bits of the packed weight codes; bitops: MACs x weight bits x activation bits (quantize, joint)"))
    target: float = Field(0.5, gt=0, le=1, description="fraction of the original resource to keep")
    lbound: float = Field(0.2, gt=0, le=1)
    rbound: float = Field(1.0, gt=0, le=1)
    round_to: int = Field(1, gt=0)
    episodes: int = Field(300, gt=0)
    prune_residual: bool = False
    fill_budget: bool = Field(True, description=(
        "resource protocol: after the last unit, spread unused budget over the units (false: AMC's clipping only)"))
    state_history: bool = Field(False, description=(
        "append every earlier step's value (0 for the steps not yet taken) to the paper's 11 state features, "
        "so the agent sees which units were cut, not only how much cost was removed"))
    anchor: Literal["none", "uniform", "global"] = Field("none", description=(
        "resource protocol, channel / fine_grained: the middle action (0.5) picks this rule's value at the budget "
        "and the action range spans anchor_spread octaves around it (within lbound..rbound), so the search, "
        "warmup included, explores near the rule instead of anywhere (none: the paper's lbound..rbound range)"))
    anchor_spread: float = Field(1.0, gt=0, description="octaves each way of an anchored action range (1: x0.5 to x2)")
    calibration: Literal["bn", "lsq", "both", "none"] = "bn"
    calib_batches: int = Field(16, ge=0)
    reconstruct_samples: int = Field(
        1024, gt=0, description=(
            "images whose feature maps fit the least-squares reconstruction (and calibrate activation ranges); "
            "256 overfits the deep, small-map layers and makes the reward noisy (docs/benchmarks.md, session 6)")
    )
    reconstruct_ridge: float = Field(
        RECONSTRUCT_RIDGE, ge=0, description=(
            "least squares pulls each refit layer toward its pruned weights with this weight (relative to the "
            "inputs' mean square): plain least squares (0) can fit the reconstruction images with huge, "
            "cancelling weights (docs/benchmarks.md, session 9)"))
    min_bits: int = Field(2, ge=2, le=8, description="quantize / joint: the narrowest bit width a step may take")
    max_bits: int = Field(8, ge=2, le=8, description="quantize / joint: the widest bit width a step may take")
    quantize_activations: bool = Field(False, description=(
        "quantize / joint: also search each layer's input bit width (HAQ); otherwise inputs stay fp32"))
    reward_metric: Literal["top1", "top5", "nll"] = Field("top1", description=(
        "what rewards and the selection step measure: top-1 / top-5 accuracy (error = 1 - accuracy), or nll, "
        "the mean cross-entropy of the true class (error = cross-entropy): it moves with every image's margin, "
        "not only with the images that change sides, so it tells close policies apart with less noise"))
    select_top_k: int = Field(10, ge=1, description="distinct best policies re-scored on the selection split")
    select_margin: float = Field(2.0, ge=0, description=(
        "a searched policy replaces the best rule as the answer only if it leads it on the selection split by "
        "more than this many standard errors of their paired difference (0: the plain maximum)"))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "precision of reward evaluations; auto: the fastest the hardware runs natively that passes the fidelity "
        "check against fp32 (results users read are always fp32)"))
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
        bits_mode = self.mode in ("quantize", "joint")
        if bits_mode and self.resource not in ("size", "bitops"):
            raise ValueError(f"{self.mode} mode budgets bit widths: set resource: size or bitops")
        if not bits_mode and self.resource in ("size", "bitops"):
            raise ValueError(f"resource {self.resource} prices bit widths: set mode: quantize or joint")
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must be <= max_bits ({self.max_bits})")
        if self.quantize_activations and not bits_mode:
            raise ValueError("quantize_activations needs mode: quantize or joint")
        if self.anchor != "none" and (self.protocol != "resource" or bits_mode):
            raise ValueError(f"anchor: {self.anchor} centres the walk on a rule's policy at the budget: "
                             "it needs protocol: resource and mode: channel or fine_grained")
        return self


# Agent presets: values a preset fills in for the fields a config leaves out. "default" is this
# project's agent (the field defaults below); "amc" is the official AMC code's DDPG, which credits
# every step with the episode's reward and also bootstraps across steps (gamma 1), and decays
# its exploration by 0.95 per episode. docs/benchmarks.md measures the two against random search.
AGENT_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "amc": {"gamma": 1.0, "noise_decay": 0.95},
}


class AgentConfig(Section):
    preset: Literal["default", "amc"] = Field("default", description=(
        "default: gamma 0 (each step regresses on its episode's reward), noise decay 0.99; "
        "amc: the official code's gamma 1 and noise decay 0.95. Applied when the config is built; "
        "fields set explicitly win"))
    seed: int | None = Field(None, description="seed of the agent and its exploration (default: the top-level seed)")
    algorithm: Literal["ddpg", "td3"] = Field("ddpg", description=(
        "ddpg: AMC's agent; td3: twin critics, delayed actor updates, target smoothing"))
    hidden: list[int] = Field(default_factory=lambda: [300, 300], min_length=1)
    actor_lr: float = Field(1e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    tau: float = Field(0.01, gt=0, le=1)
    gamma: float = Field(0.0, ge=0, le=1, description=(
        "discount across steps; every step is credited with its episode's final reward, so 0 makes each "
        "step's value that reward itself and 1 (AMC) adds the bootstrapped value of the steps after it"))
    batch_size: int = Field(64, gt=0)
    buffer_episodes: int = Field(100, gt=0)
    warmup_episodes: int = Field(100, ge=0)
    noise_sigma: float = Field(0.5, ge=0)
    noise_decay: float = Field(0.99, gt=0, le=1, description="sigma's factor per episode after warmup")
    baseline_alpha: float = Field(0.5, ge=0, le=1)
    clone_top_k: int = Field(0, ge=0, description=(
        "when warmup ends, fit the actor to the actions of the best k warmup episodes (behaviour "
        "cloning), so the agent starts from the policy they share; 0 (AMC): start from the untrained actor"))

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        preset = data.get("preset", "default") if isinstance(data, dict) else None
        return {**AGENT_PRESETS[preset], **data} if preset in AGENT_PRESETS else data


class FinetuneConfig(Section):
    epochs: int = Field(10, ge=0)
    max_steps: int | None = Field(None, gt=0, description=(
        "stop after this many SGD steps (the cosine schedule ends there); default: all of the epochs"))
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    distill: bool = False
    temperature: float = Field(4.0, gt=0)
    distill_weight: float = Field(0.9, ge=0, le=1)


class LatencyConfig(Section):
    batch_size: int = Field(1, gt=0, description="batch of the latency budget and of the reported latency_ms")
    large_batch: int = Field(64, gt=0, description="a second batch, reported as latency_ms_b<large_batch>")
    threads: int = Field(1, gt=0)
    warmup: int = Field(5, ge=0, description="untimed passes before timing")
    repeats: int = Field(20, gt=0, description="timed samples; the median is reported")


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
    overrides: list[str] = Field(default_factory=list, exclude=True, description="the --set KEY=VALUE applied")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def command(self, name: str) -> str:
        """The shell command running ``amc NAME`` on this config with its ``--set`` overrides (for hints)."""
        return shlex.join(["amc", name, self.source, *(arg for o in self.overrides for arg in ("--set", o))])


# DataSplits attributes `amc eval --split` may name (a held-out selection split is one more entry)
EVAL_SPLITS = ("reward_val", "select", "test")
# What `amc export --set` may change in a run's config: where the data lives, the device and how the
# result is measured; never what decides the exported weights (model, data, search, seed).
EXPORT_SETTABLE = ("device", "data.root", "data.num_workers", "data.eval_batch_size", "latency")


def _known_fields(loc: Sequence[str | int]) -> list[str]:
    """The user-settable field names of the section at ``loc`` (empty when it is not a section)."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _did_you_mean(loc: Sequence[str | int]) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc[:-1]), n=1)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""


def _format_error(err: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<top level>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(err["loc"])
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg}, got {err['input']!r}"
    return f"{field}: {msg.removeprefix('Value error, ')}"


def config_from_dict(raw: dict[str, Any], source: str = "<memory>", overrides: Sequence[str] = ()) -> Config:
    """Validate a plain dict with ``--set`` overrides applied (``raw`` is not changed).

    The first problem becomes a ``UserError`` naming the ``--set`` that caused it, else ``source``.
    """
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of sections", where=source)
    try:
        cfg = Config.model_validate(apply_overrides(copy.deepcopy(raw), overrides))
    except ValidationError as exc:
        err = exc.errors()[0]
        culprit = _blame(err["loc"], raw, overrides)
        raise UserError(_format_error(err), where=f"--set {culprit}" if culprit else source) from None
    cfg.source = source
    cfg.overrides = list(overrides)
    return cfg


def _blame(loc: Sequence[str | int], raw: dict[str, Any], overrides: Sequence[str]) -> str | None:
    """The override that caused an error at ``loc``, or None when the file did.

    An override that wrote the field (or a parent of it) is to blame. One that wrote inside the
    field (a section validator's error, an unknown key it created) is, unless the file alone
    already fails there.
    """
    loc = [str(p) for p in loc]
    paths = [(text, parse_override(text)[0]) for text in reversed(overrides)]  # the last --set of a key wins
    for text, path in paths:
        if loc[:len(path)] == path:
            return text
    inside = [text for text, path in paths if loc and path[:len(loc)] == loc]
    if not inside:
        return None
    try:
        Config.model_validate(raw)
    except ValidationError as exc:
        if any([str(p) for p in e["loc"]] == loc for e in exc.errors()):
            return None
    return inside[0]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"search.target=0.3"`` -> (["search", "target"], 0.3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key.sub=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"--set {text}: the value is not valid YAML") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Write each ``key.sub=value`` into ``raw`` (in place) and return it."""
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


def load_config(path: str | Path, overrides: Sequence[str] | None = None) -> Config:
    return config_from_dict(read_yaml(path), str(path), overrides or ())


def run_dir_for(cfg: Config) -> Path:
    """The search run directory: ``search.run_dir`` or ``runs/<config file stem>``."""
    if cfg.search.run_dir:
        return Path(cfg.search.run_dir)
    return Path("runs") / Path(cfg.source).stem
