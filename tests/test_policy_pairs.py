"""On-policy preference pairs (alignline/rl/policy_pairs.py): labelling against gold answers, and
sampling a real (tiny, random) alignline model through the chat template.

    .venv/bin/pytest tests/test_policy_pairs.py -q
"""

from __future__ import annotations

import pytest
import torch

from alignline.rl.policy_pairs import label_pairs, sample_policy_pairs


def _row(q, answer, match="exact"):
    return {"prompt": [{"role": "user", "content": q}], "answer": answer, "match": match}


def test_label_pairs_pairs_gold_with_each_distinct_wrong_sample():
    rows = [_row("What is 2+2?", "4", "numeric"), _row("Reverse a b.", "b a"), _row("Sort b a.", "a b")]
    samples = [
        ["4", " 4 ", "5", "5", "x y", "4.0"],  # right, right, wrong, duplicate, wrong, right (numeric)
        ["b a", "b a", "b a", "b a", "b a", "b a"],  # all right: no pair
        ["b a", "a b", "", "a  b", "b a", "c"],  # "", "a  b", "c" and "b a" are wrong
    ]
    pairs, stats = label_pairs(rows, samples, max_pairs_per_prompt=10)
    by_prompt: dict[str, set[str]] = {}
    for p in pairs:
        q = p["prompt"][0]["content"]
        row = next(r for r in rows if r["prompt"][0]["content"] == q)
        assert p["chosen"] == [{"role": "assistant", "content": row["answer"]}]
        by_prompt.setdefault(q, set()).add(p["rejected"][0]["content"])
    assert by_prompt == {"What is 2+2?": {"5", "x y"}, "Sort b a.": {"b a", "", "a  b", "c"}}
    assert stats == {"prompts": 3, "samples": 18, "sample_accuracy": pytest.approx(10 / 18), "pairs": 6}

    capped, _ = label_pairs(rows, samples, max_pairs_per_prompt=1)
    assert len(capped) == 2


def test_sampling_goes_through_the_chat_template_and_needs_gold_answers():
    from alignline.model import AlignlineForCausalLM
    from alignline.model.tiny import tiny_config
    from alignline.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is 1+2? 3", "Reverse a b. b a"] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = AlignlineForCausalLM(tiny_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    rows = [_row("What is 1+2?", "3", "numeric"), _row("Reverse a b.", "b a")]
    pairs, stats = sample_policy_pairs(model, tok, rows, samples_per_prompt=3, max_new_tokens=4)
    assert stats["samples"] == 6 and stats["pairs"] == len(pairs) <= 6
    assert all(p["chosen"][0]["content"] in ("3", "b a") for p in pairs)

    with pytest.raises(ValueError, match="lack them"):
        sample_policy_pairs(model, tok, [{"prompt": rows[0]["prompt"]}])


def test_policy_samples_ignore_the_checkpoint_generation_config(tmp_path, monkeypatch):
    """Pairs are labelled on what the policy really says: sampling is softmax(logits / T) only, not the
    checkpoint's top-k 5 / top-p / repetition penalty / suppressed tokens."""
    from alignline.model.tiny import toy_tokenizer
    from alignline.rl.policy_pairs import sample_responses
    from tests.sampling_checks import leaky_checkpoint, load_like_the_stages, spy_processors

    tok = toy_tokenizer(["What is 1+2? 3", "Reverse a b. b a"])
    model = load_like_the_stages(leaky_checkpoint(tmp_path / "ckpt", vocab_size=len(tok), tokenizer=tok))
    seen = spy_processors(monkeypatch, model)
    convs = [[{"role": "user", "content": "What is 1+2?"}]]
    sample_responses(model, tok, convs, samples_per_prompt=2, temperature=1.0, max_new_tokens=3)
    sample_responses(model, tok, convs, samples_per_prompt=2, temperature=0.5, max_new_tokens=3)
    assert [[type(p).__name__ for p in s] for s in seen] == [[], ["TemperatureLogitsWarper"]]
    assert seen[1][0].temperature == 0.5


def test_policy_pairs_sample_at_most_max_new_tokens(monkeypatch):
    """The length cap reaches the sampler: every response has <= max_new_tokens tokens (an unset cap
    would fall back to transformers' max_length=20)."""
    import alignline.rl.policy_pairs as pp
    from alignline.model import AlignlineForCausalLM
    from alignline.model.tiny import tiny_config, toy_tokenizer

    tok = toy_tokenizer(["What is 1+2? 3", "Reverse a b. b a"])
    torch.manual_seed(0)
    model = AlignlineForCausalLM(tiny_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    widths = []
    real = pp.generate

    def spy(*a, **k):
        out = real(*a, **k)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(pp, "generate", spy)
    sample_policy_pairs(model, tok, [_row("What is 1+2?", "3", "numeric")], samples_per_prompt=4, max_new_tokens=2)
    assert widths and max(widths) == 2
