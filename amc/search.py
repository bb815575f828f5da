"""The search run: AMC's episode loop, its run directory, and exact resume.

Read top to bottom, one episode is: reset the env, let the agent answer every unit's state
(uniform random during warmup, then actor + truncated-normal noise), store the transitions
(they all receive the episode's final reward), decay the noise, take one gradient step per
transition, then append the episode's row, keep the best policy and save the agent.

Crash safety: the row is appended before the agent checkpoint is replaced, so after a kill
the checkpoint is never ahead of episodes.csv; resume trims rows past the checkpoint's episode
count and replays those episodes, which are deterministic given the saved RNG states.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from amc.agents import AMCDDPG, rng_state, set_rng_state
from amc.checkpoint import AGENT_FORMAT, load_checkpoint, save_checkpoint
from amc.config import Config, config_from_dict, read_yaml
from amc.envs import run_episode
from amc.errors import UserError
from amc.factory import Workspace, seed_everything
from amc.fidelity import check_fidelity
from amc.files import atomic_write_json, atomic_write_text

CONFIG_FILE = "config.yaml"
EPISODES_FILE = "episodes.csv"
BEST_FILE = "best_policy.json"
AGENT_FILE = "agent.pt"
FIDELITY_FILE = "fidelity.json"
MIN_FREE_BYTES = 64 * 2**20
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


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with; only ``search.episodes`` may be changed on resume."""
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise UserError("no such run directory", where=str(run_dir))
    if not path.is_file():
        raise UserError("not a run directory (no config.yaml)", where=str(run_dir))
    raw = read_yaml(path)
    cfg = config_from_dict(raw, source=str(path))
    if overrides:
        changed = config_from_dict(cfg.to_dict(), source=str(path), overrides=overrides)
        refuse_changes(cfg.to_dict(), changed.to_dict(), path)
        cfg = changed
    return cfg


def refuse_changes(old: dict, new: dict, where: Path) -> None:
    diffs = [d for d in config_differences(old, new) if d != "search.episodes"]
    if diffs:
        raise UserError(f"config differs from the run's in {', '.join(diffs)}; only search.episodes may change "
                        f"on resume (start a new run directory instead)", where=str(where))


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


def search(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
           workspace: Workspace | None = None) -> dict:
    """Run (or continue) the search to ``cfg.search.episodes`` episodes; return the best policy.

    ``workspace``: one built from ``cfg`` with objects given from Python (``amc.compress``).
    """
    config_path, csv_path, agent_path = run_dir / CONFIG_FILE, run_dir / EPISODES_FILE, run_dir / AGENT_FILE
    if agent_path.exists():  # every caller (CLI, `amc run`, benchmarks, the API) passes through here
        old = read_yaml(config_path) if config_path.is_file() else {}
        refuse_changes(old, cfg.to_dict(), config_path)
        if not resume:
            raise UserError(f"already holds a search; continue it with `amc search --resume {run_dir}` "
                            "or choose another run directory", where=str(run_dir))

    seed_everything(cfg.seed)
    workspace = workspace or Workspace(cfg)
    env = workspace.env()  # every input problem (model, data, budget) surfaces here, before any file is written
    check_writable(run_dir)
    check_fidelity(env, run_dir / FIDELITY_FILE)  # reward precision: reduced where it ranks as fp32 does
    agent_seed = cfg.seed if cfg.agent.seed is None else cfg.agent.seed  # the data split keeps cfg.seed
    seed_everything(agent_seed)
    agent = AMCDDPG(env, cfg.agent, env.num_units, seed=agent_seed, device=str(workspace.device))
    header = METRIC_COLUMNS + env.space.names
    start, best = 0, None
    if resume and agent_path.is_file():  # killed before the first episode ended: start over
        state = load_checkpoint(agent_path, AGENT_FORMAT)
        agent.load_state_dict(state["agent"])
        set_rng_state(state["rng"])
        start, best = int(state["episodes"]), state["best"]
        if cfg.search.episodes < start:
            raise UserError(f"the run already has {start} episodes; ask for at least that many "
                            f"(search.episodes is {cfg.search.episodes})", where=str(run_dir))
    _trim_rows(csv_path, header, start)
    atomic_write_text(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if best is not None:
        atomic_write_json(run_dir / BEST_FILE, best)

    total = cfg.search.episodes
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start)
    bar = tqdm(total=total, initial=start, desc="search", disable=not progress, dynamic_ncols=True)
    try:
        for episode in range(start, total):
            began = time.perf_counter()
            warmup = episode < cfg.agent.warmup_episodes
            played = run_episode(env, lambda obs: agent.act(obs, warmup))
            for transition in played.transitions:
                agent.store(*transition)
            reward, info = played.reward, played.info
            sigma = agent.noise.sigma  # the sigma this episode explored with
            agent.noise.reset()
            if not warmup:
                agent.learn_episode()

            ratios = info.get("ratios", [None] * env.num_units)
            timings = info.get("timings", {})
            metrics = {"episode": episode, "reward": reward, "error": info.get("error", 1.0),
                       "cost_ratio": info.get("cost_ratio"), "macs_ratio": info.get("macs_ratio"),
                       "params_ratio": info.get("params_ratio"), "latency_ms_ratio": info.get("latency_ms_ratio"),
                       "sigma": sigma, "seconds": time.perf_counter() - began,
                       "calibrate_seconds": timings.get("calibrate", 0.0) + timings.get("reconstruct", 0.0),
                       "eval_seconds": timings.get("eval", 0.0)}
            _append_row(csv_path, [_format(metrics[c]) for c in METRIC_COLUMNS] + [_format(r) for r in ratios])
            for name in ("reward", "error", "cost_ratio"):
                if metrics[name] is not None:
                    writer.add_scalar(f"episode/{name}", metrics[name], episode)

            within = cfg.search.protocol == "accuracy" or (
                info.get("cost_ratio") is not None and info["cost_ratio"] <= cfg.search.target + 1e-9)
            if within and "keep" in info and (best is None or reward > best["reward"]):
                best = {"episode": episode, "reward": reward, "error": info["error"],
                        **policy_record(env, info["keep"], cfg)}
                atomic_write_json(run_dir / BEST_FILE, best)
            save_checkpoint(agent_path, AGENT_FORMAT, {
                "agent": agent.state_dict(), "rng": rng_state(), "episodes": episode + 1, "best": best})
            bar.update()
            if best is not None:
                bar.set_postfix(best=f"{best['reward']:.4f}", error=f"{best['error']:.3f}")
    finally:
        bar.close()
        writer.close()
    if best is None:
        raise UserError("no episode met the budget", where=str(run_dir))
    answer = choose_answer(workspace, env, run_dir, progress)
    atomic_write_json(run_dir / BEST_FILE, answer)
    return answer


def policy_record(env, keep: list[int], cfg: Config) -> dict:
    """What best_policy.json says about a policy besides its scores."""
    space = env.space
    measures = space.measures(keep)
    return {"units": space.names, "keep": list(keep), "ratios": [k / s for k, s in zip(keep, space.sizes)],
            "cost_ratio": space.cost(keep) / env.full_cost,
            **{f"{name}_ratio": value / env.full_measures[name] for name, value in measures.items()},
            "mode": cfg.search.mode, "resource": cfg.search.resource, "target": cfg.search.target}


def choose_answer(workspace: Workspace, env, run_dir: Path, progress: bool = True) -> dict:
    """The run's answer: the top-K policies by reward and the rules, scored on the selection split.

    See amc/selection.py for why. With ``data.select_size: 0`` the candidates are compared on
    reward-val, where the search's own candidates carry their selection bias (recorded).
    """
    from amc.selection import as_records, reward_noise, rule_candidates, select, top_policies

    cfg = workspace.cfg
    split = "select" if cfg.data.select_size else "reward_val"
    candidates = top_policies(read_episodes(run_dir), env.space.names, env.space.sizes, cfg.search.select_top_k)
    candidates += rule_candidates(workspace)
    measure = env.space.reward_measure
    winner = select(workspace, candidates, lambda error, keep: env.reward_fn(error, env.space.measures(keep)[measure]),
                    split, progress)
    noise = reward_noise(workspace, winner.keep, seed=cfg.seed)
    return {"source": winner.source, "episode": winner.episode, "reward": winner.reward,
            "error": noise["reward_val_error"], **policy_record(env, winner.keep, cfg),
            "selection": {"split": split, "metric": workspace.metric_name, "candidates": as_records(candidates)},
            "noise": noise}


def read_episodes(run_dir: Path) -> list[dict]:
    with open(run_dir / EPISODES_FILE, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in csv.DictReader(f)]
