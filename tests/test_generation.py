"""Streaming generation, chat and the `alignline generate|chat|convert` commands, checked against
plain `model.generate` + decode on a tiny checkpoint that carries a toy tokenizer and chat template.

    .venv/bin/pytest tests/test_generation.py -q
"""

import pytest
import torch
import typer
from typer.testing import CliRunner

from alignline.generation import SamplingOptions, chat_loop, encode_prompt, load_model, stream_generate
from alignline.model.tiny import tiny_model, toy_tokenizer
from alignline_cli import model_cmds

pytestmark = pytest.mark.usefixtures("cache_convention")  # generate() under both KV-cache names

CORPUS = ["hello there how are you", "the cat sat on the mat", "what is 1 + 2 ?", "3 4 5 6 7 8 9"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = toy_tokenizer(CORPUS)
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _reference(model, tok, prompt, max_new_tokens):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_template_is_used_for_prompts(ckpt):
    _, tok = load_model(ckpt, device="cpu")
    ids = encode_prompt(tok, "what is 1 + 2 ?")[0].tolist()
    assert tok.decode(ids) == "<|bos|> <|user|> what is 1 + 2 ? <|eos|> <|assistant|>"
    raw = encode_prompt(tok, "what is 1 + 2 ?", use_chat_template=False)[0].tolist()
    assert raw == tok("what is 1 + 2 ?")["input_ids"]


def test_streamed_greedy_text_equals_generate_and_decode(ckpt):
    model, tok = load_model(ckpt, device="cpu")
    pieces = list(stream_generate(model, tok, "hello there", SamplingOptions(temperature=0, max_new_tokens=12)))
    assert len(pieces) > 1  # it really streamed
    assert "".join(pieces).strip() == _reference(model, tok, "hello there", 12).strip()


def test_sampling_with_seed_is_reproducible_and_varies_across_seeds(ckpt):
    model, tok = load_model(ckpt, device="cpu")

    def sample(seed):
        opts = SamplingOptions(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=16, seed=seed)
        return "".join(stream_generate(model, tok, "the cat", opts))

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


def test_chat_loop_keeps_history_and_resets(ckpt):
    model, tok = load_model(ckpt, device="cpu")
    inputs = iter(["hello there", "how are you", "/reset", "the cat", "/exit"])
    shown = []
    history = chat_loop(model, tok, SamplingOptions(temperature=0, max_new_tokens=5),
                        read=lambda _: next(inputs), write=shown.append)
    assert [m["role"] for m in history] == ["user", "assistant"]  # only the turn after /reset remains
    assert history[0]["content"] == "the cat"
    assert "(conversation cleared)\n" in shown
    assert history[1]["content"].strip() == _reference(model, tok, "the cat", 5).strip()


def test_bad_sampling_options_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)


def _app():
    app = typer.Typer()
    model_cmds.register(app)
    return app


def test_cli_generate_streams_the_greedy_completion(ckpt):
    result = CliRunner().invoke(_app(), ["generate", str(ckpt), "--prompt", "what is 1 + 2 ?",
                                         "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model, tok = load_model(ckpt, device="cpu")
    assert result.stdout.strip() == _reference(model, tok, "what is 1 + 2 ?", 8).strip()


def test_cli_chat_reads_turns_until_eof(ckpt):
    result = CliRunner().invoke(_app(), ["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "4",
                                         "--device", "cpu"], input="hello there\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("assistant> ") == 1


def test_cli_convert_round_trip_and_refusal(ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["convert", str(ckpt), "--to", "llama", "--out", str(tmp_path / "llama")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), ["convert", str(tmp_path / "llama"), "--to", "alignline", "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    # converting an alignline checkpoint "to alignline" is a user error with a clear message
    res = runner.invoke(_app(), ["convert", str(ckpt), "--to", "alignline", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "model_type='alignline'" in res.output


# --------------------------------------------------------------------------- the checkpoint's generation_config


@pytest.fixture(scope="module")
def leaky_ckpt(tmp_path_factory):
    """A checkpoint whose generation_config.json turns on top-k 5, top-p 0.5, a repetition penalty, ..."""
    from tests.sampling_checks import leaky_checkpoint

    tok = toy_tokenizer(CORPUS)
    return leaky_checkpoint(tmp_path_factory.mktemp("leaky"), vocab_size=len(tok), tokenizer=tok)


def _kinds(processors):
    return [(type(p).__name__, getattr(p, "temperature", None) or getattr(p, "top_k", None)
             or getattr(p, "top_p", None) or getattr(p, "penalty", None)) for p in processors]


def test_sampling_options_are_the_only_logits_processors(leaky_ckpt, monkeypatch):
    from tests.sampling_checks import spy_processors

    model, tok = load_model(leaky_ckpt, device="cpu")
    seen = spy_processors(monkeypatch, model)
    for opts in (SamplingOptions(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=3),
                 SamplingOptions(temperature=0, max_new_tokens=3),
                 SamplingOptions(temperature=1.3, top_k=3, top_p=0.9, repetition_penalty=1.2, max_new_tokens=3)):
        "".join(stream_generate(model, tok, "the cat", opts))
    assert [_kinds(s) for s in seen] == [
        [("TemperatureLogitsWarper", 0.7)],
        [],  # greedy: no penalty, n-gram ban, suppressed tokens... from the checkpoint
        [("RepetitionPenaltyLogitsProcessor", 1.2), ("TemperatureLogitsWarper", 1.3), ("TopKLogitsWarper", 3),
         ("TopPLogitsWarper", 0.9)],
    ]
    assert model.generation_config.top_k == 5  # the checkpoint's own config is back after each call


def test_gold_eval_greedy_ignores_the_checkpoint_generation_config(leaky_ckpt, monkeypatch):
    from alignline.evaluation import greedy_generate
    from tests.sampling_checks import spy_processors

    model, tok = load_model(leaky_ckpt, device="cpu")
    seen = spy_processors(monkeypatch, model)
    out = greedy_generate(model, tok, [[{"role": "user", "content": "the cat"}]] * 2, max_new_tokens=4)
    assert len(out) == 2 and seen == [[]]
