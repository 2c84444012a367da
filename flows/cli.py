"""The pipeline command behind both `alignline pipeline` and `python -m flows.pipeline`.

    run_pipeline_command("configs/pipeline/tiny.yaml", run_dir="runs/tiny", to_stage="pretrain")  # -> exit code

Order of work: load and validate the pipeline config and every stage config, check --from/--to,
take the run directory's lock (alignline.locks) -- all before Prefect's API starts, so a mistake
or a busy run directory costs a second -- then run the flow with SIGTERM/SIGINT ending the whole
process tree (`alignline.launch.exit_with_tree_on_signal`).

Exit codes: 0 done; 1 a stage failed (a bug or a crash: the message says so and that a re-run
resumes); 2 a user error (config, --from/--to, input dir, a run directory another process holds,
a full disk), one `error:` message, no traceback (ALIGNLINE_DEBUG=1 shows it); 3 an evaluation gate
stopped the run; 128+N when signal N stopped it.

Imports Prefect only inside the function, after the environment defaults below are set.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

PREFECT_ENV_DEFAULTS = {
    # The ephemeral API takes 8-16 s to start on 2 busy cores; Prefect's default (20 s) is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

Say = Callable[[str, str], None]  # (message, kind) with kind "out", "warn" or "error"


def set_prefect_env() -> None:
    for key, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def plain_say(message: str, kind: str = "out") -> None:
    print(message, file=sys.stderr if kind == "error" else sys.stdout, flush=True)


def check_stage_range(from_stage: str | None, to_stage: str | None, run_dir: Path,
                      enabled: set[str] | None = None, dirs: dict[str, str] | None = None,
                      keys: dict[str, str] | None = None) -> None:
    """--from/--to name stages in order, and the stages before --from exist: checked before the
    Prefect API starts (that takes 10-20 s), so a typo costs nothing. `dirs`: each stage's output dir
    name (flows.pipeline.stage_dirs; `rlhf-ppo` for the rlhf stage), default the stage name; `keys`:
    flows.pipeline.variant_keys, for the message when another variant is named."""
    from alignline.config import ConfigError
    from flows.pipeline import stage_slot
    from stages import pipeline_stages

    sequence = pipeline_stages()
    dirs = dirs or {}
    from_stage = stage_slot("--from", from_stage, dirs, keys)
    to_stage = stage_slot("--to", to_stage, dirs, keys)
    if from_stage and to_stage and sequence.index(from_stage) > sequence.index(to_stage):
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}; stages run in the order "
                          f"{', '.join(sequence)}")
    if from_stage:
        for stage in sequence[:sequence.index(from_stage)]:
            if enabled is not None and stage not in enabled:
                continue
            manifest = run_dir / dirs.get(stage, stage) / "manifest.json"
            legacy = run_dir / stage / "manifest.json"  # a pre-variant dir: the flow moves it first
            if not manifest.is_file() and not legacy.is_file():
                raise ConfigError(f"--from {from_stage}: earlier stage {stage!r} has not finished in {run_dir} "
                                  f"({manifest} is missing); run without --from, or --from {stage}")


def _debug() -> bool:
    from alignline.config import debug_enabled

    return debug_enabled()


def report_failure(say: Say, message: str, code: int) -> int:
    """Say `error: message` (the traceback too under ALIGNLINE_DEBUG) and return the exit code."""
    if _debug():
        traceback.print_exc()
    say(f"error: {message}", "error")
    return code


def run_pipeline_command(
    config: str | Path | None,
    *,
    run_dir: str | Path | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    print_config: bool = False,
    wait: bool = False,
    say: Say = plain_say,
) -> int:
    """Validate, lock the run directory, run the pipeline flow; returns the exit code (see the module doc)."""
    set_prefect_env()
    import yaml

    from alignline.config import UserError, config_to_dict
    from alignline.launch import exit_with_tree_on_signal
    from alignline.locks import LockHeld, run_lock
    from flows.pipeline import (
        GateFailed,
        load_pipeline_config,
        pipeline_flow,
        resolve_pipeline,
        stage_dirs,
        variant_keys,
    )

    def fail(message: str, code: int) -> int:
        return report_failure(say, message, code)

    all_over = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    try:
        cfg = load_pipeline_config(config, all_over)
        resolved = resolve_pipeline(cfg)  # fail fast, before the Prefect API starts
        check_stage_range(from_stage, to_stage, Path(cfg.run_dir), set(resolved), stage_dirs(cfg, resolved),
                          variant_keys(resolved))
    except UserError as exc:
        return fail(str(exc), 2)
    if print_config:
        out = config_to_dict(cfg)
        out["resolved_stage_configs"] = {s: r.config_dict for s, r in resolved.items()}
        say(yaml.safe_dump(out, sort_keys=False), "out")
        return 0
    # SIGTERM/SIGINT end the stage subprocesses and Prefect's temporary server too (no leak).
    exit_with_tree_on_signal()
    report = Path(cfg.run_dir) / "report.md"
    try:
        # Taken here, before Prefect starts, so a busy run dir is refused at once; the flow re-enters it.
        with run_lock(cfg.run_dir, wait=wait, on_wait=lambda m: say(m, "warn")):
            result = pipeline_flow(config=cfg, from_stage=from_stage, to_stage=to_stage, force=force)
    except LockHeld as exc:
        return fail(str(exc), 2)
    except GateFailed as exc:
        return fail(f"{exc}\nreport: {report}", 3)
    except UserError as exc:
        return fail(f"{exc}\nreport: {report}", 2)
    except Exception as exc:
        return fail(f"pipeline failed: {type(exc).__name__}: {exc}\nreport: {report}\n"
                    "re-run the same command to resume at the failed stage", 1)
    for stage, rec in result["stages"].items():
        wall = f"{rec['wall_s']:.1f}s" if rec.get("wall_s") is not None else ""
        say(f"  {rec.get('name') or stage:10s} {rec['status']:8s} {wall}", "out")
    for note in result["notes"]:
        say(note, "warn")
    say(f"report: {result['report']}", "out")
    return 0


def run_ablate_command(
    config: str | Path | None,
    *,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    print_config: bool = False,
    wait: bool = False,
    say: Say = plain_say,
) -> int:
    """`alignline ablate`: validate the ablation config and every variant's pretrain config, lock the run
    directory, run the ablation flow (flows/ablate.py); returns the exit code: 0 done; 1 a run failed
    (the others finished, the table shows it, a re-run resumes it); 2 a user error (one `error:`
    message, nothing written; or every failed run failed on one); 128+N when signal N stopped it."""
    set_prefect_env()
    import yaml

    from alignline.config import UserError, config_to_dict
    from alignline.launch import exit_with_tree_on_signal
    from alignline.locks import LockHeld, run_lock
    from flows.ablate import AblationFailed, load_ablation_config, resolve_ablation, run_ablation

    def fail(message: str, code: int) -> int:
        return report_failure(say, message, code)

    all_over = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    try:
        cfg = load_ablation_config(config, all_over)
        plan = resolve_ablation(cfg)  # every variant's pretrain config, before the Prefect API starts
    except UserError as exc:
        return fail(str(exc), 2)
    if print_config:
        out = config_to_dict(cfg)
        out["resolved_pretrain_configs"] = {r.label: r.resolved.config_dict for r in plan.runs}
        say(yaml.safe_dump(out, sort_keys=False), "out")
        return 0
    exit_with_tree_on_signal()
    report = Path(cfg.run_dir) / "ablation.md"
    try:
        with run_lock(cfg.run_dir, wait=wait, on_wait=lambda m: say(m, "warn")):
            result = run_ablation(cfg)
    except LockHeld as exc:
        return fail(str(exc), 2)
    except AblationFailed as exc:
        return fail(str(exc), 2 if exc.user_error else 1)
    except UserError as exc:
        return fail(f"{exc}\ntable: {report}", 2)
    except Exception as exc:
        return fail(f"ablation failed: {type(exc).__name__}: {exc}\ntable: {report}\n"
                    "re-run the same command to resume", 1)
    for rec in result["runs"]:
        wall = f"{rec['wall_s']:.1f}s" if rec.get("wall_s") is not None else ""
        say(f"  {rec['variant'] + '-s' + str(rec['seed']):24s} {rec['status']:8s} {wall}", "out")
    say(f"table: {result['report']}", "out")
    return 0
