"""`alignline stage <name> ...`: run one pipeline stage (every stage in stages.STAGES), by hand or as a flow.

    alignline stage --help
    alignline stage pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny --set optim.lr=3e-4
    alignline stage sft --config configs/sft/tiny.yaml --init runs/tiny/pretrain
    alignline stage reward --flow --run-dir runs/tiny [--force] [--nproc-per-node N]

Each sub-command forwards its arguments to the stage module's `main(argv)` (the same parser as
`python -m stages.<name>`, see alignline/stage_cli.py), so `alignline stage X --help` lists every
option. `--flow` runs the same stage, with the same options, as the Prefect flow
`flows/stage.py:stage_flow` (what the single-stage deployment runs): an unchanged stage is reused
from its cache unless `--force`, the run directory is locked and a report card is published;
`--nproc-per-node N` launches it under torchrun. Stage modules are imported only when their command
runs, so a missing or broken stage module fails only when used, with a message naming it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from alignline.config import UserError
from alignline.stage_cli import build_parser
from flows.cli import set_prefect_env
from stages import DESCRIPTIONS, STAGES


def _make_command(name: str):
    def command(ctx: typer.Context) -> None:
        from stages import StageNotAvailable, load_stage_module

        try:
            module = load_stage_module(name)
        except StageNotAvailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        args = list(ctx.args)
        if "--flow" in args:
            run_as_flow(name, module, args)
        else:
            module.main(args)

    command.__name__ = f"stage_{name}"
    command.__doc__ = f"{DESCRIPTIONS.get(name, STAGES[name])} (options: alignline stage {name} --help)"
    return command


def _take(args: list[str], flag: str, has_value: bool = False) -> str | bool | None:
    """Remove `flag` (and its value) from `args`; its value, True for a bare flag, None when absent."""
    for i, a in enumerate(args):
        if a == flag or (has_value and a.startswith(flag + "=")):
            del args[i]
            if not has_value:
                return True
            if "=" in a:
                return a.split("=", 1)[1]
            if i >= len(args):
                typer.echo(f"error: {flag} needs a value", err=True)
                raise typer.Exit(2)
            return args.pop(i)
    return None


def run_as_flow(name: str, module, args: list[str]) -> None:
    """`alignline stage NAME --flow ...`: the stage's own options, run by flows.stage.stage_flow."""
    args = list(args)
    _take(args, "--flow")
    force = bool(_take(args, "--force"))
    nproc = _take(args, "--nproc-per-node", has_value=True)
    if not hasattr(module, "INPUTS") or name == "lora":
        typer.echo(f"error: --flow runs a pipeline stage; for {name!r} use `alignline {name}` (its flow is "
                   f"flows/{name}.py)", err=True)
        raise typer.Exit(2)
    try:
        nproc_n = int(nproc) if nproc is not None else 1
    except ValueError:
        typer.echo(f"error: --nproc-per-node {nproc!r} is not a number", err=True)
        raise typer.Exit(2) from None
    parsed = build_parser(name, module.INPUTS, module.__doc__, module.Config).parse_args(args)
    set_prefect_env()
    from alignline.launch import exit_with_tree_on_signal
    from flows.stage import stage_flow
    from flows.tasks import StageEntry

    # A --config path is relative to the working directory; the default is repo-relative.
    config = str(Path(parsed.config).resolve()) if parsed.config else f"configs/{name}/tiny.yaml"
    run_dir = parsed.run_dir or Path("runs") / Path(config).stem
    inputs = {s.name: str(getattr(parsed, s.name)) for s in module.INPUTS if getattr(parsed, s.name) is not None}
    try:
        entry = StageEntry(config=config, set=list(parsed.overrides), inputs=inputs, nproc_per_node=nproc_n)
        exit_with_tree_on_signal()
        out = stage_flow(stage=name, run_dir=str(run_dir), entry=entry, force=force)
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{name}: {out['status']} -> {out['path']}")


def register(app: typer.Typer) -> None:
    stage_app = typer.Typer(
        name="stage",
        help="Run one pipeline stage: alignline stage <name> --help lists its options; add --flow to run "
             "it as a Prefect flow (cache, lock, report card; --force, --nproc-per-node N).",
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
