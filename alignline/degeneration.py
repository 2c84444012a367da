"""Degeneration and reward-hacking detectors on a set of generated responses (pure Python, no torch).

    stats = output_stats(["The answer is 19.", "36", ...], eos=[True, True, ...])
    # {"n": 120, "mean_length": 2.1, "eos_rate": 0.98, "distinct_1": 0.61, "distinct_2": 0.83,
    #  "repeated_3gram_rate": 0.0, "identical_share": 0.04, "empty_share": 0.0}
    reasons = collapse_reasons(policy_texts, sft_texts)    # [] unless the policy collapsed vs SFT

The classic RLHF failure is a policy that finds a string the reward model likes and repeats it
("1. 1. 1. 1. ..." for every prompt): the RM score rises while the answers stop being answers.
These numbers show it whatever the data, with no verifier:

- `mean_length`: units per response; `eos_rate`: share that ended with EOS (when given);
- `distinct_1` / `distinct_2`: distinct unigrams / bigrams over all units of the set (Li et al., 2016);
- `repeated_3gram_rate`: per response, the share of its 3-grams that repeat an earlier one, averaged;
- `identical_share`: the share of responses equal to the most common response;
- `empty_share`: the share of empty responses.

Units are whitespace words; a response with no whitespace (Chinese, Japanese, a run of symbols) is
split into characters, so the numbers mean the same for every script.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def units(text: str) -> list[str]:
    """Whitespace words, or the characters of a response written without spaces."""
    words = text.split()
    if len(words) == 1 and len(words[0]) > 1 and not words[0].isascii():
        return list(words[0])
    return words


def _ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the set; None when the set has no n-gram at all."""
    grams = [g for t in texts for g in _ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(texts: Sequence[str], n: int = 3) -> float:
    """Mean over responses of the share of a response's n-grams that already occurred in it."""
    rates = []
    for t in texts:
        grams = _ngrams(units(t), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
        else:
            rates.append(0.0)
    return sum(rates) / len(rates) if rates else 0.0


def identical_share(texts: Sequence[str]) -> float:
    """The share of responses equal to the most common one (1/n when all differ, 1 when all agree)."""
    if not texts:
        return 0.0
    return Counter(t.strip() for t in texts).most_common(1)[0][1] / len(texts)


def output_stats(texts: Sequence[str], eos: Sequence[bool] | None = None) -> dict[str, Any]:
    """Every detector on one set of responses (see the module docstring)."""
    n = len(texts)
    out: dict[str, Any] = {
        "n": n,
        "mean_length": sum(len(units(t)) for t in texts) / n if n else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram_rate": repeated_ngram_rate(texts, 3),
        "identical_share": identical_share(texts),
        "empty_share": sum(not t.strip() for t in texts) / n if n else 0.0,
    }
    if eos is not None:
        out["eos_rate"] = sum(bool(e) for e in eos) / len(eos) if len(eos) else 0.0
    return out


# Fewer bigrams than this in either set and distinct-2 says nothing (short answers like "19").
MIN_BIGRAMS = 50


def collapse_reasons(policy: Sequence[str], reference: Sequence[str], *, max_identical_share: float = 0.5,
                     min_distinct2_ratio: float = 0.5, max_repetition: float = 0.5) -> list[str]:
    """Why the `policy` responses collapsed relative to the `reference` ones (SFT's); [] if they did not.

    - most responses are one string (`identical_share` above `max_identical_share` and the reference's);
    - distinct-2 fell below `min_distinct2_ratio` x the reference's (when both sets have at least
      MIN_BIGRAMS bigrams: a policy that learnt to answer "19" instead of "The answer is 19." has few);
    - answers repeat themselves (`repeated_3gram_rate` above `max_repetition` and the reference's)."""
    p, r = output_stats(policy), output_stats(reference)
    out = []
    if p["identical_share"] > max_identical_share and p["identical_share"] > r["identical_share"]:
        out.append(f"{p['identical_share']:.0%} of the answers are one and the same string (SFT: "
                   f"{r['identical_share']:.0%}; limit {max_identical_share:.0%})")
    enough = min(_bigram_count(policy), _bigram_count(reference)) >= MIN_BIGRAMS
    if enough and p["distinct_2"] < min_distinct2_ratio * r["distinct_2"]:
        out.append(f"distinct-2 fell from {r['distinct_2']:.3f} (SFT) to {p['distinct_2']:.3f} "
                   f"(below {min_distinct2_ratio:g}x)")
    if p["repeated_3gram_rate"] > max_repetition and p["repeated_3gram_rate"] > r["repeated_3gram_rate"]:
        out.append(f"{p['repeated_3gram_rate']:.0%} of each answer's 3-grams repeat within it (SFT: "
                   f"{r['repeated_3gram_rate']:.0%}; limit {max_repetition:.0%})")
    return out


def _bigram_count(texts: Sequence[str]) -> int:
    return sum(len(_ngrams(units(t), 2)) for t in texts)
