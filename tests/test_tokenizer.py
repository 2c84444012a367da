"""Tokenizer behaviour: lossless round trip, special tokens, chat template and assistant masks.

    .venv/bin/pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from alignline.data.tasks import generate_suite, suite_config
from alignline.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def suite_texts():
    return [r["text"] for r in generate_suite(suite_config("tiny"))["pretrain/train.jsonl"]]


@pytest.fixture(scope="module")
def tok(suite_texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(suite_texts, vocab_size=400, out_dir=out)
    return load_tokenizer(out)


def test_vocab_and_special_tokens(tok):
    assert len(tok) == 400
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.bos_token == BOS
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    # Plain text gets no special tokens: the chat template and the packer add them.
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)
    assert BOS not in tok.convert_ids_to_tokens(tok("hello")["input_ids"])


def test_too_small_vocab_is_refused(suite_texts):
    with pytest.raises(ValueError, match="at least 262"):
        train_tokenizer(suite_texts, vocab_size=100)


def test_digits_are_single_tokens(tok):
    toks = tok.convert_ids_to_tokens(tok.encode("What is 123+45?"))
    digits = [t for t in toks if any(c.isdigit() for c in t)]
    assert digits == ["1", "2", "3", "4", "5"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    ["中文分词测试，你好世界", "emoji 🤗🧪👩‍👩‍👧 flags 🇫🇷", "ctrl \x00\x01\x1f\x7f\t\r\n end", "  lead and trail  ",
     "a . b , c ! ' s", "ümlaut café naïve", "\u200b zero width \ufeff", "12345678901234567890"],
)
def test_round_trip_known_hard_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_matches_architecture(tok):
    msgs = [{"role": "user", "content": "What is 12+7?"}, {"role": "assistant", "content": "19"}]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|bos|><|user|>What is 12+7?<|eos|><|assistant|>19<|eos|>"
    )
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<|bos|><|user|>What is 12+7?<|eos|><|assistant|>" and gen.endswith(ASSISTANT)
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(sys_msgs, tokenize=False).startswith("<|bos|><|system|>Be brief.<|eos|><|user|>")
    # The prompt rendering is a prefix of the full rendering (TRL splits prompt/completion this way).
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(gen)
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    # Scoring decodes with special tokens skipped: only the plain text survives.
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "What is 12+7?19"


def test_assistant_mask_selects_answer_and_eos(tok):
    msgs = [
        {"role": "user", "content": "What is 12+7?"},
        {"role": "assistant", "content": "19"},
        {"role": "user", "content": "Reverse c a t."},
        {"role": "assistant", "content": "t a c"},
    ]
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    picked = [i for i, m in zip(ids, mask) if m]
    # Reference: exactly the tokens of each answer followed by its eos, nothing of the prompts.
    ref = tok.encode("19") + [tok.eos_token_id] + tok.encode("t a c") + [tok.eos_token_id]
    assert picked == ref
    assert tok.convert_ids_to_tokens(ids)[mask.index(1) - 1] == ASSISTANT


def test_saved_format_loads_with_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path / "checkpoint")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "checkpoint"))
    assert auto.chat_template == CHAT_TEMPLATE and auto.pad_token == PAD and auto.padding_side == "left"
    # load_tokenizer accepts a stage dir and reuses its checkpoint's tokenizer.
    again = load_tokenizer(tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    assert again.encode("Sort d o g.") == tok.encode("Sort d o g.")


def test_load_tokenizer_names_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nope")


def test_deterministic_training(suite_texts):
    a = train_tokenizer(suite_texts, vocab_size=350)
    b = train_tokenizer(suite_texts, vocab_size=350)
    assert tokenizer_hash(a) == tokenizer_hash(b)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_real_text_compresses_and_round_trips():
    shakespeare = (SHARED / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = [d for d in shakespeare.split("\n\n") if d.strip()]
    tok = train_tokenizer(docs, vocab_size=1024)
    sample = shakespeare[:20000]
    ids = tok.encode(sample)
    assert len(sample) / len(ids) > 2.2  # ~1 without merges; 1024-token BPE gives ~2.4 on Shakespeare
    assert tok.decode(ids) == sample
    wiki = (SHARED / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8")[:20000]
    assert tok.decode(tok.encode(wiki)) == wiki


def test_trl_accepts_the_template_for_assistant_only_loss(tok):
    # The same checks SFTTrainer(assistant_only_loss=True) runs: markers present and the closing eos trained.
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_the_stage_learns_from_chats_and_preference_pairs(tmp_path):
    """`corpus:` may name the data stage's sft/ and preference/ files: the tokenizer learns their
    messages' text, one line per turn."""
    import json

    from stages import tokenizer as stage
    from tests.test_user_errors import fake_stage

    data = fake_stage(tmp_path / "run" / "data", "data")
    chat = {"messages": [{"role": "user", "content": "把这句话翻译成英文"}, {"role": "assistant", "content": "翻译好了"}]}
    pair = {"prompt": [{"role": "user", "content": "你好吗"}], "chosen": [{"role": "assistant", "content": "很好"}],
            "rejected": [{"role": "assistant", "content": "不好"}]}
    (data / "sft").mkdir()
    (data / "sft" / "train.jsonl").write_text("\n".join(json.dumps(chat, ensure_ascii=False) for _ in range(50)))
    (data / "preference").mkdir()
    (data / "preference" / "train.jsonl").write_text("\n".join(json.dumps(pair, ensure_ascii=False) for _ in range(50)))
    texts = list(stage._texts([data / "sft" / "train.jsonl", data / "preference" / "train.jsonl"], None))
    assert texts[0] == "把这句话翻译成英文\n翻译好了" and texts[50] == "你好吗\n很好\n不好" and len(texts) == 100
