"""LoRA stage: every bad input is refused with a clear message before any training, and the loss masks
are exactly the assistant tokens however they are computed.

Bad inputs: a base that is not a causal LM (BERT masked-LM, Llama sequence classifier), a base without
tokenizer files, data in the wrong format, a target module the model lacks, QLoRA on a CPU-only
machine, `chat.mask=generation` with a template that has no generation tags, and a template that is
not prefix-preserving under `chat.mask=render`. Each must raise before `<run>/lora/` is created.

    .venv/bin/pytest tests/test_lora_inputs.py -q        (~10 s)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.lora_fixtures import (
    CHATML_TAGGED,
    LLAMA_TEMPLATE,
    build_base,
    conversations,
    lora_overrides,
    one_thread_per_module,  # noqa: F401 - autouse
    write_jsonl,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_inputs")
    return {
        "root": root,
        "llama": build_base("llama", root / "llama"),
        "qwen2": build_base("qwen2", root / "qwen2"),
        "data": write_jsonl(root / "chat.jsonl", conversations(24)),
    }


def _run_expecting_error(env, base, data, tmp_path, *extra, match):
    from alignline.chat import ChatTemplateError
    from alignline.config import InputError
    from stages.lora import build_config, run

    cfg = build_config(None, str(base), str(data), lora_overrides() + list(extra))
    with pytest.raises((InputError, ChatTemplateError), match=match) as info:
        run(cfg, None, tmp_path / "run")
    assert not (tmp_path / "run" / "lora").exists(), "a stage dir was created before the input was checked"
    return str(info.value)


def test_base_not_a_causal_lm_masked_lm(env, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(bert))
    msg = _run_expecting_error(env, bert, env["data"], tmp_path, match="not a causal language model")
    assert "BertForMaskedLM" in msg and "config.json" in msg


def test_base_not_a_causal_lm_sequence_classifier(env, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig.from_pretrained(str(env["llama"]))
    clf = tmp_path / "clf"
    LlamaForSequenceClassification(cfg).save_pretrained(str(clf))
    AutoTokenizer.from_pretrained(str(env["llama"])).save_pretrained(str(clf))
    msg = _run_expecting_error(env, clf, env["data"], tmp_path, match="not a causal language model")
    assert "LlamaForSequenceClassification" in msg


def test_base_without_tokenizer(env, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (env["llama"] / name).exists():
            shutil.copy(env["llama"] / name, bare / name)
    msg = _run_expecting_error(env, bare, env["data"], tmp_path, match="no tokenizer")
    assert "tokenizer=DIR" in msg


def test_missing_base_dir(env, tmp_path):
    _run_expecting_error(env, tmp_path / "nope" / "model", env["data"], tmp_path, match="no such directory")


@pytest.mark.parametrize("records, match", [
    ([{"foo": 1}, {"foo": 2}], "failed validation"),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 3, "assistant"),
    ([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}] * 3, "role"),
])
def test_data_in_the_wrong_format(env, tmp_path, records, match):
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    msg = _run_expecting_error(env, env["llama"], bad, tmp_path, match=match)
    assert str(bad) in msg


def test_unknown_target_module(env, tmp_path):
    msg = _run_expecting_error(env, env["llama"], env["data"], tmp_path, 'lora.target_modules=["q_proj","qkv"]',
                               match="not found")
    assert "['qkv']" in msg and "q_proj" in msg and "'auto'" in msg


def test_qlora_on_cpu_fails_before_loading(env, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The base does not even exist: the QLoRA check must come first.
    msg = _run_expecting_error(env, tmp_path / "no-such-base", env["data"], tmp_path, "qlora=true", match="QLoRA")
    assert "CUDA" in msg


def test_qlora_without_bitsandbytes(env, tmp_path, monkeypatch):
    import alignline.peft_utils as pu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pu, "bitsandbytes_available", lambda: False)
    msg = _run_expecting_error(env, env["llama"], env["data"], tmp_path, "qlora=true", match="bitsandbytes")
    assert "pip install 'alignline[qlora]'" in msg


def test_generation_mask_needs_tags(env, tmp_path):
    msg = _run_expecting_error(env, env["llama"], env["data"], tmp_path, "chat.mask=generation",
                               match="generation")
    assert "chat.mask=render" in msg


def test_non_prefix_preserving_template_is_refused(env, tmp_path):
    # Drops earlier assistant turns' content, as some "thinking" templates do: rendering cannot locate turns.
    tmpl = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}A:{% else %}"
            "{{ m['role'] }}:{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
    tmp_base = tmp_path / "llama"
    shutil.copytree(env["llama"], tmp_base)
    cfg_path = tmp_base / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = tmpl
    cfg_path.write_text(json.dumps(tok_cfg))
    (tmp_base / "chat_template.jinja").unlink(missing_ok=True)
    msg = _run_expecting_error(env, tmp_base, env["data"], tmp_path, match="prefix-preserving")
    assert "chat.template_source=config" in msg


def test_cli_exit_code_and_message(env, tmp_path, capsys):
    from stages.lora import main

    with pytest.raises(SystemExit) as info:
        main(["--base", str(env["llama"]), "--data", str(env["data"]), "--run-dir", str(tmp_path / "r"),
              "--set", "lora.target_modules=[nope]"])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_config_typo_names_the_key(tmp_path, capsys):
    from stages.lora import main

    with pytest.raises(SystemExit) as info:
        main(["--run-dir", str(tmp_path), "--set", "lora.rank=4", "--print-config"])
    assert info.value.code == 2
    assert "lora.rank" in capsys.readouterr().err


# --------------------------------------------------------------------------- masks


def _masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_render_mask_equals_generation_tag_mask(env):
    from transformers import AutoTokenizer

    from alignline.chat import encode_generation, encode_render

    tok = AutoTokenizer.from_pretrained(str(env["qwen2"]))
    for rec in conversations(12):
        ids_g, mask_g = encode_generation(tok, rec["messages"], CHATML_TAGGED)
        ids_r, mask_r = encode_render(tok, rec["messages"], CHATML_TAGGED)
        assert ids_g == ids_r
        assert mask_g == mask_r, rec
        want = "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        assert _masked_text(tok, ids_g, mask_g) == want


def test_render_mask_on_a_tagless_template_is_exactly_the_answers(env):
    from transformers import AutoTokenizer

    from alignline.chat import encode_render

    tok = AutoTokenizer.from_pretrained(str(env["llama"]))
    assert tok.chat_template == LLAMA_TEMPLATE
    for rec in conversations(12):
        ids, mask = encode_render(tok, rec["messages"], LLAMA_TEMPLATE)
        want = "".join(f" {m['content']}</s>" for m in rec["messages"] if m["role"] == "assistant")
        assert _masked_text(tok, ids, mask) == want, rec
        # and nothing of the prompts leaks in
        assert "[INST]" not in _masked_text(tok, ids, mask)


def test_default_template_masks_answer_and_eos(env):
    from transformers import AutoTokenizer

    from alignline.chat import encode_generation, encode_render
    from stages.lora import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(env["llama"]))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, mask = encode_generation(tok, msgs, DEFAULT_CHAT_TEMPLATE)
    assert _masked_text(tok, ids, mask) == "4</s>"
    assert encode_render(tok, msgs, DEFAULT_CHAT_TEMPLATE) == (ids, mask)
    text = tok.apply_chat_template(msgs[:2], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<s><|im_start|>system\nBe brief.</s>\n") and text.endswith("<|im_start|>assistant\n")


def test_template_source_base_without_template_is_an_error(env):
    from transformers import AutoTokenizer

    from alignline.config import InputError
    from stages.lora import ChatConfig, resolve_chat_template

    tok = AutoTokenizer.from_pretrained(str(env["llama"]))
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        resolve_chat_template(ChatConfig(template_source="base"), tok)
    assert resolve_chat_template(ChatConfig(), tok)[1] == "default"
    assert resolve_chat_template(ChatConfig(template=CHATML_TAGGED), tok) == (CHATML_TAGGED, "config")


def test_template_from_a_jinja_file(env, tmp_path):
    from transformers import AutoTokenizer

    from stages.lora import ChatConfig, resolve_chat_template

    (tmp_path / "t.jinja").write_text(CHATML_TAGGED)
    tok = AutoTokenizer.from_pretrained(str(env["llama"]))
    got = resolve_chat_template(ChatConfig(template_source="config", template="t.jinja"), tok, Path(tmp_path))
    assert got == (CHATML_TAGGED, "config")
