"""The Prefect flow `flows/lora.py:lora_flow` runs the lora stage and reuses an unchanged result.

    .venv/bin/pytest tests/test_lora_flow.py -q        (~30 s, most of it the Prefect test server)
"""

from __future__ import annotations

import json

import pytest

from tests.lora_fixtures import (
    build_base,
    conversations,
    lora_overrides,
    one_thread_per_module,  # noqa: F401 - autouse: one torch thread
    write_jsonl,
)
from tests.prefect_fixtures import prefect_harness  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_lora_flow_runs_then_reuses(tmp_path):
    from alignline.artifacts import load_stage
    from alignline.config import ConfigError
    from flows.lora import lora_flow

    base = build_base("gpt2", tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    sets = lora_overrides(**{"train.max_steps": 10})
    first = lora_flow(base=str(base), data=str(data), run_dir=str(tmp_path / "run"), overrides=sets)
    assert first["status"] == "ran"
    sd = load_stage(tmp_path / "run" / "lora", expect="lora")
    assert sd.headline["heldout_loss_after"] < sd.headline["heldout_loss_before"]
    assert json.loads((sd.path / "eval.json").read_text())["steps"] == 10
    again = lora_flow(base=str(base), data=str(data), run_dir=str(tmp_path / "run"), overrides=sets)
    assert again["status"] == "cached"
    # A config error is reported by the flow before anything runs, naming the key.
    with pytest.raises(ConfigError, match="lora.rank"):
        lora_flow(base=str(base), data=str(data), run_dir=str(tmp_path / "run2"), overrides=["lora.rank=3"])
    assert not (tmp_path / "run2").exists()
