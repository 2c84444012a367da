"""`alignline export`: Llama dirs with identical logits, GGUF files that llama.cpp (xllamacpp) decodes to the
same greedy tokens as transformers, the q/k rope permutation, the tokenizer, and refusals.

    .venv/bin/pytest tests/test_export.py -q            # slow ones use the session's tiny_chain (~2-3 min once)
    .venv/bin/pytest tests/test_export.py -q -s -k agreement   # prints the f16/bf16/q8_0 agreement
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from alignline.export import (  # noqa: E402
    ExportError,
    LlamaCpp,
    export_gguf,
    export_llama,
    rope_rows_to_interleaved,
    validate_gguf,
)
from alignline.model.tiny import tiny_model  # noqa: E402

CORPUS = ["What is 12+7? 19.", "Reverse a b c. c b a", "The capital of Solkesmark is Lumthoow.",
          "naïve café, 日本語 ½ ٣ and 2024-01-31", "  spaces\tand\nnewlines  "] * 20
RAW = ["The capital of", "1 2 3 4 5"]
CHAT = [[{"role": "user", "content": "What is 12+7?"}], [{"role": "user", "content": "Reverse a b c."}]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Our byte-level BPE (alignline.tokenizer) trained on a few lines: the tokenizer the pipeline makes."""
    from alignline.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


def _random_checkpoint(path, tok, **overrides):
    """A random tiny alignline model (GQA 4/2 heads, head_dim 16) saved with `tok`."""
    model = tiny_model(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cli(monkeypatch, capsys, *args):
    """Run `alignline ...` in-process through main() (what the console script runs): (exit code, out, err)."""
    from alignline_cli.main import main

    monkeypatch.setattr(sys, "argv", ["alignline", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# --------------------------------------------------------------------------- rope permutation


def _rotate_half_rope(x, pos, theta=10000.0):
    """HF's rope on (..., head_dim): pairs (j, j + d/2)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _interleaved_rope(x, pos, theta=10000.0):
    """llama.cpp's "llama" (normal) rope on (..., head_dim): pairs (2j, 2j+1)."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    return out


def test_rope_permutation_turns_rotate_half_into_interleaved_pairs():
    rng = np.random.default_rng(0)
    heads, head_dim, width = 3, 8, 12
    wq, wk, h1, h2 = (rng.standard_normal(s) for s in ((heads * head_dim, width), (heads * head_dim, width),
                                                        width, width))
    for w in (wq, wk):  # each head's rows: first half to even slots, second half to odd slots
        p = rope_rows_to_interleaved(w, heads)
        assert np.array_equal(p[0::2][:head_dim // 2], w[: head_dim // 2])
        assert np.array_equal(p[1::2][:head_dim // 2], w[head_dim // 2: head_dim])
    # attention scores q.k per head are the same under HF's rope and llama.cpp's rope on the permuted rows
    for pos_q, pos_k in ((5, 2), (17, 0)):
        q_hf = _rotate_half_rope((wq @ h1).reshape(heads, head_dim), pos_q)
        k_hf = _rotate_half_rope((wk @ h2).reshape(heads, head_dim), pos_k)
        q_cpp = _interleaved_rope((rope_rows_to_interleaved(wq, heads) @ h1).reshape(heads, head_dim), pos_q)
        k_cpp = _interleaved_rope((rope_rows_to_interleaved(wk, heads) @ h2).reshape(heads, head_dim), pos_k)
        np.testing.assert_allclose((q_hf * k_hf).sum(-1), (q_cpp * k_cpp).sum(-1), rtol=1e-10)
        # and without the permutation they are not (what llama.cpp would compute from HF's rows)
        k_raw = _interleaved_rope((wk @ h2).reshape(heads, head_dim), pos_k)
        q_raw = _interleaved_rope((wq @ h1).reshape(heads, head_dim), pos_q)
        assert not np.allclose((q_hf * k_hf).sum(-1), (q_raw * k_raw).sum(-1))


@pytest.mark.parametrize("overrides", [
    {},  # GQA 4 query / 2 kv heads, head_dim 16, untied output
    {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "linear",
                                                                               "factor": 2.0}},
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "rope_theta": 5e5}},
], ids=["gqa-untied", "mqa-tied-linear-rope", "yarn-rope"])
def test_random_model_gguf_matches_transformers(tmp_path, bpe, overrides):
    """Random weights have tiny logit margins: greedy tokens and top-5 log-probs agree only if every tensor,
    the q/k permutation and the rope metadata are right (dropping the permutation fails here)."""
    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe, **overrides)
    gguf_path = export_gguf(ckpt, tmp_path / "m.gguf")
    report = validate_gguf(ckpt, gguf_path, RAW + CHAT, max_new_tokens=16, ignore_eos=True)
    assert report["all_matched"], [(r["hf"], r["gguf"]) for r in report["prompts"]]
    assert report["max_abs_logprob_diff"] < 1e-4


# --------------------------------------------------------------------------- tokenizer


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tmp_path, bpe):
    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe)
    gguf_path = export_gguf(ckpt, tmp_path / "m.gguf")
    texts = ["What is 12+7?", "2024-01-31 and 1234567890", "  two  spaces\tand a\ttab\n\nnew lines ",
             "naïve café ½ ٣ 日本語 😀", "don't we'll it's", "<|bos|><|user|>Hi<|eos|><|assistant|>",
             "text<|eos|>more <|pad|>", ""]
    with LlamaCpp(gguf_path) as cpp:
        for text in texts:
            assert cpp.tokenize(text) == bpe(text, add_special_tokens=False)["input_ids"], text
        # llama.cpp renders the GGUF's chat template as transformers renders ours
        for messages in CHAT:
            assert cpp._post("/apply-template", {"messages": messages})["prompt"] == \
                bpe.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def value(key):
        field = fields[key]
        return field.contents()

    assert value("tokenizer.ggml.pre") == "smollm" and value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.add_bos_token") is False  # our tokenizer adds nothing; the template does
    assert value("tokenizer.ggml.eos_token_id") == bpe.eos_token_id
    assert "endgeneration" not in value("tokenizer.chat_template")  # HF-only tags dropped, rendering unchanged


def test_other_pre_tokenizer_is_refused_naming_it(tmp_path, bpe):
    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe)
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer.*add_prefix_space\": true"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


# --------------------------------------------------------------------------- refusals (CLI)


@pytest.mark.parametrize("overrides, needle", [
    ({"position": "alibi"}, "position='alibi'"),
    ({"num_experts": 2}, "num_experts=2"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
])
@pytest.mark.parametrize("fmt", ["gguf", "llama"])
def test_cli_refuses_variants_without_llama_counterpart(tmp_path, bpe, monkeypatch, capsys, overrides, needle, fmt):
    if fmt == "llama" and "rope_parameters" in overrides:
        pytest.skip("dynamic rope is a Llama rope type; only GGUF lacks it")
    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe, **overrides)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "llama")
    code, stdout, err = _cli(monkeypatch, capsys, "export", str(ckpt), "--format", fmt, "--out", str(out))
    assert code == 2 and needle in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, no temp left


def test_cli_refuses_adapter_missing_checkpoint_and_bad_dtype(tmp_path, bpe, monkeypatch, capsys):
    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text("{}")
    cases = [
        (["export", str(adapter), "--format", "gguf", "--out", str(tmp_path / "a.gguf")], "checkpoint"),
        (["export", str(adapter), "--format", "llama", "--out", str(tmp_path / "a")], "PEFT adapter"),
        (["export", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "b.gguf")], "not found"),
        (["export", str(ckpt), "--format", "gguf", "--dtype", "q4_0", "--out", str(tmp_path / "c.gguf")], "--dtype"),
        (["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "d")], "--format"),
    ]
    for args, needle in cases:
        code, _, err = _cli(monkeypatch, capsys, *args)
        assert code == 2 and needle in err and err.count("error:") == 1 and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ckpt"]


# --------------------------------------------------------------------------- Llama export


def test_export_llama_gives_same_logits(tmp_path, bpe, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from alignline.model import AlignlineForCausalLM

    ckpt = _random_checkpoint(tmp_path / "ckpt", bpe)
    code, out, _ = _cli(monkeypatch, capsys, "export", str(ckpt), "--format", "llama", "--out", str(tmp_path / "l"))
    assert code == 0 and "wrote llama checkpoint" in out
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "l")
    assert type(llama) is LlamaForCausalLM
    ours = AlignlineForCausalLM.from_pretrained(ckpt)
    ids = torch.tensor([bpe("What is 12+7? naïve", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    # a llama checkpoint is copied as is (weights + tokenizer) and exports to GGUF too
    export_llama(tmp_path / "l", tmp_path / "l2")
    assert (tmp_path / "l2" / "tokenizer.json").is_file() and (tmp_path / "l2" / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="exists"):
        export_llama(ckpt, tmp_path / "l2")
    assert export_gguf(tmp_path / "l2", tmp_path / "l2.gguf").is_file()


# --------------------------------------------------------------------------- the pipeline's SFT model


def _chain_prompts(tiny_chain):
    from alignline.evaluation import load_prompts

    chat = [row["prompt"] for row in load_prompts(tiny_chain.data, "test", limit=4)]
    return chat + ["What is 3+4? The answer is", "Reverse x y z."]


@pytest.mark.slow
def test_tiny_chain_sft_gguf_f32_reproduces_transformers_greedy(tiny_chain, tmp_path, monkeypatch, capsys):
    ckpt = tiny_chain.sft / "checkpoint"
    code, out, err = _cli(monkeypatch, capsys, "export", str(ckpt), "--format", "gguf", "--out",
                          str(tmp_path / "sft.gguf"))
    print(out)
    assert code == 0 and "4/4 prompts identical" in out, out + err
    # eos suppressed: 24 tokens per prompt (the SFT model answers in 1-12 tokens and stops)
    report = validate_gguf(ckpt, tmp_path / "sft.gguf", _chain_prompts(tiny_chain), max_new_tokens=24,
                           ignore_eos=True)
    print({k: v for k, v in report.items() if k != "prompts"})
    assert report["total"] == 6 and report["all_matched"], [(r["hf"], r["gguf"]) for r in report["prompts"]]
    assert all(len(r["gguf"]) == 24 for r in report["prompts"])
    assert report["max_abs_logprob_diff"] < 1e-3
    # and as served: stopping at the eos
    assert validate_gguf(ckpt, tmp_path / "sft.gguf", _chain_prompts(tiny_chain), max_new_tokens=24)["all_matched"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_tiny_chain_sft_gguf_agreement(tiny_chain, tmp_path, dtype):
    """Lower precision changes logits, so greedy paths may part after a few tokens: the agreement is
    printed (see README) and only the robust part asserted: the file loads and decodes, and most prompts
    agree on the first token."""
    ckpt = tiny_chain.sft / "checkpoint"
    path = export_gguf(ckpt, tmp_path / f"sft-{dtype}.gguf", dtype=dtype)
    report = validate_gguf(ckpt, path, _chain_prompts(tiny_chain), max_new_tokens=24, ignore_eos=True)
    prefixes = [r["match_prefix"] for r in report["prompts"]]
    print(f"{dtype}: {report['matched']}/{report['total']} identical over 24 tokens, match prefixes {prefixes}, "
          f"max |logprob diff| {report['max_abs_logprob_diff']:.2e}, {path.stat().st_size} bytes")
    assert all(r["gguf"] for r in report["prompts"])
    assert sum(p >= 1 for p in prefixes) >= len(prefixes) - 1
