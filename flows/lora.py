"""Prefect flow `lora_flow`: the `lora` stage (LoRA/QLoRA fine-tuning of a released model) as a flow.

    from flows.lora import lora_flow; lora_flow(base=..., data=..., run_dir="runs/x")
    (a deployment in prefect.yaml points at flows/lora.py:lora_flow)

Same job as `alignline lora`: the config is validated before anything runs (an error names the
file, line and key), the stage runs as one task (flows.tasks.stage_task: reused when config,
code and input manifests are unchanged), and a markdown artifact summarises held-out loss
before/after and a few sample generations. Returns {status, path, headline, ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.tasks import StageEntry, quiet_user_errors, resolve_stage, stage_task


def _summary(stage_dir: Path) -> str:
    ev = json.loads((stage_dir / "eval.json").read_text(encoding="utf-8"))
    lines = [
        f"## LoRA: {ev['base'].get('hub_id') or ev['base']['path']}",
        "",
        "| held-out loss before | after | steps | trainable params | template | mask |",
        "|---|---|---|---|---|---|",
        f"| {ev['heldout_loss_before']:.4f} | {ev['heldout_loss_after']:.4f} | {ev['steps']} | "
        f"{ev['trainable_params']:,} / {ev['total_params']:,} | {ev['chat_template_source']} | {ev['loss_mask']} |",
        "",
        f"Outputs: `{stage_dir}/adapter`, `{stage_dir}/checkpoint`",
        "",
    ]
    for s in ev.get("samples", [])[:4]:
        prompt = s["messages"][-1]["content"] if s["messages"] else ""
        lines += [f"- **{prompt[:80]}** reference `{s['reference'][:60]}` | before `{s['before'][:60]}` | "
                  f"after `{s['after'][:60]}`"]
    return "\n".join(lines)


@flow(name="lora", log_prints=False)
def lora_flow(
    base: str = "runs/nightly/sft",
    data: str = "runs/nightly/data",
    run_dir: str = "runs/nightly",
    config: str | None = "configs/lora/tiny.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune `base` with LoRA on `data`; the stage dir is `<run_dir>/lora`.

    The defaults serve the weekly `lora-refresh` deployment: the nightly run's SFT checkpoint on the
    nightly data, written to runs/nightly/lora. Pass base/data/run_dir for anything else.
    """
    logger = get_run_logger()
    quiet_user_errors()
    sets = [f"base={json.dumps(str(base))}", f"data.train={json.dumps(str(data))}", *(overrides or [])]
    resolved = resolve_stage("lora", StageEntry(config=config, set=sets), where="lora_flow")
    # An alignline stage dir as base is a real input: its manifest hash then decides cache reuse.
    inputs = {"base": str(base)} if (Path(base) / "manifest.json").is_file() else {}
    result = stage_task("lora", resolved.module, resolved.config_dict, inputs, str(run_dir), force=force)
    stage_dir = Path(result["path"])
    create_markdown_artifact(_summary(stage_dir), key="lora-summary", description="LoRA fine-tuning result")
    logger.info("lora: %s %s (held-out loss %s)", result["status"], stage_dir, result.get("headline"))
    return result
