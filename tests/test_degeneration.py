"""Degeneration detectors (alignline/degeneration.py) against hand-counted values.

    .venv/bin/pytest tests/test_degeneration.py -q
"""

from __future__ import annotations

import pytest

from alignline.degeneration import (
    collapse_reasons,
    distinct_n,
    identical_share,
    output_stats,
    repeated_ngram_rate,
    units,
)


def test_each_detector_on_hand_counted_sets() -> None:
    texts = ["a b a b", "a c", "a c"]
    # unigrams: a b a b a c a c -> 3 distinct of 8; bigrams: ab ba ab ac ac -> 3 distinct of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 8) and distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["19", "36"], 2) is None  # no bigram at all
    # "a b a b": 3-grams aba, bab -> no repeat; "x y z x y z": xyz yzx zxy xyz -> 1 of 4 repeats
    assert repeated_ngram_rate(["a b a b", "x y z x y z"]) == pytest.approx((0 + 1 / 4) / 2)
    assert identical_share(["x", "y", "x ", "x"]) == pytest.approx(3 / 4)  # stripped before comparing
    stats = output_stats(["a b", "", "c"], eos=[True, False, True])
    assert stats == {"n": 3, "mean_length": 1.0, "distinct_1": 1.0, "distinct_2": 1.0, "repeated_3gram_rate": 0.0,
                     "identical_share": pytest.approx(1 / 3), "empty_share": pytest.approx(1 / 3),
                     "eos_rate": pytest.approx(2 / 3)}


def test_text_without_spaces_counts_characters() -> None:
    assert units("十加十是二十") == list("十加十是二十")
    assert units("The answer is 19.") == ["The", "answer", "is", "19."]
    assert units("19") == ["19"]  # ASCII without spaces stays one word
    assert distinct_n(["是是是是"], 2) == pytest.approx(1 / 3)


def test_collapse_is_caught_and_a_terser_policy_is_not() -> None:
    sft = [f"The answer is {i}." for i in range(40)] + [f"Paris is the capital of country {i}." for i in range(40)]
    collapsed = ["1. 1. 1. 1. 1. 1. 1. 1."] * 80
    reasons = collapse_reasons(collapsed, sft)
    assert len(reasons) == 3, reasons  # one string, distinct-2 gone, self-repetition
    assert "100% of the answers are one and the same string" in reasons[0]
    # PPO on the built-in suite learns to drop "The answer is": shorter, fewer bigrams, not a collapse.
    terse = [str(i) for i in range(80)]
    assert collapse_reasons(terse, sft) == []
    # Thresholds are respected: half the answers identical is allowed at 0.5, not at 0.4.
    half = ["same answer here"] * 40 + [f"answer number {i} is different" for i in range(40)]
    assert collapse_reasons(half, sft, min_distinct2_ratio=0) == []
    assert "50% of the answers" in collapse_reasons(half, sft, max_identical_share=0.4, min_distinct2_ratio=0)[0]
