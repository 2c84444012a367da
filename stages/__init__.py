"""The pipeline stages: one straight-through module per stage, `run(config, inputs, run_dir) -> Path`.

Each module exposes `Config` (its pydantic config class), `INPUTS` (its input dirs),
`run(config, inputs, run_dir)` and `main(argv=None)`, so all of these work:

    python -m stages.pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny
    from stages import load_stage_module; load_stage_module("sft").run(cfg, {"init": ...}, run_dir)

`REGISTRY` is the one list of stages: name, module, one-line description and whether it is a step
of the pipeline, in pipeline order. The pipeline's stage sequence and config (flows/pipeline.py),
the `alignline stage` commands, the report card's row order and the test fixtures all derive from
it. Adding a stage is a module plus `register(StageSpec(...))`, nothing else. Modules are imported
lazily, so a missing or broken one only fails (clearly) when that stage is used. No Prefect import
anywhere in stages/.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from alignline.config import ConfigError


@dataclass(frozen=True)
class StageSpec:
    """One stage: `name` (its command and output dir), `module` (implements the stage interface),
    `description` (shown by `alignline stage --help`), `pipeline` (a step of `alignline pipeline`, in
    registry order; False: run on its own, like lora), `optional` (a pipeline step that is off unless the
    pipeline config lists it, like distill)."""

    name: str
    module: str
    description: str
    pipeline: bool = True
    optional: bool = False


REGISTRY: list[StageSpec] = [
    StageSpec("data", "stages.data", "generate the built-in task suite or prepare real data"),
    StageSpec("tokenizer", "stages.tokenizer", "train the byte-level BPE tokenizer (or reuse a checkpoint's)"),
    StageSpec("pretrain", "stages.pretrain", "pretrain the decoder on the pretraining corpus (own loop, DDP/FSDP)"),
    StageSpec("sft", "stages.sft", "supervised fine-tuning with TRL SFTTrainer (full or LoRA)"),
    StageSpec("reward", "stages.reward", "train a reward model with TRL RewardTrainer"),
    StageSpec("rlhf", "stages.rlhf", "RLHF: PPO (or DPO/GRPO/RLOO) against the reward model"),
    StageSpec("distill", "stages.distill", "distil the aligned model into a smaller student (TRL DistillationTrainer)",
              optional=True),
    StageSpec("evaluate", "stages.evaluate", "evaluate checkpoints and write the report card"),
    StageSpec("export", "stages.export", "export the aligned model to Llama and GGUF, validated in their runtimes"),
    StageSpec("lora", "stages.lora", "LoRA fine-tuning of a released model on chat data", pipeline=False),
]

# name -> module and name -> description, kept in step with REGISTRY by `register`.
STAGES: dict[str, str] = {s.name: s.module for s in REGISTRY}
DESCRIPTIONS: dict[str, str] = {s.name: s.description for s in REGISTRY}


def register(spec: StageSpec, *, after: str | None = None) -> None:
    """Add a stage (after stage `after`, else at the end of the pipeline steps). Its module is
    imported when the stage is first used."""
    if spec.name in STAGES:
        raise ValueError(f"stage {spec.name!r} is already registered (module {STAGES[spec.name]})")
    names = [s.name for s in REGISTRY]
    if after is not None:
        index = names.index(after) + 1
    else:
        index = max((i + 1 for i, s in enumerate(REGISTRY) if s.pipeline), default=0)
    REGISTRY.insert(index, spec)
    STAGES[spec.name] = spec.module
    DESCRIPTIONS[spec.name] = spec.description


def unregister(name: str) -> None:
    """Remove a stage registered with `register` (tests)."""
    REGISTRY[:] = [s for s in REGISTRY if s.name != name]
    STAGES.pop(name, None)
    DESCRIPTIONS.pop(name, None)


def pipeline_stages() -> tuple[str, ...]:
    """The pipeline's stages, in run order."""
    return tuple(s.name for s in REGISTRY if s.pipeline)


def optional_stages() -> tuple[str, ...]:
    """Pipeline steps that run only where a pipeline config lists them (enabled)."""
    return tuple(s.name for s in REGISTRY if s.pipeline and s.optional)


def stage_order() -> tuple[str, ...]:
    """Every registered stage, pipeline steps first (the report card's row order)."""
    return tuple(s.name for s in REGISTRY)


class StageNotAvailable(ConfigError, ImportError):
    """The module of a stage is missing, fails to import or lacks the stage interface (a user error:
    a wrong `module:` in a pipeline config, or a broken install)."""


def load_stage_module(name: str, module: str | None = None) -> ModuleType:
    """Import the module of stage `name` (or `module`, a pipeline entry's own implementation of it),
    with one clear error when it is unknown, missing or broken. The one stage importer: the CLI,
    the flows and the tests all come through here."""
    if module is None and name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    modname = module or STAGES[name]
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise StageNotAvailable(f"stage {name!r}: module {modname} does not exist yet "
                                    f"(expected file {modname.replace('.', '/')}.py)") from exc
        raise StageNotAvailable(f"stage {name!r}: importing {modname} failed: {exc}") from exc
    except Exception as exc:
        raise StageNotAvailable(f"stage {name!r}: importing {modname} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    missing = [a for a in ("Config", "run", "main") if not hasattr(module, a)]
    if missing:
        raise StageNotAvailable(f"stage {name!r}: {modname} lacks {', '.join(missing)} "
                                "(every stage module exposes Config, run and main)")
    return module


def config_class(name: str) -> type:
    return load_stage_module(name).Config
