"""Where the LoRA stage takes its base and data from: a hub id (pinned revision in the manifest), an
alignline stage dir (its checkpoint, recorded as a stage input), a data stage dir (its own sft
train/val split); and the `alignline lora` command end to end on them.

    .venv/bin/pytest tests/test_lora_sources.py -q        (~20 s)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.lora_fixtures import (
    build_base,
    conversations,
    lora_overrides,
    one_thread_per_module,  # noqa: F401 - autouse: one torch thread
    write_jsonl,
)


@pytest.fixture(scope="module")
def data_stage(tmp_path_factory):
    from stages.data import Config, run

    return run(Config(size="tiny"), None, tmp_path_factory.mktemp("suite"))


def test_hub_id_is_resolved_and_pinned(tmp_path, monkeypatch):
    import huggingface_hub

    from stages.lora import build_config, prepare

    local = build_base("qwen2", tmp_path / "build")
    sha = "0123456789abcdef0123456789abcdef01234567"
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        snap = tmp_path / "hub" / "snapshots" / sha
        if not snap.exists():
            shutil.copytree(local, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    cfg = build_config(None, "someorg/tiny-qwen", str(data), lora_overrides(base_revision="v1.0"))
    prep = prepare(cfg)
    ident = prep.base.identity()
    assert calls[0][:2] == ("someorg/tiny-qwen", "v1.0") and "*.safetensors" in calls[0][2]
    assert (ident["source"], ident["hub_id"], ident["revision"]) == ("hub", "someorg/tiny-qwen", sha)
    assert set(ident["weight_sha256"]) == {"model.safetensors"}


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    from alignline.config import InputError
    from stages.lora import build_config, prepare

    def offline(*a, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    cfg = build_config(None, "someorg/nothing", str(tmp_path / "x.jsonl"), [])
    with pytest.raises(InputError, match="not a local directory.*network is unreachable"):
        prepare(cfg)


def test_data_stage_dir_uses_its_own_heldout_split(tmp_path, data_stage):
    from stages.lora import build_config, prepare

    base = build_base("alignline", tmp_path / "base")
    prep = prepare(build_config(None, str(base), str(data_stage), lora_overrides(**{"data.max_val_examples": 64})))
    val = [json.loads(x)["messages"] for x in (data_stage / "sft" / "val.jsonl").read_text().splitlines()]
    assert prep.val_conversations == val
    assert len(prep.train_rows) == 300


def test_cli_on_stage_dirs_chains_lora_after_lora(tmp_path, data_stage):
    """`alignline lora` with an alignline stage dir as base: its checkpoint is used and recorded as input."""
    from typer.testing import CliRunner

    from alignline.artifacts import load_stage, manifest_sha256
    from alignline_cli.main import app

    base = build_base("alignline", tmp_path / "base")
    quick = lora_overrides(**{"train.max_steps": 4, "data.max_train_examples": 32})
    args = ["lora", "--base", str(base), "--data", str(data_stage), "--run-dir", str(tmp_path / "a")]
    for s in quick:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    first = load_stage(tmp_path / "a" / "lora", expect="lora")
    args2 = [a if a != str(base) else str(first.path) for a in args]
    args2[args2.index(str(tmp_path / "a"))] = str(tmp_path / "b")
    res = CliRunner().invoke(app, args2)
    assert res.exit_code == 0, res.output
    second = load_stage(tmp_path / "b" / "lora", expect="lora")
    assert second.manifest["base"]["source"] == "stage"
    assert second.manifest["base"]["path"] == str(first.checkpoint.resolve())
    assert second.manifest["inputs"]["base"]["manifest_sha256"] == manifest_sha256(first.path)
    # The second run starts where the first ended: its "before" loss is the first one's "after".
    assert second.eval["heldout_loss_before"] == pytest.approx(first.eval["heldout_loss_after"], rel=1e-5)


def test_cli_bad_input_exit_code(tmp_path):
    from typer.testing import CliRunner

    from alignline_cli.main import app

    res = CliRunner().invoke(app, ["lora", "--base", str(tmp_path / "missing"), "--data", "x.jsonl",
                                   "--run-dir", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "no such directory" in res.output


def test_dora_rslora_and_gradient_checkpointing_options(tmp_path):
    from stages.lora import build_config, run

    base = build_base("gpt2", tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    cfg = build_config(None, str(base), str(data), lora_overrides(**{
        "lora.use_dora": True, "lora.use_rslora": True, "train.gradient_checkpointing": True,
        "train.max_steps": 12}))
    out = run(cfg, None, tmp_path / "run")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["heldout_loss_after"] < ev["heldout_loss_before"]
    assert ev["merge_max_abs_logit_diff"] < 1e-5
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] and adapter_cfg["use_rslora"] and adapter_cfg["fan_in_fan_out"]
    assert adapter_cfg["base_model_name_or_path"] == str(base.resolve())


def test_lora_checkpoint_chains_into_the_reward_stage(tmp_path, data_stage):
    """LoRA SFT of a released (Llama-style) model -> reward stage with `--init <run>/lora` -> PPO on
    it. The lora checkpoint's pad token is eos (the base had none): reward and rlhf each add the same
    distinct `<|pad|>`, so PPO's masks and the reward model's token ids agree."""
    from transformers import AutoTokenizer

    from alignline.artifacts import load_stage, manifest_sha256
    from alignline.config import load_config
    from stages import reward
    from stages.lora import build_config, run

    base = build_base("llama", tmp_path / "base")
    lora_dir = run(build_config(None, str(base), str(data_stage),
                                lora_overrides(**{"train.max_steps": 4, "data.max_train_examples": 32})),
                   None, tmp_path / "run")
    cfg = load_config(reward.Config, Path(__file__).resolve().parents[1] / "configs/reward/tiny.yaml",
                      ["train.max_steps=3", "train.batch_size=8", "train.max_train_examples=24",
                       "logging.progress=false", "train.device=cpu", "onpolicy.prompts=16",
                       "onpolicy.val_prompts=8"])
    out = reward.run(cfg, {"init": lora_dir, "data": data_stage}, tmp_path / "run")
    rm = load_stage(out, expect="reward")
    assert rm.manifest["inputs"]["init"]["manifest_sha256"] == manifest_sha256(lora_dir)
    assert rm.eval["n_pairs"] > 0 and "accuracy" in rm.eval
    assert rm.eval["onpolicy"]["train"]["samples"] == 16 * 8  # sampled the LoRA model (pad == eos here)
    rm_tok = AutoTokenizer.from_pretrained(str(out / "checkpoint"))
    assert rm_tok.pad_token == "<|pad|>" != rm_tok.eos_token

    from stages import rlhf

    cfg = load_config(rlhf.Config, Path(__file__).resolve().parents[1] / "configs/rlhf/tiny.yaml",
                      ["steps=1", "ppo.rollout_batch_size=8", "ppo.forward_batch_size=8", "ppo.mini_batch_size=4",
                       "ppo.ppo_epochs=1", "ppo.max_new_tokens=4", "eval.num_prompts=4", "eval.max_new_tokens=4",
                       "logging.progress=false", "device=cpu", "lora.enabled=true"])
    pol = rlhf.run(cfg, {"init": lora_dir, "reward": out, "data": data_stage}, tmp_path / "run")
    pol_tok = AutoTokenizer.from_pretrained(str(pol / "checkpoint"))
    assert pol_tok.pad_token_id == rm_tok.pad_token_id and load_stage(pol).eval["policy"]["rm_score"] == \
        load_stage(pol).eval["policy"]["rm_score"]  # a number: the ids agreed


@pytest.mark.skipif(
    not (__import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("bitsandbytes")),
    reason="QLoRA needs a CUDA GPU and bitsandbytes (CI is CPU-only)",
)
def test_qlora_on_gpu(tmp_path):
    from stages.lora import build_config, run

    base = build_base("llama", tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    cfg = build_config(None, str(base), str(data), lora_overrides(**{"qlora": True, "train.max_steps": 10}))
    out = run(cfg, None, tmp_path / "run")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["qlora"] and ev["heldout_loss_after"] < ev["heldout_loss_before"]
    assert ev["merge_max_abs_logit_diff"] < 0.5  # 4-bit base vs merged full-precision base
