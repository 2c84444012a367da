"""PPO trainer invariants on tiny HF Llama models built in code (alignline/rl/ppo.py).

    .venv/bin/pytest tests/test_ppo_trainer.py -q

Checks: ratio == 1 and approx_kl == 0 on the first minibatch; one forward per model per
rollout; garbage after EOS changes no loss or gradient; the RM score goes up with beta = 0;
a huge beta keeps the policy at the reference; a LoRA policy uses its own base as reference;
a resumed trainer continues exactly like an uninterrupted one; log-probs are those of the
temperature-scaled sampling distribution; the trainer turns dropout off in all four models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from alignline.rl.ppo import KLArgs, PPOArgs, PPOTrainer
from alignline.rl.rollout import response_logits, response_logprobs
from tests import ppo_fixtures
from tests.ppo_fixtures import ThreadCollective, llama_config

PAD, EOS, BOS, V = 0, 1, 2, 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's `one_thread`)."""


def tiny_cfg(**kw):
    return llama_config(V, PAD, EOS, BOS, **kw)


def make_models(seed=0):
    return ppo_fixtures.make_models(tiny_cfg, seed)


def prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        out.append([BOS] + torch.randint(3, V, (k,), generator=g).tolist())
    return out


def args(**kw):
    base = dict(
        rollout_batch_size=16,
        forward_batch_size=16,
        mini_batch_size=8,
        grad_accum_steps=2,
        ppo_epochs=2,
        max_new_tokens=6,
        kl=KLArgs(beta=0.05),
        optim={"lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0},
    )
    base.update(kw)
    return PPOArgs(**base)


def trainer(a, seed=0, **kw):
    policy, ref, value, rm = make_models(seed)
    return PPOTrainer(a, policy, value, rm, ref_policy=ref, eos_id=EOS, pad_id=PAD, **kw)


def test_one_forward_per_model_per_rollout(monkeypatch):
    import alignline.rl.ppo as ppo_mod

    t = trainer(args(forward_batch_size=16))
    calls = {"policy": 0, "ref": 0, "value": 0, "rm": 0}
    in_generate = [False]

    def count(model, key):
        orig = model.forward

        def wrapped(*a, **k):
            if not in_generate[0]:
                calls[key] += 1
            return orig(*a, **k)

        monkeypatch.setattr(model, "forward", wrapped)

    count(t.policy, "policy")
    count(t.ref_policy, "ref")
    count(t.value_model.model, "value")
    count(t.reward_model.model, "rm")
    real_generate = ppo_mod.generate

    def generate(*a, **k):  # the policy's per-token forwards inside generate are not counted
        in_generate[0] = True
        try:
            return real_generate(*a, **k)
        finally:
            in_generate[0] = False

    monkeypatch.setattr(ppo_mod, "generate", generate)
    torch.manual_seed(0)
    ro = t.rollout(prompts())
    assert calls == {"policy": 1, "ref": 1, "value": 1, "rm": 1}
    assert ro.logprobs.shape == ro.mask.shape == ro.values.shape == ro.entropy.shape


def test_values_are_read_on_the_normalised_reward_scale():
    """The critic starts as a copy of the RM: its outputs go through the scores' (x - mean) / std."""
    from alignline.rl.rollout import token_values

    t = trainer(args())
    t.reward_mean, t.reward_std = 4.5, 2.0
    torch.manual_seed(6)
    ro = t.rollout(prompts())
    raw = token_values(t.value_model, ro.query_response, ro.attention_mask, ro.context_len)
    torch.testing.assert_close(ro.values, (raw - 4.5) / 2.0)


def test_rollout_masks_after_eos_and_penalises_missing_eos():
    t = trainer(args(missing_eos_penalty=3.0, max_new_tokens=4))
    torch.manual_seed(2)
    ro = t.rollout(prompts(32))
    resp = ro.responses
    for i in range(len(resp)):
        n = int(ro.mask[i].sum())
        assert torch.all(resp[i, n:] == PAD)
        assert bool(ro.has_eos[i]) == bool(EOS in resp[i, :n].tolist())
        if ro.has_eos[i]:
            assert resp[i, n - 1] == EOS and EOS not in resp[i, : n - 1].tolist()
    expected = (ro.raw_scores - t.reward_mean) / t.reward_std - 3.0 * (~ro.has_eos).float()
    torch.testing.assert_close(ro.scores, expected)


def test_tokens_after_eos_change_no_loss_or_gradient():
    t = trainer(args())
    torch.manual_seed(3)
    ro = t.compute_advantages(t.rollout(prompts()))
    assert (ro.mask == 0).any(), "need some masked positions for this test"
    idx = torch.arange(8)

    def loss_and_grads(r):
        t.optimizer.zero_grad()
        t.critic_optimizer.zero_grad()
        loss, _, _ = t._micro_loss(r, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in t.params if p.grad is not None]

    base = loss_and_grads(ro)
    junk = copy.copy(ro)
    P, masked = ro.context_len, ro.mask == 0
    qr = ro.query_response.clone()
    qr[:, P:][masked] = torch.randint(3, V, (int(masked.sum()),))
    junk.query_response = qr
    for f in ("logprobs", "values", "advantages", "returns"):
        setattr(junk, f, torch.where(masked, getattr(ro, f) + 1e3, getattr(ro, f)))
    other = loss_and_grads(junk)
    assert torch.allclose(base[0], other[0], atol=1e-6, rtol=0)
    for g1, g2 in zip(base[1], other[1]):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=0)


def test_verifier_adds_its_weighted_score_and_logs_rollout_gold():
    t = trainer(args(verifier_weight=2.0, missing_eos_penalty=0.5))
    torch.manual_seed(5)
    seen = {}

    def verifier(responses, mask):  # "correct" = the first response token is even
        seen["shape"], seen["mask"] = tuple(responses.shape), mask.clone()
        return (responses[:, 0] % 2 == 0).float()

    m = t.step(prompts(), verifier=verifier)
    ro = t.last_rollout
    v = (ro.responses[:, 0] % 2 == 0).float()
    assert seen["shape"] == tuple(ro.responses.shape)
    torch.testing.assert_close(seen["mask"], ro.mask)  # the verifier is told where each response ends
    torch.testing.assert_close(ro.verified, v)
    rm_only = (ro.raw_scores - t.reward_mean) / t.reward_std - 0.5 * (~ro.has_eos).float()
    torch.testing.assert_close(ro.scores, rm_only + 2.0 * v)
    assert m["rollout_gold_accuracy"] == pytest.approx(float(v.mean()))
    assert m["score_rm"] == pytest.approx(float(rm_only.mean()), abs=1e-6)
    # The iteration's time split: sampling + scoring = the rollout phase; tokens/s counts kept tokens.
    assert m["generation_s"] > 0 and m["scoring_s"] > 0 and m["train_s"] > 0
    assert m["generation_s"] + m["scoring_s"] == pytest.approx(m["rollout_s"])
    assert m["generation_tokens_per_s"] == pytest.approx(float(ro.mask.sum()) / m["generation_s"])

    with pytest.raises(ValueError, match="one score per response"):
        t.rollout(prompts(), verifier=lambda r, mk: torch.zeros(3))


def test_reward_goes_up_without_kl():
    # Sized for the mutation lane (about a second): 6 steps at a high lr gain about 0.5.
    t = trainer(args(kl=KLArgs(beta=0.0), optim={"lr": 2e-2, "weight_decay": 0.0}), seed=4)
    torch.manual_seed(4)
    ps = prompts(16, seed=4)
    scores = [t.step(ps)["score"] for _ in range(6)]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3, scores


def _kl_to_ref(t, ps):
    """Exact KL(policy || ref) summed over the response positions of fresh samples."""
    with torch.no_grad():
        ro = t.rollout(ps)
        args = (ro.query_response, ro.attention_mask, ro.context_len, 1.0)
        logp = torch.log_softmax(response_logits(t.policy, *args), -1)
        logq = torch.log_softmax(response_logits(t.ref_policy, *args), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        return float((kl * ro.mask).sum(1).mean())


def test_huge_beta_keeps_policy_at_reference():
    def final_kl(beta):
        # 4 steps at a high lr: the free policy drifts (KL about 1.7), the tied one stays (about 0.16)
        t = trainer(args(kl=KLArgs(beta=beta), optim={"lr": 1e-2, "weight_decay": 0.0}), seed=5)
        torch.manual_seed(5)
        ps = prompts(16, seed=5)
        for _ in range(4):
            t.step(ps)
        torch.manual_seed(99)
        return _kl_to_ref(t, ps)

    free, tied = final_kl(0.0), final_kl(1e3)
    assert free > 0.5, free
    assert tied < 0.15 * free, (tied, free)


def test_lora_policy_uses_its_base_as_reference():
    from peft import LoraConfig, get_peft_model

    policy, _, value, rm = make_models(6)
    base_copy = copy.deepcopy(policy)
    lora = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    t = PPOTrainer(args(optim={"lr": 3e-2, "weight_decay": 0.0}), lora, value, rm, eos_id=EOS, pad_id=PAD)
    torch.manual_seed(6)
    ps = prompts()
    for _ in range(2):
        t.step(ps)
    ro = t.last_rollout
    with torch.no_grad():
        ref = response_logprobs(base_copy, ro.query_response, ro.attention_mask, ro.context_len, 1.0)
    # Scored on the real response tokens only (packed): 0 past each response's end.
    torch.testing.assert_close(ro.ref_logprobs, ref * ro.mask, atol=1e-5, rtol=0)
    assert not torch.allclose(ro.logprobs, ro.ref_logprobs)  # the adapter did learn something
    with pytest.raises(ValueError, match="ref_policy"):
        PPOTrainer(args(), base_copy, value, rm, eos_id=EOS, pad_id=PAD)


RESUME_SETTINGS = {
    # adaptive KL, default normalisation
    "adaptive-kl": (dict(kl=KLArgs(beta=0.1, adaptive=True, target=1.0, horizon=100)), {}),
    # everything else the state carries, off its identity values: running reward statistics (and the
    # critic's value_norm), a warmup + linear decay schedule with the critic's own lr, T != 1
    "running-norm-schedule": (
        dict(kl=KLArgs(beta=0.1, adaptive=True, target=1.0, horizon=100), reward_norm="running",
             lr_schedule="linear", warmup_iterations=1, min_lr_ratio=0.1, critic_lr=1e-3, temperature=0.7),
        dict(reward_mean=1.3, reward_std=0.4, total_iterations=4),
    ),
}


@pytest.mark.parametrize("setting", list(RESUME_SETTINGS))
def test_resume_continues_exactly(setting):
    arg_kw, trainer_kw = RESUME_SETTINGS[setting]
    a = args(**arg_kw)
    ps = prompts()
    full = trainer(a, **trainer_kw)
    torch.manual_seed(7)
    full.step(ps)
    state = copy.deepcopy(full.state_dict())
    rng = torch.get_rng_state()
    expected = full.step(ps)

    # Frozen models come from their checkpoints again; the trained ones are scrambled so that
    # everything they hold must come from the saved state. The statistics start elsewhere too.
    resumed = trainer(a, **{**trainer_kw, "reward_mean": -0.5, "reward_std": 2.0})
    with torch.no_grad():
        for p in list(resumed.policy.parameters()) + list(resumed.value_model.parameters()):
            p.add_(torch.randn_like(p))
    resumed.load_state_dict(state)
    assert resumed.reward_norm_state() == state["reward_norm"]
    assert resumed.step_count == full.step_count - 1
    torch.set_rng_state(rng)
    got = resumed.step(ps)
    for k in ("score", "kl", "policy_loss", "value_loss", "beta", "approx_kl", "reward_mean", "reward_std"):
        assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k
    for model in ("policy", "value_model"):
        for (n, p1), p2 in zip(getattr(full, model).named_parameters(), getattr(resumed, model).parameters()):
            torch.testing.assert_close(p1, p2, msg=n)
    for opt in ("optimizer", "critic_optimizer"):
        assert [g["lr"] for g in getattr(resumed, opt).param_groups] == [g["lr"] for g in getattr(full, opt).param_groups]
    if setting == "running-norm-schedule":
        assert full.value_norm == (1.3, 0.4) and full.reward_mean != 1.3  # the moments moved, the critic's scale did not
        assert resumed.value_norm == full.value_norm
        assert full.critic_optimizer.param_groups[0]["lr"] != full.optimizer.param_groups[0]["lr"]
        # An extended run (4 -> 8 iterations): the lr after loading follows the new schedule, the one an
        # 8-iteration run has after the same step, not the saved 4-iteration one.
        longer = {**trainer_kw, "total_iterations": 8}
        state2 = full.state_dict()  # after 2 iterations: past the warmup, into the decay
        ran8 = trainer(a, **longer)
        torch.manual_seed(7)
        ran8.step(ps)
        ran8.step(ps)
        ext = trainer(a, **longer)
        ext.load_state_dict(state2)
        for opt in ("optimizer", "critic_optimizer"):
            want = [g["lr"] for g in getattr(ran8, opt).param_groups]
            assert [g["lr"] for g in getattr(ext, opt).param_groups] == pytest.approx(want, rel=1e-12), opt
            assert want != [g["lr"] for g in state2[opt]["param_groups"]], "the schedules must differ here"


def test_resume_refuses_a_state_without_every_trainable_weight():
    a = args()
    t = trainer(a)
    state = t.state_dict()
    name = next(iter(state["weights"]["value_model"]))
    del state["weights"]["value_model"][name]
    with pytest.raises(ValueError, match=rf"no weights for value_model parameters \['{name}'\].*state/ dir"):
        trainer(a).load_state_dict(state)


def test_gather_rollout_builds_the_global_batch_of_all_ranks(monkeypatch):
    """Two ranks (threads over an in-memory collective, so no process group is needed) with different
    prompt and response widths: each gets the concatenation in rank order, prompts re-padded on the
    left with pad_id (mask 0), responses on the right with zeros, the slowest rank's generation time.
    pad_id is 13 here, not 0, so padding with zeros instead of pad_id shows."""
    pad = 13
    import threading
    from types import SimpleNamespace

    import alignline.rl.ppo as ppo_mod
    from alignline.distributed import DistInfo
    from alignline.rl.ppo import Rollout

    exchange = ThreadCollective(2).exchange
    monkeypatch.setattr(ppo_mod, "all_reduce_max", lambda x, d: max(exchange(d.rank, x)))
    monkeypatch.setattr(ppo_mod, "all_gather_cat", lambda t, d: torch.cat(exchange(d.rank, t)))

    def rollout(b, P, R, seed, gen_s):
        g = torch.Generator().manual_seed(seed)
        qr = torch.randint(3, V, (b, P + R), generator=g)
        attn = torch.ones(b, P + R, dtype=torch.long)
        attn[0, 0] = 0  # a left-padded prompt
        qr[0, 0] = pad
        mask = torch.ones(b, R)
        mask[-1, R - 1] = 0
        f = lambda: torch.rand(b, R, generator=g)  # noqa: E731
        return Rollout(query_response=qr, attention_mask=attn, context_len=P, mask=mask,
                       has_eos=torch.tensor([True] * (b - 1) + [False]), logprobs=f(), ref_logprobs=f(),
                       entropy=f(), values=f(), raw_scores=torch.rand(b, generator=g),
                       scores=torch.rand(b, generator=g), verified=torch.rand(b, generator=g),
                       generation_s=gen_s)

    local = [rollout(3, 4, 5, seed=0, gen_s=0.5), rollout(2, 6, 3, seed=1, gen_s=0.9)]
    out: dict[int, Rollout] = {}

    def run(rank):
        me = SimpleNamespace(dist=DistInfo(rank=rank, world_size=2, local_rank=rank), pad_id=pad)
        out[rank] = PPOTrainer.gather_rollout(me, local[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert set(out) == {0, 1}
    P, R = 6, 5
    r0, r1 = local
    expect_qr = torch.cat([torch.cat([torch.full((3, 2), pad), r0.query_response[:, :4], r0.query_response[:, 4:]], 1),
                           torch.cat([r1.query_response[:, :6], r1.query_response[:, 6:], torch.full((2, 2), pad)], 1)])
    expect_attn = torch.cat([torch.cat([torch.zeros(3, 2, dtype=torch.long), r0.attention_mask], 1),
                             torch.cat([r1.attention_mask, torch.zeros(2, 2, dtype=torch.long)], 1)])

    def right(t0, t1):
        return torch.cat([t0, torch.cat([t1, torch.zeros(2, 2)], 1)])

    for rank in (0, 1):
        g = out[rank]
        assert g.context_len == P and g.mask.shape == (5, R) and g.generation_s == 0.9
        assert torch.equal(g.query_response, expect_qr) and torch.equal(g.attention_mask, expect_attn)
        for field in ("mask", "logprobs", "ref_logprobs", "entropy", "values"):
            assert torch.equal(getattr(g, field), right(getattr(r0, field), getattr(r1, field))), field
        for field in ("has_eos", "raw_scores", "scores", "verified"):
            assert torch.equal(getattr(g, field), torch.cat([getattr(r0, field), getattr(r1, field)])), field
        assert torch.equal(g.responses[3:, :3], r1.responses)
    # One process: the rollout comes back as is; a rollout with advantages is refused.
    single = SimpleNamespace(dist=DistInfo(), pad_id=pad)
    assert PPOTrainer.gather_rollout(single, r0) is r0
    r0.advantages = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"^gather_rollout takes a scored rollout before compute_advantages$"):
        PPOTrainer.gather_rollout(SimpleNamespace(dist=DistInfo(rank=0, world_size=2), pad_id=pad), r0)


def test_ptx_mixes_in_the_pretraining_loss():
    g = torch.Generator().manual_seed(8)
    block = torch.randint(3, V, (4, 12), generator=g)

    def lm_loss_after(coef):
        a = args(ptx_coef=coef, kl=KLArgs(beta=0.0), ppo_epochs=1)
        t = trainer(a, seed=8, ptx_sampler=(lambda: block) if coef else None)
        torch.manual_seed(8)
        for _ in range(3):
            m = t.step(prompts(seed=8))
        with torch.no_grad():
            return float(t.ptx_loss(block)), m

    base, _ = lm_loss_after(0.0)
    mixed, metrics = lm_loss_after(1.0)
    assert "ptx_loss" in metrics
    assert mixed < base - 0.1, (mixed, base)
    with pytest.raises(ValueError, match="ptx_sampler"):
        trainer(args(ptx_coef=1.0))


def test_logprobs_apply_the_sampling_temperature():
    # The rollout samples from softmax(logits / T); the log-probs PPO uses must be of that same
    # distribution, so they are log_softmax(logits / T), computed here by hand from a plain forward.
    policy = make_models()[0]
    q = torch.tensor([[BOS, 5, 7, 9]])
    r = torch.tensor([[4, 11, 3, EOS]])
    qr = torch.cat([q, r], 1)
    attn = torch.ones_like(qr)
    P = q.shape[1]
    with torch.no_grad():
        logits = policy(input_ids=qr, attention_mask=attn).logits[:, P - 1 : -1]
        for T in (0.7, 1.0, 1.6):
            want = torch.log_softmax(logits / T, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
            got = response_logprobs(policy, qr, attn, P, T)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(response_logprobs(policy, qr, attn, P, 0.7), response_logprobs(policy, qr, attn, P, 1.0))


def test_trainer_turns_dropout_off_in_all_four_models():
    # Models built with dropout and left in train mode: the trainer must make all four deterministic,
    # or the first-minibatch ratio would not be 1 and the reference/RM/values would be noisy.
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_cfg(attention_dropout=0.5))
    ref = copy.deepcopy(policy)
    rm = LlamaForSequenceClassification(tiny_cfg(num_labels=1, attention_dropout=0.5))
    value = copy.deepcopy(rm)
    models = (policy, ref, value, rm)
    assert all(m.training for m in models)
    PPOTrainer(args(), policy, value, rm, ref_policy=ref, eos_id=EOS, pad_id=PAD)
    qr = torch.tensor([[BOS, 5, 7, 9, 4, 11, 3, EOS]])
    attn = torch.ones_like(qr)
    for m in models:
        assert not m.training and m.config.attention_dropout == 0.0
        with torch.no_grad():
            a, b = m(input_ids=qr, attention_mask=attn).logits, m(input_ids=qr, attention_mask=attn).logits
        assert torch.equal(a, b)


def test_scores_are_normalised_then_clipped_then_eos_penalised():
    # (raw - mean) / std with the reward stage's statistics, clipped to +-reward_clip, then the
    # missing-EOS penalty: raw [1, 11, -9, 3] with mean 1, std 2 -> [0, 5, -5, 1].
    raw = torch.tensor([1.0, 11.0, -9.0, 3.0])
    has_eos = torch.tensor([True, True, True, False])
    clipped = trainer(args(reward_clip=2.0, missing_eos_penalty=0.5), reward_mean=1.0, reward_std=2.0)
    torch.testing.assert_close(clipped.normalise_scores(raw, has_eos), torch.tensor([0.0, 2.0, -2.0, 0.5]))
    unclipped = trainer(args(reward_clip=None, missing_eos_penalty=0.5), reward_mean=1.0, reward_std=2.0)
    torch.testing.assert_close(unclipped.normalise_scores(raw, has_eos), torch.tensor([0.0, 5.0, -5.0, 0.5]))


def test_rm_score_is_read_at_the_last_real_response_token():
    # Left-padded prompts, right-padded responses of different lengths: the score must equal the RM's
    # own (HF) score of each unpadded prompt+response, i.e. the head at the last real token.
    from alignline.rl.rollout import left_pad, sequence_scores

    rm = make_models()[3].eval()
    prompt_ids = [[BOS, 5, 7], [BOS, 4, 9, 11, 3]]
    responses = [[6, 8, EOS], [10]]
    ids, attn = left_pad(prompt_ids, PAD)
    resp = torch.full((2, 3), PAD)
    mask = torch.zeros((2, 3), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        got = sequence_scores(rm, torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), ids.shape[1], mask)
        want = torch.stack([rm(input_ids=torch.tensor([p + r])).logits[0, 0] for p, r in zip(prompt_ids, responses)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rank_statistics_and_no_sync_for_ddp():
    """The pieces of a multi-rank update that a single process skips: a rank's micro-batch statistics
    weighted by its token share (ratio_var carried as the second moment, E[r^2] = var + mean^2) and
    DDP's no_sync entered on policy and critic for every micro-batch but a minibatch's last."""
    import contextlib
    from types import SimpleNamespace

    stats = {"policy_loss": torch.tensor(2.0), "ratio_mean": torch.tensor(1.5), "ratio_var": torch.tensor(0.25)}
    got = PPOTrainer._weighted_stats(stats, 0.25)
    assert got == {"policy_loss": 0.5, "ratio_mean": 0.375, "ratio_var": (0.25 + 1.5**2) * 0.25}
    assert PPOTrainer._weighted_stats({"value_loss": torch.tensor(4.0)}, 0.5) == {"value_loss": 2.0}

    entered: list[str] = []

    class Wrapped:
        def __init__(self, name):
            self.name = name

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(self.name)
            yield

    me = SimpleNamespace(policy_fwd=Wrapped("policy"), critic_fwd=Wrapped("critic"))
    with PPOTrainer._no_sync(me, True):
        assert entered == ["policy", "critic"]
    with PPOTrainer._no_sync(me, False):
        pass
    assert entered == ["policy", "critic"]
    plain = SimpleNamespace(policy_fwd=object(), critic_fwd=object())  # not DDP-wrapped: nothing to enter
    with PPOTrainer._no_sync(plain, True):
        pass


def test_step_metrics_are_the_rollouts_statistics_and_a_consistent_time_split():
    """Every metric of a step, recomputed from the rollout it trained on (non-identity: T = 0.7,
    reward mean/std 1.3/0.4, critic lr != policy lr), and a time split that adds up."""
    import time

    from alignline.rl.core import explained_variance, masked_mean

    a = args(temperature=0.7, critic_lr=1e-3, ppo_epochs=2)
    t = trainer(a, reward_mean=1.3, reward_std=0.4)
    torch.manual_seed(3)
    start = time.perf_counter()
    m = t.step(prompts())
    wall = time.perf_counter() - start
    ro = t.last_rollout
    mask = ro.mask
    tokens = float(mask.sum())
    expect = {
        "rlhf_reward": float(ro.rewards.sum(1).mean()), "score": float(ro.scores.mean()),
        "score_raw": float(ro.raw_scores.mean()), "kl": float(ro.kl.sum(1).mean()),
        "entropy": float(masked_mean(ro.entropy, mask)),
        "explained_variance": explained_variance(ro.values, ro.returns, mask),
        "eos_rate": float(ro.has_eos.float().mean()), "response_length": tokens / mask.shape[0],
        "beta": 0.05, "advantage_mean": float(masked_mean(ro.advantages, mask)),
        "return_mean": float(masked_mean(ro.returns, mask)), "lr": 3e-3, "critic_lr": 1e-3,
        "reward_mean": 1.3, "reward_std": 0.4, "generation_s": ro.generation_s,
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert 0 < m["generation_s"] < m["rollout_s"] and 0 < m["train_s"] and m["rollout_s"] + m["train_s"] <= wall
    assert m["scoring_s"] == pytest.approx(m["rollout_s"] - m["generation_s"])
    assert m["rollout_tokens_per_s"] * m["rollout_s"] == pytest.approx(tokens)
    assert m["generation_tokens_per_s"] * m["generation_s"] == pytest.approx(tokens)
    assert m["train_tokens_per_s"] * m["train_s"] == pytest.approx(a.ppo_epochs * tokens)  # each token once an epoch
    assert "_train_tokens" not in m and "score_rm" not in m  # no verifier: no gold metrics


def test_global_micro_stats_sum_the_ranks_weighted_rows(monkeypatch):
    """Each rank's weighted micro-batch rows (see _weighted_stats) summed over ranks in one all-reduce,
    row by row; a minibatch's rows then sum to its token means, with ratio_var turned back into a
    variance (E[r^2] - mean^2, never below 0)."""
    from types import SimpleNamespace

    import alignline.rl.ppo as ppo_mod
    from alignline.distributed import DistInfo

    other = torch.tensor([[0.5, 0.25, 0.25 * (0.01 + 1.0)], [1.0, 0.3, 0.3 * 1.2]], dtype=torch.float64)
    sums = []

    def fake_sum(t, d):
        sums.append(t.clone())
        return t + other  # what the other rank holds

    monkeypatch.setattr(ppo_mod, "all_reduce_sum", fake_sum)
    me = SimpleNamespace(dist=DistInfo(rank=0, world_size=2), device="cpu")
    rows = [{"policy_loss": 1.5, "ratio_mean": 0.75, "ratio_var": 0.75 * (0.04 + 1.0)},
            {"policy_loss": 2.0, "ratio_mean": 0.7, "ratio_var": 0.7 * 0.8}]
    out = PPOTrainer._global_micro_stats(me, rows)
    assert len(sums) == 1 and sums[0].dtype == torch.float64 and sums[0].shape == (2, 3)  # one all-reduce
    assert out[0] == pytest.approx({"policy_loss": 2.0, "ratio_mean": 1.0, "ratio_var": 0.75 * 1.04 + 0.25 * 1.01})
    assert out[1] == pytest.approx({"policy_loss": 3.0, "ratio_mean": 1.0, "ratio_var": 0.7 * 0.8 + 0.3 * 1.2})
    assert list(out[1]) == ["policy_loss", "ratio_mean", "ratio_var"]
    single = SimpleNamespace(dist=DistInfo(), device="cpu")
    assert PPOTrainer._global_micro_stats(single, rows) is rows
    assert PPOTrainer._global_micro_stats(me, []) == []
    # Two micro-batches holding 3/4 and 1/4 of a minibatch's tokens, ratios (mean, var) (1.2, 0.04), (0.8, 0.01).
    mb = PPOTrainer._minibatch_stats([PPOTrainer._weighted_stats(
        {"policy_loss": torch.tensor(pl), "ratio_mean": torch.tensor(m), "ratio_var": torch.tensor(v)}, w)
        for pl, m, v, w in ((2.0, 1.2, 0.04, 0.75), (-1.0, 0.8, 0.01, 0.25))])
    mean = 0.75 * 1.2 + 0.25 * 0.8
    assert mb == pytest.approx({"policy_loss": 1.25, "ratio_mean": mean,
                                "ratio_var": 0.75 * (0.04 + 1.44) + 0.25 * (0.01 + 0.64) - mean**2})
    assert PPOTrainer._minibatch_stats([{"ratio_mean": 1.0, "ratio_var": 0.9}])["ratio_var"] == 0.0  # clamped


def test_two_ranks_update_like_one_process(monkeypatch):
    """optimize()'s multi-rank branch, which a single process never runs, on two ranks simulated as
    threads over an in-memory collective: gradients averaged where DDP averages them (before
    clipping), statistics and token counts summed, the shuffling seed broadcast from rank 0. Each rank
    trains on its half of every micro-batch, weighted by its token share; the update, the statistics
    and the token count must equal one process training on the whole batch with that seed (T = 0.7,
    ragged lengths, 2 micro-batches of 4 per minibatch, 2 epochs)."""
    import threading

    import alignline.rl.ppo as ppo_mod
    from alignline.distributed import DistInfo

    t = trainer(args(temperature=0.7), seed=3, reward_mean=1.3, reward_std=0.4)
    torch.manual_seed(3)
    ro = t.rollout(prompts(16, seed=3))
    t.compute_advantages(ro)
    assert len(set(ro.mask.sum(1).tolist())) > 1  # ragged: the ranks' token weights differ
    ranks = [copy.deepcopy(t) for _ in range(2)]

    collective, seeds = ThreadCollective(2), []
    exchange = collective.exchange

    def broadcast(obj, d):
        got = exchange(d.rank, obj)[0]
        seeds.append(got)
        return got

    me = threading.local()
    clip = torch.nn.utils.clip_grad_norm_

    def ddp_average_then_clip(params, max_norm):
        params = list(params)
        grads = exchange(me.rank, [p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = (grads[0][i] + grads[1][i]) / 2
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", ddp_average_then_clip)
    monkeypatch.setattr(ppo_mod, "all_reduce_sum", lambda v, d: sum(exchange(d.rank, v)))
    monkeypatch.setattr(ppo_mod, "broadcast_object", broadcast)
    out, errors = [None, None], []

    def run(rank):
        me.rank = rank
        ranks[rank].dist = DistInfo(rank=rank, world_size=2)
        try:
            out[rank] = ranks[rank].optimize(ro)
        except BaseException as e:  # re-raised in the test's thread below
            errors.append(e)
            collective.barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    monkeypatch.undo()
    assert len(seeds) == 2 and seeds[0] == seeds[1]
    single = t.optimize(ro, torch.Generator().manual_seed(seeds[0]))
    for r in ranks:
        for model in ("policy", "value_model"):
            for (n, p), q in zip(getattr(t, model).named_parameters(), getattr(r, model).parameters(), strict=True):
                torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=f"{model}.{n}")
    for o in out:
        assert o["_train_tokens"] == single["_train_tokens"]
        assert o.keys() == single.keys()
        for k, v in single.items():
            assert o[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_trainer_checks_its_arguments_and_keeps_its_defaults():
    """What the constructor promises: its defaults (reward scale 0/1, a fixed KL, step 0, frozen RM
    and reference), one exact message per bad argument, and the KL / schedule settings wired through."""
    from alignline.rl.core import AdaptiveKLController, FixedKLController

    policy, ref, value, rm = make_models(0)

    def build(a=None, **kw):
        kw.setdefault("ref_policy", ref)
        return PPOTrainer(a or args(), policy, value, rm, eos_id=EOS, pad_id=PAD, **kw)

    t = build()
    assert (t.reward_mean, t.reward_std, t.step_count, t.value_norm) == (0.0, 1.0, 0, None)
    assert type(t.kl_ctl) is FixedKLController and t.kl_ctl.value == 0.05
    assert not any(p.requires_grad for m in (rm, ref) for p in m.parameters())
    assert all(p.requires_grad for m in (policy, value) for p in m.parameters())
    with pytest.raises(ValueError, match=r"^ref_policy is None but the policy is not a PEFT model; pass a frozen "
                       r"copy of the SFT model as ref_policy \(or train LoRA so the reference is the base with "
                       r"adapters off\)$"):
        build(ref_policy=None)
    with pytest.raises(ValueError, match=r"^ppo\.ptx_coef > 0 needs a ptx_sampler returning pretraining token "
                       r"batches$"):
        build(args(ptx_coef=0.1))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^reward_std must be a positive number \(got {bad}\); check the "
                           r"reward eval\.json$"):
            build(reward_std=bad)
    with pytest.raises(ValueError, match=r"^ppo\.lr_schedule=linear decays over ppo\.decay_iterations or the run's "
                       r"total iterations; pass total_iterations or set ppo\.decay_iterations$"):
        build(args(lr_schedule="linear"))
    build(args(lr_schedule="linear", decay_iterations=4))  # either horizon will do
    adaptive = build(args(kl=KLArgs(beta=0.0, adaptive=True, target=1.0, horizon=100, min_beta=0.02)))
    assert type(adaptive.kl_ctl) is AdaptiveKLController and adaptive.kl_ctl.min_beta == 0.02
    # min_lr_ratio reaches both schedules: after the whole horizon the lr is min_lr_ratio x its peak
    s = build(args(lr_schedule="linear", min_lr_ratio=0.25, critic_lr=1e-2), total_iterations=2)
    for _ in range(2):
        s.optimizer.step()  # no gradients: only keeps the optimizer-before-scheduler order
        s.critic_optimizer.step()
        s.scheduler.step()
        s.critic_scheduler.step()
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 3e-3)
    assert s.critic_optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 1e-2)


def test_batch_sizes_must_split_over_the_ranks():
    """PPOArgs.check on N torchrun ranks: each rank rolls out 1/N of the prompts and trains on 1/N of
    every micro-batch, so both must divide; one exact message for each."""
    from alignline.config import ConfigError

    a = args(rollout_batch_size=16, mini_batch_size=8, grad_accum_steps=2)  # micro-batches of 4
    for world in (1, 2, 4):
        a.check(world)
    with pytest.raises(ConfigError, match=r"^ppo\.rollout_batch_size=16 does not split evenly over 3 processes "
                       r"\(torchrun --nproc_per_node / WORLD_SIZE=3\): each rank rolls out rollout_batch_size / 3 "
                       r"prompts\. Make it a multiple of 3$"):
        a.check(3)
    odd = args(rollout_batch_size=12, mini_batch_size=6, grad_accum_steps=2)  # micro-batches of 3
    odd.check()  # the default is one process
    with pytest.raises(ConfigError, match=r"^a micro-batch of ppo\.mini_batch_size / ppo\.grad_accum_steps = 6 / 2 "
                       r"= 3 rollouts does not split evenly over 2 processes \(WORLD_SIZE=2\): each rank trains on "
                       r"1/2 of every micro-batch\. Make mini_batch_size a multiple of grad_accum_steps x 2$"):
        odd.check(2)
    with pytest.raises(ConfigError, match=r"^ppo\.rollout_batch_size=16 must be a multiple of "
                       r"ppo\.mini_batch_size=6$"):
        args(rollout_batch_size=16, mini_batch_size=6, grad_accum_steps=1).check()
    with pytest.raises(ConfigError, match=r"^ppo\.mini_batch_size=8 must be a multiple of ppo\.grad_accum_steps=3$"):
        args(rollout_batch_size=16, mini_batch_size=8, grad_accum_steps=3).check()


@pytest.mark.parametrize("cut", [{"top_k": 2}, {"top_p": 0.3}])
def test_rollout_samples_only_inside_the_configured_top_k_or_top_p(cut):
    """ppo.top_k / ppo.top_p reach the sampler: every sampled token lies in the top-k, or in the
    nucleus (the smallest set of the tempered distribution's most likely tokens whose mass reaches
    top_p). Near-uniform tiny-model logits over 16 tokens put most samples outside either cut."""
    t = trainer(args(temperature=0.7, max_new_tokens=6, **cut), seed=2)
    torch.manual_seed(2)
    ro = t.rollout(prompts(16, seed=2))
    with torch.no_grad():
        logits = response_logits(t.policy, ro.query_response, ro.attention_mask, ro.context_len, 0.7)
    probs = torch.softmax(logits, -1)
    order = probs.argsort(-1, descending=True)
    rank = (order == ro.responses[..., None]).float().argmax(-1)  # rank of each sampled token
    if "top_k" in cut:
        allowed = rank < cut["top_k"]
    else:
        sorted_p = probs.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
        allowed = before.gather(-1, rank[..., None]).squeeze(-1) < cut["top_p"]
    assert bool(allowed[ro.mask.bool()].all())
    assert int(ro.mask.sum()) > 40


def test_step_shuffles_minibatches_with_the_generator_it_is_given(monkeypatch):
    """A resumed run reproduces its minibatch order only if step() hands its generator to optimize()."""
    t = trainer(args())
    seen = []
    real = t.optimize
    monkeypatch.setattr(t, "optimize", lambda ro, generator=None: seen.append(generator) or real(ro, generator))
    g = torch.Generator().manual_seed(3)
    t.step(prompts(), generator=g)
    assert seen == [g]


def test_optimize_reports_the_mean_over_its_minibatches(monkeypatch):
    """optimize()'s statistics: each minibatch's is the token mean over its micro-batches (each
    micro-batch's weighted by its share of the minibatch's response tokens; ratio_var the variance
    over all of them) plus the two gradient norms (policy and critic clipped apart); the update
    reports the mean over minibatches and keeps the first minibatch's (16 rollouts, minibatches of 8
    in 2 micro-batches, 2 epochs, ragged lengths)."""
    t = trainer(args(), seed=4)
    torch.manual_seed(4)
    ro = t.rollout(prompts())
    t.compute_advantages(ro)
    norms, micro = [], []
    clip, real = torch.nn.utils.clip_grad_norm_, t._micro_loss

    def spy_clip(params, max_norm):
        n = clip(params, max_norm)
        norms.append(float(n))
        return n

    def spy_micro(r, idx):
        loss, stats, ntok = real(r, idx)
        micro.append(({k: float(v) for k, v in stats.items()}, ntok))
        return loss, stats, ntok

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(t, "_micro_loss", spy_micro)
    out = t.optimize(ro, torch.Generator().manual_seed(0))
    assert len(norms) == 2 * 4 and len(micro) == 2 * 4  # 4 optimizer steps, 2 micro-batches each
    assert any(a[1] != b[1] for a, b in zip(micro[0::2], micro[1::2]))  # the token weights differ

    def mean(xs):
        return sum(xs) / len(xs)

    def minibatch(pair):
        n = sum(k for _, k in pair)
        st = {key: sum(s[key] * k for s, k in pair) / n for key in pair[0][0]}
        st["ratio_var"] = sum((s["ratio_var"] + s["ratio_mean"] ** 2) * k for s, k in pair) / n - st["ratio_mean"] ** 2
        return st

    mbs = [minibatch(micro[i : i + 2]) for i in range(0, 8, 2)]
    assert out["policy_grad_norm"] == pytest.approx(mean(norms[0::2]))
    assert out["critic_grad_norm"] == pytest.approx(mean(norms[1::2]))
    assert t.first_minibatch_stats["policy_grad_norm"] == pytest.approx(norms[0])
    assert t.first_minibatch_stats["critic_grad_norm"] == pytest.approx(norms[1])
    for k in micro[0][0]:
        assert out[k] == pytest.approx(mean([m[k] for m in mbs]), rel=1e-6, abs=1e-9), k
        assert t.first_minibatch_stats[k] == pytest.approx(mbs[0][k], rel=1e-6, abs=1e-9), k
    assert set(out) == set(micro[0][0]) | {"policy_grad_norm", "critic_grad_norm", "_train_tokens"}


def test_heads_run_on_real_response_tokens_only_in_scoring_and_training():
    """The policy's and the reference's LM heads see exactly the rollout's real response tokens when
    scoring (not every padded position), and the policy's head each micro-batch's real tokens when
    training: N rows per scoring forward, ppo_epochs x N rows over the update (ragged answers)."""
    t = trainer(args(ppo_epochs=2))
    rows = {"policy": [], "ref": []}
    hooks = [m.lm_head.register_forward_hook(
        lambda mod, inp, out, name=name: rows[name].append(inp[0].shape[0]) if inp[0].dim() == 2 else None)
        for name, m in (("policy", t.policy), ("ref", t.ref_policy))]
    torch.manual_seed(8)
    ro = t.rollout(prompts())
    n = int(ro.mask.sum())
    assert len(set(ro.mask.sum(1).tolist())) > 1 and n < ro.mask.numel()  # ragged, so packing matters
    assert sum(rows["policy"]) == n and sum(rows["ref"]) == n
    t.compute_advantages(ro)
    rows["policy"].clear()
    t.optimize(ro, torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert sum(rows["policy"]) == 2 * n and len(rows["policy"]) == 2 * 16 // 4  # a call per micro-batch
    assert rows["ref"] == [n]


def test_a_warmup_as_long_as_the_run_is_warned_once_by_its_ppo_key(caplog):
    """ppo.warmup_iterations >= the run's iterations: one warning naming ppo.warmup_iterations (the critic
    shares the schedule and stays quiet); a shorter warmup: none."""
    import logging

    with caplog.at_level(logging.WARNING, logger="alignline.training"):
        trainer(args(lr_schedule="linear", warmup_iterations=4), total_iterations=4)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and msgs[0].startswith("ppo.warmup_iterations=4 >= the run's 4 steps")
    assert msgs[0].endswith("lower ppo.warmup_iterations")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignline.training"):
        trainer(args(lr_schedule="linear", warmup_iterations=3), total_iterations=4)
    assert caplog.records == []
