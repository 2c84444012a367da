"""The architecture lab as a Prefect 3 flow: one pretrain per (variant, seed) on the same data, tokenizer,
token budget and seeds, a length-extrapolation evaluation of each, and a comparison table with plots.

    alignline ablate --config configs/ablation/tiny.yaml --run-dir runs/ablation-tiny
    alignline ablate --config configs/ablation/ci.yaml --set seeds=2 --set pretrain.train.max_steps=20

The config (`AblationConfig`) names the data and tokenizer stage configs and a base pretrain config
(`alignline pipeline` stage entries: config file, `params`, `set`, launcher), then `variants:`, each a
name and `overrides` (dotted pretrain keys -> values, applied over the base after its `set`), and
`seeds` (a list, or a count n for seeds 0..n-1; `train.seed` is set per run). Every variant's resolved
pretrain config is validated before anything runs: a bad key is one error naming the variant and the
key. A variant may not change the token budget (`train.max_steps`, `train.batch_size`,
`train.seq_len`) or `train.seed`.

Run dir layout (`<run_dir>` = run_dir):

    data/, tokenizer/                               run once, by the pipeline's stage task
    variants/<variant>-s<seed>/pretrain/            the pretrain stage dir of one (variant, seed)
    variants/<variant>-s<seed>/extrapolation.json   val loss by position at each length multiple
    ablation.md, ablation/*.png, ablation.json      the comparison (table, curves, extrapolation plot)
    ablation.yaml                                   the resolved ablation config

Each `variants/<variant>-s<seed>/` is the run directory of its pretrain stage (so several train side
by side, each with its own stage lock and training state; its `cache/` links to `<run_dir>/cache/`, the
token shards built once). A stage is reused when its reuse key (config, code, inputs, data) is
unchanged (`flows.tasks.cache_check`), so a second run retrains nothing, changing one variant's
overrides retrains that variant only, and a crashed run resumes each unfinished variant from its
latest training state. extrapolation.json carries its own key (the pretrain manifest, the val data,
the `extrapolation:` settings, the code) and is reused the same way.

Concurrency: up to `max_concurrency` (variant, seed) runs at once (a ThreadPoolTaskRunner of that
many workers); with more than one, the pretrain stage runs as a subprocess (`pretrain.launcher:
subprocess`), because runs in threads of one process would share torch's global RNG (model init)
and thread pool. `threads_per_variant` sets OMP_NUM_THREADS for each. Tokens/s are measured while the
others run: compare them at `max_concurrency: 1`.

Failures: a failed (variant, seed) does not stop the others. It is a "failed" row in the table with
its error, and when all have finished the flow raises `AblationFailed` (the command exits 1, or 2 when
every failure was a user error); re-running resumes the failed ones and reuses the rest. A length the
model cannot take (learned positions past max_position_embeddings, out of memory) is "n/a" with the
reason in the table's notes and in extrapolation.json, not a failure.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import ConfigDict, Field, field_validator, model_validator

from alignline.ablation import (
    length_key,
    plot_extrapolation,
    plot_loss_curves,
    render_table,
    summary_rows,
    tokens_per_second,
)
from alignline.artifacts import key_changes, load_stage, stage_key
from alignline.config import (
    ConfigError,
    StrictModel,
    UserError,
    config_from_dict,
    read_config,
    save_config,
)
from alignline.files import read_json, write_json, write_text
from alignline.locks import run_lock
from alignline.report import png_data_uri
from flows.pipeline import stage_inputs
from flows.tasks import (
    ResolvedStage,
    StageEntry,
    append_stage_sets,
    not_a_user_error,
    quiet_user_errors,
    resolve_stage,
    stage_task,
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Pretrain keys every variant shares: the token budget and the seed (which `seeds` sets).
SHARED_KEYS = ("train.max_steps", "train.batch_size", "train.seq_len", "train.seed")
# Fields of a stage entry; any other `--set <stage>.<key>=v` is a key of that stage's config.
ENTRY_FIELDS = tuple(StageEntry.model_fields)


class VariantSpec(StrictModel):
    """One architecture variant: a name and its changes to the base pretrain config."""

    name: str = Field(..., description="variant name: lower-case letters, digits and '-' (dir and artifact names)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted pretrain config keys -> values, applied over the base pretrain "
        "config after its `set` (e.g. model.norm: layernorm, model.rope_scaling: {rope_type: yarn, factor: 8})",
    )
    eval_rope_scaling: dict[str, Any] | None = Field(
        None, description="RoPE scaling applied to the trained model for the extrapolation evaluation only "
        "(train short, extend at inference, as YaRN is used), e.g. {rope_type: yarn, factor: 8, "
        "original_max_position_embeddings: 128}; a variant whose training config equals another's shares its "
        "training run",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"variant name {value!r}: use lower-case letters, digits and '-' (it names the "
                             "variant's directory and Prefect artifacts), e.g. rope-yarn")
        return value


class ExtrapolationConfig(StrictModel):
    """Val loss by position at multiples of the training length, on the data stage's val split."""

    lengths: list[int] = Field([1, 2, 4, 8], min_length=1, description="window lengths as multiples of "
                               "train.seq_len (the model's max_position_embeddings should cover the largest)")
    windows: int = Field(8, gt=0, description="val windows per length (fewer when the val split is too short)")
    buckets_per_length: int = Field(8, gt=0, description="position buckets per training length in the plot "
                                    "and extrapolation.json (a bucket = seq_len / this many tokens)")
    batch_size: int = Field(4, gt=0, description="windows per forward pass")
    device: str = Field("auto", description="auto | cpu | cuda; the model is evaluated in fp32")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value) or len(set(value)) != len(value):
            raise ValueError(f"lengths must be distinct multiples >= 1 of train.seq_len; got {value}")
        return sorted(value)


class AblationReportConfig(StrictModel):
    embed_images: bool = Field(True, description="embed the PNGs in the Prefect markdown artifact")
    progress_every_s: float = Field(2.0, gt=0, description="progress artifact refresh period of each pretrain")


class AblationConfig(StrictModel):
    """An architecture ablation: shared data and tokenizer, a base pretrain config, variants of it, seeds."""

    model_config = ConfigDict(**StrictModel.model_config, serialize_by_alias=True)

    name: str = Field("ablation", description="ablation name; used in artifact keys")
    run_dir: str = Field("runs/ablation", description="run directory (relative to the working directory)")
    retries: int = Field(1, ge=0, description="task retries per stage (a retry resumes from the stage state)")
    retry_delay_s: float = Field(1.0, ge=0, description="seconds between a failed stage task and its retry")
    data: StageEntry = Field(default_factory=lambda: StageEntry(config="configs/data/tiny.yaml"),
                             description="the data stage (a pipeline stage entry: config, params, set)")
    tokenizer: StageEntry = Field(default_factory=lambda: StageEntry(config="configs/tokenizer/tiny.yaml"),
                                  description="the tokenizer stage (a pipeline stage entry)")
    pretrain: StageEntry = Field(
        default_factory=lambda: StageEntry(config="configs/pretrain/tiny.yaml", launcher="subprocess"),
        description="the base pretrain config every variant starts from (a pipeline stage entry: config, params, "
        "set, launcher: subprocess | inprocess (max_concurrency 1 only), nproc_per_node, timeout_s)",
    )
    # `variants:` in YAML; named variant_specs here because StrictModel.variants is the class variable of
    # discriminated config unions (alignline.config), which a field must not shadow.
    variant_specs: list[VariantSpec] = Field(
        default_factory=lambda: [VariantSpec(name="baseline")], min_length=1, alias="variants",
        description="the variants, in table order: [{name, overrides}]",
    )
    seeds: list[int] = Field([0], min_length=1, description="train.seed of each run of every variant: a list, "
                             "or a count n for seeds 0..n-1")
    max_concurrency: int = Field(1, ge=1, description="(variant, seed) runs at once (Prefect thread pool workers)")
    threads_per_variant: int | None = Field(
        None, gt=0, description="OMP_NUM_THREADS of each pretrain subprocess; none = inherited (torch: all cores)"
    )
    extrapolation: ExtrapolationConfig = Field(default_factory=ExtrapolationConfig,
                                               description="length-extrapolation evaluation of every variant")
    report: AblationReportConfig = Field(default_factory=AblationReportConfig,
                                         description="ablation.md and Prefect artifacts")

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"seeds: a count must be >= 1; got {value}")
            return list(range(value))
        if isinstance(value, list) and len(set(map(str, value))) != len(value):
            raise ValueError(f"seeds must be distinct; got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        names = [v.name for v in self.variant_specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if self.max_concurrency > 1 and self.pretrain.launcher == "inprocess" and self.pretrain.nproc_per_node == 1 \
                and self.pretrain.timeout_s is None:
            raise ValueError(f"max_concurrency={self.max_concurrency} with pretrain.launcher: inprocess would train "
                             "variants in threads of one process, which share torch's RNG and thread pool; set "
                             "pretrain.launcher: subprocess (or max_concurrency: 1)")
        if self.threads_per_variant is not None and self.pretrain.launcher == "inprocess" \
                and self.pretrain.nproc_per_node == 1 and self.pretrain.timeout_s is None:
            raise ValueError("threads_per_variant sets OMP_NUM_THREADS of a pretrain subprocess; with "
                             "pretrain.launcher: inprocess there is none: set pretrain.launcher: subprocess")
        return self


class AblationFailed(RuntimeError):
    """Some (variant, seed) runs failed; the others finished and ablation.md reports every one."""

    def __init__(self, message: str, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error


# --------------------------------------------------------------------------- config loading


def split_overrides(overrides: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """`--set` items as ablation config keys: `pretrain.train.max_steps=20` (a key of the stage's config,
    not of its entry) goes to `pretrain.set`, likewise for data and tokenizer; `pretrain.config=PATH`,
    `max_concurrency=2` and the rest are keys of the ablation config."""
    out, per_stage = [], {}
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        head, _, rest = key.partition(".")
        if head in ("data", "tokenizer", "pretrain") and rest and rest.split(".", 1)[0] not in ENTRY_FIELDS:
            per_stage.setdefault(head, []).append(item.split(".", 1)[1])
        else:
            out.append(item)
    return out, per_stage


def load_ablation_config(path: str | Path | None, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML, apply `--set` overrides (stage config keys as `<stage>.<key>=v`), validate."""
    top, per_stage = split_overrides(overrides)
    data, source, key_lines = read_config(path, overrides=top)
    append_stage_sets(data, per_stage, config_to_entry_default, str(source))
    if overrides:
        source = f"{path if path is not None else '<defaults>'} (with --set {' '.join(overrides)})"
    return config_from_dict(AblationConfig, data, source, key_lines)


def config_to_entry_default(stage: str) -> dict[str, Any]:
    """The default entry of `stage` in an ablation config, as data."""
    return AblationConfig.model_fields[stage].default_factory().model_dump(exclude_defaults=True)


def _yaml_value(value: Any) -> str:
    """A value as the right-hand side of a `set` item that parses back to the same value (JSON is YAML)."""
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", value) \
        and value.lower() not in ("null", "true", "false", "yes", "no", "on", "off", "nan", "inf") \
        else json.dumps(value)


@dataclass
class VariantRun:
    """One (variant, seed): its resolved pretrain config, run dir and output dirs."""

    variant: str
    seed: int
    index: int  # position of the variant in `variants`
    resolved: ResolvedStage
    out_dir: Path  # <run_dir>/variants/<variant>-s<seed>: this run's extrapolation.json
    run_dir: Path  # the pretrain stage's run dir: out_dir, or the earlier run with the same training config
    eval_rope_scaling: dict[str, Any] | None = None
    shares: int | None = None  # index in plan.runs of the run that trains for this one

    @property
    def label(self) -> str:
        return f"{self.variant}-s{self.seed}"

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.resolved.dir_name


@dataclass
class AblationPlan:
    data: ResolvedStage
    tokenizer: ResolvedStage
    base: ResolvedStage
    runs: list[VariantRun] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return int(self.base.config.train.seq_len)


def variant_entry(base: StageEntry, variant: VariantSpec, seed: int) -> StageEntry:
    """The base pretrain entry with the variant's overrides and the seed appended to its `set`."""
    extra = [f"{k}={_yaml_value(v)}" for k, v in variant.overrides.items()] + [f"train.seed={seed}"]
    return base.model_copy(update={"set": [*base.set, *extra]})


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resolve_ablation(config: AblationConfig, run_dir: Path | None = None) -> AblationPlan:
    """Validate the data, tokenizer and base pretrain configs and every (variant, seed)'s resolved pretrain
    config before anything runs; one ConfigError lists every problem, each naming its variant and key."""
    run_dir = Path(run_dir or config.run_dir)
    problems: list[str] = []
    resolved: dict[str, ResolvedStage] = {}
    for stage in ("data", "tokenizer", "pretrain"):
        try:
            resolved[stage] = resolve_stage(stage, getattr(config, stage), where=f"ablation {config.name!r}")
        except ConfigError as exc:
            problems.append(f"[{stage}] {exc}")
    if problems:
        raise ConfigError("ablation config has problems; nothing was run:\n" + "\n".join(problems))
    base = resolved["pretrain"]
    plan = AblationPlan(data=resolved["data"], tokenizer=resolved["tokenizer"], base=base)
    for i, variant in enumerate(config.variant_specs):
        where = f"variants[{i}] {variant.name!r}"
        bad = [k for k in variant.overrides if k in ("train.seed",) or k.startswith("train.seed.")]
        if bad:
            problems.append(f"[{where}] overrides train.seed; the seeds come from `seeds:` "
                            f"(every variant trains on each of {config.seeds})")
            continue
        for seed in config.seeds:
            try:
                rs = resolve_stage("pretrain", variant_entry(config.pretrain, variant, seed), where=where)
            except ConfigError as exc:
                problems.append(f"[{where}] {exc}")
                break
            changed = [f"{k} ({_lookup(base.config_dict, k)} -> {_lookup(rs.config_dict, k)})"
                       for k in SHARED_KEYS[:-1] if _lookup(base.config_dict, k) != _lookup(rs.config_dict, k)]
            if changed:
                problems.append(f"[{where}] changes the shared token budget: {', '.join(changed)}; every variant "
                                "trains on the same tokens: change it for all in pretrain.set")
                break
            out_dir = run_dir / "variants" / f"{variant.name}-s{seed}"
            same = next((j for j, other in enumerate(plan.runs) if other.shares is None
                         and other.resolved.config_dict == rs.config_dict), None)
            plan.runs.append(VariantRun(variant.name, seed, i, rs, out_dir,
                                        out_dir if same is None else plan.runs[same].run_dir,
                                        variant.eval_rope_scaling, same))
    if problems:
        raise ConfigError("ablation config has problems; nothing was run:\n" + "\n".join(problems))
    return plan


# --------------------------------------------------------------------------- extrapolation


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def extrapolation_key(ex: ExtrapolationConfig, seq_len: int, stage_dir: Path, data_dir: Path,
                      tokenizer_dir: Path, rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """What extrapolation.json depends on: the settings, the model (pretrain manifest), the val data, the code."""
    return stage_key({"extrapolation": ex.model_dump(mode="json"), "seq_len": seq_len,
                      "eval_rope_scaling": rope_scaling},
                     {"pretrain": stage_dir, "data": data_dir, "tokenizer": tokenizer_dir}, __file__)


# transformers' from_pretrained switches process-wide state (init and weight-tying contexts) while it
# loads: two variant tasks loading at once in the flow's threads came back with an untied, meta-device
# lm_head. Loads take turns; the evaluations themselves still run side by side.
_LOAD_LOCK = threading.Lock()


def load_scaled(checkpoint: Path, rope_scaling: dict[str, Any] | None, device: str):
    """The checkpoint's causal LM, with `rope_scaling` merged into its RoPE parameters when given (ConfigError
    for a model without RoPE, or a scaling its config refuses)."""
    with _LOAD_LOCK:
        return _load_scaled(checkpoint, rope_scaling, device)


def _load_scaled(checkpoint: Path, rope_scaling: dict[str, Any] | None, device: str):
    from transformers import AutoConfig

    from alignline.models import load_causal_lm

    if not rope_scaling:
        return load_causal_lm(checkpoint, device=device)
    config = AutoConfig.from_pretrained(checkpoint)
    if getattr(config, "position", "rope") != "rope":
        raise ConfigError(f"eval_rope_scaling needs a RoPE model; {checkpoint} has position={config.position!r}")
    try:
        config.rope_parameters = {**config.rope_parameters, **rope_scaling}
        if hasattr(config, "validated_rope_parameters"):  # alignline: check it now, not at the first forward
            config.validated_rope_parameters()
    except ValueError as exc:
        raise ConfigError(f"eval_rope_scaling={rope_scaling}: {exc}") from None
    return load_causal_lm(checkpoint, device=device, config=config)


def measure_extrapolation(ex: ExtrapolationConfig, seq_len: int, stage_dir: Path, data_dir: Path,
                          tokenizer_dir: Path, log=None, rope_scaling: dict[str, Any] | None = None,
                          ) -> dict[str, dict[str, Any]]:
    """`extrapolation_losses` of the pretrain stage's checkpoint (RoPE-scaled at inference when asked) on
    the data stage's val split."""
    from alignline.tokenizer import load_tokenizer
    from stages.pretrain import read_texts, tokenize_stream

    model = load_scaled(load_stage(stage_dir, verify=False).checkpoint, rope_scaling, _device(ex.device))
    stream = tokenize_stream(read_texts(data_dir / "pretrain" / "val.jsonl"), load_tokenizer(tokenizer_dir))
    return extrapolation_losses(model, stream, seq_len, ex, log=log, what=stage_dir.parent.name)


def extrapolation_losses(model, stream, seq_len: int, ex: ExtrapolationConfig, log=None,
                         what: str = "model") -> dict[str, dict[str, Any]]:
    """{length multiple: {tokens, windows, loss, buckets}} for windows of multiple * seq_len tokens from
    the start of the token `stream` (`ex.windows` of them, fewer when the stream is short), or {tokens,
    loss: None, error} at a length the model cannot take (its forward raises ValueError, IndexError or
    RuntimeError, e.g. learned positions past max_position_embeddings, out of memory) or the stream is
    too short for; such a length is "n/a" in the table, with the error, and the others still count."""
    from alignline.evaluation import bucket_means, loss_by_position
    from stages.pretrain import val_windows

    width = max(1, seq_len // ex.buckets_per_length)
    out: dict[str, dict[str, Any]] = {}
    for m in ex.lengths:
        tokens = m * seq_len
        n = min(ex.windows, (len(stream) - 1) // tokens)
        if n == 0:
            out[str(m)] = {"tokens": tokens, "loss": None,
                           "error": f"the val split has {len(stream)} tokens, fewer than one window of {tokens + 1}"}
            continue
        try:
            losses = loss_by_position(model, val_windows(stream, tokens, n), ex.batch_size)
        except (ValueError, IndexError, RuntimeError) as exc:  # a length this model cannot take, or OOM
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if log is not None:
                log.warning("%s: no loss at %dx (%d tokens): %s", what, m, tokens, reason)
            out[str(m)] = {"tokens": tokens, "loss": None, "error": reason}
            continue
        out[str(m)] = {"tokens": tokens, "windows": n, "loss": float(losses.mean()),
                       "buckets": bucket_means(losses, width)}
    return out


@task(name="extrapolation", cache_policy=NO_CACHE, log_prints=False)
def extrapolation_task(ex: dict[str, Any], seq_len: int, stage_dir: str, data_dir: str, tokenizer_dir: str,
                       out_file: str, rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `out_file` (extrapolation.json) unless it holds a result with this key; returns its content
    plus `status` (ran | cached)."""
    logger = get_run_logger()
    cfg = ExtrapolationConfig.model_validate(ex)
    key = extrapolation_key(cfg, seq_len, Path(stage_dir), Path(data_dir), Path(tokenizer_dir), rope_scaling)
    out = Path(out_file)
    if out.is_file():
        old = read_json(out)
        changes = key_changes(old.get("key") if isinstance(old, dict) else None, key)
        if not changes:
            logger.info("%s: extrapolation cached (%s)", out.parent.name, out)
            return {**old, "status": "cached"}
        logger.info("%s: extrapolation re-measured (%s)", out.parent.name, "; ".join(changes))
    t0 = time.monotonic()
    lengths = measure_extrapolation(cfg, seq_len, Path(stage_dir), Path(data_dir), Path(tokenizer_dir), logger,
                                    rope_scaling)
    result = {"key": key, "seq_len": seq_len, "bucket_width": max(1, seq_len // cfg.buckets_per_length),
              "wall_s": round(time.monotonic() - t0, 3), "lengths": lengths}
    write_json(out, result)
    logger.info("%s: extrapolation %s", out.parent.name,
                ", ".join(f"{m}x={e['loss']:.4f}" if e.get("loss") is not None else f"{m}x=n/a"
                          for m, e in lengths.items()))
    return {**result, "status": "ran"}


# --------------------------------------------------------------------------- one (variant, seed)


def _share_cache(run_dir: Path, variant_dir: Path) -> None:
    """`<variant_dir>/cache` -> `<run_dir>/cache`: the token shards (keyed by corpus and tokenizer) are
    built once for all variants; alignline.data.shards.build_shards is safe against concurrent builders."""
    link = variant_dir / "cache"
    (run_dir / "cache").mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        variant_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..") / ".." / "cache", target_is_directory=True)


@task(name="variant", cache_policy=NO_CACHE, log_prints=False)
def variant_task(label: str, module: str, config: dict[str, Any], inputs: dict[str, str], run_dir: str,
                 variant_dir: str, nproc: int, launcher: str, timeout_s: float | None, env: dict[str, str],
                 retries: int, retry_delay_s: float, progress_key: str, progress_every_s: float,
                 extrapolation: dict[str, Any], seq_len: int, out_dir: str | None = None,
                 rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pretrain one (variant, seed) (the pipeline's stage task: cached, resumed, retried like a pipeline
    stage) in `variant_dir`, then its extrapolation evaluation (RoPE-scaled when asked) into `out_dir`;
    returns the record for the table."""
    logger = get_run_logger()
    _share_cache(Path(run_dir), Path(variant_dir))
    logger.info("%s: pretrain starting", label)
    runner = stage_task.with_options(name="stage-pretrain", task_run_name=f"pretrain-{label}", retries=retries,
                                     retry_delay_seconds=retry_delay_s, retry_condition_fn=not_a_user_error)
    out = runner(stage="pretrain", module=module, config=config, inputs=inputs, run_dir=variant_dir, nproc=nproc,
                 launcher=launcher, timeout_s=timeout_s, progress_key=progress_key,
                 progress_every_s=progress_every_s, env=env or None)
    stage_dir = Path(out["path"])
    ex = extrapolation_task.with_options(task_run_name=f"extrapolation-{label}")(
        extrapolation, seq_len, str(stage_dir), inputs["data"], inputs["tokenizer"],
        str(Path(out_dir or variant_dir) / "extrapolation.json"), rope_scaling)
    ev = load_stage(stage_dir, verify=False).eval
    return {"status": out["status"], "reason": out["reason"], "path": str(stage_dir), "wall_s": out["wall_s"],
            "n_params": ev.get("n_params"), "active_params": ev.get("n_active_params", ev.get("n_params")),
            "tokens_per_s": tokens_per_second(stage_dir), "val_loss": ev.get("val_loss"),
            "gold_accuracy": ev.get("gold_accuracy"), "extrapolation": ex["lengths"],
            "extrapolation_status": ex["status"]}


# --------------------------------------------------------------------------- the report


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "ablation"


def write_report(config: AblationConfig, plan: AblationPlan, records: list[dict[str, Any]], run_dir: Path,
                 plots: bool = True, publish: bool = False) -> Path:
    """Write `<run_dir>/ablation.md` and `ablation.json` (and with `plots`, `ablation/*.png`); with `publish`,
    the Prefect markdown and table artifacts (`<name>-ablation`, `<name>-ablation-table`)."""
    names = [v.name for v in config.variant_specs]
    lengths = config.extrapolation.lengths
    rows = summary_rows(records, names, lengths)
    table = render_table(rows, lengths, len(config.seeds))
    pngs: dict[str, Path] = {}
    if plots:
        done = [r for r in records if r.get("status") in ("ran", "cached")]
        curves = plot_loss_curves({n: [r["path"] for r in done if r["variant"] == n] for n in names
                                   if any(r["variant"] == n for r in done)}, run_dir / "ablation")
        extrap = plot_extrapolation({n: [{"lengths": r["extrapolation"]} for r in done if r["variant"] == n]
                                     for n in names if any(r["variant"] == n for r in done)},
                                    plan.seq_len, run_dir / "ablation")
        pngs = {k: p for k, p in (("training and val loss", curves), ("length extrapolation", extrap)) if p}
    overrides = {v.name: v.overrides for v in config.variant_specs}
    head = [f"# Ablation: {config.name}", "",
            f"Base pretrain config: `{config.pretrain.config}` ({plan.seq_len}-token training length, "
            f"{plan.base.config.train.max_steps} steps x {plan.base.config.train.batch_size} sequences); seeds "
            f"{config.seeds}; val loss at {', '.join(f'{m}x' for m in lengths)} the training length on the data "
            "stage's val split. Active params: what one token uses (an MoE counts only its routed top-k experts).",
            ""]
    if config.max_concurrency > 1:
        head += [f"Tokens/s were measured with up to {config.max_concurrency} runs side by side; compare them at "
                 "max_concurrency: 1.", ""]
    body = ["## Variants", "", "| variant | overrides |", "|---|---|"]
    body += [f"| {n} | {'`' + json.dumps(o) + '`' if o else '(base)'} |" for n, o in overrides.items()]

    def render(embed: bool) -> str:
        parts = [*head, table, ""]
        for title, p in pngs.items():
            src = png_data_uri(p) if embed else p.relative_to(run_dir).as_posix()
            parts += [f"### {title}", "", f"![{title}]({src})", ""]
        return "\n".join(parts + body) + "\n"

    path = run_dir / "ablation.md"
    write_text(path, render(False))
    write_json(run_dir / "ablation.json", {"name": config.name, "seq_len": plan.seq_len, "lengths": lengths,
                                           "seeds": config.seeds, "rows": rows, "runs": records})
    if publish:
        slug = _slug(config.name)
        create_markdown_artifact(markdown=render(config.report.embed_images), key=f"{slug}-ablation",
                                 description=f"alignline ablation; also at {path}")
        create_table_artifact(table=[{k: v for k, v in r.items()} for r in rows], key=f"{slug}-ablation-table",
                              description="one row per variant: params, tokens/s, val loss, extrapolation")
    return path


# --------------------------------------------------------------------------- the flow


def run_ablation(config: AblationConfig) -> dict[str, Any]:
    """Run `ablate_flow` with a thread pool of `config.max_concurrency` workers for the variant runs."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ablate_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=config.max_concurrency))(
        config=config)


@flow(name="alignline-ablate", log_prints=False, validate_parameters=True)
def ablate_flow(config: AblationConfig = AblationConfig()) -> dict[str, Any]:  # noqa: B008 - renders the UI form
    """Run the ablation; returns {run_dir, report, runs: [record per (variant, seed)]}. Holds the run
    directory's lock (alignline.locks) while it runs. Use `run_ablation` for `max_concurrency`."""
    with run_lock(config.run_dir):
        return _run(config)


def _run(config: AblationConfig) -> dict[str, Any]:
    logger = get_run_logger()
    quiet_user_errors()
    run_dir = Path(config.run_dir).resolve()
    plan = resolve_ablation(config, run_dir)  # every variant's config validated before anything runs
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "ablation.yaml")
    logger.info("ablation %s: %d variants x %d seeds = %d pretrain runs, up to %d at once, in %s", config.name,
                len(config.variant_specs), len(config.seeds), len(plan.runs), config.max_concurrency, run_dir)
    dirs = {"data": "data", "tokenizer": "tokenizer"}
    shared = {}
    for stage, rs in (("data", plan.data), ("tokenizer", plan.tokenizer)):
        runner = stage_task.with_options(name=f"stage-{stage}", task_run_name=stage, retries=config.retries,
                                         retry_delay_seconds=config.retry_delay_s, retry_condition_fn=not_a_user_error)
        out = runner(stage=stage, module=rs.module, config=rs.config_dict,
                     inputs=stage_inputs(rs, run_dir, {"data", "tokenizer"}, dirs), run_dir=str(run_dir),
                     nproc=rs.nproc, launcher=rs.entry.launcher, timeout_s=rs.entry.timeout_s)
        shared[stage] = out["path"]
        logger.info("%s: %s (%s)", stage, out["status"], out["path"])
    inputs = stage_inputs(plan.base, run_dir, {"data", "tokenizer"}, dirs)
    env = ({"OMP_NUM_THREADS": str(config.threads_per_variant), "MKL_NUM_THREADS": str(config.threads_per_variant)}
           if config.threads_per_variant else {})
    slug = _slug(config.name)
    records: list[dict[str, Any]] = [{"variant": r.variant, "seed": r.seed, "status": "pending",
                                      "path": str(r.stage_dir)} for r in plan.runs]
    futures: dict[Any, int] = {}
    by_index: list[Any] = []
    for i, r in enumerate(plan.runs):
        rs = r.resolved
        if r.shares is not None:  # same training config: wait for that run, then reuse its stage dir
            logger.info("%s trains exactly as %s: it reuses that run", r.label, plan.runs[r.shares].label)
        fut = variant_task.with_options(task_run_name=r.label).submit(
            label=r.label, module=rs.module, config=rs.config_dict, inputs=inputs, run_dir=str(run_dir),
            variant_dir=str(r.run_dir), nproc=rs.nproc, launcher=rs.entry.launcher, timeout_s=rs.entry.timeout_s,
            env=env, retries=rs.entry.retries if rs.entry.retries is not None else config.retries,
            retry_delay_s=config.retry_delay_s, progress_key=f"{slug}-{r.label}-progress",
            progress_every_s=config.report.progress_every_s, extrapolation=config.extrapolation.model_dump(),
            seq_len=plan.seq_len, out_dir=str(r.out_dir), rope_scaling=r.eval_rope_scaling,
            wait_for=[by_index[r.shares]] if r.shares is not None else None)
        futures[fut] = i
        by_index.append(fut)
    failures: list[tuple[str, BaseException]] = []
    for done, fut in enumerate(as_completed(list(futures)), 1):
        i = futures[fut]
        run = plan.runs[i]
        fut.wait()
        if fut.state.is_completed():
            rec = fut.result()
            records[i].update(rec)
            ex = rec["extrapolation"]
            logger.info("[%d/%d] %s: %s, val loss %.4f, %s", done, len(plan.runs), run.label, rec["status"],
                        rec["val_loss"], ", ".join(f"{length_key(int(m))}="
                                                   + (f"{e['loss']:.4f}" if e.get("loss") is not None else "n/a")
                                                   for m, e in ex.items()))
        else:
            exc = fut.result(raise_on_failure=False)
            exc = exc if isinstance(exc, BaseException) else RuntimeError(str(fut.state.message))
            first = str(exc).splitlines()[0] if str(exc) else ""
            records[i].update(status="failed", error=f"{type(exc).__name__}: {first}"[:300])
            failures.append((run.label, exc))
            logger.error("[%d/%d] %s: FAILED: %s", done, len(plan.runs), run.label, records[i]["error"])
        write_report(config, plan, records, run_dir, plots=False)  # the table so far, after each run
    report = write_report(config, plan, records, run_dir, plots=True, publish=True)
    logger.info("ablation table: %s", report)
    if failures:
        raise AblationFailed(
            f"{len(failures)} of {len(plan.runs)} runs failed: "
            + "; ".join(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        for label, e in failures)
            + f"\nthe others finished; table: {report}; re-run the same command to resume the failed ones",
            user_error=all(isinstance(e, UserError) for _, e in failures))
    from prefect.runtime import flow_run

    return {"run_dir": str(run_dir), "report": str(report), "flow_run_id": flow_run.get_id(), "runs": records}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.ablate --config ... [--run-dir ...] [--set k=v ...]` (same as `alignline ablate`)."""
    import argparse

    from flows.cli import run_ablate_command

    ap = argparse.ArgumentParser(prog="python -m flows.ablate", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ablation/tiny.yaml")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    return run_ablate_command(args.config, run_dir=args.run_dir, overrides=args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
