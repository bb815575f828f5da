"""The fast inference path (BN folding, batch sizes, precision), the fidelity check, and the one
repair: the search's reward is the exported model's reward-val error."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from amc.baselines import uniform_policy
from amc.config import config_from_dict
from amc.errors import UserError
from amc.factory import env_from_config
from amc.fidelity import check_fidelity, compare, rank_correlation
from amc.inference import FastEval, batchnorm_pairs, fold_batchnorm
from amc.metrics import accuracy
from amc.models import build_model
from amc.pipeline import export_run
from amc.search import search
from conftest import write_config


def demo_env(demo_raw, tmp_path, **search_settings):
    raw = copy.deepcopy(demo_raw)
    raw["search"].update(search_settings)
    return env_from_config(config_from_dict(raw, source=str(write_config(tmp_path / "variant.yaml", raw))))


def repaired_uniform(env, ratio: float = 0.5) -> nn.Module:
    space = env.space
    keep = uniform_policy(space.sizes, space.round_to, space.cost, ratio * env.full_cost, env.lbound)
    pruned = space.apply(copy.deepcopy(env.model), keep)
    env.scorer.repair(pruned, space.refit_layers(keep))
    return pruned


def with_random_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))
        elif isinstance(m, nn.Linear):  # the zoo's 0.01 init would make every logit tiny
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=generator) / m.in_features ** 0.5)
    return model.eval()


@pytest.mark.parametrize("name,channels,side,foldable", [
    ("resnet20", 1, 32, 21),  # every BN, the projection shortcuts' too
    ("branchy_cnn", 3, 16, 8),
    ("mobilenet_v1", 3, 32, 27),
])
def test_folded_batchnorm_equals_unfolded(name, channels, side, foldable):
    torch.manual_seed(0)
    kwargs = {"cifar": True, "width_mult": 0.5} if name == "mobilenet_v1" else {}
    model = with_random_statistics(build_model(name, 10, channels, kwargs))
    pairs = batchnorm_pairs(model)
    assert len(pairs) == foldable == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(6, channels, side, side)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(copy.deepcopy(model), pairs)
        got = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert expected.abs().max() > 1.0  # not a trivially small output
    assert (got - expected).abs().max() <= 1e-4


def test_fp32_results_identical_across_batch_sizes(demo_raw, tmp_path):
    env = demo_env(demo_raw, tmp_path, precision="fp32")
    pruned = repaired_uniform(env)
    fast = env.scorer.fast
    reference = accuracy(pruned, fast.batches(len(fast.labels)))  # plain eager fp32, BN unfolded
    results = []
    for batch_size in (1, 7, 64, 300, None):  # None: the measured fastest
        evaluator = FastEval(fast.images, fast.labels, fast.pairs, fast.channels_last, "fp32", batch_size)
        results.append(evaluator.accuracy(pruned))
    assert all((r["top1"], r["top5"]) == (reference["top1"], reference["top5"]) for r in results)
    assert all(r["nll"] == pytest.approx(reference["nll"], rel=1e-5) for r in results)  # summed in another order
    assert 0.5 < reference["top1"] < 1.0 and 0 < reference["nll"] < 2
    assert set(evaluator.measured) == {"fp32"}


def test_fidelity_check_falls_back_to_fp32_and_leaves_the_rng_alone(demo_raw, tmp_path):
    env = demo_env(demo_raw, tmp_path, precision="bf16")
    assert env.scorer.precision == "bf16"
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    kept = check_fidelity(env, tmp_path / "kept.json", policies=4, tolerance=1e9)
    assert env.scorer.precision == "bf16" and kept["candidates"]["bf16"]["passed"]
    with pytest.warns(UserWarning, match="fidelity check: bf16 would change the rewards"):
        report = check_fidelity(env, tmp_path / "fidelity.json", policies=4, tolerance=0.0)
    assert env.scorer.precision == "fp32"
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    saved = json.loads((tmp_path / "fidelity.json").read_text())
    assert saved == report and saved["precision"] == "fp32"
    assert saved["keeps"] == kept["keeps"] and len(saved["keeps"]) == 5  # the base model + 4 policies
    assert saved["keeps"][0] == env.space.sizes and len({tuple(k) for k in saved["keeps"]}) == 5
    bf16 = saved["candidates"]["bf16"]
    assert not bf16["passed"] and len(bf16["errors"]) == len(saved["fp32_errors"]) == 5
    assert bf16["max_abs_diff"] < 0.05  # bf16 is close to fp32 on the demo, only the tolerance failed it
    # after the fallback, a reward is the fp32 reference error exactly
    keep = saved["keeps"][1]
    assert env.evaluate(keep)[1]["error"] == saved["fp32_errors"][1]


def test_the_fidelity_check_of_nll_rewards_measures_the_cross_entropys_own_error(demo_raw, tmp_path):
    """nll's error (the cross-entropy) is not a proportion: its sampling error is the per-image
    spread over the square root of the images, and the check decides on that scale."""
    from amc.fidelity import reference_model
    from amc.metrics import per_image_metric

    env = demo_env(demo_raw, tmp_path, precision="bf16", reward_metric="nll")
    report = check_fidelity(env, policies=2, tolerance=1e9)
    values = per_image_metric(reference_model(env, env.space.sizes), env.scorer.fast.batches(256), "nll")
    bf16 = report["candidates"]["bf16"]
    assert bf16["passed"] and bf16["standard_error"] == pytest.approx(values.std(ddof=1) / len(values) ** 0.5)
    assert report["fp32_errors"][0] == pytest.approx(1 - values.mean(), abs=1e-6)  # the base's cross-entropy
    with pytest.warns(UserWarning, match=r"nll difference\| [0-9.]+ nats"):
        check_fidelity(env, policies=2, tolerance=0.0)


def test_the_fidelity_gate_ignores_swaps_of_policies_tied_at_the_rewards_resolution():
    """A VGG-16 search's check (5,000 reward-val images): bf16 swapped two policies that fp32 puts
    2 images apart, well inside the allowed 0.11 points; a swap of two policies further apart fails."""
    fp32 = [0.0782, 0.1178, 0.0982, 0.1198, 0.0932, 0.1174]
    bf16 = [0.0782, 0.1182, 0.0976, 0.1210, 0.0934, 0.1186]
    se = (np.mean(fp32) * (1 - np.mean(fp32)) / 5000) ** 0.5  # binomial, 5,000 images
    passed = compare(bf16, fp32, se, tolerance=0.25)
    assert passed["spearman"] < 0.95 and passed["reordered_pairs"] == 0 and passed["passed"]
    swapped = [0.0782, 0.1182, 0.0976, 0.1160, 0.0934, 0.1186]  # 0.1198 scored below 0.1178 and 0.1174
    failed = compare(swapped, fp32, se, tolerance=0.25)
    assert failed["reordered_pairs"] == 2 and failed["mean_abs_diff"] < failed["allowed_mean_abs_diff"]
    assert not failed["passed"]


def test_rank_correlation_with_ties():
    assert rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.1], [0.2, 0.2]) == 1.0
    assert np.isnan(rank_correlation([0.1, 0.1], [0.2, 0.3]))


def test_fp16_on_a_cpu_is_refused(demo_raw, tmp_path):
    with pytest.raises(UserError, match="search.precision: fp16 has no fast kernels on a CPU"):
        demo_env(demo_raw, tmp_path, precision="fp16")


@pytest.mark.parametrize("calibration", ["bn", "both"])
def test_search_reward_equals_the_exported_models_reward_val_error(demo_raw, tmp_path, calibration):
    demo_raw["search"].update(episodes=6, calibration=calibration, precision="fp32")
    demo_raw["agent"]["warmup_episodes"] = 3
    cfg = config_from_dict(demo_raw, source=str(write_config(tmp_path / "demo.yaml", demo_raw)))
    run_dir = tmp_path / "run"
    best = search(cfg, run_dir, progress=False)
    _, metrics = export_run(run_dir)
    assert best["error"] == 1.0 - metrics["reward_val_top1"]
    assert json.loads((run_dir / "fidelity.json").read_text())["precision"] == "fp32"


@pytest.mark.parametrize("value", ["auto", 256])
def test_eval_batch_size_is_auto_or_a_positive_integer(demo_raw, value):
    demo_raw["data"]["eval_batch_size"] = value
    data = config_from_dict(demo_raw).data
    assert data.eval_batch_size == value and data.loader_batch_size == (512 if value == "auto" else 256)


@pytest.mark.parametrize("value", [0, "fast"])
def test_a_bad_eval_batch_size_is_refused(demo_raw, value):
    demo_raw["data"]["eval_batch_size"] = value
    with pytest.raises(UserError, match=f"data.eval_batch_size: must be a positive integer or auto, got {value!r}"):
        config_from_dict(demo_raw)
