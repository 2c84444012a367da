"""The PPO trainer (alignline/rl/ppo.py) against hand-written references, at settings where bugs show.

    .venv/bin/pytest tests/test_ppo_reference.py -q

Why a second trainer file: at temperature 1, reward mean 0 / std 1, one minibatch and no gradient
accumulation, many PPO paths are the identity, and a review found injected bugs that
tests/test_ppo_trainer.py let through (log-probs at T=1, whitening over padding, no zero_grad, ...).
Everything here runs at T=0.7, reward mean 1.3 / std 0.4, several minibatches, grad_accum_steps > 1
and a 64-token vocabulary, and compares the trainer with plain loops written out below: per-token
rewards + GAE + whitening, the micro-batch loss, the optimizer loop (zero_grad, accumulation scaling,
clipping, epochs, every rollout once per epoch), the adaptive KL update and the RM read position.
Each test takes a second or two; `make mutation` runs this file.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from alignline.rl.core import FixedKLController
from alignline.rl.ppo import KLArgs, PPOArgs, PPOTrainer, Rollout
from alignline.rl.rollout import response_logprobs, token_values
from tests import ppo_fixtures
from tests.ppo_fixtures import llama_config

PAD, EOS, BOS, V = 0, 1, 2, 64
T_ROLL, MEAN, STD = 0.7, 1.3, 0.4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's `one_thread`)."""


def tiny_cfg(**kw):
    return llama_config(V, PAD, EOS, BOS, **kw)


def make_models(seed=0):
    return ppo_fixtures.make_models(tiny_cfg, seed)


def prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def args(**kw):
    base = dict(rollout_batch_size=16, forward_batch_size=8, mini_batch_size=4, grad_accum_steps=2, ppo_epochs=2,
                max_new_tokens=6, temperature=T_ROLL, gamma=0.95, lam=0.9, vf_coef=0.5, kl=KLArgs(beta=0.1),
                optim={"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0})
    base.update(kw)
    return PPOArgs(**base)


def trainer(a, seed=0, eos_id=EOS):
    policy, ref, value, rm = make_models(seed)
    return PPOTrainer(a, policy, value, rm, ref_policy=ref, eos_id=eos_id, pad_id=PAD, reward_mean=MEAN,
                      reward_std=STD)


def trainable(t):
    return [p.detach().clone() for p in t.params]


# --------------------------------------------------------------------------- invariants at T != 1


def test_first_minibatch_ratio_one_and_kl_zero_at_temperature_07():
    t = trainer(args())
    torch.manual_seed(1)
    m = t.step(prompts())
    first = t.first_minibatch_stats
    # The training forward must score the same tempered distribution the rollout sampled from,
    # and the reference must be read at the same temperature as the policy.
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["ratio_var"] == pytest.approx(0.0, abs=1e-10)
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert first["clipfrac"] == 0.0
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["approx_kl"] > 0  # later minibatches did move the policy
    ro = t.last_rollout
    with torch.no_grad():
        logits = t.ref_policy(input_ids=ro.query_response, attention_mask=ro.attention_mask,
                              position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
        P = ro.context_len
        want = torch.log_softmax(logits[:, P - 1 : -1] / T_ROLL, -1).gather(-1, ro.responses[..., None])[..., 0]
    torch.testing.assert_close(ro.logprobs * ro.mask, want * ro.mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.ref_logprobs * ro.mask, want * ro.mask, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- rewards, GAE, whitening


def whiten_reference(rows: list[list[float]], lengths: list[int], shift_mean: bool) -> list[list[float]]:
    real = [x for r, n in zip(rows, lengths) for x in r[:n]]
    mean = sum(real) / len(real)
    var = sum((x - mean) ** 2 for x in real) / (len(real) - 1)
    scale = 1 / math.sqrt(var + 1e-8)
    return [[((x - mean) * scale + (0.0 if shift_mean else mean)) if t < n else 0.0 for t, x in enumerate(r)]
            for r, n in zip(rows, lengths)]


def advantages_reference(scores, logp, ref, values, lengths, beta, estimator, gamma, lam, whiten_r, whiten_a):
    """Per-token rewards (-beta KL + score on the last real token), textbook GAE one episode at a
    time, optional whitening over real tokens only; plain Python floats."""
    B, T = len(logp), len(logp[0])
    kl = [[0.0] * T for _ in range(B)]
    rewards = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(lengths[b]):
            d = logp[b][t] - ref[b][t]
            kl[b][t] = d if estimator == "k1" else math.exp(-d) - 1 + d
            rewards[b][t] = -beta * kl[b][t]
        rewards[b][lengths[b] - 1] += scores[b]
    if whiten_r:
        rewards = whiten_reference(rewards, lengths, shift_mean=False)
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n, last = lengths[b], 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            last = rewards[b][t] + gamma * next_v - values[b][t] + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    if whiten_a:
        adv = whiten_reference(adv, lengths, shift_mean=True)
    return rewards, kl, adv, ret


@pytest.fixture(scope="module")
def any_trainer():
    return trainer(args())


@pytest.mark.parametrize(("gamma", "lam", "estimator", "whiten_r", "whiten_a"), [
    (0.9, 0.6, "k1", False, True),
    (0.8, 0.95, "k3", True, True),
    (0.95, 0.9, "k3", False, False),
    (1.0, 0.5, "k1", True, False),
])
def test_compute_advantages_matches_a_python_loop(any_trainer, gamma, lam, estimator, whiten_r, whiten_a):
    g = torch.Generator().manual_seed(4)
    lengths = [6, 1, 4, 6, 2, 3]
    B, T = len(lengths), 6
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # Junk at padded positions: nothing may read it.
    junk = lambda x: torch.where(mask.bool(), x, torch.full_like(x, 1e3))  # noqa: E731
    logp, ref, values = junk(rnd(B, T) - 2), junk(rnd(B, T) - 2), junk(rnd(B, T) + 0.5)
    scores = rnd(B) + 1.0
    z = torch.zeros(B, T)
    ro = Rollout(query_response=torch.zeros(B, T + 1, dtype=torch.long), attention_mask=torch.ones(B, T + 1),
                 context_len=1, mask=mask, has_eos=torch.ones(B, dtype=torch.bool), logprobs=logp,
                 ref_logprobs=ref, entropy=z, values=values, raw_scores=scores, scores=scores)
    t = any_trainer
    t.args = args(gamma=gamma, lam=lam, whiten_rewards=whiten_r, whiten_advantages=whiten_a,
                  kl=KLArgs(beta=0.3, estimator=estimator))
    t.kl_ctl = FixedKLController(0.3)
    t.compute_advantages(ro)
    want = advantages_reference(scores.tolist(), logp.tolist(), ref.tolist(), values.tolist(), lengths, 0.3,
                                estimator, gamma, lam, whiten_r, whiten_a)
    rewards, kl, adv, ret = (torch.tensor(x, dtype=torch.float64) for x in want)
    torch.testing.assert_close(ro.kl, kl)
    torch.testing.assert_close(ro.rewards * mask, rewards)
    torch.testing.assert_close(ro.advantages, adv)
    torch.testing.assert_close(ro.returns, ret)


# --------------------------------------------------------------------------- the micro-batch loss


def test_micro_loss_matches_the_clipped_objectives_written_out():
    """After the policy and critic moved off the rollout, `_micro_loss` is exactly
    -min(r A, clip(r) A) + vf_coef * 0.5 max((V-R)^2, (clip(V, V_old +- eps) - R)^2), with log-probs at
    the rollout temperature and values on the normalised reward scale."""
    t = trainer(args())
    torch.manual_seed(2)
    ro = t.compute_advantages(t.rollout(prompts()))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in t.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in t.value_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.tensor([0, 3, 5, 6])
    loss, stats, ntok = t._micro_loss(ro, idx)

    qr, attn, mask, P = ro.query_response[idx], ro.attention_mask[idx], ro.mask[idx].bool(), ro.context_len
    with torch.no_grad():
        logp = response_logprobs(t.policy, qr, attn, P, T_ROLL)
        v = (token_values(t.value_model, qr, attn, P) - MEAN) / STD
    old, adv = ro.logprobs[idx], ro.advantages[idx]
    v_old, ret = ro.values[idx], ro.returns[idx]
    ratio = torch.exp(logp - old)
    pg_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    v_clip = v_old + (v - v_old).clamp(-0.2, 0.2)
    vf_tok = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    pg, vf = pg_tok[mask].mean(), vf_tok[mask].mean()
    assert ntok == int(mask.sum())
    assert 0 < float(stats["clipfrac"]) < 1 and 0 < float(stats["vf_clipfrac"]) < 1  # both clips are live
    torch.testing.assert_close(stats["policy_loss"], pg, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["value_loss"], vf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), pg + 0.5 * vf, atol=1e-6, rtol=1e-5)
    loss.backward()  # both models get a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.value_model.score.parameters())
    assert t.policy.lm_head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the optimizer loop


def ragged_rollout(t, n=16):
    """A scored rollout whose responses hold 1, 2, ..., max_new_tokens real tokens in turn: sampled at
    full length (EOS is out of the vocabulary), then cut. Log-probs and values are causal, so those
    of the kept positions are exact; the advantages are computed on the cut rollout. The micro-batches
    of a minibatch then hold different numbers of tokens, where only a minibatch-wide token mean
    makes k accumulated micro-batches one batch."""
    torch.manual_seed(5)
    ro = t.rollout(prompts(n))
    B, R = ro.mask.shape
    assert R == t.args.max_new_tokens
    keep = torch.arange(R)[None, :] < (torch.arange(B) % R + 1)[:, None]
    P = ro.context_len
    ro.query_response[:, P:] = torch.where(keep, ro.query_response[:, P:], PAD)
    ro.attention_mask[:, P:] = keep.long()
    ro.mask = keep.long()
    return t.compute_advantages(ro)


def sgd(t, lr):
    """Plain SGD for the policy and for the critic (each has its own optimizer)."""
    t.optimizer = torch.optim.SGD(t.policy_params, lr=lr)
    t.critic_optimizer = torch.optim.SGD(t.critic_params, lr=lr)
    return t.optimizer, t.critic_optimizer


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_optimize_equals_a_plain_minibatch_loop(grad_clip):
    """optimize() == for each epoch, for each minibatch of a fresh permutation: zero_grad, the loss of
    the whole minibatch in one piece, backward, clip, step. Ragged responses, so micro-batches
    weighted by anything but their share of the minibatch's tokens show, and so does a length-sorted
    split that changed what a minibatch holds. SGD, so a gradient scaled by k or piled up across
    minibatches shows (Adam would normalise it away); grad_clip 0.05 is below every gradient norm
    here, so ignoring it shows too."""
    a = args(grad_accum_steps=2, optim={"lr": 1e-2, "weight_decay": 0.0, "grad_clip": grad_clip})
    t = trainer(a, eos_id=V)
    ro = ragged_rollout(t)
    ref = copy.deepcopy(t)
    lr = 0.1 if grad_clip else 0.01  # unclipped, lr 0.1 makes the critic's steps diverge
    sgd(t, lr)
    t.optimize(copy.deepcopy(ro), torch.Generator().manual_seed(11))

    opts = sgd(ref, lr)
    gen = torch.Generator().manual_seed(11)
    norms = []
    for _ in range(a.ppo_epochs):
        perm = torch.randperm(a.rollout_batch_size, generator=gen)
        for s in range(0, a.rollout_batch_size, a.mini_batch_size):
            for opt in opts:
                opt.zero_grad()
            loss, _, _ = ref._micro_loss(ro, perm[s : s + a.mini_batch_size])
            loss.backward()
            if grad_clip:  # policy and critic are clipped each on its own norm
                norms += [float(torch.nn.utils.clip_grad_norm_(ps, grad_clip))
                          for ps in (ref.policy_params, ref.critic_params)]
            for opt in opts:
                opt.step()
    assert all(n > 2 * grad_clip for n in norms)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(ref.params, make_models()[0].parameters()))
    assert moved > 5e-4
    # Eight SGD steps with another summation order: float rounding stays ~1e-6, far below any bug (unclipped
    # at lr 0.1, the critic's gradient norm grows to ~1e3 and amplifies that rounding to ~1e-2).
    for p, q in zip(t.params, ref.params):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulating_k_micro_batches_is_one_batch(optimizer):
    """One optimizer step over 8 rollouts of 1..6 tokens: 4 accumulated micro-batches of 2 == one batch of 8."""
    params = []
    for k in (1, 4):
        a = args(rollout_batch_size=8, mini_batch_size=8, grad_accum_steps=k, ppo_epochs=1,
                 optim={"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 0.0, "eps": 1e-4})
        t = trainer(a, eos_id=V)
        if optimizer == "sgd":
            sgd(t, 0.5)
        ro = ragged_rollout(t, 8)
        assert len(set(ro.mask.sum(1).tolist())) == 6
        t.optimize(ro, torch.Generator().manual_seed(3))
        params.append(trainable(t))
    before = [p.detach() for p in trainer(args(), eos_id=V).params]
    assert max(float((p - q).abs().max()) for p, q in zip(params[0], before)) > 1e-3
    # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 an element whose gradient is near eps turns
    # summation-order rounding into up to ~1e-2 * lr (7.8e-5 measured); eps 1e-4 keeps that below 1e-6.
    # A dropped or doubled micro-batch, or one weighted by anything but its token share, moves elements by ~lr.
    atol = 1e-6 if optimizer == "sgd" else 1e-5
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5)


def test_every_rollout_is_trained_on_once_per_epoch(monkeypatch):
    a = args(ppo_epochs=3)
    t = trainer(a)
    torch.manual_seed(6)
    ro = t.compute_advantages(t.rollout(prompts()))
    seen = []
    real = t._micro_loss

    def spy(r, idx):
        seen.append(idx.tolist())
        return real(r, idx)

    monkeypatch.setattr(t, "_micro_loss", spy)
    t.optimize(ro, torch.Generator().manual_seed(0))
    per_epoch = a.rollout_batch_size // a.mini_batch_size * a.grad_accum_steps
    assert len(seen) == a.ppo_epochs * per_epoch
    micro = a.mini_batch_size // a.grad_accum_steps
    assert all(len(i) == micro for i in seen)
    for e in range(a.ppo_epochs):
        assert sorted(x for i in seen[e * per_epoch : (e + 1) * per_epoch] for x in i) == list(range(16))
    assert seen[:per_epoch] != seen[per_epoch : 2 * per_epoch]  # a fresh permutation each epoch


def test_micro_batches_are_cut_from_each_minibatch_by_length_and_trimmed(monkeypatch):
    """Each minibatch (the rows a fresh permutation puts in it) is cut into micro-batches of ascending
    response length, so every micro-batch's forward is trimmed to its own longest response and
    prompt: with ragged responses the trained positions add up to less than the untrimmed layout's."""
    a = args(rollout_batch_size=16, mini_batch_size=8, grad_accum_steps=4, ppo_epochs=2)
    t = trainer(a, eos_id=V)
    ro = ragged_rollout(t)
    gen = torch.Generator().manual_seed(4)
    g2 = torch.Generator().manual_seed(4)
    perms = [torch.randperm(16, generator=g2).tolist() for _ in range(2)]
    seen, widths = [], []
    real_fwd = t.policy_fwd.forward

    def spy_fwd(qr=None, attn=None, *rest, **kw):
        if qr is not None:
            widths.append(qr.shape[1])
        return real_fwd(qr, attn, *rest, **kw)

    real = t._micro_loss

    def spy(r, idx):
        seen.append(idx.tolist())
        return real(r, idx)

    monkeypatch.setattr(t, "_micro_loss", spy)
    monkeypatch.setattr(t.policy_fwd, "forward", spy_fwd)
    t.optimize(ro, gen)
    lengths = ro.mask.sum(1).tolist()
    prompt_len = ro.attention_mask[:, : ro.context_len].sum(1).tolist()
    assert len(seen) == 2 * 2 * 4 and all(len(i) == 2 for i in seen)  # epochs x minibatches x micro-batches
    for m in range(4):
        rows = [x for i in seen[m * 4 : (m + 1) * 4] for x in i]
        epoch, start = divmod(m, 2)
        assert sorted(rows) == sorted(perms[epoch][start * 8 : (start + 1) * 8])  # the minibatch's own rows
        keys = [(lengths[x], prompt_len[x]) for x in rows]
        assert keys == sorted(keys)
    for i, w in zip(seen, widths, strict=True):
        assert w == max(prompt_len[x] for x in i) + max(lengths[x] for x in i)
    assert sum(widths) < len(seen) * ro.query_response.shape[1]


def test_critic_moves_towards_the_returns():
    t = trainer(args(ppo_epochs=4, vf_coef=1.0, clip_range_value=10.0))
    torch.manual_seed(7)
    ro = t.compute_advantages(t.rollout(prompts()))

    def value_error():
        with torch.no_grad():
            v = (token_values(t.value_model, ro.query_response, ro.attention_mask, ro.context_len) - MEAN) / STD
        return float(((v - ro.returns) ** 2)[ro.mask.bool()].mean())

    before = value_error()
    t.optimize(ro, torch.Generator().manual_seed(0))
    assert value_error() < 0.7 * before, (before, value_error())


# --------------------------------------------------------------------------- adaptive KL, RM position


def test_adaptive_kl_is_fed_the_per_sequence_kl():
    """Ziegler's controller targets KL per sequence (summed over tokens), not per token."""
    a = args(kl=KLArgs(beta=0.1, adaptive=True, target=1.0, horizon=64))
    t = trainer(a)
    torch.manual_seed(8)
    with torch.no_grad():
        for p in t.ref_policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ps = prompts()
    torch.manual_seed(9)
    probe = t.compute_advantages(t.rollout(ps))
    kl_seq = float(probe.kl.sum(1).mean())
    assert kl_seq > 0.05
    # Target 0.95x the per-sequence KL: error +0.053, not clipped; a per-token KL would be clipped at -0.2.
    t.kl_ctl.target = kl_seq / 1.0526
    torch.manual_seed(9)
    m = t.step(ps)
    assert m["kl"] == pytest.approx(kl_seq, rel=1e-5)
    error = kl_seq / t.kl_ctl.target - 1
    assert t.kl_ctl.value == pytest.approx(0.1 * (1 + error * 16 / 64), rel=1e-5)
    assert m["beta"] == 0.1


def test_rollout_reads_the_rm_at_each_rows_last_real_token():
    t = trainer(args(rollout_batch_size=32, forward_batch_size=32, mini_batch_size=8, max_new_tokens=8))
    torch.manual_seed(0)
    ps = prompts(32, seed=1)
    ro = t.rollout(ps)
    lengths = ro.mask.sum(1)
    assert int(lengths.min()) < int(lengths.max()) == ro.mask.shape[1], "need responses of different lengths"
    with torch.no_grad():
        want = torch.stack([
            t.reward_model(input_ids=torch.tensor([p + ro.responses[i, : int(lengths[i])].tolist()])).logits[0, 0]
            for i, p in enumerate(ps)
        ])
    torch.testing.assert_close(ro.raw_scores, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.scores, (want - MEAN) / STD - (~ro.has_eos).float())
