"""Prefect tasks shared by the flows: resolve a stage config, check the stage cache, run one stage.

Not run directly; `flows/pipeline.py` (whole pipeline) and `flows/stage.py` (one stage) use it.

A stage's directory is `<run_dir>/<stage>`, or `<run_dir>/<stage>-<variant>` when its config
selects a variant (`alignline.artifacts.stage_dir_name`; the rlhf stage: `rlhf-<algorithm>`), so
each variant is cached, resumed and forced on its own. A stage is reused, not run, when its directory has a verified complete manifest whose reuse key
(`alignline.artifacts.stage_key`: config, code version, every input's manifest hash or content,
and the fingerprint of every data file the stage reads from outside the run dir) equals the key of
this run (see `cache_check`); the same key decides whether the stage may resume its `state/`. A stage runs in this process
(`launcher: inprocess`), as `python -m <module>` (`subprocess`), or under torchrun when
`nproc_per_node > 1`; the last two are killed as a process group on timeout or cancellation
(so a stage with `timeout_s` always runs as a subprocess: a Python thread cannot be killed).

User errors (alignline.config.UserError: bad data, a wrong input dir, a full disk) are not retried
(`not_a_user_error`), a stage subprocess that exits 2 raises one (`StageUserError`), and Prefect's
task and flow loggers print them as one line without a traceback (`quiet_user_errors`); the
pipeline command then prints the message once and exits 2. ALIGNLINE_DEBUG=1 keeps the tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from alignline.artifacts import (
    StageError,
    adopt_legacy_dir,
    discard_state,
    key_changes,
    load_stage,
    stage_dir_name,
    stage_key,
)
from alignline.config import (
    ConfigError,
    StrictModel,
    UserError,
    config_from_dict,
    config_to_dict,
    debug_enabled,
    read_config,
)
from alignline.launch import LaunchError, launch, torchrun_command
from alignline.report import metrics_path
from stages import load_stage_module

REPO_ROOT = Path(__file__).resolve().parent.parent


class StageEntry(StrictModel):
    """How the pipeline runs one stage: its config (file, inline values, overrides) and launcher."""

    enabled: bool = Field(True, description="false: the stage is not part of this pipeline")
    config: str | None = Field(
        None, description="stage YAML, relative to the working directory (or absolute); none = stage defaults"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="inline config values, applied over the file")
    set: list[str] = Field(default_factory=list, description="dotted overrides (key.path=value), applied last")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="input dirs by input name (e.g. init: /models/base); default: this run's"
    )
    module: str | None = Field(None, description="implementation module; default from the stages registry")
    nproc_per_node: int = Field(1, ge=1, description="> 1 launches the stage with torchrun on this many ranks "
                                "(per node: GPUs per node with launcher kubernetes or slurm)")
    launcher: Literal["inprocess", "subprocess", "kubernetes", "slurm"] = Field(
        "inprocess", description="inprocess | subprocess (`python -m <module>`) on this machine (torchrun when "
        "nproc_per_node > 1); kubernetes | slurm: one job of `nnodes` nodes (deploy/, alignline/jobs.py)"
    )
    nnodes: int = Field(1, ge=1, description="nodes of a kubernetes or slurm job (torchrun c10d rendezvous)")
    job: dict[str, Any] = Field(
        default_factory=dict, description="the job's settings: alignline.jobs.KubernetesJob (image, pvc, ...) or "
        "SlurmJob (workdir, partition, ...), for launcher kubernetes or slurm"
    )
    timeout_s: float | None = Field(
        None, gt=0, description="kill the stage after this long; implies a subprocess (a thread cannot be killed)"
    )
    retries: int | None = Field(None, ge=0, description="task retries; none = the pipeline's `retries`")


@dataclass
class ResolvedStage:
    """A validated stage, ready to run: everything a task needs, as plain data."""

    name: str
    module: str
    config: Any
    config_dict: dict[str, Any]
    input_specs: list[Any]
    entry: StageEntry
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)  # validated `job:` for launcher kubernetes | slurm

    @property
    def dir_name(self) -> str:
        """The stage's output dir in the run dir: `name`, or `name-<variant>` (stage_dir_name)."""
        return stage_dir_name(self.name, self.config)

    @property
    def nproc(self) -> int:
        return max(self.entry.nproc_per_node, _config_nproc(self.config_dict))


def _config_nproc(cfg: dict[str, Any]) -> int:
    """A stage config may ask for ranks itself (`nproc_per_node`, top level or under `distributed`)."""
    for node in (cfg, cfg.get("distributed") or {}):
        v = node.get("nproc_per_node") if isinstance(node, dict) else None
        if isinstance(v, int) and v > 1:
            return v
    return 1


def user_path(p: str | Path) -> Path:
    """alignline's one path convention: a relative path, wherever it is written (a pipeline or stage
    YAML, `--set`, the command line), is relative to the working directory; every example runs from
    the repository root. (A stage's own files, such as the tokenizer's `corpus`, are named inside
    its input stage directory instead.)"""
    p = Path(p)
    return p if p.is_absolute() else Path.cwd() / p


def stage_module_name(stage: str, entry: StageEntry) -> str:
    if entry.module:
        return entry.module
    from stages import STAGES

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    return STAGES[stage]


def resolve_stage(stage: str, entry: StageEntry, where: str = "pipeline") -> ResolvedStage:
    """Load and validate one stage config (file, then `params`, then `set`); ConfigError names the place."""
    module_name = stage_module_name(stage, entry)
    module = load_stage_module(stage, module_name)
    path = None
    if entry.config:
        path = user_path(entry.config)
        if not path.is_file():
            raise ConfigError(f"{where}: stages.{stage}.config: {entry.config} does not exist (relative paths are "
                              f"relative to the working directory {Path.cwd()}; the shipped configs/ are in {REPO_ROOT})")
    data, source, key_lines = read_config(path, params=entry.params, overrides=entry.set,
                                          label=f"{where}: stages.{stage} (defaults)", set_flag="set")
    cfg = config_from_dict(module.Config, data, source, key_lines)
    nproc = max(entry.nproc_per_node, _config_nproc(config_to_dict(cfg)))
    job = _job_settings(stage, entry, where)
    world = nproc * entry.nnodes
    check = getattr(module, "check_world_size", None)  # optional: a stage's own rank-count rules
    if world > 1 and check is not None:
        try:
            check(cfg, world)
        except ConfigError as exc:
            ranks = f"nproc_per_node={nproc}" + (f" x nnodes={entry.nnodes}" if entry.nnodes > 1 else "")
            raise ConfigError(f"{where}: stages.{stage} on {ranks} ranks: {exc}") from None
    return ResolvedStage(
        name=stage,
        module=module_name,
        config=cfg,
        config_dict=config_to_dict(cfg),
        input_specs=list(getattr(module, "INPUTS", [])),
        entry=entry,
        source=str(getattr(module, "__file__", "")),
        job=job,
    )


def _job_settings(stage: str, entry: StageEntry, where: str) -> dict[str, Any]:
    """`job:` validated for the entry's launcher (alignline.jobs), as plain data; {} on this machine."""
    from alignline.jobs import KubernetesJob, SlurmJob

    key = f"{where}: stages.{stage}"
    if entry.launcher not in ("kubernetes", "slurm"):
        if entry.nnodes > 1:
            raise ConfigError(f"{key}.nnodes={entry.nnodes} needs launcher: kubernetes or slurm (a job across "
                              f"nodes); launcher {entry.launcher} runs on this machine only")
        if entry.job:
            raise ConfigError(f"{key}.job is only read by launcher: kubernetes or slurm (launcher is "
                              f"{entry.launcher}); remove it")
        return {}
    cls = KubernetesJob if entry.launcher == "kubernetes" else SlurmJob
    try:
        return cls.model_validate(entry.job).model_dump()
    except ValueError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", list)())
        raise ConfigError(f"{key}.job (launcher {entry.launcher}, alignline.jobs.{cls.__name__}): "
                          f"{problems or exc}") from None


# --------------------------------------------------------------------------- cache


def append_stage_sets(entries: dict[str, Any], per_stage: dict[str, list[str]], default_entry, source: str) -> None:
    """Append each stage's `--set` items (`<stage>.<key>=v` with the stage prefix removed) to the `set` of its
    entry in `entries` (a pipeline's `stages:` or an ablation config), creating `default_entry(stage)` when
    the YAML has none."""
    for stage, items in per_stage.items():
        entry = entries.get(stage)
        if entry is None:
            entry = entries[stage] = default_entry(stage)
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: {stage}: expected a stage entry (config, set, ...); got {entry!r}")
        entry["set"] = list(entry.get("set") or []) + items


def data_files(module: ModuleType, config: Any) -> dict[str, Path]:
    """The data a stage reads from outside the run directory: its module's `data_files(config)`, if any."""
    fn = getattr(module, "data_files", None)
    return {k: Path(v) for k, v in (fn(config) if fn else {}).items()}


def current_key(module_name: str, config: Any, inputs: dict[str, str | Path]) -> dict[str, Any]:
    """The reuse key this run of the stage has (the same `stage_key` the stage's StageRun computes)."""
    module = load_stage_module(module_name.rsplit(".", 1)[-1], module_name)  # already imported: a lookup
    return stage_key(config, dict(inputs), module.__file__, data_files(module, config))


def cache_check(module_name: str, config: Any, inputs: dict[str, str | Path], stage_dir: Path) -> tuple[bool, str]:
    """(True, why) when `stage_dir` holds a complete output with exactly this run's reuse key;
    (False, why) otherwise, `why` naming what changed (config, code, which input, which data file)."""
    try:
        sd = load_stage(stage_dir, verify=True)
    except StageError as exc:
        return False, f"no reusable output ({exc})"
    key = current_key(module_name, config, inputs)
    changes = key_changes(sd.manifest.get("key"), key)
    if changes:
        return False, "; ".join(changes)
    return True, (f"key {key['sha256'][:10]}: config {key['config_sha256'][:10]}, code {key['code_version'][:10]}, "
                  f"{len(key['inputs'])} inputs and {len(key['data'])} data sources unchanged")


# --------------------------------------------------------------------------- progress


def total_steps(cfg: dict[str, Any]) -> int | None:
    """The training length from a config, wherever the stage keeps it (first match, depth first)."""
    keys = ("max_steps", "total_steps", "num_steps", "train_steps", "steps")

    def walk(node: Any) -> int | None:
        if isinstance(node, dict):
            for k in keys:
                v = node.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
            for v in node.values():
                found = walk(v)
                if found:
                    return found
        return None

    return walk(cfg)


class ProgressReporter:
    """Tail a stage's metrics.jsonl in a thread and feed a Prefect progress artifact."""

    def __init__(self, stage: str, stage_dir: Path, total: int | None, every_s: float = 2.0, key: str | None = None):
        self.stage, self.stage_dir, self.total, self.every_s = stage, stage_dir, total, every_s
        self.key = key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.artifact_id = None
        self.last = -1.0

    def __enter__(self) -> ProgressReporter:
        if self.total:
            self.artifact_id = create_progress_artifact(
                0.0, key=self.key, description=f"{self.stage}: training steps done (of {self.total})"
            )
            self._thread = threading.Thread(target=self._loop, name=f"progress-{self.stage}", daemon=True)
            self._thread.start()
        return self

    def current(self) -> float:
        path = metrics_path(self.stage_dir)
        if not path.is_file() or not self.total:
            return 0.0
        step = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    step = max(step, int(json.loads(line).get("step", 0)))
                except (json.JSONDecodeError, TypeError, ValueError):
                    continue  # a line being written right now
        return min(100.0, 100.0 * step / self.total)

    def push(self, value: float) -> None:
        if self.artifact_id is None or value == self.last:
            return
        update_progress_artifact(self.artifact_id, value)
        self.last = value

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.push(self.current())
            except Exception as exc:  # progress is informative; never fail the stage for it
                get_run_logger().warning("progress update for %s failed: %r", self.stage, exc)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc_type is None and self.artifact_id is not None:
            self.push(100.0)


# --------------------------------------------------------------------------- user errors


class StageUserError(UserError):
    """A stage run as a subprocess exited 2: it reported a user error, whose `error:` lines this carries."""


def not_a_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry crashes, never a user error (the same input fails again)."""
    return not isinstance(getattr(state, "data", None), UserError)


class _QuietUserErrors(logging.Filter):
    """Drops the traceback from Prefect's "task/flow run failed" records when the exception is a user error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError) and not debug_enabled():
            first = str(exc).splitlines()[0] if str(exc) else ""
            record.msg, record.args = f"stopped by a user error ({type(exc).__name__}): {first}", ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    """Install `_QuietUserErrors` on Prefect's run loggers (idempotent); call inside a flow run, after
    Prefect has configured logging."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _QuietUserErrors) for f in lg.filters):
            lg.addFilter(_QuietUserErrors())


def _user_error_lines(tail: list[str]) -> str:
    """The `error: ...` message (and its continuation lines) a stage CLI printed last (alignline.stage_cli)."""
    starts = [i for i, line in enumerate(tail) if line.startswith("error:")]
    if not starts:
        return "\n".join(tail[-5:])
    block = tail[starts[-1]:]
    for j, line in enumerate(block[1:], 1):  # under torchrun its failure summary follows: not the message
        if line.startswith(("Traceback", "error:", "[rank")) or re.match(r"[EWI]\d{4} ", line) \
                or "torch.distributed" in line:
            block = block[:j]
            break
    return "\n".join(block).removeprefix("error:").strip()


def _is_user_error_exit(exc: LaunchError, nproc: int) -> bool:
    """The stage CLI exits 2 on a user error; torchrun exits 1 then, and names the rank's exit code 2."""
    if exc.returncode == 2:
        return True
    return nproc > 1 and re.search(r"exitcode\s*:\s*2\b", "\n".join(exc.tail)) is not None


# --------------------------------------------------------------------------- the stage task


def _write_config(run_dir: Path, stage: str, cfg: dict[str, Any]) -> Path:
    d = run_dir / ".pipeline"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{stage}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p


def stage_args(config_file: Path, run_dir: Path, inputs: dict[str, str]) -> list[str]:
    args = ["--config", str(config_file), "--run-dir", str(run_dir)]
    for name, path in inputs.items():
        args += [f"--{name}", str(path)]
    return args


def stage_command(module: str, config_file: Path, run_dir: Path, inputs: dict[str, str], nproc: int) -> list[str]:
    args = stage_args(config_file, run_dir, inputs)
    if nproc > 1:
        return torchrun_command(module, args, nproc)
    return [sys.executable, "-m", module, *args]


def submit_job(launcher: str, stage: str, module: str, config: dict[str, Any], name: str, rd: Path,
               inputs: dict[str, str], nproc: int, nnodes: int, job: dict[str, Any], timeout_s: float | None,
               logger) -> None:
    """Run the stage as one Kubernetes or Slurm job (alignline.jobs) and wait for it. The run dir, and
    the config written into it, must be on storage the job's nodes share (the same path there)."""
    from prefect.runtime import task_run

    from alignline import jobs

    settings = (jobs.SlurmJob if launcher == "slurm" else jobs.KubernetesJob).model_validate(job)
    if launcher == "kubernetes" and not rd.resolve().is_relative_to(settings.mount_path):
        raise ConfigError(f"{name}: run_dir {rd.resolve()} is not under job.mount_path {settings.mount_path}, where "
                          "the job's pods mount the runs volume; put the run dir on that volume")
    cfg_file = _write_config(rd, name, config)
    attempt = f"{(task_run.id or 'local')}"[:8] + f"-{task_run.run_count or 1}"
    spec = jobs.JobSpec(stage=stage, module=module, args=stage_args(cfg_file, rd, inputs), nnodes=nnodes,
                        nproc_per_node=nproc, name=jobs.job_name(rd.name, name, attempt))
    emit = lambda line: logger.info("[%s] %s", name, line)  # noqa: E731
    try:
        if launcher == "slurm":
            script = rd / ".pipeline" / f"{name}.sbatch"
            script.write_text(jobs.render_slurm(spec, settings, rd / ".pipeline" / f"{name}.slurm.log"),
                              encoding="utf-8")
            logger.info("%s: sbatch --wait %s (%d nodes x %d GPUs)", name, script, nnodes, nproc)
            jobs.run_slurm(script, on_line=emit, timeout=timeout_s)
        else:
            docs = jobs.render_kubernetes(spec, settings)
            manifest = rd / ".pipeline" / f"{name}.k8s.yaml"
            manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
            logger.info("%s: kubectl apply -f %s (job %s, %d pods x %d GPUs)", name, manifest, spec.name, nnodes, nproc)
            jobs.run_kubernetes(manifest, docs, poll_s=settings.poll_s, on_line=emit, timeout=timeout_s)
    except LaunchError as exc:
        raise StageError(f"{name}: {exc}") from None


# log_prints stays off here and on the flows: Prefect's print patch also catches the prints that
# dill (under `datasets` fingerprinting) captures from dis.dis, which flooded the run log with bytecode.
# Stage progress goes through the run logger; a stage's own prints still reach the terminal.
@task(name="stage", cache_policy=NO_CACHE, log_prints=False)
def stage_task(
    stage: str,
    module: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    run_dir: str,
    nproc: int = 1,
    launcher: str = "inprocess",
    timeout_s: float | None = None,
    nnodes: int = 1,
    job: dict[str, Any] | None = None,
    force: bool = False,
    progress_key: str | None = None,
    progress_every_s: float = 2.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run stage `stage` unless its output is cached; returns {status, path, name, wall_s, headline, reason}.

    `env`: extra environment variables of a stage run as a subprocess or under torchrun (e.g.
    OMP_NUM_THREADS for stages running side by side); not applicable to an in-process stage.

    The output is `<run_dir>/<stage_dir_name(stage, config)>` (`name`): each variant of a stage (the
    rlhf stage's algorithms) is cached, resumed and forced on its own; logs name the variant.
    """
    logger = get_run_logger()
    mod = load_stage_module(stage, module)
    cfg = mod.Config.model_validate(config)
    rd = Path(run_dir)
    name = stage_dir_name(stage, cfg)
    stage_dir = rd / name
    adopt_legacy_dir(rd, stage, cfg)  # a pre-variant <stage>/ moves to its variant's dir (logged once)
    if not force:
        hit, why = cache_check(module, cfg, inputs, stage_dir)
        if hit:
            sd = load_stage(stage_dir, verify=False)
            logger.info("%s: cached, reusing %s (%s)", name, stage_dir, why)
            return {"status": "cached", "path": str(stage_dir), "name": name,
                    "wall_s": sd.manifest.get("wall_time_s"), "headline": sd.headline, "reason": why}
        logger.info("%s: running (%s)", name, why)
    else:
        why = "forced"
        # A forced stage retrains from scratch; only a retry of this same task (run_count > 1) resumes.
        from prefect.runtime import task_run

        if (task_run.run_count or 1) <= 1:
            discard_state(stage_dir / "state", f"{name} is forced to re-run (--from / force)")
        logger.info("%s: running (forced)", name)
    if env and launcher == "inprocess" and nproc == 1 and timeout_s is None:
        raise StageError(f"{name}: env {sorted(env)} applies to a stage run as a subprocess; this one runs "
                         "in-process (set launcher: subprocess)")
    t0 = time.monotonic()
    with ProgressReporter(name, stage_dir, total_steps(config), every_s=progress_every_s, key=progress_key):
        if launcher in ("kubernetes", "slurm"):
            submit_job(launcher, stage, module, config, name, rd, inputs, nproc, nnodes, job or {}, timeout_s, logger)
        elif nproc > 1 or launcher == "subprocess" or timeout_s is not None:
            cfg_file = _write_config(rd, name, config)
            cmd = stage_command(module, cfg_file, rd, inputs, nproc)
            logger.info("%s: launching %s", name, " ".join(cmd))
            env = {**(env or {}),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            try:
                launch(cmd, on_line=lambda line: logger.info("[%s] %s", name, line), timeout=timeout_s,
                       cwd=os.getcwd(), env=env, log_file=rd / ".pipeline" / f"{name}.log")
            except LaunchError as exc:
                if _is_user_error_exit(exc, nproc):  # the stage CLI's exit code for a user error
                    raise StageUserError(f"{name}: {_user_error_lines(exc.tail)}") from None
                raise
        else:
            out = mod.run(cfg, {k: Path(v) for k, v in inputs.items()}, rd)
            if Path(out).resolve() != stage_dir.resolve():
                raise StageError(f"stage {stage!r} wrote {out}, expected {stage_dir} (the stage contract puts "
                                 f"a stage in <run_dir>/{name}, see alignline.artifacts.stage_dir_name)")
    sd = load_stage(stage_dir, verify=False)  # a stage that 'succeeded' without a manifest is a failure
    wall = time.monotonic() - t0
    logger.info("%s: done in %.1f s -> %s", name, wall, stage_dir)
    return {"status": "ran", "path": str(stage_dir), "name": name, "wall_s": round(wall, 3),
            "headline": sd.headline, "reason": why}
