"""Episodes per minute of the search, serial and parallel, and where parallel scoring stops paying.

    python scripts/bench_search.py [--config configs/resnet20_fmnist.yaml] [--episodes 12] \\
        [--backends local ray] [--set model.checkpoint=checkpoints/resnet20_fmnist.pt]
    python scripts/bench_search.py --simulate 1 2 4 8 16 32 64 128 256 512 [--scoring-seconds S]

Default mode, on the config with 2,000 reward-val images, on the CPU:
1. the per-episode costs: walking the units, scoring one policy at 1 thread, the agent's update
   (one gradient step per unit), the agent checkpoint (once per round) and the round trip to a
   worker (score wall time less the worker's own time) on each backend;
2. the search's episodes per minute (``amc.search.search``, the first 2 episodes not counted)
   for 1 worker at 1 thread, 2 workers at 1 thread each and 1 worker at 2 threads, per backend.
   The last line: ``speedup: local X.XX ray Y.YY`` (2 workers x 1 thread over 1 worker x 1 thread).

``--simulate``: the real search loop (walk, store, learn, rows, checkpoints) with N workers that
sleep for the scoring time instead of scoring (threads, no CPU), so the search's own serial work
(the Amdahl term) shows how far the speedup goes with N. Needs no quiet machine for the sleeping;
the serial part it measures is CPU work like any other.

Uses the trained checkpoint when present, else an untrained model of the same architecture
(the costs do not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from amc.agents import AMCDDPG, rng_state
from amc.checkpoint import AGENT_FORMAT, BASE_FORMAT, save_checkpoint
from amc.config import Config, load_config
from amc.envs import walk
from amc.factory import Workspace, seed_everything
from amc.parallel import LocalWorkers, RayActors, available_cores, import_ray
from amc.report import table
from amc.search import read_episodes, search

SETTINGS = ((1, 1), (2, 1), (1, 2))  # (workers, threads each)
SKIP = 2  # episodes not counted: first inferences allocate and build kernels


def prepared_config(args, tmp: Path) -> Config:
    """The config with 2,000 reward-val images on the CPU; an untrained checkpoint if none is there."""
    cfg = load_config(args.config, args.overrides + ["data.reward_val_size=2000", "device=cpu",
                                                     f"agent.warmup_episodes={SKIP}"])
    ws = Workspace(cfg)
    if not ws.checkpoint_path.is_file():
        print(f"note: no checkpoint at {ws.checkpoint_path}: an untrained {cfg.model.name} "
              "(costs do not depend on the weights)")
        path = tmp / "untrained.pt"
        save_checkpoint(path, BASE_FORMAT, {"spec": ws.spec, "state_dict": ws.new_model().state_dict(), "metrics": {}})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": str(path)})})
    return cfg


def with_search(cfg: Config, **fields) -> Config:
    return cfg.model_copy(update={"search": cfg.search.model_copy(update=fields)})


def mean_ms(values: list[float]) -> str:
    return f"{1000 * statistics.mean(values):.1f}"


def costs(cfg: Config, backends: list[str], policies: int = 4) -> list[list]:
    """Per-episode costs in milliseconds (mean over ``policies`` noisy actor policies)."""
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    env = Workspace(cfg).env()
    agent = AMCDDPG(env, cfg.agent, env.num_units, seed=cfg.seed, device="cpu")
    walks, scorings, played = [], [], []
    for _ in range(policies):
        start = time.perf_counter()
        episode = walk(env, lambda obs: agent.act(obs, warmup=False))
        walks.append(time.perf_counter() - start)
        start = time.perf_counter()
        episode.score(*env.evaluate(episode.keep))
        scorings.append(time.perf_counter() - start)
        played.append(episode)
    for _ in range(cfg.agent.buffer_episodes // policies):  # a full replay buffer, as in a long search
        for episode in played:
            for transition in episode.transitions:
                agent.store(*transition)
    updates, saves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(policies):
            start = time.perf_counter()
            agent.learn_episode()
            updates.append(time.perf_counter() - start)
            start = time.perf_counter()
            save_checkpoint(Path(tmp) / "agent.pt", AGENT_FORMAT, {"agent": agent.state_dict(), "rng": rng_state()})
            saves.append(time.perf_counter() - start)
    rows = [["walk the units (per episode)", mean_ms(walks)],
            ["score one policy, 1 thread (per episode)", mean_ms(scorings)],
            [f"agent update, {env.num_units} gradient steps (per episode)", mean_ms(updates)],
            ["agent checkpoint, full buffer (per round)", mean_ms(saves)]]
    keeps = [(i, episode.keep) for i, episode in enumerate(played)]
    for name in backends:
        workers = LocalWorkers(cfg, 2, 1, timeout=600) if name == "local" else RayActors(cfg, 2, 1, timeout=600)
        try:
            workers.score(keeps[:2])  # the workers' first scoring builds their kernels
            trips = []
            for first in range(0, len(keeps), 2):
                start = time.perf_counter()
                results = workers.score(keeps[first:first + 2])
                wall = time.perf_counter() - start
                trips.append(wall - max(sum(info["timings"].values()) for _, info in results.values()))
        finally:
            workers.close()
        rows.append([f"round trip to a {name} worker, less its scoring (per round of 2)", mean_ms(trips)])
    return rows


def episodes_per_minute(cfg: Config, backend: str, workers: int, threads: int, run_dir: Path) -> float:
    search(with_search(cfg, backend=backend, workers=workers, worker_threads=threads), run_dir, progress=False)
    rows = read_episodes(run_dir)[SKIP:]
    return 60 * len(rows) / sum(r["seconds"] for r in rows)


class SleepingWorkers:
    """N simulated workers: each sleeps ``seconds`` (no CPU), then answers with the policy's analytic
    cost and a made-up error that falls with the kept fraction, so the agent still has a signal."""

    def __init__(self, env, workers: int, seconds: float):
        self.env, self.seconds = env, seconds
        self.pool = ThreadPoolExecutor(workers)

    def _score(self, keep: list[int]) -> tuple[float, dict]:
        time.sleep(self.seconds)
        env, space = self.env, self.env.space
        measures = space.measures(keep)
        ratios = [k / s for k, s in zip(keep, space.sizes)]
        error = 1.0 - 0.9 * float(np.mean(ratios))
        info = {"error": error, "keep": list(keep), "ratios": ratios, "cost_ratio": space.cost(keep) / env.full_cost,
                **{f"{name}_ratio": value / env.full_measures[name] for name, value in measures.items()}}
        return env.reward_fn(error, measures[space.reward_measure]), info

    def score(self, jobs):
        futures = {episode: self.pool.submit(self._score, keep) for episode, keep in jobs}
        return {episode: future.result() for episode, future in futures.items()}

    def close(self) -> None:
        self.pool.shutdown()


def simulate(cfg: Config, counts: list[int], seconds: float, rounds: int, tmp: Path) -> None:
    """Episodes per minute of the real loop with N sleeping workers, for each N in ``counts``."""
    torch.set_num_threads(1)  # as the search process holds itself while real workers score
    env = Workspace(cfg).env()
    rows, base = [], None
    for n in counts:
        run_cfg = with_search(cfg, workers=n, episodes=n * rounds)
        run_cfg = run_cfg.model_copy(update={"agent": run_cfg.agent.model_copy(update={"warmup_episodes": 0})})
        workers = SleepingWorkers(env, n, seconds)
        try:
            search(run_cfg, tmp / f"sim{n}", progress=False, backend=workers)
        finally:
            workers.close()
        wall = sum(r["seconds"] for r in read_episodes(tmp / f"sim{n}"))
        rate = 60 * n * rounds / wall
        base = base or rate / n  # N = 1 first
        serial = wall / rounds - seconds  # per round: everything but the (sleeping) scoring
        rows.append([n, f"{rate:.0f}", f"{rate / base:.2f}", f"{rate / base / n:.0%}", f"{1000 * serial / n:.1f}"])
        print(f"  {n} workers: {rate:.0f} episodes/min", file=sys.stderr, flush=True)
    print(f"simulated workers sleeping {seconds:.3f} s per policy, {rounds} rounds each, "
          f"every episode learning (warmup 0), torch threads {torch.get_num_threads()}:")
    print(table(["workers", "episodes/min", "speedup", "efficiency", "serial ms per episode"], rows, markdown=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/resnet20_fmnist.yaml")
    p.add_argument("--episodes", type=int, default=12, help="per setting; the first 2 are not counted")
    p.add_argument("--backends", nargs="+", choices=("local", "ray"), default=["local", "ray"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--simulate", type=int, nargs="+", metavar="N", help="simulated worker counts (1 first)")
    p.add_argument("--scoring-seconds", type=float, help="simulated scoring time (default: measured, 1 thread)")
    p.add_argument("--rounds", type=int, default=3, help="simulated rounds per worker count")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = prepared_config(args, tmp)
        if args.simulate:
            seconds = args.scoring_seconds
            if seconds is None:
                torch.set_num_threads(1)
                env = Workspace(cfg).env()
                keep = walk(env, lambda obs: np.array([0.5], dtype=np.float32)).keep
                env.evaluate(keep)
                start = time.perf_counter()
                env.evaluate(keep)
                seconds = time.perf_counter() - start
            simulate(cfg, sorted(set(args.simulate) | {1}), seconds, args.rounds, tmp)
            return 0

        ray = import_ray() if "ray" in args.backends else None
        if ray:
            ray.init(num_cpus=available_cores(), include_dashboard=False, logging_level="WARNING")
        try:
            print(f"{cfg.model.name} on {cfg.data.name}, {cfg.data.reward_val_size} reward-val images, "
                  f"calibration {cfg.search.calibration}, {available_cores()} cores")
            print(table(["cost", "ms"], costs(cfg, args.backends), markdown=True))
            rates = {}
            for backend in args.backends:
                for workers, threads in SETTINGS:
                    run_cfg = with_search(cfg, episodes=args.episodes)
                    rates[backend, workers, threads] = episodes_per_minute(
                        run_cfg, backend, workers, threads, tmp / f"{backend}_{workers}x{threads}")
                    print(f"  {backend} {workers}x{threads}: {rates[backend, workers, threads]:.1f} episodes/min",
                          file=sys.stderr, flush=True)
        finally:
            if ray:
                ray.shutdown()
    rows = [[f"{w} worker{'s' if w > 1 else ''} x {t} thread{'s' if t > 1 else ''}",
             *(f"{rates[b, w, t]:.1f}" for b in args.backends)] for w, t in SETTINGS]
    print(f"episodes per minute ({args.episodes - SKIP} counted per setting):")
    print(table(["setting", *args.backends], rows, markdown=True))
    print("speedup: " + " ".join(f"{b} {rates[b, 2, 1] / rates[b, 1, 1]:.2f}" for b in args.backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
