"""The full pipeline as a Prefect 3 flow: data -> tokenizer -> pretrain -> sft -> reward -> rlhf -> evaluate
-> export.

    alignline pipeline --config configs/pipeline/tiny.yaml --run-dir runs/tiny        # embedded
    alignline pipeline --config configs/pipeline/tiny.yaml --from sft --set sft.optim.lr=1e-3

Each stage is a task calling the plain stage function (or torchrun when it asks for more
than one rank). Tasks pass only paths and manifests. All stage configs are validated before
any stage runs. A stage whose reuse key (config, code, inputs, external data files) is unchanged is reused
(see `flows.tasks.cache_check`), so re-running after a crash resumes at the failed stage, which
itself resumes from its latest training state. Gates stop before RLHF when the reward model
is too weak, and mark the run when PPO drifts (KL) or loses gold accuracy against SFT.
Every run writes `<run_dir>/report.md` (+ `report/*.png`) and publishes it as artifacts.

Run dir layout: one dir per stage, `<run_dir>/<stage>/`, except a stage whose config selects a
variant: `<run_dir>/<stage>-<variant>/` (`alignline.artifacts.stage_dir_name`; the rlhf stage:
`rlhf-ppo/`, `rlhf-dpo/`, `rlhf-kto/`, `rlhf-grpo/`, `rlhf-rloo/` by `algorithm`). Switching the algorithm
keeps the other algorithms' outputs; switching back reuses the cached one (evaluate, whose input
changed, re-runs). Downstream stages, gates and `--from` use the variant the config selects;
the report card lists the others as "kept". `--from rlhf` (or `--from rlhf-<algorithm>` when that
is the selected one) retrains the selected algorithm from scratch and re-runs what follows; the
other algorithms' dirs are left alone. A pre-variant `<run_dir>/rlhf/` is moved to
`rlhf-<its algorithm>/` with a log line and a report note (`alignline.artifacts.adopt_legacy_dir`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field, field_validator

from alignline.artifacts import (
    StageError,
    adopt_legacy_dir,
    is_complete,
    load_stage,
    stage_dir_name,
)
from alignline.config import (
    ConfigError,
    StrictModel,
    config_from_dict,
    read_config,
    save_config,
)
from alignline.degeneration import collapse_reasons
from alignline.locks import run_lock
from alignline.report import StageRecord, build_report, render_markdown, responses
from flows.tasks import (
    REPO_ROOT,
    ResolvedStage,
    StageEntry,
    append_stage_sets,
    not_a_user_error,
    quiet_user_errors,
    resolve_stage,
    stage_task,
)
from stages import load_stage_module, optional_stages, pipeline_stages


def default_entry(stage: str) -> dict[str, Any]:
    """A stage the pipeline config leaves out: its configs/<stage>/tiny.yaml, or the stage's defaults
    when it has none (a newly registered stage)."""
    tiny = f"configs/{stage}/tiny.yaml"  # relative to the working directory, as every path (the repo root)
    return {"config": tiny if (REPO_ROOT / tiny).is_file() else None}


class GateConfig(StrictModel):
    """Evaluation gates; metric names are keys of the stage's headline (manifest) or eval.json."""

    enabled: bool = Field(True, description="false: no reward gate before RLHF and no RLHF marks")
    reward_metric: str = Field("accuracy", description="reward-model held-out accuracy key")
    min_reward_accuracy: float = Field(0.7, ge=0, le=1, description="stop before RLHF below this")
    kl_metric: str = Field("kl", description="RLHF KL key")
    max_kl: float | None = Field(1.0, gt=0, description="mark the run when RLHF's KL exceeds this; none = off")
    gold_metric: str = Field("gold_accuracy", description="gold accuracy key, in both SFT and RLHF")
    sft_gold_metric: str = Field(
        "sft_gold_accuracy", description="SFT's gold accuracy as measured by RLHF (else the SFT stage's)"
    )
    gold_must_not_drop: bool = Field(True, description="mark the run when RLHF gold accuracy < SFT's")
    gold_tolerance: float = Field(0.0, ge=0, description="allowed drop of gold accuracy before marking")
    collapse: bool = Field(
        True, description="mark the run when RLHF's answers collapse relative to SFT's (alignline.degeneration)"
    )
    max_identical_share: float = Field(
        0.5, gt=0, le=1, description="collapse: more than this share of RLHF answers are one string"
    )
    min_distinct2_ratio: float = Field(
        0.5, ge=0, le=1, description="collapse: RLHF's distinct-2 below this multiple of SFT's"
    )
    max_repetition: float = Field(
        0.5, gt=0, le=1, description="collapse: more than this share of an answer's 3-grams repeat within it"
    )


class ReportConfig(StrictModel):
    sample_limit: int = Field(8, ge=0, description="rows in the side-by-side samples table")
    progress_every_s: float = Field(2.0, gt=0, description="progress artifact refresh period")
    embed_images: bool = Field(True, description="embed PNG curves in the Prefect markdown artifact")


class PipelineConfig(StrictModel):
    """The whole pipeline: where to write, each stage's config, retries, gates, report."""

    name: str = Field("tiny", description="pipeline name; used in artifact keys")
    run_dir: str = Field("runs/tiny", description="run directory (relative to the working directory)")
    retries: int = Field(1, ge=0, description="task retries per stage (a retry resumes from the stage state)")
    retry_delay_s: float = Field(1.0, ge=0, description="seconds between a failed stage task and its retry")
    stages: dict[str, StageEntry] = Field(
        default_factory=dict, validate_default=True,
        description="one entry per pipeline stage (stages.REGISTRY, in run order): its config, overrides, "
        "launcher; a stage left out runs configs/<stage>/tiny.yaml; an optional stage (distill) runs only with "
        "`enabled: true`",
    )
    gates: GateConfig = Field(
        default_factory=GateConfig, description="reward gate before RLHF, marks after it"
    )
    report: ReportConfig = Field(default_factory=ReportConfig, description="report.md and Prefect artifacts")


    @field_validator("stages", mode="before")
    @classmethod
    def _every_registered_stage(cls, value: Any) -> dict[str, Any]:
        """An entry per registered pipeline stage, in registry order; a name not registered is an error."""
        given = dict(value or {})
        known = pipeline_stages()
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ValueError(f"unknown pipeline stage(s) {', '.join(map(repr, unknown))}; the pipeline's stages "
                             f"are {', '.join(known)} (registered in stages/__init__.py)")
        out = {name: given[name] if given.get(name) is not None else default_entry(name) for name in known}
        for name in optional_stages():  # off unless the config says `enabled: true` (not merely configures it)
            if isinstance(out[name], dict) and "enabled" not in out[name]:
                out[name] = {**out[name], "enabled": False}
        return out


class GateFailed(RuntimeError):
    """An evaluation gate stopped the pipeline (the report says which and why)."""


# --------------------------------------------------------------------------- config loading


def split_overrides(overrides: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """`pretrain.optim.lr=1e-3` goes to stage pretrain; `rlhf.config=PATH` picks the stage's YAML
    (`stages.rlhf.config`, e.g. configs/rlhf/dpo_tiny.yaml to switch the algorithm); anything else is
    a pipeline key."""
    pipeline, per_stage = [], {}
    for item in overrides or []:
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        if head in pipeline_stages() and item.split("=", 1)[0].strip() == f"{head}.config":
            pipeline.append(f"stages.{item}")
        elif head in pipeline_stages() and "." in item.split("=", 1)[0]:
            per_stage.setdefault(head, []).append(item.split(".", 1)[1])
        else:
            pipeline.append(item)
    return pipeline, per_stage


def load_pipeline_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply `--set` overrides (stage keys as `<stage>.<key>=v`), validate."""
    pipeline_over, stage_over = split_overrides(overrides)
    data, source, key_lines = read_config(path, overrides=pipeline_over)
    if stage_over:
        data["stages"] = data.get("stages") or {}
        append_stage_sets(data["stages"], stage_over, default_entry, str(source))
    if overrides:  # name all of them, stage keys included, as the user typed them
        source = f"{path if path is not None else '<defaults>'} (with --set {' '.join(overrides)})"
    return config_from_dict(PipelineConfig, data, source, key_lines)


def resolve_pipeline(config: PipelineConfig) -> dict[str, ResolvedStage]:
    """Validate every enabled stage config up front; one ConfigError lists every problem."""
    resolved: dict[str, ResolvedStage] = {}
    problems: list[str] = []
    for stage in pipeline_stages():
        entry: StageEntry = config.stages[stage]
        if not entry.enabled:
            continue
        try:
            resolved[stage] = resolve_stage(stage, entry, where=f"pipeline {config.name!r}")
        except ConfigError as exc:
            problems.append(f"[{stage}] {exc}")
    if problems:
        raise ConfigError("pipeline config has problems; no stage was run:\n" + "\n".join(problems))
    return resolved


def stage_dirs(config: PipelineConfig, resolved: dict[str, ResolvedStage]) -> dict[str, str]:
    """The output dir name of every stage in this pipeline, `stage_dir_name(stage, its config)`:
    {"rlhf": "rlhf-dpo", "sft": "sft", ...}. A disabled stage's config is resolved too (its output
    may still be an input); when it does not resolve, the plain stage name."""
    out: dict[str, str] = {}
    for stage in pipeline_stages():
        rs = resolved.get(stage)
        if rs is None:
            try:
                rs = resolve_stage(stage, config.stages[stage], where=f"pipeline {config.name!r}")
            except Exception:  # a disabled stage may well have no usable config or module
                out[stage] = stage
                continue
        out[stage] = stage_dir_name(stage, rs.config)
    return out


def variant_keys(resolved: dict[str, ResolvedStage]) -> dict[str, str]:
    """{stage: the config key that selects its variant} for the stages that have variants ({"rlhf": "algorithm"})."""
    return {s: key for s, rs in resolved.items() if (key := getattr(type(rs.config), "variant_key", None))}


def stage_slot(flag: str, value: str | None, dirs: dict[str, str] | None = None,
               keys: dict[str, str] | None = None) -> str | None:
    """A `--from`/`--to` value as a pipeline stage: a stage name, or the output dir name of the variant
    this pipeline selects (`rlhf-dpo` when rlhf's algorithm is dpo). Another variant is an error that
    says how to select it (`keys`: `variant_keys`)."""
    if value is None or value in pipeline_stages():
        return value
    dirs = dirs or {}
    for stage, name in dirs.items():
        if value == name:
            return stage
    for stage, name in dirs.items():
        if name != stage and value.startswith(f"{stage}-"):
            want, key = value[len(stage) + 1:], (keys or {}).get(stage, "<key>")
            raise ConfigError(f"{flag} {value}: this pipeline's {stage} stage is {name} (its config selects "
                              f"{name[len(stage) + 1:]}); to restart {want}, select it (a {stage} config with "
                              f"`{key}: {want}`: --set {stage}.config=PATH) and use {flag} {stage}")
    import difflib

    close = difflib.get_close_matches(value, pipeline_stages(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{flag} {value!r} is not a stage{hint}; choose one of {', '.join(pipeline_stages())}")


def stage_inputs(rs: ResolvedStage, run_dir: Path, enabled: set[str],
                 dirs: dict[str, str] | None = None) -> dict[str, str]:
    """Input dirs for a stage from its INPUTS: the producing stage's dir in this run (`dirs[producer]`,
    the variant this pipeline selects, e.g. evaluate's `rlhf` input is `<run_dir>/rlhf-dpo`)."""
    out: dict[str, str] = {}
    explicit = rs.entry.inputs
    for spec in rs.input_specs:
        if spec.name in explicit:
            out[spec.name] = str(explicit[spec.name])
            continue
        producer = spec.default
        if producer is None:
            continue
        path = run_dir / (dirs or {}).get(producer, producer)
        if producer in enabled or is_complete(path) or spec.required:
            out[spec.name] = str(path)
    return out


def preflight(resolved: dict[str, ResolvedStage]) -> None:
    """Each stage's explicit `inputs:` (directories from outside the run, such as a released model)
    through the stage module's optional `preflight(config, inputs)`, before the first stage starts:
    a base without a chat template fails now, not after the stages before it have run."""
    for stage, rs in resolved.items():
        check = getattr(load_stage_module(stage, rs.module), "preflight", None)
        if check is not None and rs.entry.inputs:
            check(rs.config, {k: Path(v) for k, v in rs.entry.inputs.items()})


def producers(rs: ResolvedStage) -> list[str]:
    """The pipeline stages whose outputs this stage reads (its INPUTS' defaults not given explicitly)."""
    return [spec.default for spec in rs.input_specs if spec.default and spec.name not in rs.entry.inputs]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "pipeline"


# --------------------------------------------------------------------------- gates


def _metric(stage: str, stage_dir: Path, key: str) -> float | None:
    """The stage's `key` from its headline (manifest) or eval.json; None when it has none (a metric
    that does not exist for this data, e.g. gold accuracy without a verifier)."""
    sd = load_stage(stage_dir, verify=False)
    for source in (sd.headline, sd.eval):
        value = source.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _skipped(gate: str, stage_dir: Path, key: str, setting: str) -> str:
    return (f"NOTE: gate {gate} skipped: {stage_dir.name} has no {key!r} (not measured for this data, e.g. no "
            f"verifier); name another metric with {setting} or turn the gate off")


def reward_gate(gates: GateConfig, run_dir: Path, reward_dir: Path | None = None,
                skipped: list[str] | None = None) -> str | None:
    """A reason to stop before RLHF, or None. A metric the reward stage does not have skips the gate
    (a note goes to `skipped`): it never fails or passes on a missing number."""
    reward_dir = reward_dir or run_dir / "reward"
    acc = _metric("reward", reward_dir, gates.reward_metric)
    if acc is None:
        if skipped is not None:
            skipped.append(_skipped("min_reward_accuracy", reward_dir, gates.reward_metric, "gates.reward_metric"))
        return None
    if acc >= gates.min_reward_accuracy:
        return None
    # With its sample size: below the bar only when the whole 95% interval is (15 pairs at 0.6 do
    # not show that the reward model is worse than 0.7; 1,500 do).
    est = load_stage(reward_dir, verify=False).eval.get("estimates", {}).get(gates.reward_metric)
    if isinstance(est, dict) and est.get("n"):
        where = f" (on {est['n']} held-out pairs, 95% interval {est['low']:.2f}-{est['high']:.2f})"
        if est["high"] >= gates.min_reward_accuracy:
            if skipped is not None:
                skipped.append(f"NOTE: reward model held-out {gates.reward_metric}={acc:.3f} < "
                               f"gates.min_reward_accuracy={gates.min_reward_accuracy}, but{where} the interval "
                               "reaches the bar: too few pairs to stop on, RLHF ran (hold out more pairs to know)")
            return None
    else:
        where = " (no sample size recorded)"
    return (f"GATE: reward model held-out {gates.reward_metric}={acc:.3f} < {gates.min_reward_accuracy}{where}; "
            "stopped before RLHF (improve the reward model or lower gates.min_reward_accuracy)")


def rlhf_marks(gates: GateConfig, run_dir: Path, rlhf_dir: Path | None = None,
               sft_dir: Path | None = None, skipped: list[str] | None = None) -> list[str]:
    """Warnings that mark (not stop) the run after RLHF; `rlhf_dir`: the selected variant's dir. A gate
    whose metric is missing is skipped, with a note in `skipped`."""
    rlhf_dir = rlhf_dir or run_dir / "rlhf"
    sft_dir = sft_dir or run_dir / "sft"
    skipped = skipped if skipped is not None else []
    which = f" ({rlhf_dir.name})"
    marks = []
    if gates.max_kl is not None:
        kl = _metric("rlhf", rlhf_dir, gates.kl_metric)
        if kl is None:
            skipped.append(_skipped("max_kl", rlhf_dir, gates.kl_metric, "gates.kl_metric"))
        elif kl > gates.max_kl:
            marks.append(f"WARNING: RLHF {gates.kl_metric}={kl:.4g} exceeds gates.max_kl={gates.max_kl}{which}")
    if gates.gold_must_not_drop:
        rl = _metric("rlhf", rlhf_dir, gates.gold_metric)
        # RLHF evaluates its SFT starting point on the same prompts; prefer that number.
        sft = _metric("rlhf", rlhf_dir, gates.sft_gold_metric)
        if sft is None:
            sft = _metric("sft", sft_dir, gates.gold_metric)
        if rl is None or sft is None:
            skipped.append(_skipped("gold_must_not_drop", rlhf_dir if rl is None else sft_dir, gates.gold_metric,
                                    "gates.gold_metric"))
        elif rl < sft - gates.gold_tolerance:
            marks.append(f"WARNING: RLHF {gates.gold_metric}={rl:.3f} dropped below SFT's {sft:.3f}{which}")
    if gates.collapse:
        policy, reference = responses(rlhf_dir), responses(sft_dir)
        if policy and reference:  # no samples (a stage that writes none): nothing to compare
            for reason in collapse_reasons(policy, reference, max_identical_share=gates.max_identical_share,
                                           min_distinct2_ratio=gates.min_distinct2_ratio,
                                           max_repetition=gates.max_repetition):
                marks.append(f"WARNING: RLHF answers collapsed: {reason}{which}")
    return marks


def _tag_flow_run(tags: list[str]) -> None:
    """Add tags to the running flow run so marked runs can be filtered in the UI."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, tags=sorted(set(current) | set(tags)))


# --------------------------------------------------------------------------- reporting


def publish_report(config: PipelineConfig, run_dir: Path, records: list[StageRecord], notes: list[str]) -> Path:
    """Write report.md + PNGs and publish markdown/table artifacts (keys `<name>-report-card` etc.)."""
    card = build_report(run_dir, records, title=config.name, notes=notes, sample_limit=config.report.sample_limit)
    slug = _slug(config.name)
    md = card.markdown
    if config.report.embed_images and card.plots:
        # The UI cannot read files from the run dir; embed the (small) PNGs as data URIs.
        md = render_markdown(card.records, title=config.name, notes=notes, plots=card.plots,
                             samples=card.sample_rows, run_dir=run_dir, embed_images=True, health=card.health, fits=card.fits,
                             benchmarks=card.benchmarks)
    create_markdown_artifact(markdown=md, key=f"{slug}-report-card",
                             description=f"alignline report card; also at {card.path}")
    if card.metrics_rows:
        create_table_artifact(table=card.metrics_rows, key=f"{slug}-metrics",
                              description="headline metrics of every stage")
    if card.sample_rows:
        create_table_artifact(table=card.sample_rows, key=f"{slug}-samples",
                              description="greedy generations on the same test prompts, stage by stage")
    return card.path


# --------------------------------------------------------------------------- the flow


@flow(name="alignline-pipeline", log_prints=False, validate_parameters=True)
def pipeline_flow(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - a pydantic default renders the UI form
    from_stage: str | None = None,
    to_stage: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the pipeline; returns {run_dir, report, notes, stages: {stage: record}}.

    `stages` is keyed by pipeline stage (`rlhf`); each record's `name` is its output dir (`rlhf-ppo`).
    `from_stage`/`to_stage` take a stage, or the selected variant's dir name (see `stage_slot`).

    Holds `<run_dir>/.locks/run.lock` while it runs (alignline.locks): a second pipeline or a hand-run
    stage on the same run directory is refused with a message naming the holder."""
    with run_lock(config.run_dir):
        return _run_pipeline(config, from_stage, to_stage, force)


def _run_pipeline(config: PipelineConfig, from_stage: str | None, to_stage: str | None, force: bool) -> dict[str, Any]:
    logger = get_run_logger()
    quiet_user_errors()  # a user error is one line in the run log, and one `error:` when the command stops
    resolved = resolve_pipeline(config)  # every stage config validated before anything runs
    preflight(resolved)  # inputs from outside the run (a released model) checked before anything is written
    dirs = stage_dirs(config, resolved)
    from_stage = stage_slot("--from", from_stage, dirs, variant_keys(resolved))
    to_stage = stage_slot("--to", to_stage, dirs, variant_keys(resolved))
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "pipeline.yaml")
    enabled = set(resolved)
    first = pipeline_stages().index(from_stage) if from_stage else 0
    last = pipeline_stages().index(to_stage) if to_stage else len(pipeline_stages()) - 1
    if first > last:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}")
    records = {s: StageRecord(dirs[s], "skipped" if s not in enabled else "pending", path=str(run_dir / dirs[s]),
                              stage=s if dirs[s] != s else None)
               for s in pipeline_stages()}
    notes: list[str] = []
    for stage, rs in resolved.items():
        # A run dir from before per-variant dirs: its plain rlhf/ moves to rlhf-<algorithm>/ (or is left, unused).
        moved = adopt_legacy_dir(run_dir, stage, rs.config)
        if moved:
            logger.warning("%s", moved)
            notes.append(moved)
    slug = _slug(config.name)
    done: dict[str, Any] = {}  # stage -> its task run's final state (upstream edges for the next ones)
    failure: BaseException | None = None
    try:
        for i, stage in enumerate(pipeline_stages()):
            if stage not in enabled:
                continue
            rec = records[stage]
            if i < first:
                # Before --from: must already exist; it is used as is.
                try:
                    sd = load_stage(run_dir / dirs[stage], expect=stage)
                except StageError as exc:
                    raise StageError(f"--from {from_stage}: earlier stage {stage!r} is not usable: {exc}") from None
                rec.status, rec.headline, rec.message = "cached", sd.headline, "before --from"
                rec.wall_s = sd.manifest.get("wall_time_s")
                continue
            if i > last:
                rec.message = f"after --to {to_stage}"
                continue
            if stage == "rlhf" and config.gates.enabled and "reward" in enabled:
                reason = reward_gate(config.gates, run_dir, run_dir / dirs["reward"], skipped=notes)
                if reason:
                    notes.append(reason)
                    for later in pipeline_stages()[i:]:
                        if later in enabled:
                            records[later].status = "gated"
                    raise GateFailed(reason)
            rs = resolved[stage]
            retries = rs.entry.retries if rs.entry.retries is not None else config.retries
            rec.status = "running"
            runner = stage_task.with_options(name=f"stage-{stage}", task_run_name=dirs[stage], retries=retries,
                                             retry_delay_seconds=config.retry_delay_s,
                                             retry_condition_fn=not_a_user_error)
            t0 = time.monotonic()
            try:
                # wait_for the producers' task runs: the Prefect UI draws the stage DAG from these edges.
                state = runner(
                    stage=stage, module=rs.module, config=rs.config_dict,
                    inputs=stage_inputs(rs, run_dir, enabled, dirs), run_dir=str(run_dir), nproc=rs.nproc,
                    launcher=rs.entry.launcher, timeout_s=rs.entry.timeout_s, nnodes=rs.entry.nnodes, job=rs.job,
                    force=force or from_stage == stage,
                    progress_key=f"{slug}-{dirs[stage]}-progress", progress_every_s=config.report.progress_every_s,
                    wait_for=[done[p] for p in producers(rs) if p in done], return_state=True,
                )
                out = state.result()  # raises the stage's exception when it failed
                done[stage] = state
            except Exception as exc:
                rec.status, rec.wall_s = "failed", round(time.monotonic() - t0, 3)
                rec.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                raise
            rec.status, rec.wall_s, rec.headline = out["status"], out["wall_s"], out["headline"]
            # Cached: the key matched. Ran: the reason names what changed (config, code, input, data file).
            rec.message = "config, code, inputs and data unchanged" if out["status"] == "cached" else out["reason"]
            build_report(run_dir, list(records.values()), title=config.name, notes=notes,
                         sample_limit=config.report.sample_limit, plots=False)
            if stage == "rlhf" and config.gates.enabled:
                marks = rlhf_marks(config.gates, run_dir, run_dir / dirs["rlhf"], run_dir / dirs["sft"],
                                   skipped=notes)
                if marks:
                    notes.extend(marks)
                    for m in marks:
                        logger.warning(m)
                    _tag_flow_run(["gate-warning"])
    except BaseException as exc:
        failure = exc
    try:
        report = publish_report(config, run_dir, list(records.values()), notes)
    except Exception as exc:
        if failure is None:
            raise
        # Keep the stage failure as the error of the run; the report problem is secondary.
        logger.error("could not publish the report card after the failure: %r", exc)
        raise failure from None
    logger.info("report card: %s", report)
    if failure is not None:
        raise failure
    from prefect.runtime import flow_run

    return {"run_dir": str(run_dir), "report": str(report), "notes": notes, "flow_run_id": flow_run.get_id(),
            "stages": {s: r.to_dict() for s, r in records.items()}}
