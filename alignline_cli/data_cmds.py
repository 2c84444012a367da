"""`alignline data ...` and `alignline tokenizer ...`: generate the task suite, validate data, train a tokenizer.

    alignline data generate --out runs/tiny/data --size tiny [--seed 1] [--set eval_size=60]
    alignline data validate ../shared/data/sft/alpaca_en_demo.json --kind sft [--format alpaca]
    alignline tokenizer train --corpus runs/tiny/data/pretrain/train.jsonl --vocab-size 512 --out runs/tok

Heavy imports (transformers, tokenizers) happen inside the commands so `alignline --help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(help="Generate the built-in task suite and validate datasets.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train the byte-level BPE tokenizer.", no_args_is_help=True)


@data_app.command("generate")
def generate(
    out: Path = typer.Option(..., "--out", help="output directory"),
    seed: int | None = typer.Option(None, "--seed", help="random seed (default: the preset's, 0)"),
    size: str = typer.Option("default", "--size", help="tiny | default | small"),
    overrides: list[str] = typer.Option([], "--set", help="SuiteConfig override key=value (repeatable)"),
) -> None:
    """Write the deterministic task suite (pretrain/, sft/, preference/, prompts/, suite.json)."""
    from alignline.config import ConfigError
    from alignline.data.tasks import suite_config, write_suite

    try:
        cfg = suite_config(size, list(overrides) + ([f"seed={seed}"] if seed is not None else []))
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    meta = write_suite(out, cfg)
    for rel, n in meta["sizes"].items():
        typer.echo(f"  {rel:28s} {n:7d}")
    typer.echo(f"suite (seed {cfg.seed}, size {size}) written to {out}")


@data_app.command("validate")
def validate(
    path: str = typer.Argument(..., help="file, directory or hub dataset id"),
    kind: str = typer.Option(..., "--kind", help="pretrain | sft | preference | prompts | kto"),
    fmt: str = typer.Option("auto", "--format", help="auto | alpaca | sharegpt | hh | messages | text"),
    text_unit: str = typer.Option("line", "--text-unit", help=".txt documents: line | paragraph | file"),
    max_prompt_length: int | None = typer.Option(None, "--max-prompt-length", help="cap, in characters"),
    on_too_long: str = typer.Option("error", "--on-too-long", help="error | drop"),
    overrides: list[str] = typer.Option([], "--set", help="LoaderConfig override, e.g. columns.output=response"),
) -> None:
    """Validate a dataset; exits 2 listing every problem as file:line: message."""
    from alignline.config import ConfigError, config_from_dict, read_config
    from alignline.data.loaders import DataValidationError, LoaderConfig, load_records

    fields = {"path": path, "kind": kind, "format": fmt, "text_unit": text_unit, "on_too_long": on_too_long}
    if max_prompt_length is not None:
        fields.update(max_prompt_length=max_prompt_length, length_unit="chars")
    try:
        data, source, _ = read_config(params=fields, overrides=overrides, label="command line")
        cfg = config_from_dict(LoaderConfig, data, source=source)
        records = load_records(cfg)
    except (ConfigError, DataValidationError) as exc:  # user errors: the message, exit 2 (as every command)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}: OK, {len(records)} valid {kind} records")


@tokenizer_app.command("train")
def train(
    corpus: list[Path] = typer.Option(..., "--corpus", help="text file or dir (.txt/.jsonl/.json); repeatable"),
    vocab_size: int = typer.Option(512, "--vocab-size"),
    out: Path = typer.Option(..., "--out", help="output directory (HF tokenizer files)"),
    min_frequency: int = typer.Option(2, "--min-frequency"),
    text_unit: str = typer.Option("line", "--text-unit", help=".txt documents: line | paragraph | file"),
) -> None:
    """Train a byte-level BPE tokenizer with the alignline special tokens and chat template."""
    from alignline.data.loaders import DataValidationError, iter_pretrain_texts
    from alignline.tokenizer import train_tokenizer

    try:
        tok = train_tokenizer(iter_pretrain_texts(corpus, text_unit=text_unit), vocab_size, out, min_frequency,
                              show_progress=True)
    except (DataValidationError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"tokenizer with {len(tok)} tokens saved to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(tokenizer_app, name="tokenizer")
