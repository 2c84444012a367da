"""`alignline stage <name> ...`: run one pipeline stage by hand (every stage in stages.STAGES).

    alignline stage --help
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny --set optim.lr=3e-4
    alignline stage sft --config configs/sft/tiny.yaml --init runs/tiny/pretrain

Each sub-command forwards its arguments to the stage module's `main(argv)` (the same parser as
`python -m stages.<name>`, see alignline/stage_cli.py), so `alignline stage X --help` lists every
option. Stage modules are imported only when their command runs, so `--help` stays instant and a
missing or broken stage module fails only when used, with a message naming it.
"""

from __future__ import annotations

import typer

from stages import DESCRIPTIONS, STAGES


def _make_command(name: str):
    def command(ctx: typer.Context) -> None:
        from stages import StageNotAvailable, load_stage_module

        try:
            module = load_stage_module(name)
        except StageNotAvailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        module.main(list(ctx.args))

    command.__name__ = f"stage_{name}"
    command.__doc__ = f"{DESCRIPTIONS.get(name, STAGES[name])} (options: alignline stage {name} --help)"
    return command


def register(app: typer.Typer) -> None:
    stage_app = typer.Typer(
        name="stage",
        help="Run one pipeline stage by hand: alignline stage <name> --help lists its options.",
        no_args_is_help=True,
    )
    for name in STAGES:
        stage_app.command(
            name=name,
            # Options belong to the stage's own parser (argparse), so typer passes them through.
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                              "help_option_names": []},
            add_help_option=False,
        )(_make_command(name))
    app.add_typer(stage_app, name="stage")
