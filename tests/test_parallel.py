"""Parallel search: rounds of N episodes whose policies are scored by worker processes or Ray actors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from amc.agents import AMCDDPG
from amc.checkpoint import AGENT_FORMAT, load_checkpoint
from amc.config import Config, config_from_dict
from amc.envs import run_episode
from amc.errors import UserError
from amc.factory import Workspace, seed_everything
from amc.parallel import LocalWorkers, WorkerError
from amc.search import search
from conftest import DEMO_CONFIG, demo_dict
from test_search import rows


def configured(raw: dict, **search_fields) -> Config:
    return config_from_dict({**raw, "search": {**raw["search"], **search_fields}}, source=str(DEMO_CONFIG))


def serial_search(cfg: Config) -> list[dict]:
    """The search loop as it was before rounds: each episode scored as it is walked, then learned from."""
    seed_everything(cfg.seed)
    workspace = Workspace(cfg)
    env = workspace.env()
    seed_everything(cfg.seed)
    agent = AMCDDPG(env, cfg.agent, env.num_units, seed=cfg.seed, device=str(workspace.device))
    table = []
    for episode in range(cfg.search.episodes):
        warmup = episode < cfg.agent.warmup_episodes
        played = run_episode(env, lambda obs: agent.act(obs, warmup))  # noqa: B023
        for transition in played.transitions:
            agent.store(*transition)
        sigma = agent.noise.sigma
        agent.noise.reset()
        if not warmup:
            agent.learn_episode()
        table.append({"reward": repr(played.reward), "sigma": repr(sigma),
                      **{name: repr(r) for name, r in zip(env.space.names, played.info["ratios"])}})
    return table


def test_one_worker_is_the_serial_search(demo_raw, tmp_path):
    demo_raw["search"]["episodes"] = 14
    demo_raw["agent"]["warmup_episodes"] = 6
    cfg = configured(demo_raw)
    search(cfg, tmp_path / "run", progress=False)
    expected = serial_search(cfg)
    assert [{k: row[k] for k in expected[0]} for row in rows(tmp_path / "run")] == expected


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, trained_base) -> tuple[dict, Path]:
    """A 12-episode search in rounds of 2 (warmup 4) on local workers: (its config dict, its run dir)."""
    tmp = tmp_path_factory.mktemp("two_workers")
    shutil.copy(trained_base, tmp / "base.pt")
    raw = demo_dict(tmp, search={"episodes": 12, "workers": 2}, agent={"warmup_episodes": 4})
    search(configured(raw), tmp / "run", progress=False)
    return raw, tmp / "run"


class LastFirst:
    """Scores a round's policies one at a time on the first worker, the last episode first."""

    def __init__(self, pool: LocalWorkers):
        self.pool = pool

    def score(self, jobs):
        results = {}
        for job in reversed(jobs):
            results.update(self.pool.score([job]))
        return results


def test_rounds_of_two_are_deterministic_whatever_order_the_workers_finish_in(two_workers, tmp_path):
    raw, reference = two_workers
    cfg = configured(raw)
    pool = LocalWorkers(cfg, workers=2, threads=1)
    try:
        search(cfg, tmp_path / "reversed", progress=False, backend=LastFirst(pool))
    finally:
        pool.close()
    table = rows(reference)
    assert rows(tmp_path / "reversed") == table
    assert [int(r["episode"]) for r in table] == list(range(12))

    search(configured(raw, workers=1), tmp_path / "serial", progress=False)
    serial = rows(tmp_path / "serial")
    assert [r["sigma"] for r in table] == [r["sigma"] for r in serial]  # sigma decays per episode, not per round
    assert table[:4] == serial[:4]  # warmup: the same random policies, drawn in episode order
    units = len(Workspace(cfg).env().space.names)
    state = load_checkpoint(reference / "agent.pt", AGENT_FORMAT)
    assert state["agent"]["n_updates"] == (12 - 4) * units  # one gradient step per transition after warmup

    best = json.loads((reference / "best_policy.json").read_text())
    assert Workspace(cfg).env().evaluate(best["keep"])[0] == best["reward"]  # a worker scores as this process does


def test_a_worker_that_dies_or_hangs_stops_the_search_and_resume_continues(two_workers, tmp_path):
    raw, reference = two_workers
    cfg = configured(raw)
    run_dir = tmp_path / "run"
    pool = LocalWorkers(cfg, workers=2, threads=1)
    search(configured(raw, episodes=4), run_dir, progress=False, backend=pool)
    os.kill(pool.processes[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"scoring worker 1 \(pid \d+\) died \(exit code -9\) (before|while) "
                                          r"scoring episode 5; "
                                          r"the run keeps its first 4 episodes: continue it with `amc search --resume"):
        search(cfg, run_dir, resume=True, progress=False, backend=pool)
    assert len(rows(run_dir)) == 4  # the round with the dead worker left no row

    pool = LocalWorkers(cfg, workers=2, threads=1, timeout=2)
    stopped = pool.processes[0].pid
    os.kill(stopped, signal.SIGSTOP)
    with pytest.raises(WorkerError, match=r"worker 0 .* gave no answer within 2 s \(search.worker_timeout\) "
                                          r"while scoring episode 4"):
        search(cfg, run_dir, resume=True, progress=False, backend=pool)
    assert not Path(f"/proc/{stopped}").exists()  # the hung worker was killed and reaped
    assert len(rows(run_dir)) == 4

    search(configured(raw, worker_timeout=60), run_dir, resume=True, progress=False)  # a longer timeout may be set
    assert rows(run_dir) == rows(reference)


def test_the_ray_backend_without_ray_is_one_line_and_writes_nothing(demo_raw, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(UserError, match=r"search.backend: backend ray needs Ray: pip install -e '.\[ray\]'"):
        search(configured(demo_raw, backend="ray", workers=2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): Ray backend not tested")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_actors_score_as_local_workers_do(two_workers, local_ray, tmp_path):
    from amc.parallel import RayActors

    raw, reference = two_workers
    cfg = configured(raw, backend="ray")
    search(cfg, tmp_path / "ray", progress=False)
    assert rows(tmp_path / "ray") == rows(reference)

    actors = RayActors(cfg, workers=2, threads=1)
    local_ray.kill(actors.actors[1])
    with pytest.raises(WorkerError, match="a Ray scoring actor died while scoring episodes 0-1"):
        actors.score([(0, [16, 32, 64, 64]), (1, [8, 16, 16, 8])])
    assert local_ray.is_initialized()  # the Ray this test started is not the backend's to stop
