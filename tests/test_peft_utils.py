"""alignline.peft_utils: per-architecture LoRA targets, config mapping, attach/merge against closed forms.

    .venv/bin/pytest tests/test_peft_utils.py -q        (~5 s)
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from alignline.config import LoraArgs
from alignline.peft_utils import (
    TargetModuleError,
    attach_lora,
    check_target_modules,
    detect_target_modules,
    linear_module_names,
    lora_config_from_args,
    merge_lora,
)
from tests.lora_fixtures import one_thread_per_module  # noqa: F401 - autouse: one torch thread

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _model(kind: str, meta: bool = False):
    configs = {
        "llama": lambda: tf.LlamaConfig(**SMALL),
        "qwen2": lambda: tf.Qwen2Config(**SMALL),
        "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=8),
        "mistral": lambda: tf.MistralConfig(**SMALL),
        "gemma": lambda: tf.GemmaConfig(**SMALL, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64),
        "phi3": lambda: tf.Phi3Config(**SMALL, pad_token_id=0),
        "alignline": lambda: __import__("alignline").AlignlineConfig(**SMALL, bos_token_id=1, eos_token_id=2),
    }
    cfg = configs[kind]()
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(cfg)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()  # GPT-2 has dropout


@pytest.mark.parametrize("kind, want", [
    ("llama", LLAMA_LIKE), ("qwen2", LLAMA_LIKE), ("qwen3", LLAMA_LIKE), ("mistral", LLAMA_LIKE),
    ("gemma", LLAMA_LIKE), ("alignline", LLAMA_LIKE),
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    ("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
])
def test_detect_target_modules_per_architecture(kind, want):
    model = _model(kind, meta=True)  # no weights needed
    assert detect_target_modules(model) == want
    assert "lm_head" not in linear_module_names(model)


def test_unknown_architecture_gets_every_linear_but_the_head():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery"})()
            self.wq = torch.nn.Linear(4, 4)
            self.ffn = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
            self.lm_head = torch.nn.Linear(4, 10)

    assert detect_target_modules(Block()) == ["0", "2", "wq"]


def test_check_target_modules_lists_what_exists():
    model = _model("llama", meta=True)
    assert check_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(TargetModuleError) as info:
        check_target_modules(model, ["q_proj", "c_attn"])
    msg = str(info.value)
    assert "['c_attn']" in msg and "down_proj" in msg and "LlamaForCausalLM" in msg
    with pytest.raises(TargetModuleError, match="empty"):
        check_target_modules(model, [])


def test_lora_config_from_args_maps_every_field():
    args = LoraArgs(enabled=True, r=4, alpha=8, dropout=0.1, use_rslora=True, use_dora=True,
                    target_modules=["q_proj", "v_proj"])
    cfg = lora_config_from_args(args, _model("llama", meta=True))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora) == (4, 8, 0.1, True, True)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.fan_in_fan_out is False
    gpt2 = lora_config_from_args(LoraArgs(), _model("gpt2", meta=True))
    assert gpt2.fan_in_fan_out is True  # Conv1D weights are (in, out)
    assert set(gpt2.target_modules) == {"c_attn", "c_proj", "c_fc"}


@pytest.mark.parametrize("kind, rslora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_attach_and_merge_match_the_closed_form(kind, rslora):
    torch.manual_seed(0)
    base = _model(kind)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base_logits = base(ids).logits
    r, alpha = 4, 8.0
    pm = attach_lora(base, LoraArgs(enabled=True, r=r, alpha=alpha, use_rslora=rslora))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, base_logits)  # B = 0 at init: no change
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = pm(ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    # Closed form for one projection: W' = W + s * B @ A, with s = alpha/r (alpha/sqrt(r) for rsLoRA).
    name = "q_proj" if kind == "llama" else "c_fc"
    layer = next(m for n, m in pm.named_modules() if n.endswith(name) and hasattr(m, "lora_A"))
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    scale = alpha / (math.sqrt(r) if rslora else r)
    expected = w0 + scale * (delta.T if kind == "gpt2" else delta)
    merged = merge_lora(pm)
    assert type(merged).__name__ in ("LlamaForCausalLM", "GPT2LMHeadModel")
    got = dict(merged.named_modules())[next(n for n, _ in merged.named_modules() if n.endswith(name))].weight
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)


def test_dora_merge_reproduces_adapter_logits():
    torch.manual_seed(0)
    pm = attach_lora(_model("qwen2"), LoraArgs(enabled=True, r=4, alpha=8, use_dora=True))
    assert any("lora_magnitude_vector" in n for n, p in pm.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = pm(ids).logits
        torch.testing.assert_close(merge_lora(pm)(ids).logits, adapted, atol=1e-5, rtol=0)


def test_gradient_checkpointing_trains_only_the_adapter():
    torch.manual_seed(0)
    base = _model("llama")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    pm = attach_lora(base, LoraArgs(enabled=True, r=4, alpha=8), gradient_checkpointing=True)
    pm.train()
    assert pm.get_base_model().model.gradient_checkpointing
    ids = torch.randint(0, 64, (2, 12))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    for n, p in pm.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, frozen[key]), f"{n} changed"
