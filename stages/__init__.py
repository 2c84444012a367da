"""The pipeline stages: one straight-through module per stage, `run(config, inputs, run_dir) -> Path`.

Each module exposes `Config` (its pydantic config class), `INPUTS` (its input dirs),
`run(config, inputs, run_dir)` and `main(argv=None)`, so all of these work:

    python -m stages.pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny
    from stages import load_stage_module; load_stage_module("sft").run(cfg, {"init": ...}, run_dir)

`STAGES` maps a stage name to its module; it is imported lazily so a missing or broken module
only fails (clearly) when that stage is used. No Prefect import anywhere in stages/.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from alignline.config import ConfigError

# name -> (module, one-line description shown by `alignline stage --help`)
STAGES: dict[str, str] = {
    "data": "stages.data",
    "tokenizer": "stages.tokenizer",
    "pretrain": "stages.pretrain",
    "sft": "stages.sft",
    "reward": "stages.reward",
    "rlhf": "stages.rlhf",
    "evaluate": "stages.evaluate",
    "lora": "stages.lora",
}

DESCRIPTIONS: dict[str, str] = {
    "data": "generate the built-in task suite or prepare real data",
    "tokenizer": "train the byte-level BPE tokenizer (or reuse a checkpoint's)",
    "pretrain": "pretrain the decoder on the pretraining corpus (own loop, DDP/FSDP)",
    "sft": "supervised fine-tuning with TRL SFTTrainer (full or LoRA)",
    "reward": "train a reward model with TRL RewardTrainer",
    "rlhf": "RLHF: PPO (or DPO/GRPO/RLOO) against the reward model",
    "evaluate": "evaluate checkpoints and write the report card",
    "lora": "LoRA fine-tuning stage",
}


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
