"""The search run: AMC's episode loop in rounds, its run directory, and exact resume.

A round is ``search.workers`` episodes (1 by default: AMC's serial loop). Read top to bottom,
one round is: the agent walks each episode's units in turn (uniform random during warmup, then
actor + truncated-normal noise whose sigma decays per episode); the round's final policies are
scored together, in this process or by parallel workers (``amc.parallel``); every episode's
transitions are stored in episode order (they all receive the episode's final reward); the
agent takes one gradient step per transition of each post-warmup episode; then each episode's
row is appended, the best policy kept, and the agent saved once for the round.

Crash safety: a round's rows are appended only once all its policies are scored, and before the
agent checkpoint is replaced, so after a kill the checkpoint is never ahead of episodes.csv;
resume trims rows past the checkpoint's episode count and replays those rounds, which are
deterministic given the saved RNG states.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from amc.agents import AMCDDPG, rng_state, set_rng_state
from amc.checkpoint import AGENT_FORMAT, load_checkpoint, save_checkpoint
from amc.config import Config, config_from_dict, read_yaml
from amc.envs import Episode, walk
from amc.errors import UserError
from amc.factory import Workspace, seed_everything
from amc.fidelity import check_fidelity
from amc.files import atomic_write_json, atomic_write_text
from amc.parallel import Backend, WorkerError, open_backend
from amc.selection import (Candidate, as_records, mean_candidate, reward_noise, rule_candidates, select,
                           top_policies)

CONFIG_FILE = "config.yaml"
EPISODES_FILE = "episodes.csv"
BEST_FILE = "best_policy.json"
AGENT_FILE = "agent.pt"
FIDELITY_FILE = "fidelity.json"
MIN_FREE_BYTES = 64 * 2**20
# What may change when a run is continued: its length, and where its scoring runs (a worker that
# timed out may need a longer timeout; a run may move to a machine with more cores, a cluster, or
# from a GPU to a CPU).
RESUMABLE = ("search.episodes", "device", "search.workers", "search.backend", "search.worker_threads",
             "search.worker_timeout", "ray.address")
# Where the run folder is: a run may be moved or copied (e.g. to branch a finished search into a
# longer one) and continued in its new place.
LOCATION = ("search.run_dir",)
# Fields added after runs were recorded whose default differs from what those runs did: a run's
# config.yaml without one is read with the value the run used (its scores and export stay as searched).
LEGACY_VALUES = {"search": {"reconstruct_ridge": 0.0}}
METRIC_COLUMNS = ["episode", "reward", "error", "cost_ratio", "macs_ratio", "params_ratio", "latency_ms_ratio",
                  "sigma", "seconds", "calibrate_seconds", "eval_seconds"]


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}")
    return diffs


def check_writable(run_dir: Path) -> None:
    """Fail at start, not after an hour, when the run directory cannot take our files."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run directory is not writable ({exc.strerror})", where=str(run_dir)) from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"only {free // 2**20} MiB free on the run directory's disk, need {MIN_FREE_BYTES // 2**20}",
                        where=str(run_dir))


def read_run_yaml(path: Path) -> Any:
    """A run's config.yaml as recorded, with ``LEGACY_VALUES`` for the fields it predates."""
    raw = read_yaml(path)
    if isinstance(raw, dict):
        for section, fields in LEGACY_VALUES.items():
            if isinstance(raw.get(section), dict):
                for name, value in fields.items():
                    raw[section].setdefault(name, value)
    return raw


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with; only ``RESUMABLE`` fields may be changed on resume."""
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise UserError("no such run directory", where=str(run_dir))
    if not path.is_file():
        raise UserError("not a run directory (no config.yaml)", where=str(run_dir))
    raw = read_run_yaml(path)
    search_section = raw.get("search") if isinstance(raw, dict) else None
    if isinstance(search_section, dict) and search_section.get("run_dir"):  # the folder may have moved since
        search_section["run_dir"] = str(run_dir)
    cfg = config_from_dict(raw, source=str(path))
    if overrides:
        changed = config_from_dict(cfg.to_dict(), source=str(path), overrides=overrides)
        refuse_changes(cfg.to_dict(), changed.to_dict(), run_dir)
        cfg = changed
    return cfg


def episodes_done(run_dir: Path) -> int:
    """The episodes a run has (its agent checkpoint's count; 0 before the first round ended)."""
    path = run_dir / AGENT_FILE
    return int(load_checkpoint(path, AGENT_FORMAT)["episodes"]) if path.is_file() else 0


def refuse_changes(old: dict, new: dict, run_dir: Path) -> None:
    """Refuse a continued run whose config differs from its start in what shapes its episodes.

    The warmup length may change while all the run's episodes are warmup under both lengths: those
    episodes, the noise (it decays only after warmup) and the untrained agent are then exactly what
    a run started with the new length has. So random search (every episode warmup) continues to
    more episodes."""
    diffs = [d for d in config_differences(old, new) if d not in RESUMABLE + LOCATION]
    warmups = [config.get("agent", {}).get("warmup_episodes") for config in (old, new)]
    if "agent.warmup_episodes" in diffs and None not in warmups and episodes_done(run_dir) <= min(warmups):
        diffs.remove("agent.warmup_episodes")
    if diffs:
        raise UserError(f"config differs from the run's in {', '.join(diffs)}; only search.episodes and where "
                        f"the scoring runs ({', '.join(RESUMABLE[1:])}) may change on resume "
                        f"(start a new run directory instead)", where=str(run_dir / CONFIG_FILE))


def _trim_rows(path: Path, header: list[str], keep: int) -> None:
    """Keep the header and the first ``keep`` complete rows of episodes.csv (atomically)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    rows = [line for line in lines[1:] if line.endswith("\n")][:keep]
    if len(rows) < keep:
        raise UserError(f"has {len(rows)} episodes but the agent checkpoint has {keep}", where=str(path))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(header)
    atomic_write_text(path, out.getvalue() + "".join(rows))


def _append_row(path: Path, row: list) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(row)
        f.flush()


def _format(value) -> str:
    return "" if value is None else (repr(float(value)) if isinstance(value, float) else str(value))


@dataclass
class Proposal:
    """One episode of a round: the policy walked and the exploration it was walked with."""

    episode: int
    warmup: bool
    sigma: float
    played: Episode


def propose(agent: AMCDDPG, env, episodes: range, warmup_episodes: int) -> list[Proposal]:
    """Walk one policy per episode, drawing from the agent's RNGs in episode order.

    Uniform random during warmup, else the actor's output plus noise; sigma decays after every
    episode, so the N policies of a round explore with N successive sigmas as N serial episodes would.
    """
    proposals = []
    for episode in episodes:
        warmup = episode < warmup_episodes
        if not warmup:
            agent.end_warmup()
        sigma = agent.noise.sigma
        played = walk(env, lambda obs: agent.act(obs, warmup))  # noqa: B023 (called at once)
        proposals.append(Proposal(episode, warmup, sigma, played))
        agent.noise.reset()
    return proposals


def episode_metrics(p: Proposal, seconds: float, num_units: int) -> tuple[dict, list]:
    """The episode's row values and its per-unit ratios."""
    info, timings = p.played.info, p.played.info.get("timings", {})
    metrics = {"episode": p.episode, "reward": p.played.reward, "error": info.get("error", 1.0),
               "cost_ratio": info.get("cost_ratio"), "macs_ratio": info.get("macs_ratio"),
               "params_ratio": info.get("params_ratio"), "latency_ms_ratio": info.get("latency_ms_ratio"),
               "sigma": p.sigma, "seconds": seconds,
               "calibrate_seconds": timings.get("calibrate", 0.0) + timings.get("reconstruct", 0.0),
               "eval_seconds": timings.get("eval", 0.0)}
    return metrics, info.get("ratios", [None] * num_units)


def better(best: dict | None, p: Proposal, cfg: Config, env) -> dict | None:
    """The new best policy if episode ``p`` is within budget and beats ``best``, else None."""
    info, reward = p.played.info, p.played.reward
    within = cfg.search.protocol == "accuracy" or (
        info.get("cost_ratio") is not None and info["cost_ratio"] <= cfg.search.target + 1e-9)
    if not within or "keep" not in info or (best is not None and reward <= best["reward"]):
        return None
    return {"episode": p.episode, "reward": reward, "error": info["error"], **policy_record(env, info["keep"], cfg)}


def search(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
           workspace: Workspace | None = None, backend: Backend | None = None) -> dict:
    """Run (or continue) the search to ``cfg.search.episodes`` episodes, then choose the run's answer.

    ``workspace``: one built from ``cfg`` with objects given from Python (``amc.compress``).
    ``backend`` replaces the scoring backend the config asks for (the caller then closes it).
    """
    config_path, agent_path = run_dir / CONFIG_FILE, run_dir / AGENT_FILE
    if agent_path.exists():  # every caller (CLI, `amc run`, benchmarks, the API) passes through here
        # validated, so fields added since the run started compare as their defaults
        old = config_from_dict(read_run_yaml(config_path), str(config_path)).to_dict() if config_path.is_file() else {}
        refuse_changes(old, cfg.to_dict(), run_dir)
        if not resume:
            raise UserError(f"already holds a search; continue it with `amc search --resume {run_dir}` "
                            "or choose another run directory", where=str(run_dir))

    seed_everything(cfg.seed)
    workspace = workspace or Workspace(cfg)
    env = workspace.env()  # every input problem (model, data, budget) surfaces here, before any file is written
    fidelity = check_fidelity(env)  # reward precision: reduced where it ranks as fp32 does
    # workers score at the precision the check chose; a backend that cannot start fails before any
    # file is written, and starting Ray may draw from the global RNGs, so before the agent is seeded
    scoring = backend or open_backend(with_precision(cfg, env.scorer.precision), env, workspace.device)
    try:
        check_writable(run_dir)
        atomic_write_json(run_dir / FIDELITY_FILE, fidelity)
        _rounds(cfg, run_dir, resume, progress, workspace, env, scoring)
    except WorkerError as exc:
        saved = episodes_done(run_dir)
        raise WorkerError(f"{exc}; the run keeps its first {saved} episodes: continue it with "
                          f"`amc search --resume {run_dir}`", where=str(run_dir)) from None
    finally:
        if backend is None:
            scoring.close()
    answer = choose_answer(workspace, env, run_dir, progress)
    atomic_write_json(run_dir / BEST_FILE, answer)
    return answer


def with_precision(cfg: Config, precision: str) -> Config:
    """``cfg`` with the reward precision fixed (what the fidelity check chose in the main process)."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"precision": precision})})


def _rounds(cfg: Config, run_dir: Path, resume: bool, progress: bool, workspace: Workspace, env,
            scoring: Backend) -> None:
    """The search loop proper: rounds of ``search.workers`` episodes, recorded in episode order."""
    csv_path, agent_path = run_dir / EPISODES_FILE, run_dir / AGENT_FILE
    agent_seed = cfg.seed if cfg.agent.seed is None else cfg.agent.seed  # the data split keeps cfg.seed
    seed_everything(agent_seed)
    agent = AMCDDPG(env, cfg.agent, env.num_units, seed=agent_seed, device=str(workspace.device))
    header = METRIC_COLUMNS + env.space.names
    start, best = 0, None
    if resume and agent_path.is_file():  # killed before the first round ended: start over
        state = load_checkpoint(agent_path, AGENT_FORMAT)
        agent.load_state_dict(state["agent"])
        set_rng_state(state["rng"])
        start, best = int(state["episodes"]), state["best"]
        if cfg.search.episodes < start:
            raise UserError(f"the run already has {start} episodes; ask for at least that many "
                            f"(search.episodes is {cfg.search.episodes})", where=str(run_dir))
    _trim_rows(csv_path, header, start)
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if best is not None:
        atomic_write_json(run_dir / BEST_FILE, best)

    total, workers = cfg.search.episodes, cfg.search.workers
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start)
    bar = tqdm(total=total, initial=start, desc="search", disable=not progress, dynamic_ncols=True)
    try:
        for first in range(start, total, workers):
            began = time.perf_counter()
            proposals = propose(agent, env, range(first, min(first + workers, total)), cfg.agent.warmup_episodes)
            scored = scoring.score([(p.episode, p.played.keep) for p in proposals if p.played.keep is not None])
            for p in proposals:
                if p.played.reward is None:
                    p.played.score(*scored[p.episode])
                for transition in p.played.transitions:
                    agent.store(*transition)
            for p in proposals:
                if not p.warmup:
                    agent.learn_episode()

            seconds = (time.perf_counter() - began) / len(proposals)  # the rows' seconds sum to the wall time
            improved = False
            for p in proposals:
                metrics, ratios = episode_metrics(p, seconds, env.num_units)
                _append_row(csv_path, [_format(metrics[c]) for c in METRIC_COLUMNS] + [_format(r) for r in ratios])
                for name in ("reward", "error", "cost_ratio"):
                    if metrics[name] is not None:
                        writer.add_scalar(f"episode/{name}", metrics[name], p.episode)
                if (candidate := better(best, p, cfg, env)) is not None:
                    best, improved = candidate, True
            if improved:
                atomic_write_json(run_dir / BEST_FILE, best)
            save_checkpoint(agent_path, AGENT_FORMAT, {
                "agent": agent.state_dict(), "rng": rng_state(), "episodes": proposals[-1].episode + 1, "best": best})
            bar.update(len(proposals))
            if best is not None:
                bar.set_postfix(best=f"{best['reward']:.4f}", error=f"{best['error']:.3f}")
    finally:
        bar.close()
        writer.close()
    if best is None:
        raise UserError("no episode met the budget", where=str(run_dir))


def policy_record(env, keep: list[int], cfg: Config) -> dict:
    """What best_policy.json says about a policy besides its scores."""
    space = env.space
    measures = space.measures(keep)
    return {"units": space.names, "keep": list(keep), "ratios": [k / s for k, s in zip(keep, space.sizes)],
            "cost_ratio": space.cost(keep) / env.full_cost,
            **{f"{name}_ratio": value / env.full_measures[name] for name, value in measures.items()},
            "mode": cfg.search.mode, "resource": cfg.search.resource, "target": cfg.search.target}


def choose_answer(workspace: Workspace, env, run_dir: Path, progress: bool = True) -> dict:
    """The run's answer: the top-K policies by reward, their mean and the rules, scored on the selection split.

    See amc/selection.py for why. With ``data.select_size: 0`` the candidates are compared on
    reward-val, where the search's own candidates carry their selection bias (recorded).
    """
    cfg = workspace.cfg
    split = "select" if cfg.data.select_size else "reward_val"
    candidates = selection_candidates(workspace, env, read_episodes(run_dir))
    for candidate in candidates:  # the added ones scored as the search scores, so the rewards say
        if candidate.reward is None:  # whether the search beat the rules
            candidate.reward = env.evaluate(candidate.keep)[0]
    winner, margin = select(workspace, candidates, protocol_reward(env), split, progress, cfg.search.select_margin)
    noise = reward_noise(workspace, winner.keep, seed=cfg.seed)
    return {"source": winner.source, "episode": winner.episode, "reward": winner.reward,
            "error": noise["reward_val_error"], **policy_record(env, winner.keep, cfg),
            "selection": {"split": split, "metric": workspace.metric_name, "candidates": as_records(candidates),
                          **({"margin": margin} if margin else {})},
            "noise": noise}


def selection_candidates(workspace: Workspace, env, rows: list[dict], k: int | None = None) -> list[Candidate]:
    """The selection step's candidates from episodes ``rows``: the top-K distinct policies by reward
    (their rewards from the episodes; K is ``search.select_top_k`` unless ``k`` is given), their
    mean and the rules at the budget (no reward yet)."""
    top = top_policies(rows, env.space.names, env.space.sizes, k or workspace.cfg.search.select_top_k)
    return top + [c for c in (mean_candidate(top, env), *rule_candidates(workspace)) if c is not None]


def protocol_reward(env) -> Callable[[float, list[int]], float]:
    """``reward_of(error, keep)`` for ``select``: the episode's reward for that error at that policy's cost."""
    space = env.space
    return lambda error, keep: env.reward_fn(error, space.measures(keep)[space.reward_measure])


def read_episodes(run_dir: Path) -> list[dict]:
    with open(run_dir / EPISODES_FILE, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in csv.DictReader(f)]
