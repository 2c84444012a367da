"""Deployments of the alignline flows: nightly pipeline (cron), LoRA refresh, single-stage retrain.

    alignline deploy --pool alignline                     # against $PREFECT_API_URL
    prefect worker start --pool alignline                  # runs them (type: process)

Equivalent to `prefect deploy --all` with prefect.yaml at the repository root. The flows are
loaded from this checkout (a local source), so the worker must see the same path; for Docker
or Kubernetes pools on GPU nodes see docs/deploy.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from flows.pipeline import load_pipeline_config
from flows.tasks import REPO_ROOT, StageEntry

DEFAULT_POOL = "alignline"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 every night
LORA_CRON = "0 4 * * 0"  # 04:00 on Sundays


def ensure_pool(name: str, pool_type: str = "process") -> None:
    """Create work pool `name` (type `process` by default) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return
        if pool.type != pool_type:
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}; "
                             "pass another --pool or --pool-type")


def build_deployments(
    config: str | Path = "configs/pipeline/tiny.yaml",
    overrides: list[str] | None = None,
    pipeline_cron: str | None = NIGHTLY_CRON,
    lora_cron: str | None = LORA_CRON,
    stage: str = "reward",
    stage_run_dir: str | None = None,
    stage_entry: dict[str, Any] | None = None,
    timezone: str = "UTC",
    include_lora: bool = True,
) -> list[Any]:
    """RunnerDeployments for the three flows, loaded from this checkout."""
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    cfg = load_pipeline_config(config, overrides)  # relative to the working directory, as every path
    src = str(REPO_ROOT)
    out = []
    pipeline = Flow.from_source(src, "flows/pipeline.py:pipeline_flow")
    out.append(pipeline.to_deployment(
        name="nightly",
        parameters={"config": cfg.model_dump(mode="json")},
        schedules=[CronSchedule(cron=pipeline_cron, timezone=timezone)] if pipeline_cron else [],
        description="The full pipeline, every night; unchanged stages are reused from the cache.",
        tags=["alignline", "pipeline"],
    ))
    entry = StageEntry(**(stage_entry or {"config": f"configs/{stage}/tiny.yaml"}))
    single = Flow.from_source(src, "flows/stage.py:stage_flow")
    out.append(single.to_deployment(
        name=f"retrain-{stage}",
        parameters={"stage": stage, "run_dir": stage_run_dir or cfg.run_dir, "entry": entry.model_dump(mode="json")},
        description=f"Retrain the {stage} stage (e.g. on fresh data) in an existing run directory.",
        tags=["alignline", "stage"],
    ))
    if include_lora:
        lora = Flow.from_source(src, "flows/lora.py:lora_flow")
        out.append(lora.to_deployment(
            name="lora-refresh",
            schedules=[CronSchedule(cron=lora_cron, timezone=timezone)] if lora_cron else [],
            description="Refresh the LoRA adapter on the latest data, weekly.",
            tags=["alignline", "lora"],
        ))
    return out


def deploy_all(pool: str = DEFAULT_POOL, pool_type: str = "process", **kwargs: Any) -> dict[str, UUID]:
    """Create the pool if needed and apply every deployment; returns {"<flow>/<name>": id}."""
    from prefect.deployments.runner import deploy

    ensure_pool(pool, pool_type)
    deployments = build_deployments(**kwargs)
    ids = deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                 ignore_warnings=True)
    return {f"{d.flow_name}/{d.name}": i for d, i in zip(deployments, ids, strict=True)}
