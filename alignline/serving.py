"""An OpenAI-compatible server for alignline checkpoints, released HF models and LoRA outputs.

    alignline serve runs/tiny/rlhf-ppo --port 8000           # a stage dir: its checkpoint/ is served
    alignline serve runs/tiny/sft/checkpoint --host 0.0.0.0   # any HF causal-LM dir with a tokenizer

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    model = client.models.list().data[0].id
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 12+7?"}])

The server is transformers' own (`transformers serve`: FastAPI + uvicorn; /v1/chat/completions with
streaming, /v1/completions, /v1/models, /health), pinned to one model. What alignline adds:
- the model is resolved like every stage input (`alignline.models.resolve_model`: a local dir, a finished
  stage dir, or a hub id) and checked before the server starts: a causal LM, a tokenizer with a chat template,
  not a bare PEFT adapter (the lora/sft/reward stages write the merged model to <stage>/checkpoint);
- our classes are registered where transformers' server looks them up. It instantiates
  `getattr(transformers, config.architectures[0])`, which knows only in-tree models; `import alignline.model`
  registers us with the Auto classes, not in that namespace;
- a busy port is a user error before any weights load.
Requires the `serve` extra (openai, for clients; FastAPI and uvicorn come with Prefect).
"""

from __future__ import annotations

import socket
from pathlib import Path

from alignline.config import InputError, UserError


def resolve_servable(spec: str, revision: str | None = None) -> Path:
    """The directory to serve for `spec` (local dir, stage dir or hub id), checked as a chat causal LM."""
    from alignline.models import check_causal_lm, load_chat_tokenizer, resolve_model

    p = Path(spec).expanduser()
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise InputError(
            f"{p} is a PEFT adapter, not a model: serve the merged model instead. The lora, sft and reward "
            "stages write it next to the adapter (serve the stage dir, or <stage dir>/checkpoint).")
    src = resolve_model(spec, revision=revision, flag="CKPT")
    check_causal_lm(src.path)
    load_chat_tokenizer(src.path)  # chat completions need a chat template and an eos token
    return src.path


def register_with_transformers_serve() -> None:
    """Make transformers' server able to build our models: it looks classes up by name in `transformers`."""
    import transformers

    import alignline.model as model

    for name in ("AlignlineForCausalLM",):
        if getattr(transformers, name, None) is None:
            setattr(transformers, name, getattr(model, name))


def check_port_free(host: str, port: int) -> None:
    """UserError when `host:port` cannot be bound (in use, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") \
                from exc


def make_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                dtype: str = "auto", log_level: str = "warning", background: bool = False):
    """transformers' `Serve` pinned to `model_dir`. Blocks until interrupted unless `background` (then the
    server runs in a thread: stop it with `.kill_server()`)."""
    try:
        from transformers.cli.serve import Serve
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:  # an older transformers without the server
        raise UserError(f"this transformers has no OpenAI-compatible server ({exc}); "
                        "pip install 'alignline[serve]'") from exc
    if not is_serve_available():
        raise UserError("serving needs fastapi, uvicorn and openai: pip install 'alignline[serve]'")
    check_port_free(host, port)
    register_with_transformers_serve()
    return Serve(force_model=str(model_dir), host=host, port=port, device=device, dtype=dtype,
                 log_level=log_level, non_blocking=background)
