"""SFT stage beyond the chain checks: Trainer-checkpoint resume equals an uninterrupted run, LoRA
writes adapter/ plus a merged checkpoint, and an HF model dir without manifest is accepted as --init.

    .venv/bin/pytest tests/test_sft.py -q       # builds on conftest.tiny_chain
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignline.artifacts import load_stage
from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt
from tests.conftest import run_stage

pytestmark = pytest.mark.slow

FAST = ["train.max_steps=4", "train.save_every=2", "train.eval_every=4", "train.batch_size=8",
        "eval.gold_prompts=8", "eval.max_new_tokens=4", "logging.progress=false", "logging.every_steps=1",
        "train.max_train_examples=64"]


def _weights(stage_dir):
    ckpt = load_stage(stage_dir).checkpoint
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_resume_from_trainer_checkpoint_equals_uninterrupted(tiny_chain, tmp_path, monkeypatch):
    inputs = {"init": tiny_chain.pretrain, "data": tiny_chain.data}
    full = run_stage("sft", tmp_path / "a", FAST, inputs)
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(SimulatedInterrupt):
        run_stage("sft", tmp_path / "b", FAST, inputs)
    assert (tmp_path / "b" / "sft" / "state" / "trainer" / "checkpoint-2").is_dir()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = run_stage("sft", tmp_path / "b", FAST, inputs)
    wa, wb = _weights(full), _weights(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    la = json.loads((full / "eval.json").read_text())["val_loss"]
    lb = json.loads((resumed / "eval.json").read_text())["val_loss"]
    assert la == pytest.approx(lb, abs=1e-6)


def test_lora_writes_adapter_and_merged_checkpoint(tiny_chain, tmp_path):
    inputs = {"init": tiny_chain.pretrain, "data": tiny_chain.data}
    out = run_stage("sft", tmp_path, [*FAST, "lora.enabled=true", "optim.lr=1e-2"], inputs)
    sd = load_stage(out)
    assert (sd.adapter / "adapter_config.json").is_file()
    merged, base = _weights(out), _weights(tiny_chain.pretrain)
    assert not any("lora" in k for k in merged)
    changed = [k for k in base if "proj" in k and not torch.equal(base[k], merged[k])]
    assert changed, "merged LoRA weights equal the base: the adapter was not merged"
    assert all(torch.equal(base[k], merged[k]) for k in base if "norm" in k or "embed" in k)


def test_plain_hf_dir_is_accepted_as_init(tiny_chain, tmp_path):
    hf_dir = load_stage(tiny_chain.pretrain).checkpoint  # config.json, no manifest: an "external" model
    out = run_stage("sft", tmp_path, FAST, {"init": hf_dir, "data": tiny_chain.data})
    m = load_stage(out).manifest
    assert "init" not in m["inputs"] and m["external_init"] == str(hf_dir.resolve())
