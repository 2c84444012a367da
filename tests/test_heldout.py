"""Measurements that mean something on a user's data: held-out proportions with n and a 95%
interval, gold accuracy only where a verifier exists, and the parts that need a verifier
(on-policy reward pairs, a verifiable RL reward) refused or skipped where there is none.

    .venv/bin/pytest tests/test_heldout.py -q      # ~5 s
"""

from __future__ import annotations

import math

import pytest

from alignline.files import write_jsonl


def test_the_interval_is_wilsons_at_small_n_and_at_the_edges():
    from alignline.evaluation import estimate, proportion_interval

    # Closed form: centre (p + z²/2n) / (1 + z²/n), half-width z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    z = 1.96
    for k, n in ((5, 10), (0, 10), (10, 10), (27, 33), (1.5, 4)):
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert proportion_interval(k, n) == pytest.approx((max(0, c - h), min(1, c + h)), abs=1e-12)
    assert proportion_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = proportion_interval(0, 10)  # no successes: not the point interval (0, 0) of the normal formula
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    # More data, a narrower interval around the same proportion.
    assert proportion_interval(500, 1000)[1] - proportion_interval(500, 1000)[0] < 0.07 < \
        proportion_interval(5, 10)[1] - proportion_interval(5, 10)[0]
    assert estimate(12, 15) == {"value": 0.8, "n": 15, "low": 0.5481, "high": 0.9295}


def test_a_mean_has_the_normal_interval():
    from alignline.evaluation import mean_estimate

    e = mean_estimate([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sd sqrt(5/3), half-width 1.96 sd / 2
    half = 1.96 * math.sqrt(5 / 3) / 2
    assert e["value"] == 2.5 and e["n"] == 4
    assert (e["low"], e["high"]) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-4)
    assert math.isnan(mean_estimate([3.0])["low"]) and mean_estimate([])["n"] == 0


def test_gold_accuracy_exists_only_where_the_prompts_have_answers():
    from alignline.evaluation import GoldResult, gold_summary, has_verifier

    assert has_verifier([{"prompt": [], "answer": "3"}, {"prompt": [], "answer": "x"}])
    assert not has_verifier([{"prompt": [], "task": "alpaca"}]) and not has_verifier([])
    assert not has_verifier([{"answer": "3"}, {"task": "t"}])  # a mixed set is not a verifier
    none = gold_summary(GoldResult(accuracy=None, samples=[{}] * 7))
    assert none == {"verifier": "none", "gold_prompts": 7}  # absent, never 0
    some = gold_summary(GoldResult(accuracy=0.25, samples=[{}] * 8))
    assert some["gold_accuracy"] == 0.25 and some["estimates"]["gold_accuracy"]["n"] == 8


def test_a_tied_reward_pair_counts_half():
    from stages.reward import pair_metrics

    m = pair_metrics([1.0, 2.0, 3.0, 0.0], [1.0, 0.0, 5.0, -1.0])  # tie, win, loss, win
    assert m["accuracy"] == pytest.approx(2.5 / 4)


def _prompts(tmp_path, rows):
    data = tmp_path / "data"
    write_jsonl(data / "prompts" / "train.jsonl", rows)
    return data


def test_onpolicy_pairs_are_skipped_without_a_verifier(tmp_path, caplog):
    from stages.reward import Config, policy_pairs

    data = _prompts(tmp_path, [{"prompt": [{"role": "user", "content": "Write a poem."}], "task": "mine"}])
    # No model is loaded: the prompts are read first, and without gold answers there is nothing to pair.
    train, val, stats = policy_pairs(Config(onpolicy={"enabled": True}), tmp_path / "no-model", None, data)
    assert train == [] and val == [] and stats["skipped"].startswith("no verifier")
    assert "on-policy pairs skipped" in caplog.text


@pytest.mark.parametrize("algorithm,key", [("ppo", "ppo.verifier_weight"), ("grpo", "grpo.gold_reward")])
def test_a_verifiable_reward_without_answers_is_refused_before_the_stage_starts(tmp_path, algorithm, key):
    from alignline.config import InputError
    from stages.rlhf import RLHFConfig, check_verifier_needs

    over = {"ppo": {"ppo": {"verifier_weight": 1.0}}, "grpo": {"grpo": {"gold_reward": True}}}[algorithm]
    cfg = RLHFConfig.model_validate({"algorithm": algorithm, **over})
    data = _prompts(tmp_path, [{"prompt": [{"role": "user", "content": "Hi"}], "task": "mine"}])
    with pytest.raises(InputError, match=f"{key} needs a gold `answer`"):
        check_verifier_needs(cfg, data)
    write_jsonl(data / "prompts" / "train.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}],
                                                    "answer": "2", "match": "numeric"}])
    check_verifier_needs(cfg, data)  # with answers: fine
    check_verifier_needs(RLHFConfig.model_validate({"algorithm": algorithm}), _prompts(tmp_path, [{"prompt": []}]))
