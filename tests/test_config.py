"""Config validation: each kind of mistake is one UserError naming file, field and problem."""

from __future__ import annotations

import pytest

from amc.config import apply_overrides, config_from_dict, load_config
from amc.errors import UserError
from conftest import DEMO_CONFIG, demo_dict, write_config


def error_for(tmp_path, raw) -> str:
    path = write_config(tmp_path / "bad.yaml", raw)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def test_demo_config_loads():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.model.name == "demo_cnn"
    assert cfg.search.target == 0.5
    assert cfg.agent.hidden == [300, 300]  # DDPG defaults from the design


def test_unknown_key(tmp_path):
    raw = demo_dict(tmp_path)
    raw["search"]["targt"] = 0.3
    assert "search.targt: unknown key" in error_for(tmp_path, raw)


def test_wrong_type(tmp_path):
    raw = demo_dict(tmp_path)
    raw["search"]["episodes"] = "many"
    message = error_for(tmp_path, raw)
    assert "search.episodes" in message and "integer" in message


def test_missing_section(tmp_path):
    raw = demo_dict(tmp_path)
    del raw["data"]
    assert "data: required field is missing" in error_for(tmp_path, raw)


@pytest.mark.parametrize("target", [0, -0.1, 1.5])
def test_target_out_of_range(tmp_path, target):
    raw = demo_dict(tmp_path)
    raw["search"]["target"] = target
    assert "search.target" in error_for(tmp_path, raw)


def test_lbound_above_rbound(tmp_path):
    raw = demo_dict(tmp_path)
    raw["search"].update(lbound=0.9, rbound=0.5)
    assert "lbound (0.9) must be <= rbound (0.5)" in error_for(tmp_path, raw)


def test_bad_choice(tmp_path):
    raw = demo_dict(tmp_path)
    raw["search"]["calibration"] = "magic"
    message = error_for(tmp_path, raw)
    assert "search.calibration" in message and "'bn'" in message


def test_fine_grained_needs_params_budget(tmp_path):
    raw = demo_dict(tmp_path)
    raw["search"].update(mode="fine_grained", resource="flops")
    assert "resource: params" in error_for(tmp_path, raw)


@pytest.mark.parametrize("fields", [{"protocol": "accuracy"}, {"mode": "quantize", "resource": "size"}])
def test_an_anchor_needs_a_budgeted_channel_or_weight_search(tmp_path, fields):
    raw = demo_dict(tmp_path)
    raw["search"].update(anchor="uniform", **fields)
    assert "it needs protocol: resource and mode: channel or fine_grained" in error_for(tmp_path, raw)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_parsed_and_validated(tmp_path):
    raw = demo_dict(tmp_path)
    cfg = config_from_dict(apply_overrides(raw, ["search.target=0.3", "agent.hidden=[64, 64]"]))
    assert cfg.search.target == 0.3 and cfg.agent.hidden == [64, 64]
    with pytest.raises(UserError, match="--set expects key.sub=value"):
        apply_overrides(raw, ["search.target"])
    with pytest.raises(UserError, match="search.target"):
        config_from_dict(apply_overrides(raw, ["search.target=2"]), source="x.yaml")


def test_every_shipped_config_is_valid():
    for path in sorted(DEMO_CONFIG.parent.glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("where, key, expected", [
    ("top", "serach", "serach: unknown key (did you mean search?)"),
    ("search", "targt", "search.targt: unknown key (did you mean search.target?)"),
    ("agent", "noise_sigam", "agent.noise_sigam: unknown key (did you mean agent.noise_sigma?)"),
    ("search", "zzzz", "search.zzzz: unknown key"),
])
def test_unknown_key_suggests_the_closest_field(tmp_path, where, key, expected):
    raw = demo_dict(tmp_path)
    (raw if where == "top" else raw[where])[key] = 1
    message = error_for(tmp_path, raw)
    assert message.endswith(expected)
    assert "source" not in message  # internal fields are never suggested


def test_override_errors_blame_the_override_that_caused_them(tmp_path):
    raw = demo_dict(tmp_path)
    path = write_config(tmp_path / "x.yaml", raw)

    def error(overrides, file_raw=raw) -> str:
        write_config(path, file_raw)
        with pytest.raises(UserError) as info:
            load_config(path, overrides)
        return str(info.value)

    assert error(["search.target=abc"]).startswith("--set search.target=abc: search.target: ")
    assert error(["search.target=0.5", "search.target=2"]).startswith("--set search.target=2: ")
    assert error(["search=3"]).startswith("--set search=3: search: ")
    # a section rule broken by an override, and by the file while an unrelated override is given
    assert error(["search.rbound=0.1"]).startswith("--set search.rbound=0.1: search: lbound (0.2)")
    bad_file = demo_dict(tmp_path, search={"lbound": 0.8, "rbound": 0.4})
    assert error(["search.episodes=3"], bad_file).startswith(f"{path}: search: lbound (0.8)")
    # an override may repair the file
    assert load_config(write_config(path, bad_file), ["search.rbound=0.9"]).search.rbound == 0.9


def test_config_command_repeats_the_overrides(tmp_path):
    path = write_config(tmp_path / "my config.yaml", demo_dict(tmp_path))
    cfg = load_config(path, ["agent.hidden=[64, 64]", "search.target=0.3"])
    assert cfg.command("train") == f"amc train '{path}' --set 'agent.hidden=[64, 64]' --set search.target=0.3"
    assert cfg.overrides == ["agent.hidden=[64, 64]", "search.target=0.3"]
    assert "overrides" not in cfg.to_dict() and "source" not in cfg.to_dict()
