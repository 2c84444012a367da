"""A released model through the pipeline: configs/pipeline/released_lora.yaml (LoRA SFT -> reward
-> PPO with LoRA -> evaluate, no tokenizer or pretrain stage) on tiny random Llama and Qwen2
checkpoints built on disk, at the few steps of configs/pipeline/ci.yaml, through the Prefect flow.

    .venv/bin/pytest tests/test_pipeline_released.py      # ~3 min

The Llama base has no pad token and a chat template without {% generation %} tags; the Qwen2 one
has pad = eos and a tagged ChatML template: the two things that stopped a released model in the
sft, reward and rlhf stages.
"""

from __future__ import annotations

import json

import pytest

from tests.lora_fixtures import build_base
from tests.prefect_fixtures import REPO, ci_steps, prefect_harness  # noqa: F401

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def test_a_template_without_generation_tags_trains_on_the_answers_only(tmp_path):
    """SFT on a base whose template has no {% generation %} tags: the labels cover each assistant
    turn's content and its eos, nothing of the user turns (found by rendering, as the lora stage does)."""
    from transformers import AutoTokenizer

    from stages.sft import masked_examples

    tok = AutoTokenizer.from_pretrained(str(build_base("llama", tmp_path / "llama")))
    chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Reverse cat."}, {"role": "assistant", "content": "tac"}]
    (ex,) = masked_examples(tok, [{"messages": chat}])
    kept = [i for i, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != -100]
    assert tok.decode(kept).replace(" ", "") == "5</s>tac</s>"
    assert len(kept) < len(ex["input_ids"]) / 2


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_released_model_runs_lora_sft_reward_ppo_evaluate(tmp_path, arch):
    from transformers import AutoTokenizer

    from flows.pipeline import load_pipeline_config, pipeline_flow

    base = build_base(arch, tmp_path / "base")
    if arch == "qwen2":  # pad = eos, as in SmolLM2 and many released chat models
        tok = AutoTokenizer.from_pretrained(str(base))
        tok.pad_token = tok.eos_token
        tok.save_pretrained(str(base))
    base_tok = AutoTokenizer.from_pretrained(str(base))
    run_dir = tmp_path / "run"
    cfg = load_pipeline_config(REPO / "configs/pipeline/released_lora.yaml", [
        f"run_dir={run_dir}", f"name=released-{arch}", f"stages.sft.inputs.init={base}", "data.size=tiny",
        "gates.min_reward_accuracy=0.0", "gates.max_kl=1000", "gates.gold_must_not_drop=false",
        *ci_steps(("sft", "reward", "rlhf", "evaluate"))])
    result = pipeline_flow(config=cfg)
    statuses = {s: r["status"] for s, r in result["stages"].items()}
    assert statuses == {"data": "ran", "tokenizer": "skipped", "pretrain": "skipped", "sft": "ran", "reward": "ran",
                        "rlhf": "ran", "distill": "skipped", "evaluate": "ran", "export": "skipped"}
    sft_tok = AutoTokenizer.from_pretrained(str(run_dir / "sft" / "checkpoint"))
    assert sft_tok.pad_token == "<|pad|>" and sft_tok.pad_token_id != sft_tok.eos_token_id
    assert sft_tok.chat_template == base_tok.chat_template  # the base's own template, carried downstream
    config = json.loads((run_dir / "sft" / "checkpoint" / "config.json").read_text())
    assert config["vocab_size"] >= len(sft_tok) and config["pad_token_id"] == sft_tok.pad_token_id
    assert (run_dir / "sft" / "adapter").is_dir() and (run_dir / "rlhf-ppo" / "adapter").is_dir()
    ev = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert set(ev["stages"]) == {"sft", "rlhf"} and "gold_accuracy" in ev["stages"]["rlhf"]
    rl = json.loads((run_dir / "rlhf-ppo" / "eval.json").read_text())
    assert rl["policy"]["rm_score"] == rl["policy"]["rm_score"]  # a number, not NaN
    assert "| rlhf-ppo | ran |" in (run_dir / "report.md").read_text()


@pytest.mark.usefixtures("prefect_harness")
def test_a_base_without_a_chat_template_is_refused_before_any_stage_runs(tmp_path):
    from alignline.config import InputError
    from flows.pipeline import load_pipeline_config, pipeline_flow

    base = build_base("gpt2", tmp_path / "gpt2")  # a base model: no chat template
    run_dir = tmp_path / "run"
    cfg = load_pipeline_config(REPO / "configs/pipeline/released_lora.yaml",
                               [f"run_dir={run_dir}", f"stages.sft.inputs.init={base}"])
    with pytest.raises(InputError, match=f"the tokenizer in {base} has no chat template"):
        pipeline_flow(config=cfg)
    assert [p.name for p in run_dir.iterdir()] == [".locks"]  # nothing ran, nothing written but the (released) lock
    with pytest.raises(InputError, match="is not a directory"):
        pipeline_flow(config=load_pipeline_config(REPO / "configs/pipeline/released_lora.yaml",
                                                  [f"run_dir={run_dir}", f"stages.sft.inputs.init={tmp_path}/no"]))
