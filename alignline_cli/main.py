"""The `alignline` command: the top of the stack (imports stages and flows; nothing imports it).

    alignline --help
    alignline pipeline --config configs/pipeline/tiny.yaml --run-dir runs/tiny
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny

Each group of sub-commands lives in its own module with a `register(app)` function; heavy
imports (torch, transformers, prefect) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import typer

from alignline_cli import data_cmds, lora_cmds, model_cmds, pipeline_cmds, stage_cmds

app = typer.Typer(
    name="alignline",
    help="Train a language model from raw text to an aligned chat model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (pipeline_cmds, stage_cmds, data_cmds, model_cmds, lora_cmds):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
