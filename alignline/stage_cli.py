"""Shared command-line handling for every stage: `python -m stages.<name>` and `alignline stage <name>`.

A stage module calls

    def main(argv=None):
        return stage_main("pretrain", Config, run, INPUTS, __doc__, argv)

with `INPUTS = [InputSpec("data", default="data"), InputSpec("tokenizer", default="tokenizer")]`.
That gives, uniformly:

    --config PATH        stage YAML (default configs/<stage>/tiny.yaml)
    --run-dir DIR        where <stage>/ is written (default runs/<config file stem>)
    --set KEY=VALUE      dotted override, repeatable, applied last (e.g. --set train.lr=3e-4)
    --<input> DIR        one flag per input (--data, --tokenizer, --init ...), default <run-dir>/<stage>
    --print-config       print the resolved config and exit

Order of work: parse flags, load + validate the config (unknown keys / wrong types exit with a
message naming file, line and key, before any model is built), check every input dir (a missing
one names the dir and the command that creates it), then call `run(config, inputs, run_dir)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignline.artifacts import MANIFEST, StageError, load_stage
from alignline.config import ConfigError, config_to_dict, load_config

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


def default_config_path(stage: str) -> Path:
    return REPO_ROOT / "configs" / stage / "tiny.yaml"


def config_keys(cls: type, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """One line per config key (dotted), with its default and description, for --help."""
    from pydantic import BaseModel

    lines = []
    for name, field in cls.model_fields.items():
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
    return lines


def build_parser(stage: str, inputs: Sequence[InputSpec], description: str | None,
                 config_cls: type | None = None) -> argparse.ArgumentParser:
    epilog = None
    if config_cls is not None:
        epilog = ("config keys (set in the YAML or with --set KEY=VALUE; defaults shown):\n"
                  + "\n".join(config_keys(config_cls)))
    p = argparse.ArgumentParser(
        prog=f"alignline stage {stage}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None,
                   help=f"stage config YAML (default: configs/{stage}/tiny.yaml)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="run directory; the stage writes <run-dir>/" + stage + "/ (default: runs/<config stem>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. --set train.lr=3e-4 (repeatable)")
    for spec in inputs:
        default = f"<run-dir>/{spec.default}" if spec.default else "none"
        p.add_argument(f"--{spec.name}", type=Path, default=None,
                       help=f"{spec.help or spec.name + ' stage directory'} (default: {default})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def check_input(spec: InputSpec, path: Path, run_dir: Path) -> Path:
    """Refuse a missing or incomplete input dir with a message naming it and how to create it."""
    if not path.exists():
        producer = spec.default or spec.name
        raise StageError(
            f"input --{spec.name}: {path} does not exist; create it with "
            f"`alignline stage {producer} --run-dir {run_dir}` or pass --{spec.name} DIR"
        )
    if spec.allow_hf_dir and not (path / MANIFEST).exists() and (path / "config.json").is_file():
        return path  # a plain HF model directory (not produced by a stage)
    load_stage(path)  # raises naming the file when incomplete or corrupted
    return path


def resolve_inputs(specs: Sequence[InputSpec], given: dict[str, Path | None], run_dir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        path = given.get(spec.name)
        if path is None and spec.default is not None:
            path = run_dir / spec.default
            if not spec.required and not path.exists():
                continue
        if path is None:
            if spec.required:
                raise StageError(f"input --{spec.name} is required; pass --{spec.name} DIR")
            continue
        out[spec.name] = check_input(spec, Path(path), run_dir)
    return out


def stage_main(
    stage: str,
    config_cls: type,
    run: Callable[[Any, dict[str, Path], Path], Path],
    inputs: Sequence[InputSpec],
    description: str | None = None,
    argv: Sequence[str] | None = None,
) -> Path | None:
    """Parse `argv`, validate config and inputs, run the stage; exit code 2 on config/input errors."""
    args = build_parser(stage, inputs, description, config_cls).parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg_path = args.config or default_config_path(stage)
    try:
        cfg = load_config(config_cls, cfg_path, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return None
    run_dir = args.run_dir or Path("runs") / Path(cfg_path).stem
    try:
        paths = resolve_inputs(inputs, {s.name: getattr(args, s.name) for s in inputs}, run_dir)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = run(cfg, paths, run_dir)
    print(f"{stage}: wrote {out}")
    return out
