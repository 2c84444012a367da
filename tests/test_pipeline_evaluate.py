"""alignline/evaluation.py: the one greedy decoder and the one reward-model scorer every stage uses.

    .venv/bin/pytest tests/test_pipeline_evaluate.py

References: a padded batch scores each row as the RM's own (HF) forward scores that row alone;
an answer cut at max_new_tokens is scored without the eos the template would add; greedy answers
are the argmax continuation, cut after the first of several eos ids. The evaluate stage end to
end is in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import pytest
import torch

from alignline.evaluation import (
    greedy_generate,
    greedy_responses,
    rm_scores,
    score_conversations,
    score_responses,
)
from alignline.model.configuration import AlignlineConfig
from alignline.model.modeling import AlignlineForCausalLM, AlignlineForSequenceClassification
from alignline.tokenizer import train_tokenizer

PROMPTS = [[{"role": "user", "content": "What is 1+2?"}], [{"role": "user", "content": "Reverse c a t."}],
           [{"role": "user", "content": "What is 12+7? Answer with a number only please."}]]
RESPONSES = ["3", "t a c and some much longer text to force padding", ""]


@pytest.fixture(scope="module")
def tok():
    texts = [f"What is {a}+{b}? {a + b}. Reverse c a t: t a c." for a in range(30) for b in range(3)]
    return train_tokenizer(texts, vocab_size=300)


def _cfg(tok, **kw):
    return AlignlineConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=tok.pad_token_id, **kw)


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(0)
    return AlignlineForSequenceClassification(_cfg(tok, num_labels=1)).eval()


def _alone(rm, ids: list[int]) -> float:
    """The RM's own forward on one unpadded sequence: HF pools the last token."""
    with torch.no_grad():
        return float(rm(input_ids=torch.tensor([ids])).logits[0, 0])


def test_batched_scores_equal_the_models_own_score_of_each_row_alone(tok, rm) -> None:
    finished = [True, False, True]
    batched = score_responses(rm, tok, PROMPTS, RESPONSES, finished, batch_size=3)
    single = [score_responses(rm, tok, [p], [r], [f], batch_size=1)[0]
              for p, r, f in zip(PROMPTS, RESPONSES, finished)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    assert len(set(round(s, 6) for s in single)) == 3  # distinct inputs, distinct scores
    # the reference: HF's forward of the exact token sequence, finished answers closed by eos only
    for p, r, f, got in zip(PROMPTS, RESPONSES, finished, batched):
        text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
        assert got == pytest.approx(_alone(rm, ids + ([tok.eos_token_id] if f else [])), abs=1e-5)


def test_a_cut_answer_is_scored_as_cut_and_a_conversation_as_rendered(tok, rm) -> None:
    cut, done = score_responses(rm, tok, PROMPTS[:1] * 2, ["3 4 5"] * 2, [False, True])
    assert cut != pytest.approx(done, abs=1e-4)
    conv = PROMPTS[0] + [{"role": "assistant", "content": "3 4 5"}]
    (whole,) = score_conversations(rm, tok, [conv])
    assert whole == pytest.approx(done, abs=1e-5)  # the template closes the answer with eos
    ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    (short,) = score_conversations(rm, tok, [conv], max_length=5)
    assert short == pytest.approx(_alone(rm, ids[:5]), abs=1e-5)
    # the pad id takes no part: another pad gives the same scores
    seqs = [ids, ids[:4], ids[:7]]
    torch.testing.assert_close(rm_scores(rm, seqs, tok.pad_token_id), rm_scores(rm, seqs, 5), atol=1e-5, rtol=0)


def test_greedy_is_the_argmax_continuation_cut_after_the_first_eos(tok) -> None:
    torch.manual_seed(1)
    model = AlignlineForCausalLM(_cfg(tok)).eval()
    prompts = [[1, 5, 9, 11], [1, 7]]
    got = greedy_responses(model, prompts, eos_token_id=None, pad_token_id=0, max_new_tokens=6, batch_size=2)
    for p, r in zip(prompts, got):  # reference: one argmax step at a time, no cache, no padding
        ids = list(p)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert r == ids[len(p):]
    # any of several eos ids ends an answer, and is kept
    stops = [got[0][2], got[1][1]]
    cut = greedy_responses(model, prompts, eos_token_id=stops, pad_token_id=0, max_new_tokens=6, batch_size=2)
    for r, full in zip(cut, got):
        first = min(i for i, t in enumerate(full) if t in stops)
        assert r == full[: first + 1]
    text = greedy_generate(model, tok, PROMPTS[:2], max_new_tokens=6)
    ids = [tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    expect = greedy_responses(model, ids, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              max_new_tokens=6)
    assert text == tok.batch_decode(expect, skip_special_tokens=True)


def test_kl_to_reference_is_the_exact_kl_of_the_tempered_distributions(tok) -> None:
    """With one new token the sampled path does not matter: the estimate is exactly the mean over
    prompts of KL(softmax(policy / T) || softmax(ref / T)) at the next position (T = 0.7)."""
    from alignline.evaluation import kl_to_reference

    torch.manual_seed(2)
    policy, ref = AlignlineForCausalLM(_cfg(tok)).eval(), AlignlineForCausalLM(_cfg(tok)).eval()
    prompts = [[1, 5, 9, 11], [1, 7], [1, 8, 8]]
    got = kl_to_reference(policy, ref, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          max_new_tokens=1, batch_size=2, temperature=0.7, samples=2)
    kls = []
    with torch.no_grad():
        for p in prompts:
            lp = torch.log_softmax(policy(input_ids=torch.tensor([p])).logits[0, -1] / 0.7, -1)
            lq = torch.log_softmax(ref(input_ids=torch.tensor([p])).logits[0, -1] / 0.7, -1)
            kls.append(float((lp.exp() * (lp - lq)).sum()))
    assert got == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert kl_to_reference(policy, policy, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           max_new_tokens=4, temperature=0.7) == pytest.approx(0.0, abs=1e-6)
