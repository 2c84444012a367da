"""`alignline serve`: an OpenAI-compatible server (transformers' own) for one checkpoint.

    alignline serve runs/tiny/rlhf-ppo --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "...", "messages": [{"role": "user", "content": "What is 12+7?"}]}'

See alignline/serving.py for what is served and how. Heavy imports happen inside the command.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        checkpoint: str = typer.Argument(..., help="A checkpoint dir, a finished stage dir (its checkpoint/) or "
                                                   "a hub id (org/name)."),
        host: str = typer.Option("127.0.0.1", help="Listen address (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, min=1, max=65535, help="Listen port."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:1"),
        dtype: str = typer.Option("auto", help="auto (the weights' dtype) | float32 | bfloat16 | float16"),
        revision: str | None = typer.Option(None, help="Hub revision, for a hub id."),
        log_level: str = typer.Option("warning", help="transformers' log level (warning, info, debug); uvicorn "
                                                       "logs each request."),
    ) -> None:
        """Serve a model over an OpenAI-compatible API (/v1/chat/completions with streaming, /v1/models)."""
        from alignline.serving import check_port_free, make_server, resolve_servable

        path = resolve_servable(checkpoint, revision=revision)
        check_port_free(host, port)
        typer.echo(f"serving {path} on http://{host}:{port}/v1 (model id: {path}); Ctrl-C stops")
        make_server(path, host=host, port=port, device=device, dtype=dtype, log_level=log_level)
