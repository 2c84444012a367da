"""Every YAML under configs/ loads and validates into its stage's config class.

    .venv/bin/pytest tests/test_configs.py -q

The directory name picks the class through the stages registry (`configs/pretrain/*.yaml` ->
`stages.pretrain.Config`, `configs/rlhf/*` -> `stages.ppo.Config`); `configs/pipeline/*` ->
`flows.pipeline.PipelineConfig`. A registered stage or flows module that cannot be imported fails
the test (it is a broken install or a broken module, not a reason to skip). Also: config errors
name the key (and the line), and are raised before any model is built.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from alignline.config import ConfigError, load_config
from stages import STAGES, StageNotAvailable, config_class

REPO = Path(__file__).resolve().parent.parent
YAMLS = sorted((REPO / "configs").glob("*/*.yaml"))


def _class_for(directory: str):
    if directory == "pipeline":
        try:
            return importlib.import_module("flows.pipeline").PipelineConfig
        except (ImportError, AttributeError) as exc:
            pytest.fail(f"configs/pipeline needs flows.pipeline.PipelineConfig, which cannot be imported: {exc}")
    if directory not in STAGES:
        pytest.fail(f"configs/{directory}/ matches no stage in stages.STAGES ({', '.join(STAGES)}) "
                    "and is not configs/pipeline; rename the directory or register the stage")
    try:
        return config_class(directory)
    except StageNotAvailable as exc:
        pytest.fail(f"configs/{directory}: the registered stage cannot be imported: {exc}")


@pytest.mark.parametrize("path", YAMLS, ids=[f"{p.parent.name}/{p.name}" for p in YAMLS])
def test_config_validates(path):
    cls = _class_for(path.parent.name)
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # The header says how to run it.
    assert path.read_text().lstrip().startswith("#"), f"{path} needs a comment header saying how to run it"


@pytest.mark.parametrize("stage", ["data", "tokenizer", "pretrain", "sft", "reward"])
def test_each_of_my_stages_has_three_sizes(stage):
    sizes = {p.stem for p in (REPO / "configs" / stage).glob("*.yaml")}
    assert {"tiny", "small", "1b"} <= sizes, f"configs/{stage}/ has {sorted(sizes)}"


def test_unknown_key_is_named_with_file_and_line(tmp_path):
    from stages.pretrain import Config

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\ntrain:\n  max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4: train\.max_stepz: unknown key"):
        load_config(Config, bad)


def test_wrong_type_is_named(tmp_path):
    from stages.sft import Config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: train\.batch_size: .*lots"):
        load_config(Config, bad)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(Config, REPO / "configs/sft/tiny.yaml", ["optim.lr=-1"])


def test_cli_config_error_exits_before_building_anything(tmp_path, capsys, monkeypatch):
    import stages.pretrain as pretrain

    def boom(*a, **k):
        raise AssertionError("run() must not be called with an invalid config")

    monkeypatch.setattr(pretrain, "run", boom)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--run-dir", str(tmp_path), "--set", "train.seq_len=oops"])
    assert exc.value.code == 2
    assert "train.seq_len" in capsys.readouterr().err


def test_cli_missing_input_names_dir_and_command(tmp_path, capsys):
    import stages.sft as sft

    with pytest.raises(SystemExit):
        sft.main(["--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--init: {tmp_path / 'pretrain'} does not exist" in err
    assert f"alignline stage pretrain --run-dir {tmp_path}" in err


def test_cli_incomplete_input_is_refused(tmp_path, capsys):
    import stages.tokenizer as tokenizer

    (tmp_path / "data").mkdir()  # exists but has no manifest: a crashed or running data stage
    with pytest.raises(SystemExit):
        tokenizer.main(["--run-dir", str(tmp_path)])
    assert "manifest.json is missing" in capsys.readouterr().err


def test_stage_help_lists_every_option(capsys):
    import stages.pretrain as pretrain

    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--run-dir", "--set", "--data", "--tokenizer", "--print-config"):
        assert flag in out


def test_registry_fails_clearly_for_unknown_stage():
    from stages import load_stage_module

    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        load_stage_module("nope")


def test_alignline_stage_command_forwards_to_the_stage_parser(tmp_path):
    from typer.testing import CliRunner

    from alignline_cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["stage", "--help"])
    assert res.exit_code == 0
    for name in ("data", "tokenizer", "pretrain", "sft", "reward"):
        assert name in res.output
    res = runner.invoke(app, ["stage", "reward", "--print-config", "--set", "train.max_steps=7"])
    assert res.exit_code == 0, res.output
    assert "max_steps: 7" in res.output
    res = runner.invoke(app, ["stage", "reward", "--run-dir", str(tmp_path), "--set", "train.nope=1"])
    assert res.exit_code == 2 and "train.nope: unknown key" in res.output


LIGHT = ["alignline", "alignline.config", "alignline.files", "alignline.artifacts", "alignline.stage_cli",
         "alignline.locks", "stages", "stages.tokenizer", "stages.data", "stages.evaluate", "stages.lora"]


def test_the_library_spine_imports_without_torch():
    """`import alignline` and the config, contract and CLI modules load without torch or transformers
    (a config check, `--print-config` or a light stage's `--help` must not pay torch's import); the
    model registers with the Auto classes where it is imported, in alignline.model."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for m in {LIGHT!r}: importlib.import_module(m)\n"
            "heavy = sorted(k for k in ('torch', 'transformers', 'trl', 'peft', 'prefect') if k in sys.modules)\n"
            "assert not heavy, heavy\n"
            "import alignline.model\n"
            "from transformers import AutoConfig\n"
            "assert type(AutoConfig.for_model('alignline')).__name__ == 'AlignlineConfig'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
