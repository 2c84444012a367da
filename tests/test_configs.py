"""Every YAML under configs/ loads and validates into its stage's config class.

    .venv/bin/pytest tests/test_configs.py -q

The directory name picks the class through the stages registry (`configs/pretrain/*.yaml` ->
`stages.pretrain.Config`, `configs/rlhf/*` -> `stages.rlhf.Config`); `configs/pipeline/*` ->
`flows.pipeline.PipelineConfig`; `configs/ablation/*` -> `flows.ablate.AblationConfig` with every variant's
pretrain config resolved. A registered stage or flows module that cannot be imported fails
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
    if directory == "ablation":
        return importlib.import_module("flows.ablate").AblationConfig
    if directory == "pipeline":
        try:
            return importlib.import_module("flows.pipeline").PipelineConfig
        except (ImportError, AttributeError) as exc:
            pytest.fail(f"configs/pipeline needs flows.pipeline.PipelineConfig, which cannot be imported: {exc}")
    if directory not in STAGES:
        pytest.fail(f"configs/{directory}/ matches no stage in stages.STAGES ({', '.join(STAGES)}) "
                    "and is not configs/pipeline or configs/ablation; rename the directory or register the stage")
    try:
        return config_class(directory)
    except StageNotAvailable as exc:
        pytest.fail(f"configs/{directory}: the registered stage cannot be imported: {exc}")


@pytest.mark.parametrize("path", YAMLS, ids=[f"{p.parent.name}/{p.name}" for p in YAMLS])
def test_config_validates(path):
    cls = _class_for(path.parent.name)
    if path.parent.name == "ablation":
        from flows.ablate import load_ablation_config, resolve_ablation

        cfg = load_ablation_config(path)
        assert resolve_ablation(cfg).runs  # every variant's pretrain config validates
    else:
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
         "alignline.locks", "alignline.checkpointing", "alignline.rl.args", "alignline.chat", "stages",
         *(f"stages.{name}" for name in STAGES), "alignline_cli.main"]


def test_the_library_spine_imports_without_torch():
    """`import alignline`, the config, contract and CLI modules and every stage module load without
    torch or transformers, so a config check, `--print-config` or `alignline stage X --help` answers
    in well under a second; the model registers with the Auto classes where it is imported, in
    alignline.model."""
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


# --------------------------------------------------------------------------- the rlhf union


def test_rlhf_config_is_a_union_on_algorithm(tmp_path):
    """`algorithm` picks the config's shape: each algorithm has its own section and `optim:`, and a
    key of another algorithm is refused, named with its line, with the way out."""
    from stages.rlhf import (
        Config,
        DPOStageConfig,
        GRPOStageConfig,
        KTOStageConfig,
        PPOStageConfig,
        RLOOStageConfig,
    )

    shapes = {"ppo": (PPOStageConfig, "ppo"), "dpo": (DPOStageConfig, "dpo"), "kto": (KTOStageConfig, "kto"),
              "grpo": (GRPOStageConfig, "grpo"), "rloo": (RLOOStageConfig, "rloo")}
    for algo, (cls, section) in shapes.items():
        cfg = load_config(Config, None, [f"algorithm={algo}", "optim.lr=0.0123"])
        assert type(cfg) is cls and cfg.algorithm == algo and cfg.optim.lr == 0.0123
        assert hasattr(cfg, section) and all(not hasattr(cfg, other) for other in shapes if other != section)
        assert type(Config(algorithm=algo)) is cls  # constructing the base builds the variant too
    assert type(load_config(Config)) is PPOStageConfig  # algorithm defaults to ppo
    # PPO's optimizer is the stage's `optim:`, handed to the trainer with the `ppo:` section.
    ppo = load_config(Config, REPO / "configs/rlhf/tiny.yaml", ["optim.lr=0.002", "ppo.vf_coef=0.3"])
    assert ppo.ppo_args().optim.lr == 0.002 and ppo.ppo_args().vf_coef == 0.3

    bad = tmp_path / "dpo.yaml"
    bad.write_text("algorithm: dpo\nsteps: 3\nppo:\n  vf_coef: 0.1\nptx:\n  batch_size: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Config, bad)
    msg = str(exc.value)
    assert "invalid RLHFConfig for algorithm: dpo" in msg
    assert f"{bad}:3: ppo: unknown key" in msg and f"{bad}:5: ptx: unknown key" in msg
    assert "`ppo`, `ptx` belong(s) to algorithm: ppo" in msg and "config written for algorithm: dpo" in msg
    with pytest.raises(ConfigError, match=r"algorithm: Input should be 'ppo', 'dpo', 'kto', 'grpo' or 'rloo' \(got 'a2c'\)"):
        load_config(Config, None, ["algorithm=a2c"])
    with pytest.raises(ConfigError, match=r"ppo\.optim: unknown key"):  # the lr has one home: optim.lr
        load_config(Config, None, ["ppo.optim.lr=1e-3"])


def test_rlhf_help_lists_each_algorithms_keys(capsys):
    import stages.rlhf as rlhf

    with pytest.raises(SystemExit):
        rlhf.main(["--help"])
    out = capsys.readouterr().out
    for algo, key in (("ppo", "ppo.vf_coef"), ("dpo", "dpo.beta"), ("kto", "kto.desirable_weight"),
                      ("grpo", "grpo.num_generations"),
                      ("rloo", "rloo.num_generations")):
        block = out.split(f"with algorithm: {algo}\n")[1].split("with algorithm:")[0]
        assert f"    {key} = " in block and "    optim.lr = " in block, block
    assert "\n  steps = " in out and "\n  eval.num_prompts = " in out  # the shared keys, once


def test_pipeline_switches_the_rlhf_config_with_one_override():
    from flows.pipeline import load_pipeline_config, resolve_pipeline

    cfg = load_pipeline_config(REPO / "configs/pipeline/tiny.yaml", ["rlhf.config=configs/rlhf/grpo_tiny.yaml",
                                                                     "rlhf.grpo.beta=0.2"])
    rlhf = resolve_pipeline(cfg)["rlhf"]
    assert rlhf.dir_name == "rlhf-grpo" and rlhf.config.grpo.beta == 0.2


def test_one_builder_turns_our_sections_into_trainer_arguments(tmp_path):
    """sft, reward, lora and rlhf's TRL algorithms all get their TrainingArguments from
    `alignline.training.hf_trainer_args`: each of our keys lands in its HF field."""
    from transformers import TrainingArguments

    from alignline.config import LoggingConfig, OptimConfig, ScheduleConfig
    from alignline.training import hf_trainer_args

    kw = dict(output_dir=tmp_path, seed=7, max_steps=11, batch_size=3, save_every=4, device="cpu",
              optim=OptimConfig(lr=0.0123, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-7, grad_clip=0.0),
              schedule=ScheduleConfig(kind="cosine", warmup_steps=3, min_lr_ratio=0.2),
              logging=LoggingConfig(every_steps=2, report_to=["tensorboard", "wandb"], progress=False))
    a = TrainingArguments(**hf_trainer_args(**kw, grad_accum=2, eval_every=5))
    assert (a.learning_rate, a.weight_decay, a.adam_beta1, a.adam_beta2, a.adam_epsilon) == (0.0123, 0.05, 0.8, 0.9, 1e-7)
    assert a.max_grad_norm == 1e9  # grad_clip 0 = off
    assert str(a.lr_scheduler_type.value) == "cosine_with_min_lr" and a.lr_scheduler_kwargs == {"min_lr_rate": 0.2}
    assert (a.warmup_steps, a.seed, a.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps,
            a.save_steps, a.logging_steps) == (3, 7, 11, 3, 2, 4, 2)
    assert str(a.eval_strategy.value) == "steps" and a.eval_steps == 5 and a.disable_tqdm and a.use_cpu
    assert a.report_to == []  # W&B/MLflow get the metrics once, through our MetricsLogger, not twice
    b = TrainingArguments(**hf_trainer_args(**{**kw, "optim": OptimConfig(grad_clip=0.5),
                                               "schedule": ScheduleConfig(kind="constant", warmup_steps=0)}))
    assert b.max_grad_norm == 0.5 and str(b.eval_strategy.value) == "no"
    assert str(b.lr_scheduler_type.value) == "constant_with_warmup"


def test_a_section_given_in_part_keeps_its_fields_defaults(tmp_path):
    """`optim: {lr: ...}` in a DPO config keeps DPO's AdamW defaults (TRL's: no weight decay, beta2
    0.999), the values --help shows, not the bare OptimConfig class defaults (0.1, 0.95)."""
    from alignline.config import OptimConfig
    from stages.rlhf import Config

    path = tmp_path / "dpo.yaml"
    path.write_text("algorithm: dpo\noptim:\n  lr: 1.0e-4\nschedule:\n  warmup_steps: 3\n")
    cfg = load_config(Config, path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and tuple(cfg.optim.betas) == (0.9, 0.999)
    assert cfg.schedule.kind == "constant" and cfg.schedule.warmup_steps == 3
    assert OptimConfig().weight_decay == 0.1  # the class default differs: the field's default won


def test_every_config_field_has_a_description():
    """`alignline stage X --help` prints each key's description: every field of every registered stage's
    config (a union's variants too), of the sub-models it nests, and of the pipeline config has one."""
    from pydantic import BaseModel

    from flows.pipeline import PipelineConfig

    seen: set[type] = set()
    missing: list[str] = []

    def walk(cls: type[BaseModel]) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for sub in (cls.__dict__.get("variants") or {}).values():
            walk(sub)
        for name, field in cls.model_fields.items():
            if not field.description:
                missing.append(f"{cls.__module__}.{cls.__name__}.{name}")
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)

    for stage in STAGES:
        walk(config_class(stage))
    walk(PipelineConfig)
    assert not missing, f"{len(missing)} config field(s) without a description=:\n" + "\n".join(missing)


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, caplog):
    """10 warmup steps in a 4-step run leave the lr at a fraction of optim.lr: every loop says so."""
    import logging

    import torch

    from alignline.config import LoggingConfig, OptimConfig, ScheduleConfig
    from alignline.training import build_scheduler, hf_trainer_args

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level(logging.WARNING, logger="alignline.training"):
        build_scheduler(opt, ScheduleConfig(warmup_steps=10), 4, "ppo.warmup_iterations")
        hf_trainer_args(output_dir=tmp_path, optim=OptimConfig(), schedule=ScheduleConfig(warmup_steps=10),
                        logging=LoggingConfig(), seed=0, max_steps=4, batch_size=1, save_every=2, device="cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "ppo.warmup_iterations=10 >= the run's 4 steps" in msgs[0], msgs
    assert "schedule.warmup_steps=10 >= the run's 4 steps" in msgs[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignline.training"):
        build_scheduler(opt, ScheduleConfig(warmup_steps=3), 4)
    assert not caplog.records


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_resolves_with_its_ranks(path):
    """Each pipeline's stage configs validate, and each stage's batch splits over the ranks its entry
    asks for (the 1b pipeline runs pretrain, sft, reward and PPO on 8)."""
    from flows.pipeline import load_pipeline_config, resolve_pipeline

    resolved = resolve_pipeline(load_pipeline_config(path))
    assert resolved, path
    if path.stem == "1b":
        assert {k for k, v in resolved.items() if v.nproc == 8} == {"pretrain", "sft", "reward", "rlhf"}
        assert resolved["pretrain"].config.train.parallel == "fsdp"
    header = path.read_text().split("\n", 12)
    if path.stem in ("small", "1b"):  # hardware and expected time per stage
        assert any("GPU" in line for line in header) and any(" min" in line or " h " in line for line in header)


def _named_paths(text: str) -> set[str]:
    import re

    return {m.rstrip("/.") for m in re.findall(r"(?<![\w/.<-])((?:configs|deploy|bench|docs)/[\w./-]*[\w/])", text)}


def test_every_repository_path_named_in_the_docs_exists():
    """README, docs/, BENCHMARKS and the config headers name only files that exist (a missing
    configs/pipeline/small.yaml was once in docs/deploy.md)."""
    sources = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
               *sorted((REPO / "configs").rglob("*.yaml"))]
    missing = {}
    for src in sources:
        for named in _named_paths(src.read_text(encoding="utf-8")):
            if not (REPO / named).exists():
                missing.setdefault(named, []).append(src.relative_to(REPO).as_posix())
    assert not missing, f"paths named but not in the repository: {missing}"
    assert _named_paths("see configs/pipeline/small.yaml, and deploy/kubernetes/ or `docs/deploy.md`.") == {
        "configs/pipeline/small.yaml", "deploy/kubernetes", "docs/deploy.md"}
