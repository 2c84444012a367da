"""The tiny chain (data -> tokenizer -> pretrain -> sft -> reward with configs/*/tiny.yaml) obeys the
stage contract and every stage improves the model.

    .venv/bin/pytest tests/test_stage_chain.py -q      # runs the chain once (conftest.tiny_chain)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignline.artifacts import load_stage
from alignline.config import load_config
from alignline.files import read_jsonl
from stages import load_stage_module

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

MODEL_STAGES = ("pretrain", "sft", "reward")


@pytest.mark.parametrize("stage", ["data", "tokenizer", *MODEL_STAGES])
def test_directory_matches_contract(tiny_chain, stage):
    sd = load_stage(tiny_chain[stage], expect=stage)  # verifies every hash
    m = sd.manifest
    for key in ("config_sha256", "code_version", "inputs", "files", "versions", "git_commit", "wall_time_s",
                "device", "headline"):
        assert key in m, f"manifest.json of {stage} lacks {key}"
    # config.yaml is the resolved config: it validates back into the stage's Config with the same hash.
    cfg = load_config(load_stage_module(stage).Config, sd.path / "config.yaml")
    from alignline.config import config_sha256

    assert config_sha256(cfg) == m["config_sha256"]
    assert (sd.path / "eval.json").is_file()
    if stage in ("tokenizer", *MODEL_STAGES):
        assert (sd.checkpoint / "tokenizer.json").is_file()
    if stage in MODEL_STAGES:
        ckpt = sd.checkpoint
        assert (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors"))
        assert any(k.endswith(".safetensors") for k in m["files"])
        assert (sd.path / "metrics.jsonl").is_file() and list((sd.path / "tb").glob("events.out.tfevents*"))
        rows = read_jsonl(sd.path / "metrics.jsonl")
        assert any("loss" in r for r in rows) and all("step" in r for r in rows)
    if stage in ("pretrain", "sft"):
        assert (sd.checkpoint / "generation_config.json").is_file()
        assert (sd.path / "state").is_dir()


def test_inputs_link_the_chain(tiny_chain):
    for stage, parents in {"tokenizer": ["data"], "pretrain": ["data", "tokenizer"], "sft": ["init", "data"],
                           "reward": ["init", "data"]}.items():
        m = load_stage(tiny_chain[stage]).manifest
        assert sorted(m["inputs"]) == sorted(parents), stage
    assert load_stage(tiny_chain.sft).manifest["inputs"]["init"]["stage"] == "pretrain"
    assert load_stage(tiny_chain.reward).manifest["inputs"]["init"]["stage"] == "sft"


def test_samples_use_the_same_fixed_prompts(tiny_chain):
    fixed = [r["prompt"][-1]["content"] for r in read_jsonl(tiny_chain.data / "prompts" / "test.jsonl")]
    pre = read_jsonl(tiny_chain.pretrain / "samples.jsonl")
    sft = read_jsonl(tiny_chain.sft / "samples.jsonl")
    assert [s["prompt"] for s in pre] == [s["prompt"] for s in sft] == fixed[: len(pre)]
    assert len(pre) > 0 and all("response" in s for s in pre)


def test_pretrain_val_loss_falls_well_below_initial(tiny_chain):
    ev = json.loads((tiny_chain.pretrain / "eval.json").read_text())
    # Initial loss of a random model is ~ln(vocab) = ln(512) = 6.2.
    assert ev["initial_val_loss"] > 5.5
    assert ev["val_loss"] < 0.5 * ev["initial_val_loss"], ev
    assert ev["val_ppl"] == pytest.approx(2.718281828 ** ev["val_loss"], rel=1e-6)
    t = yaml.safe_load((tiny_chain.pretrain / "config.yaml").read_text())["train"]
    assert ev["tokens_seen"] == t["max_steps"] * t["batch_size"] * t["seq_len"]  # every step, full blocks


def test_sft_gold_accuracy_beats_pretrain(tiny_chain):
    pre = json.loads((tiny_chain.pretrain / "eval.json").read_text())
    sft = json.loads((tiny_chain.sft / "eval.json").read_text())
    assert sft["gold_accuracy"] > pre["gold_accuracy"] + 0.1, (pre["gold_accuracy"], sft["gold_accuracy"])
    # Leaves PPO room to improve.
    assert 0.2 <= sft["gold_accuracy"] <= 0.7, sft["gold_accuracy"]
    # The reported accuracy is the mean of the per-prompt scores in samples.jsonl.
    samples = read_jsonl(tiny_chain.sft / "samples.jsonl")
    assert sft["gold_accuracy"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))


def test_reward_model_ranks_held_out_pairs(tiny_chain):
    ev = json.loads((tiny_chain.reward / "eval.json").read_text())
    assert ev["accuracy"] > 0.8, ev
    assert ev["margin"] > 0 and ev["reward_std"] > 0
    assert ev["reward_mean"] > ev["rejected_mean"]
    # Every val pair is counted against max_length (none is cut at the tiny config's 128 tokens).
    val = read_jsonl(tiny_chain.data / "preference" / "val.jsonl")
    assert ev["length_fit"]["val"] == {"n": len(val), "over_max_length": 0, "share": 0.0, "max_length": 128,
                                       "longest": ev["length_fit"]["val"]["longest"], "action": "truncated",
                                       "identical_after_truncation": 0, "key": "train.max_length"}
    est = ev["estimates"]["accuracy"]  # with its sample size and 95% interval
    assert est["n"] == len(val) == ev["n_pairs"] and est["low"] < ev["accuracy"] < est["high"]
    assert 10 < ev["length_fit"]["val"]["longest"] <= 128


def test_reward_stage_adds_pairs_from_the_policys_own_samples(tiny_chain):
    """configs/reward/tiny.yaml adds on-policy pairs (SFT samples labelled by the gold scorer) and
    reports how the RM ranks the SFT policy's held-out mistakes (onpolicy_accuracy)."""
    ev = json.loads((tiny_chain.reward / "eval.json").read_text())
    op = ev["onpolicy"]
    assert op["train"]["samples"] == 2000 * 8 and op["train"]["pairs"] > 500, op
    assert 0 < op["train"]["sample_accuracy"] < 1 and op["val"]["pairs"] > 20
    # The RM ranks the SFT policy's own held-out mistakes below the gold answers, well above chance
    # (0.76 on the demo run; 0.5 is a coin flip).
    assert ev["onpolicy_accuracy"] > 0.6, ev["onpolicy_accuracy"]


def test_reward_checkpoint_reloads_with_same_scores(tiny_chain):
    from transformers import AutoTokenizer

    from alignline.evaluation import score_conversations
    from alignline.model import AlignlineForSequenceClassification
    from stages.reward import pair_metrics

    ckpt = load_stage(tiny_chain.reward).checkpoint
    model = AlignlineForSequenceClassification.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = read_jsonl(tiny_chain.data / "preference" / "val.jsonl")
    saved = yaml.safe_load((tiny_chain.reward / "config.yaml").read_text())["train"]["max_length"]
    chosen = score_conversations(model, tok, [r["prompt"] + r["chosen"] for r in rows], max_length=saved)
    rejected = score_conversations(model, tok, [r["prompt"] + r["rejected"] for r in rows], max_length=saved)
    ev = json.loads((tiny_chain.reward / "eval.json").read_text())
    assert pair_metrics(chosen, rejected)["accuracy"] == pytest.approx(ev["accuracy"])
    assert saved == load_config(load_stage_module("reward").Config, REPO / "configs/reward/tiny.yaml").train.max_length
