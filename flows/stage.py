"""Run one stage as a Prefect flow: the deployment for retraining a single stage.

    alignline stage reward --flow --config configs/reward/tiny.yaml --run-dir runs/tiny \
        --set optim.lr=2e-5 --set train.max_steps=60

Typical use: retrain the reward model on a schedule after the data stage took in fresh preference
files (its content fingerprint changed), reusing the run's SFT checkpoint. Inputs default to this run's stage dirs (`<run_dir>/<producer>`; for a
producer with variants the only `<producer>-<variant>/`, or the most recently finished one), or
are given explicitly (`inputs={"init": "/models/sft"}`). The stage writes
`<run_dir>/<stage_dir_name(stage, config)>` (`rlhf-dpo/` for the rlhf stage with `algorithm: dpo`). The same cache rules as the pipeline
apply: an unchanged stage is reused unless `force`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alignline.artifacts import default_stage_dir, is_complete
from alignline.locks import run_lock
from alignline.report import StageRecord
from flows.tasks import StageEntry, not_a_user_error, quiet_user_errors, resolve_stage, stage_task


@flow(name="alignline-stage", log_prints=False)
def stage_flow(
    stage: str,
    run_dir: str = "runs/tiny",
    entry: StageEntry = StageEntry(),  # noqa: B008 - a pydantic default renders the UI form
    retries: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Validate and run stage `stage` into `<run_dir>/<stage>` (or `<stage>-<variant>`); returns the outcome."""
    rs = resolve_stage(stage, entry, where=f"stage flow {stage!r}")
    rd = Path(run_dir).resolve()
    # Like the pipeline, it holds the run directory (alignline.locks): it writes a stage and report.md.
    with run_lock(rd):
        return _run_stage(stage, rs, rd, entry, retries, force)


def _run_stage(stage: str, rs, rd: Path, entry: StageEntry, retries: int, force: bool) -> dict[str, Any]:
    from flows.pipeline import PipelineConfig, _slug, publish_report

    logger = get_run_logger()
    quiet_user_errors()
    rd.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, str] = {}
    for spec in rs.input_specs:
        if spec.name in entry.inputs:
            inputs[spec.name] = str(entry.inputs[spec.name])
        elif spec.default is not None:
            path = default_stage_dir(rd, spec.default)
            if spec.required or is_complete(path):
                inputs[spec.name] = str(path)
    logger.info("stage %s with inputs %s", stage, inputs or "none")
    runner = stage_task.with_options(task_run_name=rs.dir_name, retries=retries if entry.retries is None else entry.retries,
                                     retry_condition_fn=not_a_user_error)
    out = runner(stage=stage, module=rs.module, config=rs.config_dict, inputs=inputs, run_dir=str(rd),
                 nproc=rs.nproc, launcher=entry.launcher, timeout_s=entry.timeout_s, nnodes=entry.nnodes, job=rs.job, force=force,
                 progress_key=f"{_slug(rd.name)}-{rs.dir_name}-progress")
    rec = StageRecord(out["name"], out["status"], wall_s=out["wall_s"], path=out["path"], headline=out["headline"],
                      message=out.get("reason", ""), stage=stage)
    publish_report(PipelineConfig(name=f"{rd.name}-{stage}", run_dir=str(rd)), rd, [rec], [])
    return out
