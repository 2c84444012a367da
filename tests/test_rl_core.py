"""PPO math against closed forms and plain-Python references (alignline/rl/core.py, rollout.py).

    .venv/bin/pytest tests/test_rl_core.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from alignline.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from alignline.rl.rollout import left_pad, truncate_after_eos


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


def gae_reference(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one episode at a time, in plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + (values[b][t] if t < lengths[b] else 0.0) for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 7, 3]
    T = 7
    rewards = torch.randn(5, T, generator=g, dtype=torch.float64)
    values = torch.randn(5, T, generator=g, dtype=torch.float64)
    mask = prefix_mask(lengths, T)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_gae_ignores_masked_rewards_and_values():
    g = torch.Generator().manual_seed(1)
    mask = prefix_mask([3, 5, 2], 5)
    r, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    junk = torch.randn(3, 5, generator=g) * 1e6
    a1, ret1 = compute_gae(r, v, mask, 1.0, 0.95)
    a2, ret2 = compute_gae(torch.where(mask.bool(), r, junk), torch.where(mask.bool(), v, junk), mask, 1.0, 0.95)
    assert torch.equal(a1, a2) and torch.equal(ret1, ret2)
    assert torch.all(a1[mask == 0] == 0)


def test_masked_statistics_closed_form():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(x, mask).item() == pytest.approx(real.mean().item())
    assert masked_var(x, mask).item() == pytest.approx(real.var().item())
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[mask == 0] == 0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))


def test_logprobs_and_entropy_closed_form():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]])
    tokens = torch.tensor([[2, 0]])
    lp = logprobs_from_logits(logits, tokens)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    ent = entropy_from_logits(logits)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), h2]]))


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    k1, k3 = kl_estimate(logp, logq, "k1"), kl_estimate(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert torch.all(k3 >= 0)
    assert k3.var() < k1.var()  # the point of k3
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, logq, "k2")


def test_rewards_score_on_last_token_minus_kl():
    mask = prefix_mask([3, 1], 4)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, 5.0, 5.0, 5.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.25, 0.0, 0.0, 0.0]])
    rewards, kl = compute_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [-0.75, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.1 * expected_kl
    expected[0, 2] += 2.0
    expected[1, 0] += -1.0
    torch.testing.assert_close(rewards, expected)


def test_policy_loss_ratio_one_and_clipping():
    mask = prefix_mask([3, 2], 3)
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 99.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.1]])
    loss, stats = policy_loss(old.clone(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1 - 2 + 0.5 + 3 + 1) / 5)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_var"].item() == 0.0
    # ratio 2 everywhere: positive advantages are clipped at 1.2, negative ones take the full 2x.
    new = (old + math.log(2.0)).requires_grad_()
    loss, stats = policy_loss(new, old, adv, mask, 0.2)
    per_tok = [-1.2 * 1.0, 2.0 * 2.0, -1.2 * 0.5, -1.2 * 3.0, -1.2 * 1.0]
    assert loss.item() == pytest.approx(sum(per_tok) / 5, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(4 / 5)
    loss.backward()
    # Clipped tokens get no gradient; the unclipped negative-advantage token does.
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and torch.all(new.grad[mask == 0] == 0)


def test_value_loss_takes_max_of_clipped_and_unclipped():
    mask = torch.tensor([[1, 1, 0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 1.0]])
    new = torch.tensor([[0.5, 2.0, 7.0]], requires_grad=True)
    loss, stats = value_loss(new, old, ret, mask, clip_range=0.2)
    # token 0: unclipped 0.25, clipped (0.2-1)^2=0.64 -> 0.64; token 1: unclipped 1, clipped 0.64 -> 1
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and new.grad[0, 2] == 0


def test_masked_positions_change_no_loss_and_no_grad():
    """Perturbing logits/values/old values/returns/advantages where mask==0 changes nothing."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    mask = prefix_mask([5, 2, 3], T)
    tokens = torch.randint(V, (B, T), generator=g)
    base_logits = torch.randn(B, T, V, generator=g)
    old = torch.randn(B, T, generator=g) - 2
    adv = torch.randn(B, T, generator=g)
    base_values, old_v, ret = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def run(perturb: float):
        m3 = (mask == 0)[..., None].expand(B, T, V)
        logits = torch.where(m3, base_logits + perturb * torch.randn(B, T, V, generator=g), base_logits)
        logits.requires_grad_()
        values = torch.where(mask == 0, base_values + perturb, base_values).requires_grad_()
        junk = lambda x: torch.where(mask == 0, x + perturb * 7, x)  # noqa: E731
        lp = logprobs_from_logits(logits, tokens)
        pl, _ = policy_loss(lp, junk(old), junk(adv), mask, 0.2)
        vl, _ = value_loss(values, junk(old_v), junk(ret), mask, 0.2)
        (pl + vl).backward()
        return pl.detach(), vl.detach(), logits.grad, values.grad

    a, b = run(0.0), run(1e4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.all(a[2][mask == 0] == 0) and torch.all(a[3][mask == 0] == 0)


def test_explained_variance():
    mask = prefix_mask([3, 2], 3)
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + 3.0, ret, mask) == pytest.approx(0.0, abs=1e-6)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(5.4, 100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 1000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    with pytest.raises(ValueError, match="diverged"):
        ctl.update(float("nan"), 1)


def test_truncate_after_first_eos():
    eos, pad = 2, 0
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [4, 4, 2, 0]])
    out, mask, has_eos = truncate_after_eos(resp, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [4, 4, 2, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert has_eos.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="distinct pad"):
        truncate_after_eos(resp, 2, 2)


def test_left_pad():
    ids, attn = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------- rollout sampling distribution

N_SAMPLES, T_ROLL, PROMPT = 3000, 0.7, [1, 5, 9, 13]


def _first_tokens(model, **kw):
    """N_SAMPLES first response tokens of rollout.generate on one prompt, and the model's logits there."""
    from alignline.rl.rollout import generate

    ids = torch.tensor([PROMPT] * N_SAMPLES)
    torch.manual_seed(0)
    resp = generate(model, ids, torch.ones_like(ids), max_new_tokens=1, eos_id=2, pad_id=0, **kw)
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[0, -1]
    return resp[:, 0], logits


def test_rollout_samples_the_full_tempered_softmax_with_a_large_vocab():
    # transformers 5.x fills an unset top_k with 50; with 1,000 near-uniform tokens most of the mass is
    # past rank 50, so a silent top-50 shows at once (a 16-token vocabulary hides it).
    from tests.sampling_checks import CHI2_9DF_1E4, rank_chi_square, ranks_under, spread_model

    model = spread_model(vocab_size=1000)
    tokens, logits = _first_tokens(model, temperature=T_ROLL)
    probs = torch.softmax(logits / T_ROLL, -1)
    tail = float(probs[torch.argsort(probs, descending=True)[50:]].sum())
    assert tail > 0.4  # the check below has teeth
    assert float((ranks_under(probs, tokens) >= 50).float().mean()) == pytest.approx(tail, abs=0.05)
    assert rank_chi_square(tokens, probs) < CHI2_9DF_1E4
    # ... and the temperature is really applied (T=1 would give a clearly different rank profile).
    assert rank_chi_square(tokens, torch.softmax(logits, -1)) > 3 * CHI2_9DF_1E4


def test_checkpoint_generation_config_cannot_change_rollout_sampling(tmp_path):
    """A checkpoint whose generation_config.json sets top-k 5, top-p 0.5, repetition penalty,
    suppressed tokens, min_p...: loaded as the PPO stage loads it, rollouts still sample exactly
    softmax(logits / T), and top_k=K asked by the PPO config keeps exactly the top K."""
    from tests.sampling_checks import (
        CHI2_9DF_1E4,
        leaky_checkpoint,
        load_like_the_stages,
        rank_chi_square,
        ranks_under,
    )

    model = load_like_the_stages(leaky_checkpoint(tmp_path / "ckpt", vocab_size=1000))
    tokens, logits = _first_tokens(model, temperature=T_ROLL, top_k=0, top_p=1.0)
    probs = torch.softmax(logits / T_ROLL, -1)
    assert rank_chi_square(tokens, probs) < CHI2_9DF_1E4
    assert int(ranks_under(probs, tokens).max()) >= 200

    K = 20
    tokens, _ = _first_tokens(model, temperature=T_ROLL, top_k=K)
    top = torch.zeros_like(probs)
    keep = torch.argsort(probs, descending=True)[:K]
    top[keep] = probs[keep] / probs[keep].sum()
    assert int(ranks_under(probs, tokens).max()) < K
    assert len(set(tokens.tolist())) == K  # every one of the top K appears (the checkpoint's top-5 does not win)
    assert rank_chi_square(tokens, top) < CHI2_9DF_1E4


def test_lora_wrapped_policy_hides_its_checkpoint_generation_config_too(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from alignline.rl.rollout import generate
    from tests.sampling_checks import leaky_checkpoint, load_like_the_stages, spy_processors

    model = load_like_the_stages(leaky_checkpoint(tmp_path / "ckpt", vocab_size=64))
    seen = spy_processors(monkeypatch, model)  # PEFT's generate ends in the base model's
    policy = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([PROMPT] * 4)
    generate(policy, ids, torch.ones_like(ids), max_new_tokens=3, temperature=1.0, eos_id=2, pad_id=0)
    assert seen == [[]]
    assert policy.get_base_model().generation_config.top_k == 5  # restored after the call


# --------------------------------------------------------------------------- cases mutation testing asked for


def test_policy_loss_lower_clip():
    # ratio 0.5: a negative advantage takes the clipped 0.8 (pessimistic), a positive one the unclipped 0.5.
    mask = torch.ones(1, 2, dtype=torch.long)
    old = torch.tensor([[-1.0, -2.0]])
    new = (old + math.log(0.5)).requires_grad_()
    adv = torch.tensor([[-2.0, 3.0]])
    loss, stats = policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx((0.8 * 2.0 - 0.5 * 3.0) / 2, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(0.5)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0


def test_value_loss_clips_around_nonzero_old_values_from_below():
    mask = torch.ones(1, 3, dtype=torch.long)
    old = torch.tensor([[2.0, -1.0, 0.5]])
    ret = torch.tensor([[1.0, -2.5, 0.0]])
    new = torch.tensor([[1.5, -1.1, 1.5]], requires_grad=True)
    loss, stats = value_loss(new, old, ret, mask, clip_range=0.2)
    # token 0: V 1.5 -> clip 1.8: max(0.25, 0.64) = 0.64; token 1: -1.1 inside: 1.96;
    # token 2: 1.5 -> clip 0.7: max(2.25, 0.49) = 2.25.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.96 + 2.25) / 3, rel=1e-5)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, (-1.1 + 2.5) / 3, (1.5 - 0.0) / 3]]))


def test_rewards_with_the_k3_estimator():
    mask = prefix_mask([2, 1], 3)
    logp = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, 7.0, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    rewards, kl = compute_rewards(torch.tensor([1.0, -1.0]), logp, ref, mask, beta=0.5, kl_estimator="k3")
    k3 = lambda d: math.exp(-d) - 1 + d  # noqa: E731
    expected_kl = torch.tensor([[k3(0.5), k3(-1.0), 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.5 * expected_kl
    expected[0, 1] += 1.0
    expected[1, 0] += -1.0
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="no real token"):
        compute_rewards(torch.tensor([1.0]), logp[:1], ref[:1], torch.zeros(1, 3, dtype=torch.long), beta=0.5)


def test_whiten_without_shifting_the_mean_and_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # real entries 1, 2, 3: mean 2, unbiased var 1 (biased 2/3).
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(1.0))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2 / 3))
    torch.testing.assert_close(masked_var(x[:1, :1], mask[:1, :1]), torch.tensor(0.0))  # one entry: no n-1
    s = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-s, 0.0, 0.0], [s, 0.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[2 - s, 2.0, 0.0], [2 + s, 0.0, 0.0]]))
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 3.0]))
    assert math.isnan(explained_variance(x, torch.ones_like(x), mask))  # constant returns: undefined


def test_adaptive_kl_clamps_the_error_from_below_and_checks_its_arguments():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=100)
    ctl.update(0.0, 10)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 10 / 100))
    ctl.update(3.0, 10)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.02) ** 2)
    assert AdaptiveKLController(0.1, target=1.0, horizon=1).horizon == 1  # the smallest valid horizon
    for bad in ((0.1, 0.0, 10), (0.1, 1.0, 0)):
        with pytest.raises(ValueError, match="target > 0"):
            AdaptiveKLController(*bad)
    for beta, min_beta in ((-0.1, 0.0), (-0.1, 0.5), (0.1, -0.5)):  # either one negative is refused
        with pytest.raises(ValueError, match=rf"adaptive KL needs beta >= 0 and min_beta >= 0 \(got {beta}, {min_beta}\)"):
            AdaptiveKLController(beta, 1.0, 10, min_beta=min_beta)
    with pytest.raises(ValueError, match="adaptive KL from beta 0 needs min_beta > 0, or beta could never rise"):
        AdaptiveKLController(0.0, 1.0, 10)
    assert AdaptiveKLController(0.0, 1.0, 10, min_beta=1.0).value == 0.0  # beta 0 with a floor: valid
    assert AdaptiveKLController(0.1, 1.0, 10, min_beta=0.0).min_beta == 0.0
    fixed = FixedKLController(0.3)
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3


def test_core_edge_cases_that_identity_settings_hide():
    """Cases the PPO loop rarely hits: two-entry variance, a constant to whiten, [B, T, V] entropy,
    one-token responses, the biased ratio variance, the default KL estimator and the exact messages."""
    from alignline.rl.core import RunningMoments

    x = torch.tensor([[1.0, 3.0, 7.0]])
    two = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_var(x, two), torch.tensor(2.0))  # n/(n-1) = 2 at n = 2
    torch.testing.assert_close(masked_var(x, two, unbiased=False), torch.tensor(1.0))
    const = masked_whiten(torch.full((2, 3), 5.0), torch.ones(2, 3))
    assert torch.isfinite(const).all() and const.abs().max() == 0  # var 0: the epsilon keeps it finite

    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))

    rewards, values = torch.tensor([[2.0], [0.5]]), torch.tensor([[0.5], [1.0]])
    adv, ret = compute_gae(rewards, values, torch.ones(2, 1), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, rewards - values)  # one token: A = r - V
    torch.testing.assert_close(ret, rewards)

    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.2, -1.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, stats = policy_loss(logp, old, torch.ones(1, 3), mask, 0.2)
    r = torch.exp(torch.tensor([0.2, -0.5]))
    torch.testing.assert_close(stats["ratio_var"], ((r - r.mean()) ** 2).mean())  # biased: a 2nd moment
    torch.testing.assert_close(kl_estimate(logp, old), logp - old)  # k1 by default

    with pytest.raises(ValueError, match=r"^a response has no real token \(mask all zero\); every response must keep >= 1 token$"):
        compute_rewards(torch.zeros(1), logp, old, torch.zeros(1, 3), 0.1)
    with pytest.raises(ValueError, match=r"^adaptive KL from beta 0 needs min_beta > 0, or beta could never rise$"):
        AdaptiveKLController(0.0, 1.0, 10)

    moments = RunningMoments()
    batches = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([]), torch.tensor([10.0]), torch.tensor([-3.0, 0.5])]
    for b in batches:
        moments.update(b)
    allx = torch.cat(batches).double()
    assert moments.count == 6
    assert moments.mean == pytest.approx(float(allx.mean()), abs=1e-12)
    assert moments.std == pytest.approx(float(allx.std()), abs=1e-12)  # unbiased, merged batch by batch
    assert RunningMoments().std == 0.0


def test_adaptive_kl_from_beta_zero_takes_over_only_above_target():
    ctl = AdaptiveKLController(0.0, target=2.0, horizon=10, min_beta=0.5)
    ctl.update(2.0, 1)  # exactly at target: error 0, nothing moves
    assert ctl.value == 0.0
    ctl.update(1.0, 1)  # below target: 0 stays 0
    assert ctl.value == 0.0
    ctl.update(2.2, 1)  # above target: raised to min_beta, then scaled by 1 + 0.1 * 1/10
    assert ctl.value == pytest.approx(0.5 * 1.01)


def _tiny_llama(num_labels: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      **({"num_labels": num_labels} if num_labels else {}))
    return (LlamaForSequenceClassification(cfg) if num_labels else LlamaForCausalLM(cfg)).eval()


def _tiny_gpt2(num_labels: int | None = None, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2, **({"num_labels": num_labels} if num_labels else {}))
    return (GPT2ForSequenceClassification(cfg) if num_labels else GPT2LMHeadModel(cfg)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_batches_score_like_each_row_alone(arch):
    """Left-padded prompts of different lengths: log-probs, values and RM scores of a batch equal
    those of each row run alone (the attention mask and position ids keep the pads out), T = 0.7.
    GPT-2 too: learned absolute positions, and a pad embedding that is not zero, so a forward that
    dropped the attention mask would let the pads in (Llama's zero pad rows could hide that)."""
    from alignline.rl.rollout import response_logprobs, sequence_scores, token_values

    build = _tiny_llama if arch == "llama" else _tiny_gpt2
    policy, critic = build(), build(num_labels=1, seed=1)
    prompts = [[2, 7, 8, 9, 10, 11], [2, 12, 13], [2, 14, 15, 16]]
    responses = torch.tensor([[20, 21, 1, 0], [22, 23, 24, 25], [26, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids, attn = left_pad(prompts, 0)
    qr, full = torch.cat([ids, responses], 1), torch.cat([attn, mask], 1)
    P = ids.shape[1]
    with torch.no_grad():
        logp = response_logprobs(policy, qr, full, P, 0.7)
        values = token_values(critic, qr, full, P)
        scores = sequence_scores(critic, qr, full, P, mask)
        for i, p in enumerate(prompts):
            n = int(mask[i].sum())
            one = torch.tensor([p + responses[i, :n].tolist()])
            ones = torch.ones_like(one)
            torch.testing.assert_close(logp[i, :n], response_logprobs(policy, one, ones, len(p), 0.7)[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values[i, :n], token_values(critic, one, ones, len(p))[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(scores[i], sequence_scores(critic, one, ones, len(p), torch.ones(1, n))[0],
                                       atol=1e-5, rtol=0)


def test_response_logits_compute_the_head_only_where_needed(monkeypatch):
    """logits_to_keep = R + 1 reaches a model whose forward takes it (also through a DDP-like
    `.module`), and is not passed to one that does not."""
    from alignline.rl import rollout

    model = _tiny_llama()
    seen = []
    real = model.forward

    def spy(*a, **k):
        seen.append(k.get("logits_to_keep"))
        return real(*a, **k)

    qr = torch.tensor([[2, 5, 6, 7, 8, 9]])
    monkeypatch.setattr(model, "forward", spy)
    monkeypatch.setattr(rollout, "_accepts", lambda m, name: True)
    with torch.no_grad():
        full = rollout.response_logits(model, qr, torch.ones_like(qr), 3, 1.0)
    assert seen == [4] and full.shape == (1, 3, 50)
    monkeypatch.undo()
    assert rollout._accepts(_tiny_llama(), "logits_to_keep") and not rollout._accepts(_tiny_llama(), "no_such_arg")

    class Wrapper(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group: only the `.module` lookup is exercised
            torch.nn.Module.__init__(self)
            self.module = module

    assert rollout._accepts(Wrapper(_tiny_llama()), "logits_to_keep")


def test_disable_dropout_zeroes_every_dropout_and_its_config_keys():
    """GPT-2 style names (resid_pdrop, embd_pdrop, attn_pdrop modules) and Llama/Qwen ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignline.rl.rollout import disable_dropout, position_ids_from_mask

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).train()
    for key in ("hidden_dropout", "dropout", "attention_dropout"):
        setattr(gpt2.config, key, 0.2)
    disable_dropout(gpt2)
    assert not gpt2.training
    assert all(m.p == 0.0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))
    for key in ("resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout", "attention_dropout"):
        assert getattr(gpt2.config, key) == 0.0, key
    assert gpt2.config.attn_pdrop == 0.3  # not one of the keys; its modules are zeroed above
    gpt2.train()  # even in train mode the forward is now deterministic
    x = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(gpt2(x).logits, gpt2(x).logits)

    ids, attn = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == attn.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    # absolute positions (GPT-2's learned table): the first real token is position 0, pads clamp to 0
    assert position_ids_from_mask(attn).tolist() == [[0, 1, 2], [0, 0, 0]]
    for bad in ([], [[5], []]):
        with pytest.raises(ValueError, match=r"^left_pad needs a non-empty list of non-empty token sequences$"):
            left_pad(bad, 0)


def test_left_pad_refuses_empty_input_and_positions_start_at_zero():
    """Each row's positions count from its first real token (0), as HF generate counts them; an
    empty batch, or an empty sequence in one, is refused with one message."""
    from alignline.rl.rollout import left_pad, position_ids_from_mask

    for bad in ([], [[5, 6], []]):
        with pytest.raises(ValueError, match=r"^left_pad needs a non-empty list of non-empty token sequences$"):
            left_pad(bad, 0)
    ids, attn = left_pad([[7, 8, 9], [4]], pad_id=3)
    assert ids.tolist() == [[7, 8, 9], [3, 3, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == attn.dtype == torch.long
    assert position_ids_from_mask(attn).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids_from_mask(torch.tensor([[0, 1, 1, 1]])).tolist() == [[0, 0, 1, 2]]


def _tiny_causal(arch: str):
    """A tiny causal LM of `arch` with a 50-token vocabulary (ids 0 pad, 1 eos, 2 bos)."""
    import transformers as tf

    from alignline.model import AlignlineConfig, AlignlineForCausalLM

    small = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    if arch == "alignline":
        return AlignlineForCausalLM(AlignlineConfig(**small)).eval()
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small)).eval()
    return _tiny_llama() if arch == "llama" else _tiny_gpt2()


def _ragged_batch():
    prompts = [[2, 7, 8, 9, 10, 11], [2, 12, 13], [2, 14, 15, 16]]
    responses = torch.tensor([[20, 21, 1, 0], [22, 23, 24, 25], [26, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids, attn = left_pad(prompts, 0)
    return torch.cat([ids, responses], 1), torch.cat([attn, mask], 1), ids.shape[1], mask


@pytest.mark.parametrize("arch", ["alignline", "llama", "qwen2", "gpt2", "peft"])
def test_packed_logprobs_run_the_head_on_real_tokens_only_and_equal_the_full_forward(arch):
    """response_logprobs with the response mask: the LM head sees only the 9 real response tokens
    (not 3 x 5 positions), and log-probs, entropy and their gradients equal the full forward's on
    those tokens (T = 0.7), 0 elsewhere. A PEFT-wrapped policy packs through its base model."""
    from alignline.rl import rollout

    model = _tiny_causal("llama" if arch == "peft" else arch)
    if arch == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    qr, attn, P, mask = _ragged_batch()
    full_logp, full_ent = rollout.response_logprobs(model, qr, attn, P, 0.7, with_entropy=True)
    backbone, head = rollout._packable(model)
    rows = []
    hook = head.register_forward_hook(lambda m, inp, out: rows.append(tuple(inp[0].shape)))
    logp, ent = rollout.response_logprobs(model, qr, attn, P, 0.7, with_entropy=True, mask=mask)
    hook.remove()
    assert rows == [(9, head.weight.shape[1])]
    torch.testing.assert_close(logp, full_logp * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, full_ent * mask, atol=1e-5, rtol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g_full = torch.autograd.grad((full_logp * mask).sum(), params)
    g_packed = torch.autograd.grad(logp.sum(), params)
    for a, b in zip(g_full, g_packed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_model_that_rescales_its_logits_is_scored_through_its_own_forward(caplog):
    """A causal LM whose forward is not head(backbone(x)) (here: logits / 2 after the head, as Gemma 2's
    soft-capping or Granite's logits_scaling do), or that has no output embeddings to call, is
    detected once, logged by class name, and scored with its own forward: the packed call still
    equals the full one."""
    import logging

    from transformers import LlamaForCausalLM

    from alignline.rl import rollout

    class Halved(LlamaForCausalLM):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits / 2
            return out

    plain = _tiny_llama()
    model = Halved(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    with caplog.at_level(logging.INFO, logger="alignline.rl.rollout"):
        assert rollout._packable(model) is None
    assert [r.getMessage() for r in caplog.records] == [
        "Halved: logits are not head(backbone(x)); response log-probs use its full forward"]
    headless = _tiny_llama()
    headless.get_output_embeddings = lambda: None
    assert rollout._packable(headless) is None
    assert rollout._packable(_tiny_llama()) is not None
    qr, attn, P, mask = _ragged_batch()
    with torch.no_grad():
        full = rollout.response_logprobs(model, qr, attn, P, 0.7)
        packed = rollout.response_logprobs(model, qr, attn, P, 0.7, mask=mask)
    torch.testing.assert_close(packed, full * mask, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(full * mask, rollout.response_logprobs(plain, qr, attn, P, 0.7) * mask)
        torch.testing.assert_close(rollout.response_logprobs(headless, qr, attn, P, 0.7, mask=mask),
                                   rollout.response_logprobs(headless, qr, attn, P, 0.7) * mask, atol=1e-6, rtol=0)
