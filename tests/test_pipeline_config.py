"""Pipeline config loading and validation (no Prefect run): the shipped YAMLs resolve, errors point home.

    .venv/bin/pytest tests/test_pipeline_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignline.config import ConfigError
from flows.pipeline import (
    load_pipeline_config,
    resolve_pipeline,
    split_overrides,
    stage_inputs,
)
from flows.tasks import total_steps
from stages import pipeline_stages

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["tiny", "tiny_distill", "ci"])
def test_shipped_pipelines_validate_every_stage(name: str) -> None:
    cfg = load_pipeline_config(REPO / "configs" / "pipeline" / f"{name}.yaml")
    resolved = resolve_pipeline(cfg)
    # The optional distill stage runs where the pipeline turns it on (tiny_distill, and ci for the suite).
    expected = [s for s in pipeline_stages() if s != "distill" or name != "tiny"]
    assert list(resolved) == expected
    # The DAG from each stage's INPUTS: every input is produced by an earlier stage of this run.
    run_dir = Path("/nonexistent/run")
    for i, stage in enumerate(expected):
        for path in stage_inputs(resolved[stage], run_dir, set(resolved)).values():
            assert Path(path).name in expected[:i], (stage, path)
    if "distill" in resolved:  # the student is compared beside the teacher by evaluate
        assert stage_inputs(resolved["evaluate"], run_dir, set(resolved))["distill"] == str(run_dir / "distill")


def test_an_optional_stage_runs_only_when_enabled(tmp_path: Path) -> None:
    """distill (StageSpec.optional): off when a pipeline leaves it out or only configures it; on with
    `enabled: true`, from the YAML or the command line."""
    from stages import optional_stages

    assert optional_stages() == ("distill",)
    left_out = tmp_path / "p.yaml"
    left_out.write_text("name: x\nstages:\n  sft: {config: configs/sft/tiny.yaml}\n")
    for path, extra, on in ((left_out, [], False), (left_out, ["distill.loss.sft_weight=0.5"], False),
                            (left_out, ["stages.distill.config=configs/distill/tiny.yaml"], False),
                            (left_out, ["stages.distill.enabled=true"], True),
                            (REPO / "configs" / "pipeline" / "tiny.yaml", [], False),
                            (REPO / "configs" / "pipeline" / "tiny.yaml", ["stages.distill.enabled=true"], True)):
        cfg = load_pipeline_config(path, extra)
        assert cfg.stages["distill"].enabled is on, (path, extra)
        assert ("distill" in resolve_pipeline(cfg)) is on
    assert all(cfg.stages[s].enabled for s in pipeline_stages() if s != "distill")


def test_ci_pipeline_is_small() -> None:
    resolved = resolve_pipeline(load_pipeline_config(REPO / "configs" / "pipeline" / "ci.yaml"))
    assert total_steps(resolved["pretrain"].config_dict) <= 20
    assert total_steps(resolved["rlhf"].config_dict) <= 5


def test_stage_overrides_go_to_their_stage() -> None:
    pipe, per_stage = split_overrides(["sft.optim.lr=1e-4", "gates.enabled=false", "pretrain.train.max_steps=3",
                                       "stages.reward.enabled=false"])
    assert pipe == ["gates.enabled=false", "stages.reward.enabled=false"]
    assert per_stage == {"sft": ["optim.lr=1e-4"], "pretrain": ["train.max_steps=3"]}
    cfg = load_pipeline_config(REPO / "configs" / "pipeline" / "ci.yaml", ["sft.optim.lr=1e-4", "gates.max_kl=2"])
    assert cfg.stages["sft"].set[-1] == "optim.lr=1e-4"  # appended after the YAML's own overrides
    assert cfg.gates.max_kl == 2.0
    assert resolve_pipeline(cfg)["sft"].config.optim.lr == 1e-4


def test_unknown_pipeline_key_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  sft:\n    config: configs/sft/tiny.yaml\n    retrys: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: stages.sft.retrys: unknown key"):
        load_pipeline_config(bad)


def test_bad_stage_configs_are_all_reported_before_running(tmp_path: Path) -> None:
    cfg = load_pipeline_config(REPO / "configs" / "pipeline" / "ci.yaml",
                               ["stages.reward.config=configs/reward/nope.yaml", "pretrain.train.max_stepz=3"])
    with pytest.raises(ConfigError) as info:
        resolve_pipeline(cfg)
    msg = str(info.value)
    assert "[reward]" in msg and "configs/reward/nope.yaml does not exist" in msg
    assert "[pretrain]" in msg and "train.max_stepz: unknown key" in msg


def test_output_dirs_follow_the_selected_algorithm(tmp_path: Path) -> None:
    """The rlhf stage's dir is rlhf-<algorithm>: evaluate reads it, --from/--to accept it, and a
    non-selected algorithm is refused with the way to select it."""
    from alignline_cli.pipeline_cmds import check_stage_range
    from flows.pipeline import stage_dirs, stage_slot, variant_keys

    for algo, conf in (("ppo", "tiny"), ("dpo", "dpo_tiny")):
        cfg = load_pipeline_config(REPO / "configs" / "pipeline" / "tiny.yaml", [f"rlhf.config=configs/rlhf/{conf}.yaml"])
        resolved = resolve_pipeline(cfg)
        dirs = stage_dirs(cfg, resolved)
        assert dirs == {**{s: s for s in pipeline_stages()}, "rlhf": f"rlhf-{algo}"}
        assert resolved["rlhf"].dir_name == f"rlhf-{algo}"
        assert stage_inputs(resolved["evaluate"], tmp_path, set(resolved), dirs)["rlhf"] == str(tmp_path / f"rlhf-{algo}")
        assert stage_slot("--from", f"rlhf-{algo}", dirs) == "rlhf" and stage_slot("--from", "rlhf", dirs) == "rlhf"
    assert variant_keys(resolved) == {"rlhf": "algorithm"}
    with pytest.raises(ConfigError, match=r"--from rlhf-ppo: this pipeline's rlhf stage is rlhf-dpo \(its config "
                                          r"selects dpo\); to restart ppo, select it \(a rlhf config with `algorithm: ppo`: "
                                          r"--set rlhf.config=PATH\)"):
        stage_slot("--from", "rlhf-ppo", dirs, variant_keys(resolved))
    with pytest.raises(ConfigError, match=r"did you mean 'rlhf'"):
        stage_slot("--from", "rlfh", dirs)
    # --from evaluate needs the selected algorithm's output (a pre-variant rlhf/ counts: the flow moves it).
    for s in pipeline_stages()[: pipeline_stages().index("rlhf")]:
        (tmp_path / s).mkdir()
        (tmp_path / s / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"earlier stage 'rlhf' has not finished.*rlhf-dpo/manifest.json"):
        check_stage_range("evaluate", None, tmp_path, set(resolved), dirs)
    (tmp_path / "rlhf").mkdir()
    (tmp_path / "rlhf" / "manifest.json").write_text("{}")
    check_stage_range("evaluate", None, tmp_path, set(resolved), dirs)


def test_every_relative_path_is_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """One path convention: a pipeline YAML's stage `config:` resolves against the working directory,
    like data paths, run_dir and the command line."""
    from flows.pipeline import load_pipeline_config, resolve_pipeline

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sft.yaml").write_text("train:\n  max_steps: 7\n")
    off = "".join(f"  {s}: {{enabled: false}}\n" for s in pipeline_stages() if s != "sft")
    (tmp_path / "p.yaml").write_text("name: x\nstages:\n  sft: {config: mine/sft.yaml}\n" + off)
    monkeypatch.chdir(tmp_path)
    assert resolve_pipeline(load_pipeline_config("p.yaml"))["sft"].config.train.max_steps == 7
    monkeypatch.chdir(tmp_path / "mine")  # the same YAML from elsewhere: the relative path no longer exists
    with pytest.raises(ConfigError, match=f"mine/sft.yaml does not exist \\(relative paths are relative to the "
                                          f"working directory {tmp_path / 'mine'}"):
        resolve_pipeline(load_pipeline_config(tmp_path / "p.yaml"))
