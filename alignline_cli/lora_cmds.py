"""`alignline lora`: LoRA/QLoRA fine-tuning of a released causal LM (or an alignline checkpoint) on chat data.

    alignline lora --base runs/tiny/sft --data runs/tiny/data --run-dir runs/tiny
    alignline lora --base Qwen/Qwen2.5-0.5B-Instruct --data ../shared/data/sft/alpaca_en_demo.json \
        --run-dir runs/qwen --config configs/lora/small.yaml --set lora.r=32 --set train.max_steps=200

The stage `lora` under its everyday name: the same parser and code as `alignline stage lora` and
`python -m stages.lora` (stage_cli.stage_main; `alignline lora --help` lists every option and
config key). Writes `<run-dir>/lora/` (adapter/, merged checkpoint/, eval.json, manifest.json);
see stages/lora.py. The same job runs as the Prefect flow `flows/lora.py:lora_flow`.
"""

from __future__ import annotations

import typer


def lora(ctx: typer.Context) -> None:
    """LoRA-fine-tune --base on --data: adapter + merged checkpoint + before/after eval in RUN_DIR/lora/."""
    from stages import load_stage_module

    load_stage_module("lora").main(list(ctx.args))


def register(app: typer.Typer) -> None:
    app.command(
        "lora",
        help="LoRA/QLoRA fine-tuning of a released model on chat data (stage `lora`; options: alignline lora --help).",
        # Options belong to the stage's own parser (argparse), so typer passes them through.
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(lora)
