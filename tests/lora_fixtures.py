"""Builders for the LoRA tests: tiny random HF checkpoints (Llama, Qwen2, GPT-2, alignline) with tiny
byte-level BPE tokenizers, saved to disk, plus a small generated chat dataset.

No tests live here; tests/test_lora*.py import these helpers. Each base has a different chat
template situation on purpose:
    llama      own template WITHOUT {% generation %} tags  -> mask by rendering prefixes
    qwen2      own ChatML template WITH generation tags      -> mask from the tags
    gpt2       no chat template                              -> the stage's ChatML-style default
    alignline  the alignline tokenizer's template (tags)     -> mask from the tags
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

CHATML_TAGGED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHS = ("llama", "qwen2", "gpt2", "alignline")


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """One torch thread while a test module runs, module-scoped fixtures included; a test module
    turns it on by importing it. Tiny matmuls on a shared 2-core box: extra torch threads only
    contend (measured 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Deterministic chat records: arithmetic, reversal, a system prompt now and then, some two-turn."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "map", "red", "box", "pen", "cup", "hat", "owl"]
    out = []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        w = rng.choice(words)
        turns = [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": f"Reverse {w}."}, {"role": "assistant", "content": w[::-1]}]
        if i % 4 == 1:
            turns = [{"role": "system", "content": "Be brief."}, *turns]
        out.append({"messages": turns})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    texts = []
    for r in conversations(200, seed=99):
        texts += [m["content"] for m in r["messages"]]
    return texts + ["Reverse", "What is", "[INST]", "assistant", "user", "system", "Be brief."] * 5


def bpe_tokenizer(specials: list[str], vocab_size: int = 320, **special_map):
    """A byte-level BPE (HF fast tokenizer) trained on the chat corpus, with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special_map)


def build_base(arch: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random `arch` causal LM with its tokenizer to `out`; returns `out`."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        tok = bpe_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
        tok.chat_template = LLAMA_TEMPLATE
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                            pad_token="<|endoftext|>")
        tok.chat_template = CHATML_TAGGED
        cfg = tf.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        tok = bpe_tokenizer(["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
        cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "alignline":
        from alignline.model import AlignlineConfig, AlignlineForCausalLM
        from alignline.tokenizer import train_tokenizer

        tok = train_tokenizer(_corpus(), vocab_size=320)
        cfg = AlignlineConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        model = AlignlineForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def lora_overrides(**extra) -> list[str]:
    """Small, fast settings for the stage on the tiny bases (CPU, seconds)."""
    base = {
        "train.max_steps": 40, "train.batch_size": 8, "optim.lr": 3e-2, "schedule.warmup_steps": 2,
        "train.max_length": 128, "schedule.kind": "constant",
        "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "eval.num_samples": 2, "eval.max_new_tokens": 6, "logging.progress": False, "logging.every_steps": 5,
        "data.max_val_examples": 16,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]
