"""Shared command-line handling for every stage: `python -m stages.<name>` and `alignline stage <name>`.

A stage module calls

    def main(argv=None):
        return stage_main("pretrain", Config, run, INPUTS, __doc__, argv)

with `INPUTS = [InputSpec("data", default="data"), InputSpec("tokenizer", default="tokenizer")]`.
That gives, uniformly:

    --config PATH        stage YAML (default configs/<stage>/tiny.yaml)
    --run-dir DIR        where <stage>/ is written (default runs/<config file stem>); a stage with
                         variants writes <stage>-<variant>/ (the rlhf stage: rlhf-<algorithm>/)
    --set KEY=VALUE      dotted override, repeatable, applied last (e.g. --set optim.lr=3e-4)
    --<input> DIR        one flag per input (--data, --tokenizer, --init ...), default <run-dir>/<stage>
                         (for a stage with variants, e.g. evaluate's --rlhf: the only rlhf-* dir, or
                         the most recently finished one; pass the flag to choose)
    --print-config       print the resolved config and exit
    --debug              show the traceback of a user error too

Order of work: parse flags, load + validate the config (unknown keys / wrong types exit with a
message naming file, line and key, before any model is built), check every input dir (a missing
one names the dir and the command that creates it), then call `run(config, inputs, run_dir)`.

Errors: a `UserError` (bad config, input dir, data file, a stage or run dir another process holds,
a full disk) prints one `error: ...` message and exits 2 with no traceback (`--debug` or
ALIGNLINE_DEBUG=1 shows it); anything else is a bug and keeps its traceback (exit 1). A failed stage
leaves no `<stage>/.staging/` behind unless it holds resumable training state (then a re-run
continues from it). While it runs, a stage holds `<run-dir>/.locks/<stage>.lock` (alignline.locks):
a second writer of the same stage dir, or a stage started in a run dir a pipeline holds, is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignline.artifacts import (
    MANIFEST,
    STAGING,
    STATE,
    StageError,
    default_stage_dir,
    is_disk_full,
    load_stage,
    stage_dir_name,
)
from alignline.config import UserError, config_to_dict, debug_enabled, load_config
from alignline.locks import LockHeld

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class InputSpec:
    """One input directory of a stage: flag `--<name>`, defaulting to `<run_dir>/<default>`."""

    name: str
    default: str | None = None
    required: bool = True
    help: str = ""
    # True: a plain HF model dir (config.json, no manifest) is accepted too (e.g. SFT's --init).
    allow_hf_dir: bool = False
    # Stage names whose output this input may be (checked against the manifest); None: any stage.
    kinds: tuple[str, ...] | None = None
    # The producer writes one dir per variant (`<default>-<variant>/`, e.g. rlhf-ppo/): the default is
    # the only such dir, else the most recently finished (alignline.artifacts.default_stage_dir).
    variants: bool = False


@dataclass(frozen=True)
class ConfigFlag:
    """A flag that sets one config key: `--base X` is `--set base=X` (applied before the --set items).
    For inputs that are not stage directories: hub ids, files, dataset ids (the lora stage's)."""

    name: str
    key: str
    help: str = ""


def flag_overrides(flags: Sequence[ConfigFlag], values: dict[str, Any]) -> list[str]:
    """`KEY=VALUE` overrides for the flags given a value (JSON-quoted, so any path or id survives)."""
    return [f"{f.key}={json.dumps(str(values[f.name]))}" for f in flags if values.get(f.name) is not None]


# Stages whose output is a causal-LM checkpoint (what --init of a training stage may be).
MODEL_STAGES = ("pretrain", "sft", "rlhf", "lora", "distill")


def default_config_path(stage: str) -> Path:
    return REPO_ROOT / "configs" / stage / "tiny.yaml"


def config_keys(cls: type, prefix: str = "", defaults: dict | None = None,
                skip: frozenset[str] = frozenset()) -> list[str]:
    """One line per config key (dotted), with its default and description, for --help. A union of
    variants (e.g. the rlhf stage's, on `algorithm`) lists the shared keys, then each variant's own."""
    from pydantic import BaseModel

    lines = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        ann = field.annotation
        if defaults is not None and name in defaults:
            default = defaults[name]
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(config_keys(ann, key + ".", default if isinstance(default, dict) else None))
            continue
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {key} = {default!r}{desc}")
    variants = cls.__dict__.get("variants") if not prefix else None
    for tag, sub in (variants or {}).items():
        lines.append(f"  with {cls.variant_key}: {tag}")
        lines += ["  " + line for line in config_keys(sub, skip=frozenset(cls.model_fields))]
    return lines


def build_parser(stage: str, inputs: Sequence[InputSpec], description: str | None,
                 config_cls: type | None = None, flags: Sequence[ConfigFlag] = ()) -> argparse.ArgumentParser:
    epilog = None
    example = "key=value"
    if config_cls is not None:
        keys = config_keys(config_cls)
        epilog = ("config keys (set in the YAML or with --set KEY=VALUE; defaults shown):\n"
                  + "\n".join(keys)
                  + f"\n\nas a Prefect flow: alignline stage {stage} --flow [these options] [--force] "
                  "[--nproc-per-node N]\n  (an unchanged stage is reused from its cache unless --force; the run "
                  "directory is locked; a report card is published)")
        # The example must be a key this stage accepts (a generic `train.lr` was rejected by all).
        names = [line.split(" = ", 1)[0].strip() for line in keys]
        lr = [n for n in names if n.split(".")[-1] == "lr"]
        example = f"{lr[0]}=3e-4" if lr else (f"{names[0]}=..." if names else example)
    p = argparse.ArgumentParser(
        prog=f"alignline stage {stage}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None,
                   help=f"stage config YAML (default: configs/{stage}/tiny.yaml)")
    variant = getattr(config_cls, "variant_key", None) if config_cls is not None else None
    out = f"{stage}-<{variant}>" if variant else stage
    p.add_argument("--run-dir", type=Path, default=None,
                   help=f"run directory; the stage writes <run-dir>/{out}/ (default: runs/<config stem>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value by dotted key, e.g. --set {example} (repeatable)")
    for spec in inputs:
        default = f"<run-dir>/{spec.default}" if spec.default else "none"
        if spec.default and spec.variants:
            default = f"the only <run-dir>/{spec.default}-*/, else the most recently finished"
        p.add_argument(f"--{spec.name}", type=Path, default=None,
                       help=f"{spec.help or spec.name + ' stage directory'} (default: {default})")
    for flag in flags:
        p.add_argument(f"--{flag.name}", default=None, help=f"{flag.help} (sets `{flag.key}`)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    return p


def check_hf_dir(path: Path, what: str) -> None:
    """Cheap checks of a plain HF model dir before anything is built: config.json parses, its
    model_type is one transformers knows, and every *.safetensors header is readable."""
    import json
    import struct

    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{what}: {cfg_file} is not valid JSON ({exc}); fix or re-create the model dir") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise StageError(f"{what}: {cfg_file} has no `model_type`; {path} is not a model directory")
    from transformers import CONFIG_MAPPING

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    if model_type not in CONFIG_MAPPING:
        raise StageError(f"{what}: {cfg_file}: unknown model_type {model_type!r}; use a model type this "
                         "transformers version supports (e.g. llama, alignline)")
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            ok = 0 < n <= size - 8
            if ok:
                try:
                    json.loads(fh.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
        if not ok:
            raise StageError(f"{what}: {f} is truncated or not a safetensors file (unreadable header); "
                             "re-download or re-save the model")


def check_input(spec: InputSpec, path: Path, run_dir: Path) -> Path:
    """Refuse a missing, incomplete or wrong-kind input dir with a message naming it and the fix."""
    what = f"input --{spec.name}"
    if not path.exists():
        producer = spec.default or spec.name
        raise StageError(
            f"{what}: {path} does not exist; create it with "
            f"`alignline stage {producer} --run-dir {run_dir}` or pass --{spec.name} DIR"
        )
    if not path.is_dir():
        raise StageError(f"{what}: {path} is a file; pass a stage directory")
    if spec.allow_hf_dir and not (path / MANIFEST).exists() and (path / "config.json").is_file():
        check_hf_dir(path, what)
        return path  # a plain HF model directory (not produced by a stage)
    sd = load_stage(path)  # raises naming the file when incomplete or corrupted
    if spec.kinds is not None and sd.stage not in spec.kinds:
        raise StageError(f"{what}: {path} is the output of stage {sd.stage!r}, but --{spec.name} takes "
                         f"{' or '.join(repr(k) for k in spec.kinds)} output; check the path")
    return path


def resolve_inputs(specs: Sequence[InputSpec], given: dict[str, Path | None], run_dir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        path = given.get(spec.name)
        if path is None and spec.default is not None:
            path = default_stage_dir(run_dir, spec.default)
            if not spec.required and not path.exists():
                continue
        if path is None:
            if spec.required:
                raise StageError(f"input --{spec.name} is required; pass --{spec.name} DIR")
            continue
        out[spec.name] = check_input(spec, Path(path), run_dir)
    return out


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or debug_enabled()


def cleanup_failed(stage_dir: Path) -> None:
    """Remove what a failed stage left half-written: `.staging/`, unless resumable state exists
    (a re-run then continues from it and appends to the staged metrics log)."""
    if (stage_dir / STATE).exists() or os.environ.get("RANK", "0") != "0":
        return  # resumable, or not rank 0 (which owns the stage dir under torchrun)
    shutil.rmtree(stage_dir / STAGING, ignore_errors=True)
    if stage_dir.is_dir() and not any(stage_dir.iterdir()):
        stage_dir.rmdir()


def stage_main(
    stage: str,
    config_cls: type,
    run: Callable[[Any, dict[str, Path], Path], Path],
    inputs: Sequence[InputSpec],
    description: str | None = None,
    argv: Sequence[str] | None = None,
    flags: Sequence[ConfigFlag] = (),
) -> Path | None:
    """Parse `argv`, validate config and inputs, run the stage; exit code 2 on user errors. `flags`:
    extra flags that set config keys (`ConfigFlag`)."""
    parser = build_parser(stage, inputs, description, config_cls, flags)
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg_path = args.config or default_config_path(stage)
    run_dir: Path | None = None
    out_name = stage  # the output dir name: <stage>, or <stage>-<variant> once the config is known
    try:
        overrides = flag_overrides(flags, vars(args)) + list(args.overrides)
        cfg = load_config(config_cls, cfg_path, overrides)
        out_name = stage_dir_name(stage, cfg)
        if args.print_config:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return None
        run_dir = args.run_dir or Path("runs") / Path(cfg_path).stem
        paths = resolve_inputs(inputs, {s.name: getattr(args, s.name) for s in inputs}, run_dir)
        out = run(cfg, paths, run_dir)
    except LockHeld as exc:
        # Another process writes this stage dir (or holds the run dir): touch nothing of it.
        if _debug(args):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except UserError as exc:
        if run_dir is not None:
            cleanup_failed(run_dir / out_name)
        if _debug(args):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        # Do not leave a half-built .staging/ behind (it stays when there is state to resume).
        if run_dir is not None:
            cleanup_failed(run_dir / out_name)
        if run_dir is None or not is_disk_full(exc, run_dir):
            raise  # a bug: keep the traceback
        # A full disk outside the state saves (checkpoint, logs): the state saved before is intact.
        if _debug(args):
            traceback.print_exc()
        where = getattr(exc, "filename", None) or run_dir / stage
        print(f"error: no space left on device while writing {where} ({type(exc).__name__}: {exc}); free space "
              "and re-run the same command (it resumes from the last saved training state)", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        # Ctrl-C / SystemExit: keep the traceback, but do not leave a half-built .staging/ behind.
        if run_dir is not None:
            cleanup_failed(run_dir / out_name)
        raise
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per torchrun rank
        print(f"{stage}: wrote {out}")
    return out
