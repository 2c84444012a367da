"""`alignline pipeline`, `alignline deploy`, `alignline run-stage-flow`: the Prefect-orchestrated commands.

    alignline pipeline --config configs/pipeline/tiny.yaml --run-dir runs/tiny
    alignline pipeline --config configs/pipeline/tiny.yaml --from sft --set sft.train.lr=1e-4
    alignline deploy --pool alignline            # then: prefect worker start --pool alignline
    alignline run-stage-flow reward --run-dir runs/tiny --set train.epochs=2

`pipeline` runs embedded: an ephemeral Prefect API on SQLite starts in-process (no server).
Point PREFECT_API_URL at a server to record runs there instead. Prefect is imported inside
the commands, after the environment defaults below, so `alignline --help` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

PREFECT_ENV_DEFAULTS = {
    # The ephemeral API takes 8-16 s to start on 2 busy cores; Prefect's default (20 s) is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_prefect_env() -> None:
    for key, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _fail(msg: str, code: int) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def check_stage_range(from_stage: str | None, to_stage: str | None, run_dir: Path,
                      enabled: set[str] | None = None, dirs: dict[str, str] | None = None,
                      keys: dict[str, str] | None = None) -> None:
    """--from/--to name stages in order, and the stages before --from exist: checked before the
    Prefect API starts (that takes 10-20 s), so a typo costs nothing. `dirs`: each stage's output dir
    name (flows.pipeline.stage_dirs; `rlhf-ppo` for the rlhf stage), default the stage name; `keys`:
    flows.pipeline.variant_keys, for the message when another variant is named."""
    from alignline.config import ConfigError
    from flows.pipeline import STAGE_SEQUENCE, stage_slot

    dirs = dirs or {}
    from_stage = stage_slot("--from", from_stage, dirs, keys)
    to_stage = stage_slot("--to", to_stage, dirs, keys)
    if from_stage and to_stage and STAGE_SEQUENCE.index(from_stage) > STAGE_SEQUENCE.index(to_stage):
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}; stages run in the order "
                          f"{', '.join(STAGE_SEQUENCE)}")
    if from_stage:
        for stage in STAGE_SEQUENCE[:STAGE_SEQUENCE.index(from_stage)]:
            if enabled is not None and stage not in enabled:
                continue
            manifest = run_dir / dirs.get(stage, stage) / "manifest.json"
            legacy = run_dir / stage / "manifest.json"  # a pre-variant dir: the flow moves it first
            if not manifest.is_file() and not legacy.is_file():
                raise ConfigError(f"--from {from_stage}: earlier stage {stage!r} has not finished in {run_dir} "
                                  f"({manifest} is missing); run without --from, or --from {stage}")


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
    ) -> None:
        """Run the whole pipeline (data -> ... -> rlhf -> evaluate) as an embedded Prefect flow."""
        set_prefect_env()
        import yaml

        from alignline.config import UserError, config_to_dict
        from alignline.launch import exit_with_tree_on_signal
        from flows.pipeline import (
            GateFailed,
            load_pipeline_config,
            pipeline_flow,
            resolve_pipeline,
            stage_dirs,
            variant_keys,
        )

        all_over = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
        try:
            cfg = load_pipeline_config(config, all_over)
            resolved = resolve_pipeline(cfg)  # fail fast, before the Prefect API starts
            check_stage_range(from_stage, to_stage, Path(cfg.run_dir), set(resolved), stage_dirs(cfg, resolved),
                              variant_keys(resolved))
        except UserError as exc:
            _fail(str(exc), 2)
        if print_config:
            out = config_to_dict(cfg)
            out["resolved_stage_configs"] = {s: r.config_dict for s, r in resolved.items()}
            typer.echo(yaml.safe_dump(out, sort_keys=False))
            return
        # SIGTERM/SIGINT end the stage subprocesses and Prefect's temporary server too (no leak).
        exit_with_tree_on_signal()
        try:
            result = pipeline_flow(config=cfg, from_stage=from_stage, to_stage=to_stage, force=force)
        except GateFailed as exc:
            _fail(f"{exc}\nreport: {Path(cfg.run_dir) / 'report.md'}", 3)
        except UserError as exc:
            _fail(f"{exc}\nreport: {Path(cfg.run_dir) / 'report.md'}", 2)
        except Exception as exc:
            _fail(f"pipeline failed: {type(exc).__name__}: {exc}\nreport: {Path(cfg.run_dir) / 'report.md'}\n"
                  "re-run the same command to resume at the failed stage", 1)
        for stage, rec in result["stages"].items():
            wall = f"{rec['wall_s']:.1f}s" if rec.get("wall_s") is not None else ""
            typer.echo(f"  {rec.get('name') or stage:10s} {rec['status']:8s} {wall}")
        for note in result["notes"]:
            typer.secho(note, fg=typer.colors.YELLOW)
        typer.echo(f"report: {result['report']}")

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

    @app.command("run-stage-flow")
    def run_stage_flow(
        stage: str = typer.Argument(..., help="stage name (data, tokenizer, pretrain, sft, reward, rlhf, evaluate)"),
        config: Path | None = typer.Option(None, "--config", "-c", help="stage YAML (default configs/<stage>/tiny.yaml)"),
        run_dir: Path = typer.Option(Path("runs/tiny"), "--run-dir"),
        overrides: list[str] = typer.Option([], "--set", help="stage config override key=value; repeatable"),
        inputs: list[str] = typer.Option([], "--input", help="NAME=DIR input override; repeatable"),
        force: bool = typer.Option(False, "--force"),
        nproc: int = typer.Option(1, "--nproc-per-node", help="> 1: launch with torchrun"),
    ) -> None:
        """Run one stage as a Prefect flow (what the single-stage deployment runs)."""
        set_prefect_env()
        from alignline.config import UserError
        from alignline.launch import exit_with_tree_on_signal
        from flows.stage import stage_flow
        from flows.tasks import StageEntry

        try:
            # A path given here is relative to the working directory; the default is repo-relative.
            cfg_path = str(config.resolve()) if config else f"configs/{stage}/tiny.yaml"
            entry = StageEntry(config=cfg_path, set=list(overrides),
                               inputs=dict(i.split("=", 1) for i in inputs), nproc_per_node=nproc)
            exit_with_tree_on_signal()
            out = stage_flow(stage=stage, run_dir=str(run_dir), entry=entry, force=force)
        except UserError as exc:
            _fail(str(exc), 2)
        typer.echo(f"{stage}: {out['status']} -> {out['path']}")


if __name__ == "__main__":  # pragma: no cover - `python -m alignline_cli` is the entry point
    sys.exit("use `alignline pipeline ...` or `python -m alignline_cli pipeline ...`")
