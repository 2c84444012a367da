"""The stage-directory contract: manifest, atomic finalize, checked loading, the state/ directory.

Every stage (`stages/<name>.py`) writes one self-describing directory `<run_dir>/<stage>/`, or
`<run_dir>/<stage>-<variant>/` for a stage whose config selects a variant (`stage_dir_name`: the
rlhf stage writes `rlhf-ppo/`, `rlhf-dpo/`, `rlhf-kto/`, `rlhf-grpo/`, `rlhf-rloo/` by its `algorithm`, so
alternatives in one run directory survive side by side):

    checkpoint/    HF format (config.json, *.safetensors, generation_config.json, tokenizer files).
                   The tokenizer stage also writes its tokenizer files here, so
                   `AutoTokenizer.from_pretrained(load_stage(p).checkpoint)` works for every stage.
    adapter/       PEFT adapter, when the stage trained LoRA
    state/         latest resumable training state (kept after completion; see StageRun)
    tb/            TensorBoard event files
    config.yaml    resolved stage config
    metrics.jsonl  per-step log
    eval.json      stage evaluation
    samples.jsonl  greedy generations on the fixed prompts (causal-LM stages)
    manifest.json  written last; with status "complete" it is what makes the directory valid

Use in a stage:

    run = StageRun(run_dir, "pretrain", cfg, inputs={"data": data_dir}, source=__file__)
    data = run.inputs["data"]                      # a verified StageDir
    meta = run.load_state(model=model, optimizer=opt, scheduler=sched)   # None when fresh
    ... run.metrics.log(step, loss=..., lr=...) ...
    ... run.save_state(step, model=model, optimizer=opt, scheduler=sched, data_position={...}) ...
    model.save_pretrained(run.staging / "checkpoint")
    out = run.finalize(eval={"val_loss": 2.1}, headline={"val_loss": 2.1}, samples=[...])

and in a consumer:

    sft = load_stage(run_dir / "sft", expect="sft")  # raises StageError naming the bad file
    sft.checkpoint, sft.eval, sft.manifest, sft.config

Writers: rank 0 of a StageRun holds `<run_dir>/.locks/<stage>.lock` (alignline.locks) until finalize,
so two processes never write one stage dir; a stage started in a run dir a pipeline holds is refused.
Variants: a config class names the key that selects its variant in the class variable
`variant_key` (`alignline.config.StrictModel`); `stage_dir_name(stage, config)` is the output
directory name every caller uses (StageRun, the flows, the report). The manifest keeps `stage`
(the kind, e.g. "rlhf", what consumers check) and adds `variant`. A run dir from before variants
has the output in plain `<stage>/`; `adopt_legacy_dir` moves it to `<stage>-<its variant>/`
(read from its recorded config) with one log line, or, when that name is taken, leaves it in place,
unused, and says so.

Atomicity: `StageRun` removes a stale manifest.json first, so an interrupted re-run never
leaves a directory that looks complete. Outputs are built in `<stage>/.staging/` and moved
into place by `finalize`, which writes manifest.json last via a temp file and `os.replace`.

manifest.json holds: `stage`, `status`, `config_sha256`, `inputs` (each parent's path and
manifest sha256), `files` (sha256 and size of every output file, the weights included;
`state/` and `tb/` are excluded), `versions` (python/torch/transformers/...), `git_commit`,
`wall_time_s`, `device`, `world_size`, `headline` metrics, `code_version` (hash of the stage
module plus the alignline package sources), `key` (the reuse key, see `stage_key`) and `created`.

Reuse key (`stage_key`): config sha256 + code version + every input (stage dirs by manifest
sha256, a plain HF dir by content) + a fingerprint of every data file the stage reads from outside
the run dir (`data=`, from the stage module's `data_files(config)`): content sha256, or for files
over LARGE_FILE_BYTES (256 MiB) size + mtime + a sampled hash. The flow reuses a finished stage and
StageRun resumes `state/` only under the same key.

Resume: `save_state` writes `state/step_<N>/` (alignline.checkpointing: model.safetensors,
optimizer.pt, scheduler.pt, trainer.pt, rng.pt, meta.json; FSDP2 shards gathered first) through a
temp dir (fsynced, then renamed), then points
`state/latest` at it by a rename: a failed save leaves the previous step and `latest` intact and no
temp files (a full disk raises `DiskFull`, a UserError naming the path). All
torch files hold plain tensors/containers and are read with `torch.load(weights_only=True)`;
nothing is pickled. `state/state.json` records the reuse key: a state written under a different
key (config, code, a parent, a data file) is deleted when the StageRun opens, with a log line
naming the part that changed. Each resume logs one "<stage>: resumed from step N" line. The
config part of the state's key leaves out the stage's `resume_keys` (e.g. the step count,
save/log/eval cadence): raising the step count of a finished or interrupted run continues it
from its state, and a finished run's metrics.jsonl and tb/ go back to staging so the logs
continue too.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from alignline.config import UserError, config_sha256, config_to_dict, save_config
from alignline.files import (  # noqa: F401  (read_jsonl: re-exported)
    fsync_tree,
    read_json,
    read_jsonl,
    remove_path,
    write_json,
    write_jsonl,
)
from alignline.locks import StageLock

log = logging.getLogger("alignline.artifacts")

MANIFEST = "manifest.json"
STAGING = ".staging"
STATE = "state"
FORMAT_VERSION = 1
# The pipeline's stages in run order: the one definition the stages registry, the flows, the report
# card and the test fixtures use (a stage's directory is named after it, see `stage_dir_name`).
# Directories inside a stage dir that are not covered by the manifest's file hashes:
# state/ changes during training and tb/ is only for viewing.
UNHASHED_DIRS = (STATE, "tb", STAGING)
_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "tokenizers", "safetensors",
             "datasets", "pydantic", "prefect")


class StageError(UserError, RuntimeError):
    """A stage directory is missing, incomplete, corrupted or of the wrong kind."""


class DiskFull(UserError):
    """A write failed for lack of space (ENOSPC, EDQUOT). Saves are atomic, so the previous state is intact;
    the message names the path and what a re-run resumes from."""

    def __init__(self, message: str, path: str | Path):
        super().__init__(message)
        self.path = Path(path)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "StorageFull")
# torch.save's zip writer reports a failed write without an errno ("unexpected pos ...", "file write failed").
_TORCH_WRITE_TEXT = ("inline_container", "PytorchStreamWriter", "file write failed")
_LOW_SPACE_BYTES = 64 << 20


def is_disk_full(exc: BaseException, path: str | Path | None = None) -> bool:
    """True when `exc` is a write that failed for lack of space: an OSError with ENOSPC/EDQUOT, a message
    saying so (safetensors), or torch.save's errno-less write failure on a file system with < 64 MiB free."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
    text = str(exc)
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    if path is not None and any(t in text for t in _TORCH_WRITE_TEXT):
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            return shutil.disk_usage(p).free < _LOW_SPACE_BYTES
        except OSError:
            return False
    return False


# --------------------------------------------------------------------------- small helpers


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _py_sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def code_version(*sources: str | Path) -> str:
    """Hash of the given source files (a stage module) plus every .py file of the alignline package.

    The flow uses it as part of its cache key, so editing library code invalidates cached stages.
    """
    pkg_root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    files = [Path(s).resolve() for s in sources if s is not None] + _py_sources(pkg_root)
    for f in files:
        # Content, not location: a stage module outside the repo is named by its file name only, so the
        # same code imported from another folder (a moved checkout, a copy) keeps its version.
        rel = f.relative_to(pkg_root.parent) if f.is_relative_to(pkg_root.parent) else Path(f.name)
        h.update(str(rel).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional package; absence is information too
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current commit (with '+dirty' when the tree has changes), or None outside git."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu:{platform.processor() or platform.machine()} threads={torch.get_num_threads()}"


def manifest_sha256(stage_path: str | Path) -> str:
    return sha256_file(Path(stage_path) / MANIFEST)


# --------------------------------------------------------------------------- reuse keys

# Files above this are fingerprinted by size + mtime + a sampled hash instead of a full sha256:
# re-reading a 100 GB corpus on every cache check would cost more than the stage it guards.
LARGE_FILE_BYTES = 256 * 1024 * 1024
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 20


def fingerprint_file(path: str | Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file, or {"bytes", "mtime_ns", "sampled_sha256"} above LARGE_FILE_BYTES."""
    path = Path(path)
    st = path.stat()
    if st.st_size <= LARGE_FILE_BYTES:
        return {"bytes": st.st_size, "sha256": sha256_file(path)}
    h = hashlib.sha256()
    step = (st.st_size - _SAMPLE_BYTES) // (_SAMPLES - 1)
    with open(path, "rb") as fh:
        for i in range(_SAMPLES):  # first and last MiB included, evenly spaced in between
            fh.seek(i * step)
            h.update(fh.read(_SAMPLE_BYTES))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sampled_sha256": h.hexdigest()}


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What a stage's result depends on in `path`: a stage dir by its manifest hash (which covers every
    output file), a file by `fingerprint_file`, a directory by every file in it (hidden files skipped)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return {"manifest_sha256": manifest_sha256(path)}
    if path.is_file():
        return fingerprint_file(path)
    if path.is_dir():
        files = {}
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            if f.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                files[rel.as_posix()] = fingerprint_file(f)
        return {"files": files}
    return {"missing": True}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stage_key(
    config: Any,
    inputs: dict[str, str | Path] | None = None,
    source: str | Path | None = None,
    data: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Everything a stage's result depends on, and its digest `sha256`.

    `config_sha256`, `code_version` (the stage module `source` + alignline sources), every input
    (`inputs`: stage dirs by manifest hash, anything else, e.g. an HF model dir, by content) and every
    data file or dir the stage reads from outside the run directory (`data`, from the stage module's
    `data_files(config)`). The flow's cache (flows.tasks.cache_check) and training-state resume
    (StageRun) both compare this key, so a stage is reused or resumed only on exactly the same key.
    Paths are recorded for the messages but are not part of the digest (a moved run dir stays valid).
    """
    def entries(paths: dict[str, str | Path] | None) -> dict[str, dict[str, Any]]:
        return {n: {"path": str(Path(p).resolve()), **fingerprint(p)}
                for n, p in sorted((paths or {}).items()) if p is not None}

    key: dict[str, Any] = {
        "config_sha256": config_sha256(config) if config is not None else None,
        "code_version": code_version(*([source] if source else [])),
        "inputs": entries(inputs),
        "data": entries(data),
    }
    key["sha256"] = _key_digest(key)
    return key


def _key_digest(key: dict[str, Any]) -> str:
    """Digest of a stage key without its paths (a moved run dir stays valid)."""
    strip = {k: ({n: {f: v for f, v in e.items() if f != "path"} for n, e in key[k].items()}
                 if k in ("inputs", "data") else key[k]) for k, v in key.items() if k != "sha256"}
    return _digest(strip)


def with_config(key: dict[str, Any], config: Any) -> dict[str, Any]:
    """`key` with its config part replaced by `config`'s hash (and the digest redone)."""
    out = {**key, "config_sha256": config_sha256(config)}
    out["sha256"] = _key_digest(out)
    return out


def key_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why two stage keys differ, one human line per changed part (empty when they are equal)."""
    if not old or "sha256" not in old:
        return ["no reuse key recorded (written by an older alignline)"]
    if old["sha256"] == new["sha256"]:
        return []
    out = []
    if old.get("config_sha256") != new.get("config_sha256"):
        out.append("config changed")
    if old.get("code_version") != new.get("code_version"):
        out.append("code changed (stage module or alignline sources)")
    for part, what in (("inputs", "input"), ("data", "data")):
        a, b = old.get(part) or {}, new.get(part) or {}
        for name in sorted(set(a) | set(b)):
            if name not in b:
                out.append(f"{what} {name!r} is no longer given")
            elif name not in a:
                out.append(f"{what} {name!r} is new ({b[name].get('path')})")
            else:
                out.extend(_entry_changes(what, name, a[name], b[name]))
    return out or ["reuse key changed"]


def _entry_changes(what: str, name: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    strip = ("path",)
    if {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}:
        return []
    where = b.get("path") or a.get("path")
    if a.get("path") and b.get("path") and a["path"] != b["path"]:
        # e.g. evaluate's `rlhf` input after switching the algorithm: rlhf-dpo/ -> rlhf-ppo/
        return [f"{what} {name!r} changed: now {b['path']} (was {a['path']})"]
    if "manifest_sha256" in a or "manifest_sha256" in b:
        return [f"{what} {name!r} changed: {where} has a different manifest (it was re-run)"]
    if "files" in a and "files" in b:
        fa, fb = a["files"], b["files"]
        lines = [f"{what} {name!r} changed: {where}/{rel} " + ("added" if rel not in fa else "removed"
                                                                   if rel not in fb else "changed")
                 for rel in sorted(set(fa) | set(fb)) if fa.get(rel) != fb.get(rel)]
        return lines[:5] + ([f"... and {len(lines) - 5} more files"] if len(lines) > 5 else [])
    if b.get("missing"):
        return [f"{what} {name!r} changed: {where} no longer exists"]
    return [f"{what} {name!r} changed: {where} (content differs)"]


def _hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root)
        if rel.parts[0] in UNHASHED_DIRS or rel.name == MANIFEST or rel.name.startswith(f".{MANIFEST}"):
            continue
        files[rel.as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def discard_state(state_dir: str | Path, why: str) -> None:
    """Delete a stage's training state (never resumed again), with a log line saying why."""
    state_dir = Path(state_dir)
    if state_dir.exists():
        log.warning("discarding training state %s, starting from scratch: %s", state_dir, why)
        shutil.rmtree(state_dir)


def _remove_temps(state_dir: Path) -> None:
    """Delete what an interrupted save left in `state/` (`.step_*.tmp-<pid>`, `.latest.tmp`): the stage
    lock guarantees no other process is writing there."""
    for p in state_dir.glob(".*.tmp*"):
        log.info("removing %s left by an interrupted save", p)
        remove_path(p)


# --------------------------------------------------------------------------- output directory names

_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.]*$")


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


def stage_variant(config: Any) -> str | None:
    """The variant `config` selects: the value of its class's `variant_key` (e.g. the rlhf stage's
    `algorithm`), or None for a stage without variants (or no config)."""
    key = getattr(type(config), "variant_key", None) if config is not None else None
    if not key:
        return None
    value = _lookup(config, key)
    if value is None:
        return None
    text = str(getattr(value, "value", value)).lower()  # an Enum's value, or the string itself
    if not _VARIANT_RE.match(text):
        from alignline.config import ConfigError

        raise ConfigError(f"{key}={value!r} cannot name an output directory; use lower-case letters, digits, "
                          "'_' and '.'")
    return text


def stage_dir_name(stage: str, config: Any = None) -> str:
    """The output directory name of `stage` under `config`: `<stage>`, or `<stage>-<variant>` when the
    config selects a variant (`stage_dir_name("rlhf", cfg)` is "rlhf-dpo" for `algorithm: dpo`).

    Everything that writes or finds a stage's output uses this: StageRun, the flows' cache check,
    inputs and `--from`, the report. A variant is thus its own stage for caching and resuming.
    """
    variant = stage_variant(config)
    return f"{stage}-{variant}" if variant else stage


def variant_dirs(run_dir: str | Path, stage: str) -> list[Path]:
    """Every complete `<run_dir>/<stage>-<variant>/` output of `stage` (manifest `stage` == `stage`),
    sorted by name: the alternatives of a stage that survive in a run directory."""
    out = []
    for p in sorted(Path(run_dir).glob(f"{stage}-*")):
        if not p.is_dir():
            continue
        try:
            manifest = read_json(p / MANIFEST)
        except StageError:
            continue
        if isinstance(manifest, dict) and manifest.get("stage") == stage and manifest.get("status") == "complete":
            out.append(p)
    return out


def default_stage_dir(run_dir: str | Path, stage: str) -> Path:
    """Where a consumer that was not told which variant to use finds `stage`'s output: `<run_dir>/<stage>`
    when it exists (a stage without variants, or a legacy dir), else the only complete variant dir,
    else the most recently finished one (logged, with the others). Used for the command line's input
    defaults; the pipeline passes the variant its config selects instead."""
    plain = Path(run_dir) / stage
    if plain.exists():
        return plain
    found = variant_dirs(run_dir, stage)
    if not found:
        return plain
    if len(found) > 1:
        newest = max(found, key=lambda p: (p / MANIFEST).stat().st_mtime_ns)
        log.info("%s has %d %s outputs (%s); using the most recently finished, %s (pass the input flag to choose)",
                 run_dir, len(found), stage, ", ".join(p.name for p in found), newest.name)
        return newest
    return found[0]


def _recorded_config(stage_path: Path) -> dict[str, Any] | None:
    """The config a stage dir was written with: config.yaml, .staging/config.yaml or state/state.json."""
    for f in (stage_path / "config.yaml", stage_path / STAGING / "config.yaml"):
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            if isinstance(data, dict):
                return data
    try:
        data = read_json(stage_path / STATE / "state.json").get("config")
    except (StageError, AttributeError):
        return None
    return data if isinstance(data, dict) else None


_LEGACY_SAID: set[tuple[str, str]] = set()


def adopt_legacy_dir(run_dir: str | Path, stage: str, config: Any) -> str | None:
    """Carry a pre-variant `<run_dir>/<stage>/` over to the per-variant layout; returns what was done
    (also logged once per process), or None when there is nothing to do.

    Only for a stage whose config has variants. The variant of the old dir is read from the config it
    recorded (the class default when the key did not exist then: an old rlhf dir is PPO). The dir is
    moved to `<stage>-<variant>/`; nothing in it names its own path, so a finished one is then reused
    by the cache as before. When that name is taken, or the variant cannot be told, the old dir is left
    in place and unused, never deleted.
    """
    if stage_dir_name(stage, config) == stage:
        return None
    legacy = Path(run_dir) / stage
    if not legacy.is_dir() or legacy.is_symlink():
        return None
    key = type(config).variant_key
    recorded = _recorded_config(legacy)
    variant = None
    if recorded is not None:
        try:
            variant = stage_variant(type(config).model_validate(recorded))
        except Exception:  # a config of an older alignline (renamed keys): read the one key
            value = _lookup(recorded, key)
            variant = str(value).lower() if value is not None and _VARIANT_RE.match(str(value).lower()) else None
    if variant is None:
        msg = (f"{legacy} is a {stage} output from before per-variant dirs, and its {key} cannot be read from "
               f"its config; it is left in place and not used (rename it to {stage}-<{key}> to use it)")
    else:
        target = legacy.parent / f"{stage}-{variant}"
        if target.exists():
            msg = (f"{legacy} is a {stage} output from before per-variant dirs ({key} {variant}), but {target.name}/ "
                   f"exists already: {legacy} is left in place and not used (delete it when no longer needed)")
        else:
            os.replace(legacy, target)
            msg = (f"moved {legacy} to {target} ({key} {variant}): each {stage} variant now has its own dir; "
                   "a finished output there is reused as before")
    if (str(legacy), msg) not in _LEGACY_SAID:
        _LEGACY_SAID.add((str(legacy), msg))
        log.warning("%s", msg)
    return msg


# --------------------------------------------------------------------------- checked loading


@dataclass
class StageDir:
    """A verified, complete stage directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def checkpoint(self) -> Path:
        """`<stage>/checkpoint` (HF format); raises StageError when the stage has none."""
        ckpt = self.path / "checkpoint"
        if not ckpt.is_dir():
            raise StageError(f"{ckpt} does not exist: stage {self.stage!r} wrote no checkpoint")
        return ckpt

    @property
    def adapter(self) -> Path | None:
        p = self.path / "adapter"
        return p if p.is_dir() else None

    @cached_property
    def eval(self) -> dict[str, Any]:
        p = self.path / "eval.json"
        return read_json(p) if p.is_file() else {}

    @cached_property
    def config(self) -> dict[str, Any]:
        p = self.path / "config.yaml"
        return yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else {}

    @property
    def headline(self) -> dict[str, Any]:
        return self.manifest.get("headline", {})

    def file(self, rel: str) -> Path:
        p = self.path / rel
        if not p.exists():
            raise StageError(f"{p} does not exist in stage {self.stage!r}")
        return p


def is_complete(path: str | Path) -> bool:
    """True when `path` has a manifest.json with status "complete" (hashes not checked)."""
    try:
        return read_json(Path(path) / MANIFEST).get("status") == "complete"
    except StageError:
        return False


def load_stage(path: str | Path, expect: str | None = None, verify: bool = True) -> StageDir:
    """Open a finished stage directory, refusing anything incomplete or altered.

    Checks that manifest.json exists, parses and says status "complete"; that the stage is
    `expect` (when given); and, with `verify`, that every file listed in the manifest exists
    with the recorded size and sha256. Any failure raises StageError naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        hint = f" (create it with `alignline stage {expect} ...`)" if expect else ""
        raise StageError(f"stage directory {path} does not exist{hint}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StageError(
            f"{mpath} is missing: {path} is incomplete (the stage did not finish or is still running); "
            "re-run the stage to produce it"
        )
    manifest = read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        status = manifest.get("status") if isinstance(manifest, dict) else None
        raise StageError(f"{mpath}: status is {status!r}, not 'complete'; re-run the stage")
    if expect is not None and manifest.get("stage") != expect:
        raise StageError(f"{mpath}: this is a {manifest.get('stage')!r} stage, expected {expect!r}; "
                         "check the path you passed")
    if verify:
        for rel, info in manifest.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                raise StageError(f"{f} is listed in {mpath} but missing; the directory was altered, "
                                 "re-run the stage")
            if f.stat().st_size != info["bytes"]:
                raise StageError(f"{f}: size {f.stat().st_size} != {info['bytes']} recorded in {mpath}; "
                                 "the file is corrupted or was modified, re-run the stage")
            if sha256_file(f) != info["sha256"]:
                raise StageError(f"{f}: sha256 does not match {mpath}; the file is corrupted or was "
                                 "modified, re-run the stage")
    return StageDir(path=path, manifest=manifest)


def model_dir(path: str | Path) -> Path:
    """The HF model directory behind `path`: `<stage>/checkpoint` for a stage dir (verified), else `path`.

    A plain HF directory (config.json, no manifest.json) is accepted as is, so stages can start from
    any causal LM on disk; a stage-looking dir without a complete manifest is refused.
    """
    path = Path(path)
    if (path / MANIFEST).exists() or (path / "checkpoint").is_dir():
        return load_stage(path).checkpoint
    if (path / "config.json").is_file():
        return path
    raise StageError(f"{path} is neither a stage directory (manifest.json + checkpoint/) nor an HF model "
                     "directory (config.json); pass the output of a stage or a saved model")


# --------------------------------------------------------------------------- a stage run


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass
class StageRun:
    """Opens `<run_dir>/<stage>/` (`<stage>-<variant>/` for a config with a variant, `stage_dir_name`;
    `name` is that dir name, `variant` the variant) for a run; see the module docstring for the life cycle.

    On open it (rank 0 only, under torchrun): moves a pre-variant `<stage>/` to its variant's dir
    (`adopt_legacy_dir`), removes a stale manifest.json, verifies every
    input with `load_stage`, discards training state written under another config, clears
    `.staging/` unless a compatible state exists (a resumed run keeps its staging so the
    metrics log continues), and writes the resolved config to `.staging/config.yaml`.
    """

    run_dir: str | Path
    stage: str
    config: Any
    inputs: dict[str, str | Path] = field(default_factory=dict)
    source: str | Path | None = None
    keep_states: int = 1
    # Inputs that are not stage dirs (an HF model dir as SFT's init): fingerprinted, not verified.
    external_inputs: dict[str, str | Path] = field(default_factory=dict)
    # Data read from outside the run directory (the stage module's `data_files(config)`).
    data: dict[str, str | Path] = field(default_factory=dict)
    # Top-level or dotted config keys that may change on resume (see the module docstring).
    resume_keys: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.t0 = time.time()
        self.run_dir = Path(self.run_dir)
        # `<stage>` or `<stage>-<variant>` (stage_dir_name); `stage` stays the kind written in the manifest.
        self.variant = stage_variant(self.config)
        self.name = stage_dir_name(self.stage, self.config)
        self.path = self.run_dir / self.name
        self._staging = self.path / STAGING
        self.state_dir = self.path / STATE
        self.is_main = _rank() == 0
        # Rank 0 writes the stage dir; it holds the stage's lock (alignline.locks) until finalize, so two
        # processes never write one stage dir and no pipeline takes over the run dir meanwhile.
        self._lock = StageLock(self.run_dir, self.stage) if self.is_main else None
        self.config_sha256 = config_sha256(self.config) if self.config is not None else None
        self.config_dict = config_to_dict(self.config) if self.config is not None else None
        # Inputs are verified before anything is touched, so a bad parent fails fast (hashes on rank 0
        # only: N ranks re-hashing the same multi-GB checkpoint would just cost time).
        self.inputs_loaded: dict[str, StageDir] = {
            name: load_stage(p, expect=None, verify=self.is_main) for name, p in (self.inputs or {}).items()
        }
        # The reuse key (see stage_key) decides whether state/ may be resumed; rank 0 owns state/.
        self.key: dict[str, Any] | None = None
        self.state_key: dict[str, Any] | None = None  # the key state/ is resumed under
        if self.is_main:
            self.key = stage_key(self.config, {**(self.inputs or {}), **self.external_inputs}, self.source,
                                 self.data)
            self.state_key = self.key
            if self.resume_keys and self.config_dict is not None:
                # Keys that may change on resume (steps, cadence) are left out of the state's config part.
                self.state_key = with_config(self.key, _without_keys(self.config_dict, self.resume_keys))
        self._metrics = None
        if self.is_main:
            self._open()
        # Under torchrun the other ranks must not read state/ while rank 0 may still be pruning it.
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()

    @property
    def staging(self) -> Path:
        """`.staging/`, where rank 0 writes the outputs before `finalize`. Under torchrun the other ranks
        have no business there: asking is an error, not a second writer racing rank 0."""
        if not self.is_main:
            raise RuntimeError(f"rank {_rank()} asked for {self._staging}: only rank 0 writes the {self.name} stage "
                               "dir (the other ranks wait for it at a barrier)")
        return self._staging

    def _open(self) -> None:
        adopt_legacy_dir(self.run_dir, self.stage, self.config)
        self.path.mkdir(parents=True, exist_ok=True)
        mpath = self.path / MANIFEST
        if mpath.exists():
            log.info("removing the manifest of the previous %s run before re-running: %s", self.name, mpath)
            mpath.unlink()
        compatible = self._check_state()
        if compatible:
            _remove_temps(self.state_dir)
        if not compatible and self.staging.exists():
            shutil.rmtree(self.staging)
        if compatible and not self.staging.exists():
            # A finished run being extended: its logs go back to staging and continue there.
            self.staging.mkdir(parents=True)
            for name in ("metrics.jsonl", "tb"):
                if (self.path / name).exists():
                    os.replace(self.path / name, self.staging / name)
        self.staging.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            save_config(self.config, self.staging / "config.yaml")

    # ----------------------------------------------------------------- inputs and metrics

    def input(self, name: str) -> StageDir:
        if name not in self.inputs_loaded:
            raise StageError(f"stage {self.stage!r} needs input {name!r}; got {sorted(self.inputs_loaded)}")
        return self.inputs_loaded[name]

    @property
    def metrics(self):
        """A `alignline.training.MetricsLogger` writing `.staging/metrics.jsonl` and `.staging/tb/`."""
        if self._metrics is None:
            from alignline.training import MetricsLogger  # lazy: keeps this module import-light

            self._metrics = MetricsLogger(
                self.staging if self.is_main else None,
                report_to=_report_to(self.config),
                run_name=f"{self.run_dir.name}/{self.name}",
                config=config_to_dict(self.config) if self.config is not None else None,
            )
        return self._metrics

    # ----------------------------------------------------------------- training state

    def _check_state(self) -> bool:
        """Keep state only when it was written under the same reuse key; True when kept.

        State trained on an old parent, old data or old code is never resumed: it is deleted, and the
        log line says which part of the key changed.
        """
        marker = self.state_dir / "state.json"
        if not self.state_dir.exists():
            return False
        try:
            recorded = read_json(marker)
        except StageError:
            recorded = {}
        assert self.state_key is not None
        if recorded.get("key_sha256") != self.state_key["sha256"]:
            why = key_changes(recorded.get("key"), self.state_key) if recorded else ["state/state.json is missing"]
            old_cfg = recorded.get("config")
            if old_cfg is not None and self.config_dict is not None:
                blocking = [k for k in _changed_keys(old_cfg, self.config_dict) if not _covered(k, self.resume_keys)]
                why = [f"config changed: {', '.join(blocking) or '?'}; may change on resume: "
                       f"{', '.join(self.resume_keys) or 'nothing'}" if w == "config changed" else w for w in why]
            discard_state(self.state_dir, f"{self.name}: " + "; ".join(why))
            return False
        changed = _changed_keys(recorded.get("config"), self.config_dict) if recorded.get("config") else []
        if changed:
            log.info("resuming %s with changed %s (allowed on resume)", self.name, ", ".join(changed))
            self._write_marker()
        log.info("found resumable state in %s (same config, code, inputs and data)", self.state_dir)
        return True

    def _write_marker(self) -> None:
        assert self.state_key is not None
        write_json(self.state_dir / "state.json", {
            "stage": self.stage, "key_sha256": self.state_key["sha256"], "config_sha256": self.config_sha256,
            "key": self.state_key, "config": self.config_dict,
        })

    def latest_state(self) -> Path | None:
        """The newest complete `state/step_<N>` directory, or None."""
        pointer = self.state_dir / "latest"
        if not pointer.is_file():
            return None
        p = self.state_dir / pointer.read_text().strip()
        return p if (p / "meta.json").is_file() else None

    def mark_state(self) -> Path:
        """Create `state/` stamped with this config (for trainers that write their own checkpoints)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not (self.state_dir / "state.json").exists() and self.state_key is not None:
            self._write_marker()
        return self.state_dir

    def save_state(
        self,
        step: int,
        *,
        model=None,
        optimizer=None,
        scheduler=None,
        trainer=None,
        data_position: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        dist=None,
        parallel: str = "ddp",
    ) -> Path | None:
        """Write `state/step_<step>/` atomically (rank 0) and point `state/latest` at it.

        `model`/`optimizer` may be DDP- or FSDP2-wrapped: under FSDP (`dist` enabled, `parallel`
        "fsdp") their shards are gathered first, a collective, so every rank calls this. `trainer`:
        an object with `state_dict()` / `load_state_dict()` holding its own models and optimizers
        (e.g. PPOTrainer). `data_position` and `extra` must be JSON-serialisable.
        See alignline.checkpointing for the files.
        """
        from alignline.checkpointing import gather_states, write_state

        model_state, optimizer_state = gather_states(model, optimizer, dist, parallel)
        if not self.is_main:
            return None
        name = f"step_{step:08d}"
        final = self.state_dir / name
        pointer_tmp = self.state_dir / ".latest.tmp"
        # The step goes to a temp dir renamed into place, then `latest` is switched by a rename: a failure
        # at any point (disk full, kill) leaves the previous step and `latest` as they were.
        try:
            self.mark_state()
            write_state(final, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
                        trainer=trainer, meta={
                            "step": step, "data_position": data_position or {}, "extra": extra or {},
                            "config_sha256": self.config_sha256,
                            "key_sha256": self.state_key["sha256"] if self.state_key else None, "time": time.time(),
                        })
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.state_dir / "latest")
        except BaseException as exc:
            full = isinstance(exc, Exception) and is_disk_full(exc, self.state_dir)
            try:
                remove_path(pointer_tmp)
            except OSError:
                log.warning("could not remove %s after a failed save", pointer_tmp)
            if not full:
                raise
            prev = self.latest_state()
            kept = (f"the training state of step {read_json(prev / 'meta.json')['step']} ({prev}) is intact; "
                    "free space and re-run the same command to resume from it") if prev else (
                    "there is no earlier training state; free space and re-run the same command")
            raise DiskFull(f"no space left on device while saving the training state of step {step} to {final} "
                           f"({type(exc).__name__}: {exc}); {kept}", final) from exc
        olds = sorted(p for p in self.state_dir.glob("step_*") if p.name != name)
        for old in olds[: max(0, len(olds) - (self.keep_states - 1))]:
            shutil.rmtree(old)
        return final

    def load_state(self, *, model=None, optimizer=None, scheduler=None, trainer=None, restore_rng: bool = True,
                   map_location: str = "cpu", dist=None, parallel: str = "ddp") -> dict[str, Any] | None:
        """Load the latest state into the given objects (as `save_state` took them; under FSDP every
        rank calls it); returns meta (step, data_position, extra, path), or None when there is no
        state to resume from."""
        from alignline.checkpointing import read_state

        latest = self.latest_state()
        if latest is None:
            return None
        meta = read_json(latest / "meta.json")
        # Rank 0 checked state.json against the full key when the run opened; this catches a step dir
        # copied in from elsewhere. Other ranks have no key of their own and follow rank 0.
        if self.state_key is not None and meta.get("key_sha256") != self.state_key["sha256"]:
            log.warning("ignoring %s: written under a different reuse key (config, code, inputs or data)", latest)
            return None
        try:
            read_state(latest, model=model, optimizer=optimizer, scheduler=scheduler, trainer=trainer,
                       restore_rng=restore_rng, map_location=map_location, dist=dist, parallel=parallel)
        except ValueError as exc:
            raise StageError(f"{exc}; delete {self.state_dir} to start over") from None
        log.info("%s: resumed from step %s (%s)", self.name, meta["step"], latest)
        meta["path"] = str(latest)
        return meta

    # ----------------------------------------------------------------- finalize

    def finalize(
        self,
        eval: dict[str, Any] | None = None,
        headline: dict[str, Any] | None = None,
        samples: list[dict] | None = None,
        extra_manifest: dict[str, Any] | None = None,
    ) -> Path:
        """Move `.staging/*` into the stage dir, hash the outputs, write manifest.json last."""
        if not self.is_main:
            return self.path
        if self._metrics is not None:
            self._metrics.close()
        if eval is not None:
            write_json(self.staging / "eval.json", eval)
        if samples is not None:
            write_jsonl(self.staging / "samples.jsonl", samples)
        for item in sorted(self.staging.iterdir()):
            target = self.path / item.name
            remove_path(target)
            os.replace(item, target)
        self.staging.rmdir()
        manifest = {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            **({"variant": self.variant} if self.variant else {}),
            "status": "complete",
            "config_sha256": self.config_sha256,
            "code_version": self.key["code_version"] if self.key else None,
            # The full reuse key: the flow reuses this directory only when it recomputes the same sha256.
            "key": self.key,
            "inputs": {
                name: {"path": str(sd.path.resolve()), "stage": sd.stage,
                       "manifest_sha256": manifest_sha256(sd.path)}
                for name, sd in self.inputs_loaded.items()
            },
            "files": _hash_tree(self.path),
            "headline": headline or {},
            "versions": package_versions(),
            "git_commit": git_commit(),
            "device": device_description(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "wall_time_s": round(time.time() - self.t0, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        manifest.update(extra_manifest or {})
        write_json(self.path / MANIFEST, manifest)
        if self._lock is not None:
            self._lock.release()
        return self.path


# --------------------------------------------------------------------------- internals


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _without_keys(cfg: dict, keys: Sequence[str]) -> dict:
    """A copy of a config dict without the (dotted) `keys`."""
    out = json.loads(json.dumps(cfg))
    for key in keys:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _report_to(config: Any) -> list[str]:
    logging_cfg = getattr(config, "logging", None)
    return list(getattr(logging_cfg, "report_to", ["tensorboard"]))
