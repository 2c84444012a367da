"""Typed configs: unknown keys and bad values are errors that name the file, line and key."""

from pathlib import Path

import pytest

from alignline.config import (
    ConfigError,
    OptimConfig,
    StrictModel,
    apply_overrides,
    config_sha256,
    load_config,
    save_config,
)


class _Cfg(StrictModel):
    name: str = "x"
    optim: OptimConfig = OptimConfig()


def test_unknown_key_names_file_line_and_key(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.1\n  wd: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(_Cfg, path)
    assert f"{path}:4: optim.wd: unknown key" in str(exc.value)


def test_wrong_type_names_key(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r":2: optim.lr: .*valid number"):
        load_config(_Cfg, path)


def test_overrides_apply_last_and_parse_numbers(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    cfg = load_config(_Cfg, path, ["optim.lr=3e-4", "name=run1"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.name == "run1"
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "a"}, ["name.sub=1"])


def test_saved_config_round_trips_with_same_hash(tmp_path: Path):
    cfg = load_config(_Cfg, None, ["optim.weight_decay=0.0"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(_Cfg, tmp_path / "config.yaml")
    assert again == cfg and config_sha256(again) == config_sha256(cfg)
    assert config_sha256(load_config(_Cfg, None, ["optim.lr=1e-3"])) != config_sha256(cfg)


def test_invalid_yaml_names_line(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(_Cfg, path)
