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
