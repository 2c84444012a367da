"""`alignline generate`, `alignline chat` and `alignline convert`: try and convert model checkpoints.

    alignline generate runs/tiny/sft/checkpoint --prompt "What is 12+7?" --temperature 0
    alignline chat runs/tiny/sft/checkpoint --top-p 0.9 --seed 0
    alignline convert runs/tiny/sft/checkpoint --to llama --out out/llama

generate/chat work on any HF causal-LM directory (weights + tokenizer), stream tokens as they are
produced and use the checkpoint's chat template when it has one. Heavy imports happen inside the
commands so `alignline --help` stays instant.
"""

from pathlib import Path

import typer


def _options(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             repetition_penalty: float):
    from alignline.generation import SamplingOptions

    try:
        return SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, repetition_penalty=repetition_penalty)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        checkpoint: Path = typer.Argument(..., help="HF checkpoint dir (config.json, weights, tokenizer)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text (a user turn when chat-templated)."),
        max_new_tokens: int = typer.Option(128, help="Tokens to generate at most."),
        temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy."),
        top_p: float = typer.Option(0.95, help="Nucleus sampling mass; 1.0 = off."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens; 0 = off."),
        repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats; 1.0 = off."),
        seed: int | None = typer.Option(None, help="Seed for reproducible sampling."),
        raw: bool = typer.Option(False, "--raw", help="Ignore the chat template; feed the prompt as text."),
        device: str | None = typer.Option(None, help="cpu | cuda | cuda:1 (default: cuda when present)."),
    ) -> None:
        """Complete one prompt, streaming tokens to stdout."""
        from alignline.generation import generate_text, load_model

        options = _options(max_new_tokens, temperature, top_p, top_k, seed, repetition_penalty)
        model, tokenizer = load_model(checkpoint, device=device)
        generate_text(model, tokenizer, prompt, options, use_chat_template=not raw,
                      echo=lambda s: typer.echo(s, nl=False))
        typer.echo()

    @app.command("chat")
    def chat(
        checkpoint: Path = typer.Argument(..., help="HF checkpoint dir with a chat template."),
        system: str | None = typer.Option(None, help="Optional system message."),
        max_new_tokens: int = typer.Option(256, help="Tokens per reply at most."),
        temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy."),
        top_p: float = typer.Option(0.95, help="Nucleus sampling mass; 1.0 = off."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens; 0 = off."),
        repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats; 1.0 = off."),
        seed: int | None = typer.Option(None, help="Seed for reproducible sampling."),
        device: str | None = typer.Option(None, help="cpu | cuda | cuda:1 (default: cuda when present)."),
    ) -> None:
        """Interactive multi-turn chat (/reset clears the conversation, /exit or Ctrl-D quits)."""
        from alignline.generation import chat_loop, load_model

        options = _options(max_new_tokens, temperature, top_p, top_k, seed, repetition_penalty)
        model, tokenizer = load_model(checkpoint, device=device)
        typer.echo(f"chatting with {checkpoint} (/reset, /exit)")
        chat_loop(model, tokenizer, options, system=system)

    @app.command("convert")
    def convert(
        src: Path = typer.Argument(..., help="Source checkpoint dir (alignline or llama)."),
        to: str = typer.Option(..., "--to", help="Target architecture: llama | mixtral | mistral | alignline."),
        out: Path = typer.Option(..., "--out", help="Output dir (created)."),
    ) -> None:
        """Convert between alignline and transformers' LlamaForCausalLM (weights 1:1, tokenizer copied); an
        MoE variant converts to Mixtral, a sliding-window one to Mistral."""
        if to not in ("llama", "alignline", "mixtral", "mistral"):
            raise typer.BadParameter(f"--to {to!r}: choose llama, mixtral, mistral or alignline.")
        from alignline.model.convert import ConversionError, convert_checkpoint

        try:
            path = convert_checkpoint(src, out, to=to)  # type: ignore[arg-type]
        except (ConversionError, FileNotFoundError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from err
        typer.echo(f"wrote {to} checkpoint to {path}")
