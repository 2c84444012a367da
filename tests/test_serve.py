"""`alignline serve`: transformers' OpenAI-compatible server on our checkpoints, checked with the `openai` client.

    .venv/bin/pytest tests/test_serve.py

The pipeline-trained SFT model (tiny_chain) answers /v1/chat/completions exactly as our own greedy decoding
does, streamed and not; a released-model layout (Qwen2) serves too; the CLI starts a real server process
and refuses what it cannot serve (exit 2, one message) before loading any weights.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve extra (make install) brings the openai client")

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is 12+7?", "Reverse the word 'cat'.", "What is 3+4?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(client, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.models.list()
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture()
def served():
    """Start a background server on a model dir; yields (client, model id); stops it afterwards."""
    from alignline.serving import make_server, resolve_servable

    servers = []

    def start(spec: str):
        path = resolve_servable(spec)
        port = free_port()
        servers.append(make_server(path, port=port, device="cpu", background=True))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        models = wait_for(client)
        return client, models.data[0].id

    yield start
    for server in servers:
        server.kill_server()


def reference_answer(model_dir: Path, question: str, max_new_tokens: int) -> str:
    """Our greedy answer, stripped as the server strips the assistant message."""
    from alignline.generation import SamplingOptions, generate_text, load_model

    model, tok = load_model(model_dir, device="cpu")
    return generate_text(model, tok, [{"role": "user", "content": question}],
                         SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0)).strip()


@pytest.mark.slow
def test_pipeline_sft_model_answers_like_our_greedy_decoding(tiny_chain, served):
    client, model_id = served(str(tiny_chain.sft))  # a stage dir: its checkpoint/ is served
    checkpoint = tiny_chain.sft / "checkpoint"
    assert Path(model_id) == checkpoint.resolve()
    for question in QUESTIONS:
        want = reference_answer(checkpoint, question, 12)
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == want, question
        assert reply.usage.completion_tokens <= 12
        chunks = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() == want, question
    assert any(reference_answer(checkpoint, q, 12) for q in QUESTIONS)  # not a vacuous empty-string match


@pytest.mark.slow
def test_a_released_model_layout_serves(tmp_path, served):
    from tests.lora_fixtures import build_base

    base = build_base("qwen2", tmp_path / "qwen2")
    client, model_id = served(str(base))
    question = "What is 2+2?"
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}],
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == reference_answer(base, question, 6)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignline_cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_cli_refuses_what_it_cannot_serve(tmp_path):
    from tests.lora_fixtures import build_base

    _one_error(_cli("serve", str(tmp_path / "missing")), "missing")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    _one_error(_cli("serve", str(adapter)), "PEFT adapter", "checkpoint")
    gpt2 = build_base("gpt2", tmp_path / "gpt2")  # no chat template: chat completions cannot format a turn
    _one_error(_cli("serve", str(gpt2)), "chat template")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        qwen = build_base("qwen2", tmp_path / "qwen2")
        proc = _cli("serve", str(qwen), "--port", str(busy.getsockname()[1]))
        _one_error(proc, "cannot listen", "--port")
        assert "serving" not in proc.stdout


@pytest.mark.slow
def test_cli_serves_until_interrupted(tmp_path):
    from tests.lora_fixtures import build_base

    base = build_base("alignline", tmp_path / "alignline")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignline_cli", "serve", str(base), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        models = wait_for(client)
        reply = client.chat.completions.create(model=models.data[0].id, max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == reference_answer(base, "hi", 5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert f"serving {base.resolve()}" in out
    assert proc.returncode in (0, -signal.SIGINT, 130), err
