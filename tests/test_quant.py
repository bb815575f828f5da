"""Mixed-precision quantization and joint pruning + bits on the trained demo model and real digits:
quantizers, exact costs, budgets, export / load / ONNX, QAT, baselines, resume, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import amc
from amc.checkpoint import load_model
from amc.cli import main
from amc.config import config_from_dict
from amc.errors import UserError
from amc.factory import Workspace, env_from_config
from amc.metrics import count_macs, torch_threads
from amc.quantization import (
    CLIP_GRID, batchnorm_pairs, fold_batchnorm, pack_codes, packed_bytes, refold_batchnorm, storage_and_bitops,
    unfold_batchnorm, unpack_codes, weight_qmax, weight_scales,
)
from amc.search import search
from conftest import write_config
from test_search import rows

SHAPE = (1, 1, 8, 8)
QUANTIZE = {"mode": "quantize", "resource": "size", "target": 0.125}
JOINT = {"mode": "joint", "resource": "bitops", "target": 0.03, "quantize_activations": True}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def configured(demo_raw, tmp_path, name="quant", **search) -> tuple[dict, Path]:
    raw = copy.deepcopy(demo_raw)
    raw["search"].update(search)
    return raw, write_config(tmp_path / f"{name}.yaml", raw)


def env_for(demo_raw, tmp_path, **search):
    raw, path = configured(demo_raw, tmp_path, **search)
    return env_from_config(config_from_dict(raw, source=str(path)))


def random_episodes(env, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        env.reset()
        done = False
        while not done:
            _, _, done, _, info = env.step(rng.uniform(0.0, 1.0, 1).astype(np.float32))
        yield info


def test_packed_codes_round_trip_in_the_bytes_they_are_priced_at():
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        for count in (1, 7, 37, 64):
            values = torch.from_numpy(rng.integers(0, 2 ** bits, count))
            data = pack_codes(values, bits)
            assert data.dtype == torch.uint8 and data.numel() == packed_bytes(count, bits) == math.ceil(count * bits / 8)
            assert torch.equal(unpack_codes(data, bits, count), values)
    assert packed_bytes(10, 4) == 5 and packed_bytes(10, 2) == 3 and packed_bytes(10, 8) == 10  # 2 / 4 per byte
    with pytest.raises(ValueError, match="expected 5 packed bytes"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 10)


def test_weight_clip_minimises_the_error_and_bn_folds_exactly(demo_cfg):
    model = Workspace(demo_cfg).base_model
    pairs = batchnorm_pairs(model, SHAPE)
    assert pairs == [("features.0", "features.1"), ("features.3", "features.4"), ("features.7", "features.8"),
                     ("features.10", "features.11")]
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, pairs)
    x = torch.randn(16, *SHAPE[1:])
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())

    weight = folded.features[7].weight.detach()
    flat = weight.reshape(weight.shape[0], -1)

    def error(scale: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(flat / scale[:, None]), -weight_qmax(3), weight_qmax(3)) * scale[:, None]
        return ((q - flat) ** 2).sum(1)

    chosen = weight_scales(weight, 3)
    min_max = flat.abs().amax(1) / weight_qmax(3)
    assert torch.all(error(chosen) <= error(min_max))
    assert error(chosen).sum() < 0.8 * error(min_max).sum()  # the clip pays at 3 bits
    assert CLIP_GRID.min() < 0.1 and CLIP_GRID.max() == 1.0


@pytest.mark.parametrize("search", [
    {**QUANTIZE, "target": 0.1},
    {"mode": "quantize", "resource": "bitops", "target": 0.02, "quantize_activations": True},
    JOINT,
    {"mode": "joint", "resource": "size", "target": 0.08, "round_to": 4},
], ids=["quantize-size", "quantize-bitops", "joint-bitops", "joint-size"])
def test_every_episode_meets_the_budget_and_the_cost_is_exact(demo_raw, tmp_path, search):
    env = env_for(demo_raw, tmp_path, **search)
    space = env.space
    joint, activations = search["mode"] == "joint", search.get("quantize_activations", False)
    layers = 5
    assert env.num_units == layers * (1 + activations) + 4 * joint  # the classifier is quantized, never pruned
    assert env.features[-3:] == (("prune", "activation", "depthwise") if joint else ("a_prev", "activation", "depthwise"))
    assert env.full_cost == space.cost(space.sizes)
    full_bytes, full_bitops = storage_and_bitops(env.model, SHAPE)
    assert env.full_cost == (8 * full_bytes if search["resource"] == "size" else full_bitops)
    assert full_bitops == count_macs(env.model, SHAPE) * 32 * 32
    ratios = []
    for episode, info in enumerate(random_episodes(env, 6)):
        keep = info["keep"]
        assert info["cost_ratio"] <= search["target"] + 1e-12
        ratios.append(info["cost_ratio"])
        for step, value, floor, ceiling in zip(space.steps, keep, env.floor, env.ceiling):
            assert floor <= value <= ceiling
            if step.role != "channels":
                assert 2 <= value <= 8
            elif search.get("round_to", 1) > 1 and value < space.sizes[space.steps.index(step)]:
                assert value % search["round_to"] == 0
        if episode < 3:  # the analytic cost is what the quantized (and pruned) model holds
            model = space.apply(copy.deepcopy(env.model), keep)
            weight_bytes, bitops = storage_and_bitops(model, SHAPE)
            assert space.measures(keep)["size"] == 8 * weight_bytes
            assert space.measures(keep)["bitops"] == bitops
            assert space.measures(keep)["macs"] == count_macs(model, SHAPE)
    assert max(ratios) > 0.8 * search["target"]  # budget filling spends the budget
    print(search, "cost ratios", [round(r, 4) for r in ratios])


def search_and_export(demo_raw, tmp_path, capsys, settings: dict, episodes: int, warmup: int, *export_args: str):
    """A short search and its export through the CLI: (raw config, config path, run dir, export's JSON)."""
    raw, config = configured(demo_raw, tmp_path, **settings, episodes=episodes)
    raw["agent"]["warmup_episodes"] = warmup
    write_config(config, raw)
    assert main(["search", str(config)]) == 0
    run_dir = Path(raw["search"]["run_dir"])
    assert main(["export", str(run_dir), *export_args]) == 0
    return raw, config, run_dir, json.loads(capsys.readouterr().out.splitlines()[-1])


def test_quantize_search_export_load_eval(demo_raw, tmp_path, capsys):
    raw, config, run_dir, exported = search_and_export(demo_raw, tmp_path, capsys, QUANTIZE, 4, 2)
    best = json.loads((run_dir / "best_policy.json").read_text())
    assert best["mode"] == "quantize" and best["cost_ratio"] <= 0.125
    assert best["units"][0] == "features.0:weight" and all(2 <= b <= 8 for b in best["keep"])

    data = torch.load(run_dir / "pruned.pt", weights_only=True)
    assert data["plan"]["kind"] == "quantize"
    assert {name: bits[0] for name, bits in data["plan"]["bits"].items()} == dict(
        zip([u.split(":")[0] for u in best["units"]], best["keep"]))
    codes = {k: v for k, v in data["state_dict"].items() if k.endswith("weight_codes")}
    assert len(codes) == 5 and all(v.dtype == torch.uint8 for v in codes.values())
    assert not any(k.endswith(".weight") for k in data["state_dict"])  # no fp32 copy of a quantized weight
    cfg = config_from_dict(raw, source=str(config))
    space = Workspace(cfg).space(Workspace(cfg).base_model)
    assert 8 * sum(v.numel() for v in codes.values()) == space.cost(best["keep"]) == 8 * exported["weight_bytes"]
    assert exported["weight_bytes"] <= 0.125 * 4 * sum(layer.weight_count for layer in space.graph.layers.values())

    loaded = amc.load_pruned(run_dir / "pruned.pt")
    fake_quantized = space.apply(copy.deepcopy(Workspace(cfg).base_model), best["keep"])
    x = torch.randn(32, *SHAPE[1:])
    assert torch.equal(loaded(x), fake_quantized(x))  # dequantize-on-load is the fake-quantized model

    assert main(["eval", str(run_dir / "pruned.pt"), "--config", str(config)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["weight_bytes"] == exported["weight_bytes"] and metrics["bitops"] == exported["bitops"]
    assert metrics["test_top1"] > 0.8


def test_joint_export_onnx_and_quantization_aware_finetuning(demo_raw, tmp_path, capsys):
    onnx_path = tmp_path / "joint.onnx"
    raw, config, run_dir, exported = search_and_export(demo_raw, tmp_path, capsys, JOINT, 3, 3, "--onnx", str(onnx_path))
    full_bitops = count_macs(load_model(raw["model"]["checkpoint"])[0], SHAPE) * 32 * 32
    assert exported["bitops"] <= 0.03 * full_bitops

    import onnx
    import onnxruntime as ort

    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Round"} <= ops
    model = amc.load_pruned(run_dir / "pruned.pt")
    x = np.random.default_rng(0).standard_normal((3, *SHAPE[1:])).astype(np.float32)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)

    before = torch.load(run_dir / "pruned.pt", weights_only=True)
    assert main(["finetune", str(run_dir / "pruned.pt"), "--config", str(config), "--epochs", "1", "--distill"]) == 0
    tuned = json.loads(capsys.readouterr().out.splitlines()[-1])
    after = torch.load(run_dir / "pruned_ft.pt", weights_only=True)
    assert after["plan"] == before["plan"]  # the searched bit widths and pruned shapes stay
    assert {k: v.shape for k, v in after["state_dict"].items()} == {k: v.shape for k, v in before["state_dict"].items()}
    assert tuned["weight_bytes"] == exported["weight_bytes"] and tuned["bitops"] == exported["bitops"]
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items()
               if k.endswith("weight_codes"))  # the weights learned
    assert tuned["test_top1"] > 0.85


def test_batchnorm_unfolds_for_training_and_folds_back_without_changing_the_codes(demo_raw, tmp_path):
    raw, config = configured(demo_raw, tmp_path, **QUANTIZE)
    ws = Workspace(config_from_dict(raw, source=str(config)))
    space = ws.space(ws.base_model)
    keep = [3, 4, 5, 6, 3]
    model = space.apply(copy.deepcopy(ws.base_model), keep)
    images = ws.reconstruction_images()
    codes = {n: m.weight_codes() for n, m in model.named_modules() if hasattr(m, "weight_codes")}
    reference = model(images)
    unfold_batchnorm(model, space.folds, images)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4
    torch.testing.assert_close(model.eval()(images), reference, atol=1e-5, rtol=1e-5)
    # with batch statistics too (the same images): training starts from the model it was given
    torch.testing.assert_close(model.train()(images), reference, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(torch.linspace(-1.5, 2.0, m.num_features))  # as if trained, signs flipped too
    trained = model.eval()(images)
    refold_batchnorm(model, space.folds)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(images), trained, atol=1e-4, rtol=1e-4)
    for name, m in model.named_modules():
        if name in codes:
            assert torch.equal(m.weight_codes().abs(), codes[name].abs())


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_bit_width_baselines_meet_the_budget_and_export(demo_raw, tmp_path, capsys, method):
    raw, config = configured(demo_raw, tmp_path, **{**QUANTIZE, "target": 0.1})
    out = tmp_path / f"{method}.pt"
    assert main(["baseline", str(config), "--method", method, "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    data = torch.load(out, weights_only=True)
    bits = [b[0] for b in data["plan"]["bits"].values()]
    full_bytes = storage_and_bitops(load_model(raw["model"]["checkpoint"])[0], SHAPE)[0]
    assert metrics["weight_bytes"] <= 0.1 * full_bytes
    if method == "uniform":
        assert bits == [3] * 5  # 3.2 bits on average allowed: the widest uniform width is 3
    else:
        assert len(set(bits)) > 1 and all(2 <= b <= 8 for b in bits)
        assert metrics["weight_bytes"] > 0.09 * full_bytes  # taken one bit at a time: the budget is spent
    assert metrics["reward_val_top1"] > 0.5


def test_joint_uniform_baseline_is_prune_then_uniform_bits(demo_raw, tmp_path, capsys):
    raw, config = configured(demo_raw, tmp_path, **JOINT)
    assert main(["baseline", str(config), "--method", "uniform", "--out", str(tmp_path / "u.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    data = torch.load(tmp_path / "u.pt", weights_only=True)
    assert len({tuple(b) for b in data["plan"]["bits"].values()}) == 1  # one width everywhere
    full_bitops = count_macs(load_model(raw["model"]["checkpoint"])[0], SHAPE) * 32 * 32
    assert 0.02 * full_bitops < metrics["bitops"] <= 0.03 * full_bitops
    assert data["plan"]["channels"]  # 8x8 bits alone is 1/16: the rest is uniform pruning


def test_resume_matches_an_uninterrupted_quantize_run(demo_raw, tmp_path):
    raw = copy.deepcopy(demo_raw)
    raw["search"].update(mode="quantize", resource="bitops", target=0.03, quantize_activations=True, episodes=8)
    raw["agent"]["warmup_episodes"] = 3
    whole = config_from_dict({**raw, "search": {**raw["search"], "run_dir": str(tmp_path / "a")}})
    search(whole, tmp_path / "a", progress=False)
    half = whole.model_copy(update={"search": whole.search.model_copy(update={"episodes": 5})})
    search(half, tmp_path / "b", progress=False)
    search(whole, tmp_path / "b", resume=True, progress=False)
    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    assert json.loads((tmp_path / "b" / "best_policy.json").read_text()) == \
        json.loads((tmp_path / "a" / "best_policy.json").read_text())


BAD_SEARCH = {
    "quantize with a FLOPs budget": ({"mode": "quantize", "resource": "flops"}, "set resource: size or bitops"),
    "channel mode with a size budget": ({"resource": "size"}, "set mode: quantize or joint"),
    "min_bits above max_bits": ({**QUANTIZE, "min_bits": 6, "max_bits": 4}, "min_bits (6) must be <= max_bits (4)"),
    "bits out of range": ({**QUANTIZE, "max_bits": 16}, "search.max_bits"),
    "activations without bits": ({"quantize_activations": True}, "quantize_activations needs mode: quantize or joint"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEARCH))
def test_bad_quantization_config_is_one_line(demo_raw, tmp_path, capsys, case):
    search_fields, needle = BAD_SEARCH[case]
    _, config = configured(demo_raw, tmp_path, "bad", **search_fields)
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and needle in err[0], err
    assert not Path(demo_raw["search"]["run_dir"]).exists()


def test_target_below_min_bits_names_the_smallest_reachable_target(demo_raw, tmp_path, capsys):
    _, config = configured(demo_raw, tmp_path, "bad", mode="quantize", resource="size", target=0.05)
    assert main(["search", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    assert "search.target" in message and "min_bits 2" in message
    assert message.endswith("the smallest reachable target is 0.0625")  # 2 of 32 bits
    _, config = configured(demo_raw, tmp_path, "bad", **{**JOINT, "target": 0.0001})
    assert main(["search", str(config)]) == 2
    assert "below what lbound 0.2 and min_bits 2 allows" in capsys.readouterr().err


def test_bad_policy_files_and_damaged_quantized_checkpoints_are_refused(demo_raw, tmp_path, capsys):
    raw, config = configured(demo_raw, tmp_path, **QUANTIZE, episodes=1)
    assert main(["search", str(config)]) == 0
    run_dir = Path(raw["search"]["run_dir"])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"keep": [8, 8, 12, 8, 8]}))
    assert main(["export", str(run_dir), "--policy", str(policy), "--out", str(tmp_path / "x.pt")]) == 2
    assert "features.7:weight: 12 bits is outside min_bits..max_bits (2..8)" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    assert main(["export", str(run_dir)]) == 0
    capsys.readouterr()
    data = torch.load(run_dir / "pruned.pt", weights_only=True)
    cut = copy.deepcopy(data)
    cut["state_dict"]["features.3.weight_codes"] = cut["state_dict"]["features.3.weight_codes"][:-1]
    torch.save(cut, tmp_path / "cut.pt")
    wrong = copy.deepcopy(data)
    wrong["plan"]["bits"]["no.such.layer"] = [4, 32]
    torch.save(wrong, tmp_path / "wrong.pt")
    for path, needle in ((tmp_path / "cut.pt", "weights do not fit the DemoCNN"),
                         (tmp_path / "wrong.pt", "quantization plan names layers the architecture does not have")):
        assert main(["eval", str(path), "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and needle in err[0], err
    with pytest.raises(UserError, match="sets bit widths only"):
        from amc.baselines import baseline_policy

        cfg = config_from_dict(demo_raw)
        baseline_policy(cfg, "sensitivity", Workspace(cfg))
