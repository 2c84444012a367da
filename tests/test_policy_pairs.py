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


def test_label_pairs_is_seeded_exact_by_default_and_checks_lengths():
    """Which wrong samples are kept under the cap is a seeded draw; a row without `match` is scored
    exactly; rows and samples must line up; the pair layout is the TRL conversational one."""
    rows = [_row("Q?", "7")]
    del rows[0]["match"]
    wrong = [f"w{i}" for i in range(12)]
    samples = [["7.0", *wrong]]  # "7.0" is right only under numeric matching
    picks = {seed: [p["rejected"][0]["content"] for p in label_pairs(rows, samples, 3, seed=seed)[0]]
             for seed in range(6)}
    assert picks[0] == [p["rejected"][0]["content"] for p in label_pairs(rows, samples, 3)[0]]  # default seed 0
    assert len({tuple(v) for v in picks.values()}) > 1, "the seed must drive the draw"
    assert picks[0] == [p["rejected"][0]["content"] for p in label_pairs(rows, samples, 3, seed=0)[0]]
    all_pairs, stats = label_pairs(rows, samples, 20)
    assert "7.0" in {p["rejected"][0]["content"] for p in all_pairs}  # exact: "7.0" != "7"
    assert stats["sample_accuracy"] == 0.0 and stats["pairs"] == 13
    assert all_pairs[0] == {"prompt": rows[0]["prompt"], "chosen": [{"role": "assistant", "content": "7"}],
                            "rejected": [{"role": "assistant", "content": all_pairs[0]["rejected"][0]["content"]}]}
    one, st = label_pairs([_row("Q?", "7")], [["7"]], 2)
    assert one == [] and st["sample_accuracy"] == 1.0  # one right sample of one
    with pytest.raises(ValueError):
        label_pairs(rows, [samples[0], ["x"]], 2)  # a sample list without its row


def test_sample_policy_pairs_passes_its_arguments_through(monkeypatch):
    """batch size, cap and seed reach the sampler and the labeller."""
    import alignline.rl.policy_pairs as pp

    seen = {}

    def fake_sample(model, tok, convs, **kw):
        seen.update(kw)
        return [[f"w{i}" for i in range(8)] for _ in convs]

    monkeypatch.setattr(pp, "sample_responses", fake_sample)
    rows = [_row("Q?", "7"), _row("R?", "8")]
    pairs, stats = sample_policy_pairs(None, None, rows, samples_per_prompt=8, max_pairs_per_prompt=3,
                                       temperature=0.7, max_new_tokens=5, batch_size=3, seed=4, progress=True)
    assert seen == {"samples_per_prompt": 8, "temperature": 0.7, "max_new_tokens": 5, "batch_size": 3, "progress": True}
    assert stats["pairs"] == 6
    assert pairs == label_pairs(rows, [[f"w{i}" for i in range(8)]] * 2, 3, seed=4)[0]
    assert pairs != label_pairs(rows, [[f"w{i}" for i in range(8)]] * 2, 3, seed=0)[0]
    seen.clear()
    pairs, _ = sample_policy_pairs(None, None, rows)  # the documented defaults
    assert seen == {"samples_per_prompt": 4, "temperature": 1.0, "max_new_tokens": 16, "batch_size": 64,
                    "progress": False}
    assert pairs == label_pairs(rows, [[f"w{i}" for i in range(8)]] * 2, 2, seed=0)[0]
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4\] lack them \(use the data stage's prompts/\*\.jsonl\)"):
        sample_policy_pairs(None, None, [{"prompt": []}] * 7)
