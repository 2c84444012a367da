"""Shared pytest setup: CPU threads, Prefect env vars, and the session-wide `tiny_chain` fixture.

    .venv/bin/pytest tests                      # everything
    .venv/bin/pytest tests/test_stage_chain.py  # the tiny chain + its behaviour checks

`tiny_chain` runs data -> tokenizer -> pretrain -> sft -> reward once per session with the real
`configs/<stage>/tiny.yaml` into a temporary run dir and returns the stage directories; tests of
later stages (PPO, evaluate) build on it instead of training their own models.
"""

from __future__ import annotations

import os

# Prefect must never reach out or wait forever for its ephemeral server in tests.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from stages import pipeline_stages  # noqa: E402

# The CI box has 2 cores shared by everything; more threads than cores only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent
CHAIN = pipeline_stages()[: pipeline_stages().index("reward") + 1]  # data .. reward


@dataclass
class TinyChain:
    """Stage directories of one tiny run; `chain["sft"]` or `chain.sft` both work."""

    run_dir: Path
    data: Path
    tokenizer: Path
    pretrain: Path
    sft: Path
    reward: Path

    def __getitem__(self, name: str) -> Path:
        return getattr(self, name)


def stage_inputs(stage: str, run_dir: Path) -> dict[str, Path]:
    """The default inputs of each stage of the chain inside `run_dir`."""
    return {
        "data": {},
        "tokenizer": {"data": run_dir / "data"},
        "pretrain": {"data": run_dir / "data", "tokenizer": run_dir / "tokenizer"},
        "sft": {"init": run_dir / "pretrain", "data": run_dir / "data"},
        "reward": {"init": run_dir / "sft", "data": run_dir / "data"},
    }[stage]


def run_stage(stage: str, run_dir: Path, overrides: list[str] | None = None, inputs: dict | None = None) -> Path:
    """Run one stage in-process with its tiny config (plus overrides)."""
    from alignline.config import load_config
    from stages import load_stage_module

    module = load_stage_module(stage)
    cfg = load_config(module.Config, REPO / "configs" / stage / "tiny.yaml", overrides or [])
    return module.run(cfg, inputs if inputs is not None else stage_inputs(stage, run_dir), run_dir)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory) -> TinyChain:
    run_dir = tmp_path_factory.mktemp("tiny_chain")
    quiet = {"pretrain": ["logging.progress=false"], "sft": ["logging.progress=false"],
             "reward": ["logging.progress=false"]}
    out = {name: run_stage(name, run_dir, quiet.get(name)) for name in CHAIN}
    return TinyChain(run_dir=run_dir, **out)


@pytest.fixture()
def one_thread():
    """One torch thread while a test runs: tiny matmuls on a shared 2-core box only contend with more
    (OpenMP spin-waiting between processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cache", "past_key_values"])
def cache_convention(request, monkeypatch):
    """Make generate() hand the KV cache to our forward as `cache` (transformers >= 5.24) or as
    `past_key_values` (5.0-5.23), whatever the installed transformers does, and check it did.

    Generation tests use it (`pytestmark = pytest.mark.usefixtures("cache_convention")`) so the model is
    exercised under both call conventions on one install.
    """
    import functools

    from alignline.model import AlignlineForCausalLM

    name = request.param
    other = "past_key_values" if name == "cache" else "cache"
    prepare, forward = AlignlineForCausalLM.prepare_inputs_for_generation, AlignlineForCausalLM.forward
    seen: set[str] = set()
    steps = []

    def prepare_renamed(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        steps.append(1)
        if other in inputs:
            inputs[name] = inputs.pop(other)
        return inputs

    @functools.wraps(forward)  # generate() reads forward's signature
    def forward_recorded(self, *args, **kwargs):
        seen.update(k for k in (name, other) if kwargs.get(k) is not None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AlignlineForCausalLM, "prepare_inputs_for_generation", prepare_renamed)
    monkeypatch.setattr(AlignlineForCausalLM, "forward", forward_recorded)
    yield name
    assert other not in seen, f"forward received `{other}` while testing the `{name}` convention"
    if len(steps) > 1 and request.node.funcargs.get("use_cache", True):  # decoding steps after the first
        assert name in seen, f"generate() never passed the KV cache as `{name}`"
