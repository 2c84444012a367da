"""`alignline pipeline`, `alignline ablate`, `alignline deploy`: the Prefect-orchestrated commands (`alignline stage X --flow`
runs one stage as a flow); `alignline report RUN_DIR` rebuilds a run's report card.

    alignline pipeline --config configs/pipeline/tiny.yaml --run-dir runs/tiny
    alignline pipeline --config configs/pipeline/tiny.yaml --from sft --set sft.optim.lr=1e-4
    alignline deploy --pool alignline            # then: prefect worker start --pool alignline

`pipeline` runs embedded: an ephemeral Prefect API on SQLite starts in-process (no server).
Point PREFECT_API_URL at a server to record runs there instead. Prefect is imported inside
the commands, after the environment defaults (`flows.cli.PREFECT_ENV_DEFAULTS`), so `alignline --help`
stays instant. `pipeline` is `flows.cli.run_pipeline_command`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flows.cli import check_stage_range, set_prefect_env  # noqa: F401 - re-exported for callers of this module


def _fail(msg: str, code: int) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _say(message: str, kind: str = "out") -> None:
    color = {"error": typer.colors.RED, "warn": typer.colors.YELLOW}.get(kind)
    typer.secho(message, fg=color, err=kind == "error")


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        config: Path = typer.Option(Path("configs/pipeline/tiny.yaml"), "--config", "-c",
                                    help="pipeline YAML (stage configs referenced from it)"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: run_dir in the YAML)"),
        from_stage: str | None = typer.Option(None, "--from", help="start at this stage (it is re-run from "
                                                 "scratch; rlhf: the algorithm the config selects, in rlhf-<algorithm>/; "
                                                 "earlier stages must exist)"),
        to_stage: str | None = typer.Option(None, "--to", help="stop after this stage"),
        overrides: list[str] = typer.Option([], "--set", help="override: <stage>.<key>=v for a stage config, "
                                            "<key>=v for the pipeline (e.g. gates.enabled=false); repeatable"),
        force: bool = typer.Option(False, "--force", help="re-run every stage, ignoring the cache"),
        print_config: bool = typer.Option(False, "--print-config", help="print the resolved pipeline and exit"),
        wait: bool = typer.Option(False, "--wait", help="when another pipeline or stage holds the run directory, "
                                  "wait until it is free instead of exiting with code 2"),
    ) -> None:
        """Run the whole pipeline (data -> ... -> rlhf -> evaluate -> export) as an embedded Prefect flow.

        Exit codes: 0 done, 1 a stage failed (re-run to resume), 2 a user error (config, a run directory
        another pipeline or stage holds, a full disk), 3 an evaluation gate stopped the run."""
        from flows.cli import run_pipeline_command

        code = run_pipeline_command(config, run_dir=run_dir, from_stage=from_stage, to_stage=to_stage,
                                    overrides=list(overrides), force=force, print_config=print_config, wait=wait,
                                    say=_say)
        if code:
            raise typer.Exit(code)

    @app.command("ablate")
    def ablate(
        config: Path = typer.Option(Path("configs/ablation/tiny.yaml"), "--config", "-c",
                                    help="ablation YAML (data, tokenizer, base pretrain config, variants, seeds)"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: run_dir in the YAML)"),
        overrides: list[str] = typer.Option([], "--set", help="override: <key>=v for the ablation config (e.g. "
                                            "max_concurrency=2, seeds=2), pretrain.<key>=v for the base pretrain "
                                            "config (every variant); repeatable"),
        print_config: bool = typer.Option(False, "--print-config", help="print the resolved ablation and every "
                                          "variant's pretrain config, and exit"),
        wait: bool = typer.Option(False, "--wait", help="when another process holds the run directory, wait"),
    ) -> None:
        """Architecture lab: pretrain each variant (and seed) on the same data, tokenizer and token budget,
        measure val loss by position at 1x..8x the training length, and write <run_dir>/ablation.md.

        Exit codes: 0 done, 1 a variant failed (the others finished; re-run to resume), 2 a user error."""
        from flows.cli import run_ablate_command

        code = run_ablate_command(config, run_dir=run_dir, overrides=list(overrides), print_config=print_config,
                                  wait=wait, say=_say)
        if code:
            raise typer.Exit(code)

    @app.command("deploy")
    def deploy(
        pool: str = typer.Option("alignline", "--pool", help="work pool (created if missing)"),
        pool_type: str = typer.Option("process", "--pool-type", help="process | docker | kubernetes"),
        config: Path = typer.Option(Path("configs/pipeline/tiny.yaml"), "--config", "-c",
                                    help="pipeline YAML for the nightly deployment (repo-relative)"),
        overrides: list[str] = typer.Option([], "--set", help="pipeline overrides, as for `alignline pipeline`"),
        cron: str = typer.Option("0 2 * * *", "--cron", help="nightly pipeline schedule"),
        lora_cron: str = typer.Option("0 4 * * 0", "--lora-cron", help="LoRA refresh schedule"),
        stage: str = typer.Option("reward", "--stage", help="stage of the single-stage deployment"),
        no_lora: bool = typer.Option(False, "--no-lora", help="skip the LoRA refresh deployment"),
    ) -> None:
        """Create the deployments (nightly pipeline, LoRA refresh, single stage) on $PREFECT_API_URL."""
        set_prefect_env()
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            _fail("PREFECT_API_URL is not set: deployments need a running server "
                  "(`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)", 2)
        from alignline.config import ConfigError
        from flows.deploy import deploy_all

        try:
            ids = deploy_all(pool, pool_type, config=config, overrides=list(overrides), pipeline_cron=cron,
                             lora_cron=lora_cron, stage=stage, include_lora=not no_lora)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc), 2)
        for name, dep_id in ids.items():
            typer.echo(f"deployment {name}: {dep_id}")
        typer.echo(f"start a worker: prefect worker start --pool {pool}")


    @app.command("report")
    def report(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
        """Rebuild RUN_DIR/report.md and RUN_DIR/report/*.png from the stage directories in it."""
        from alignline.report import build_report, records_from_run_dir
        from stages import stage_order

        if not run_dir.is_dir():
            _fail(f"run directory {run_dir} does not exist", 2)
        card = build_report(run_dir, records_from_run_dir(run_dir, stage_order()))
        typer.echo(f"wrote {card.path}")


if __name__ == "__main__":  # pragma: no cover - `python -m alignline_cli` is the entry point
    sys.exit("use `alignline pipeline ...` or `python -m alignline_cli pipeline ...`")
