"""`alignline export`: a checkpoint as a transformers Llama dir or a llama.cpp GGUF file, validated.

    alignline export runs/tiny/sft/checkpoint --format llama --out out/llama
    alignline export runs/tiny/sft/checkpoint --format gguf --out out/model.gguf            # f32, validated
    alignline export runs/tiny/sft/checkpoint --format gguf --dtype q8_0 --out out/q8.gguf --no-validate

The library side is alignline.export. User errors print one `error:` line and exit 2 with nothing
written; heavy imports happen inside the command so `alignline --help` stays instant.
"""

from pathlib import Path

import typer

# Chat prompts like the evaluate stage's (data/prompts) and raw text: what --validate greedy-decodes.
VALIDATION_PROMPTS = [
    [{"role": "user", "content": "What is 12+7?"}],
    [{"role": "user", "content": "Reverse a b c."}],
    "The capital of",
    "1 2 3 4",
]


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        checkpoint: Path = typer.Argument(..., help="Checkpoint dir (alignline LLaMA recipe, or llama)."),
        fmt: str = typer.Option(..., "--format", help="llama (transformers dir) | gguf (llama.cpp file)."),
        out: Path = typer.Option(..., "--out", help="Output dir (llama) or .gguf file (gguf)."),
        dtype: str = typer.Option("f32", "--dtype", help="GGUF weights: f32 | f16 | bf16 | q8_0 (norms stay f32)."),
        validate: bool | None = typer.Option(
            None, "--validate/--no-validate",
            help="GGUF: greedy-decode a few prompts with llama.cpp and transformers and compare (default: on)."),
        max_new_tokens: int = typer.Option(16, help="Tokens per validation prompt."),
    ) -> None:
        """Export for other runtimes: Llama (transformers, vLLM, ...) or GGUF (llama.cpp, Ollama)."""
        from alignline.config import UserError
        from alignline.export import GGUF_DTYPES, export_gguf, export_llama, validate_gguf
        from alignline.model.convert import ConversionError

        if fmt not in ("llama", "gguf"):
            raise UserError(f"--format {fmt!r}: choose llama or gguf.")
        if dtype not in GGUF_DTYPES:
            raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}.")
        if fmt == "llama" and (dtype != "f32" or validate):
            raise UserError("--dtype and --validate apply to --format gguf; a llama export keeps the weights as saved.")
        try:
            if fmt == "llama":
                typer.echo(f"wrote llama checkpoint to {export_llama(checkpoint, out)}")
                return
            path = export_gguf(checkpoint, out, dtype=dtype)  # type: ignore[arg-type]
        except (ConversionError, FileNotFoundError) as err:
            raise UserError(str(err)) from err
        size = path.stat().st_size / 2**20
        typer.echo(f"wrote {path} ({dtype}, {size:.1f} MiB)")
        if validate is False:
            return
        # eos suppressed on both sides: every prompt compares max_new_tokens tokens, not a 2-token answer
        report = validate_gguf(checkpoint, path, VALIDATION_PROMPTS, max_new_tokens=max_new_tokens, ignore_eos=True)
        for row in report["prompts"]:
            verdict = "match" if row["matched"] else f"differs at token {row['first_divergence']}"
            typer.echo(f"  {verdict:<20} {row['prompt']!r:.60}")
        typer.echo(f"llama.cpp vs transformers greedy: {report['matched']}/{report['total']} prompts identical "
                   f"over {max_new_tokens} tokens (eos suppressed, f32 KV cache); max |log-prob diff| "
                   f"{report['max_abs_logprob_diff']:.1e}")
        if dtype == "f32" and not report["all_matched"]:
            # f32 weights and cache should reproduce transformers; a difference is a near-tie or a bug
            typer.secho("warning: the f32 GGUF does not reproduce transformers' greedy tokens on every prompt; "
                        "compare with alignline.export.validate_gguf before serving it.", fg=typer.colors.YELLOW,
                        err=True)
