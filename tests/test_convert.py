"""alignline <-> LlamaForCausalLM conversion: bit-identical round trips, tokenizer carried along,
HF-initialised Llama weights give the same logits in our decoder, unsupported features refused.

    .venv/bin/pytest tests/test_convert.py -q
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alignline.model import AlignlineForCausalLM
from alignline.model.convert import ConversionError, convert_checkpoint, from_llama, llama_to_alignline_config
from alignline.model.tiny import tiny_model, toy_tokenizer


def _llama_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("tied", [False, True])
def test_alignline_to_llama_to_alignline_is_bit_identical(tmp_path, tied):
    tok = toy_tokenizer(["a b c d e f"])
    model = tiny_model(tie_word_embeddings=tied, rope_parameters={"rope_type": "linear", "factor": 2.0})
    model.to(torch.bfloat16).save_pretrained(tmp_path / "a")  # dtype must survive too
    tok.save_pretrained(tmp_path / "a")
    convert_checkpoint(tmp_path / "a", tmp_path / "llama", to="llama")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype="auto")
    assert type(llama) is LlamaForCausalLM and llama.dtype == torch.bfloat16
    convert_checkpoint(tmp_path / "llama", tmp_path / "b", to="alignline")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b"))
    assert ca == cb
    # the tokenizer (and its chat template) came along unchanged
    tb = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert tb.get_vocab() == tok.get_vocab() and tb.chat_template == tok.chat_template
    assert (tmp_path / "llama" / "tokenizer.json").is_file()


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, True), (1, False)])
def test_hf_llama_weights_give_same_logits_in_alignline(kv_heads, tied):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(_llama_config(num_key_value_heads=kv_heads, tie_word_embeddings=tied)).eval()
    ours = from_llama(llama).eval()
    assert type(ours) is AlignlineForCausalLM
    ids = torch.randint(1, 96, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32, "rope_theta": 500000.0}), "llama3"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
    ],
)
def test_unsupported_llama_features_are_refused(kw, needle):
    with pytest.raises(ConversionError, match=needle):
        llama_to_alignline_config(_llama_config(**kw))


def test_convert_checkpoint_refuses_wrong_direction_and_adapters(tmp_path):
    tiny_model().save_pretrained(tmp_path / "a")
    with pytest.raises(ConversionError, match="model_type='alignline'"):
        convert_checkpoint(tmp_path / "a", tmp_path / "b", to="alignline")
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match="PEFT adapter"):
        convert_checkpoint(tmp_path / "a", tmp_path / "c", to="llama")
