"""The measured latency lookup table: exact at full size, monotone, cached, and usable as a budget."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from amc.checkpoint import BASE_FORMAT, save_checkpoint
from amc.config import LatencyConfig, config_from_dict
from amc.cost import CostModel
from amc.factory import Workspace
from amc.graph import find_units
from amc.latency import LatencyModel, cache_dir
from amc.data import split_signature
from amc.metrics import MIN_SAMPLES, latency_report, measure_latency
from amc.models import build_model, model_spec

from conftest import DEMO_CONFIG, demo_dict

SHAPE = (1, 1, 8, 8)
FAST = LatencyConfig(repeats=3, warmup=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def demo(cache):
    model = build_model("demo_cnn", 10, 1)
    graph = find_units(model, SHAPE)
    latency = LatencyModel.for_model(model, graph, SHAPE, FAST, model_spec("demo_cnn", 10, 1))
    return model, graph, CostModel(graph, model), latency


def test_full_size_is_overhead_plus_layers(demo):
    model, graph, cost, latency = demo
    assert set(latency.tables) == set(graph.layers)
    full = latency.predict(cost, cost.full_keep)
    assert full == pytest.approx(latency.overhead_ms + sum(t.full for t in latency.tables.values()))
    assert latency.overhead_ms >= 0
    if latency.overhead_ms > 0:  # not clamped: the prediction is the measured model latency
        assert full == pytest.approx(latency.model_ms)
    # the image channels and the classes are never pruned: measured at full size only
    assert latency.tables["features.0"].in_counts == [1]
    assert latency.tables["classifier"].out_counts == [10]
    assert latency.tables["features.3"].in_counts == [4, 8, 12, 16]


def test_tables_and_predictions_are_monotone(demo):
    _, graph, cost, latency = demo
    for table in latency.tables.values():
        ms = np.array(table.ms)
        assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()
    rng = np.random.default_rng(0)
    sizes = cost.full_keep
    for _ in range(5):
        keep = [int(rng.integers(1, s + 1)) for s in sizes]
        base = latency.predict(cost, keep)
        assert base <= latency.predict(cost, sizes) + 1e-12
        for u in range(len(sizes)):
            fewer = list(keep)
            fewer[u] = max(1, keep[u] - int(rng.integers(1, sizes[u])))
            assert latency.predict(cost, fewer) <= base + 1e-12


def test_table_is_cached_and_reused(demo, cache):
    model, graph, cost, latency = demo
    assert not latency.from_cache
    files = list(cache_dir().glob("*.json"))
    assert files == [latency.path] and latency.path.parent == cache / "latency"
    mtime = latency.path.stat().st_mtime_ns

    again = LatencyModel.for_model(model, graph, SHAPE, FAST, model_spec("demo_cnn", 10, 1))
    assert again.from_cache
    assert latency.path.stat().st_mtime_ns == mtime
    assert {n: t.ms for n, t in again.tables.items()} == {n: t.ms for n, t in latency.tables.items()}
    assert again.overhead_ms == latency.overhead_ms
    assert again.predict(cost, cost.full_keep) == latency.predict(cost, cost.full_keep)

    # another batch size is another table; a corrupt file is measured again
    other = LatencyModel.for_model(model, graph, SHAPE, LatencyConfig(batch_size=2, repeats=3, warmup=1),
                                   model_spec("demo_cnn", 10, 1))
    assert not other.from_cache and other.path != latency.path
    latency.path.write_text("{not json")
    remeasured = LatencyModel.for_model(model, graph, SHAPE, FAST, model_spec("demo_cnn", 10, 1))
    assert not remeasured.from_cache and remeasured.path == latency.path


def test_search_env_meets_latency_budget(tmp_path, cache):
    raw = demo_dict(tmp_path, search={"resource": "latency"})
    cfg = config_from_dict(raw, source=str(DEMO_CONFIG))
    ws = Workspace(cfg)
    model = ws.new_model()  # untrained: the budget does not depend on the weights
    save_checkpoint(cfg.model.checkpoint, BASE_FORMAT, {"spec": ws.spec, "state_dict": model.state_dict(),
                                                        "split": split_signature(cfg.data, cfg.seed)})

    space = ws.space(ws.base_model)
    assert space.latency is not None and not space.latency.from_cache
    floor = space.cost([max(1, round(cfg.search.lbound * s)) for s in space.sizes]) / space.cost(space.sizes)
    cfg.search.target = round(floor + 0.5 * (1 - floor), 3)  # feasible, and binding

    env = ws.env()  # builds its space again: from the cache this time
    assert env.space.latency.from_cache
    rng = np.random.default_rng(0)
    for episode in range(4):
        env.reset(seed=episode)
        done = False
        while not done:
            action = 1.0 if episode == 0 else rng.uniform()  # episode 0 asks for everything
            _, _, done, _, info = env.step(np.array([action]))
        assert info["cost_ratio"] <= cfg.search.target + 1e-9
        assert info["latency_ms_ratio"] == pytest.approx(info["cost_ratio"])
        assert env.space.cost(info["keep"]) <= env.budget + 1e-9


class Sleeper(nn.Module):
    """A forward pass of known duration: ``seconds[i]`` on call i, ``default`` after."""

    def __init__(self, default: float, seconds: tuple[float, ...] = ()):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # measure_latency reads the device from a parameter
        self.default, self.seconds, self.calls = default, seconds, 0

    def forward(self, x):
        time.sleep(self.seconds[self.calls] if self.calls < len(self.seconds) else self.default)
        self.calls += 1
        return x


def test_latency_is_the_median_pass_and_ignores_an_interrupted_sample():
    slow = Sleeper(0.004, seconds=(0.004,) * 4 + (0.2,))  # the first timed pass is held up
    ms = measure_latency(slow, SHAPE, warmup=3, repeats=7)
    assert 4.0 <= ms < 100.0  # the 200 ms sample is not the median (sleep may overshoot on a busy machine)


def test_sub_millisecond_passes_are_timed_in_runs():
    fast = Sleeper(0.0)
    measure_latency(fast, SHAPE, warmup=2, repeats=5)
    assert fast.calls > 2 + 1 + 5  # each sample times several back-to-back passes, not one call


def test_slow_models_stop_warming_up_and_sampling_after_a_second():
    slow = Sleeper(0.3)
    started = time.perf_counter()
    ms = measure_latency(slow, SHAPE, warmup=10, repeats=50)
    assert slow.calls == 4 + 1 + MIN_SAMPLES  # warmup until 1 s, the probe pass, then the minimum of samples
    assert ms >= 300 and time.perf_counter() - started < 20


def test_latency_report_gives_batch_1_and_the_large_batch():
    report = latency_report(build_model("demo_cnn", 10, 1), SHAPE, LatencyConfig(repeats=5, warmup=1, large_batch=32))
    assert set(report) == {"latency_ms", "latency_ms_b32"}
    assert 0 < report["latency_ms"] < report["latency_ms_b32"]
