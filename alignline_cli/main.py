"""The `alignline` command: the top of the stack (imports stages and flows; nothing imports it).

    alignline --help
    alignline pipeline --config configs/pipeline/tiny.yaml --run-dir runs/tiny
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny

Each group of sub-commands lives in its own module with a `register(app)` function; heavy
imports (torch, transformers, prefect) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from alignline_cli import data_cmds, eval_cmds, lora_cmds, model_cmds, pipeline_cmds, stage_cmds

app = typer.Typer(
    name="alignline",
    help="Train a language model from raw text to an aligned chat model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors too (also ALIGNLINE_DEBUG=1)"),
) -> None:
    if debug:
        os.environ["ALIGNLINE_DEBUG"] = "1"  # read by stage_cli in this process and in stage subprocesses


for module in (pipeline_cmds, stage_cmds, data_cmds, model_cmds, lora_cmds, eval_cmds):
    module.register(app)


def main() -> None:
    """Run the app; a UserError anywhere below is one `error:` message and exit 2, no traceback."""
    from alignline.config import UserError, debug_enabled

    try:
        app()
    except UserError as exc:
        if debug_enabled():
            traceback.print_exc()
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
