"""`alignline lora`: LoRA/QLoRA fine-tuning of a released causal LM (or an alignline checkpoint) on chat data.

    alignline lora --base runs/tiny/sft --data runs/tiny/data --run-dir runs/tiny
    alignline lora --base Qwen/Qwen2.5-0.5B-Instruct --data ../shared/data/sft/alpaca_en_demo.json \
        --run-dir runs/qwen --config configs/lora/small.yaml --set lora.r=32 --set train.max_steps=200

Writes `<run-dir>/lora/` (adapter/, merged checkpoint/, eval.json, manifest.json); see stages/lora.py.
The same job runs as the Prefect flow `flows/lora.py:lora_flow`. Heavy imports happen inside the
command so `alignline --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer


def lora(
    base: str = typer.Option(None, "--base", help="base model: local HF dir, alignline stage dir, or hub id"),
    data: str = typer.Option(None, "--data", help="chat data: .json/.jsonl file, data stage dir, or hub dataset"),
    out: Path = typer.Option(..., "--run-dir", help="run directory; the stage writes RUN_DIR/lora/ (as every stage)"),
    config: Path = typer.Option(None, "--config", help="stage YAML (default: configs/lora/tiny.yaml)"),
    overrides: list[str] = typer.Option([], "--set", help="config override key.path=value (repeatable)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config and exit"),
) -> None:
    """LoRA-fine-tune BASE on DATA: adapter + merged checkpoint + before/after eval in RUN_DIR/lora/."""
    import logging

    from stages.lora import cli

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cli(base, data, out, config, overrides, print_config)
    except SystemExit as exc:
        raise typer.Exit(int(exc.code or 0)) from None


def register(app: typer.Typer) -> None:
    app.command("lora", help="LoRA/QLoRA fine-tuning of a released model on chat data (stage `lora`).")(lora)
