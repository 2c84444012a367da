"""PPO features the reference implementations (TRL 1.12 PPOTrainer, OpenRLHF, DeepSpeed-Chat) have:
a critic with its own optimizer, lr and clipping; lr warmup and decay; reward normalisation from the
policy's own samples or running statistics; adaptive KL from beta 0; fp32 log-probs of bf16 models;
the missing-EOS penalty in the GRPO/RLOO reward; extending a finished run; TensorBoard after resume.

    .venv/bin/pytest tests/test_ppo_features.py -q
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from alignline.rl.core import AdaptiveKLController, RunningMoments
from alignline.rl.ppo import KLArgs, PPOArgs, PPOTrainer
from tests.ppo_fixtures import llama_config

PAD, EOS, BOS, V = 0, 1, 2, 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's `one_thread`)."""


def tiny_cfg(**kw):
    return llama_config(V, PAD, EOS, BOS, hidden_size=16, layers=1, heads=2, kv_heads=1, **kw)


def make_trainer(seed=0, **kw):
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(tiny_cfg())
    rm = LlamaForSequenceClassification(tiny_cfg(num_labels=1))
    base = dict(rollout_batch_size=8, forward_batch_size=8, mini_batch_size=8, grad_accum_steps=1, ppo_epochs=1,
                max_new_tokens=4, kl=KLArgs(beta=0.05), optim={"lr": 3e-3, "weight_decay": 0.0, "grad_clip": 0.0})
    trainer_kw = {k: kw.pop(k) for k in ("reward_mean", "reward_std", "total_iterations") if k in kw}
    base.update(kw)
    return PPOTrainer(PPOArgs(**base), policy, copy.deepcopy(rm), rm, ref_policy=copy.deepcopy(policy),
                      eos_id=EOS, pad_id=PAD, **trainer_kw)


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, V, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# --------------------------------------------------------------------------- critic optimizer


def test_critic_has_its_own_optimizer_and_lr():
    t = make_trainer(critic_lr=1e-5)
    policy_ids = {id(p) for p in t.policy.parameters()}
    critic_ids = {id(p) for p in t.value_model.parameters()}
    in_policy_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    in_critic_opt = {id(p) for g in t.critic_optimizer.param_groups for p in g["params"]}
    assert in_policy_opt == policy_ids and in_critic_opt == critic_ids
    assert {g["lr"] for g in t.optimizer.param_groups} == {3e-3}
    assert {g["lr"] for g in t.critic_optimizer.param_groups} == {1e-5}
    m = t.step(prompts())
    assert (m["lr"], m["critic_lr"]) == (3e-3, 1e-5)
    # Back-compat: no critic_lr means the policy's.
    assert {g["lr"] for g in make_trainer().critic_optimizer.param_groups} == {3e-3}


def _grads_at_step(t):
    """Record each optimizer's gradients at the moment it steps (after clipping)."""
    seen = {}
    for name, opt in (("policy", t.optimizer), ("critic", t.critic_optimizer)):
        def hook(o, args, kwargs, _name=name):
            seen.setdefault(_name, [p.grad.clone() for g in o.param_groups for p in g["params"]])

        opt.register_step_pre_hook(hook)
    return seen


def test_critic_clipping_does_not_touch_the_policy_gradient():
    grads = {}
    for clip in (None, 1e-3):
        t = make_trainer(critic_grad_clip=clip, optim={"lr": 3e-3, "weight_decay": 0.0, "grad_clip": 100.0})
        grads[clip] = _grads_at_step(t)
        torch.manual_seed(3)
        t.step(prompts())
    norm = lambda gs: float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs])))  # noqa: E731
    # The critic was clipped to 1e-3 (its raw norm is far above) ...
    assert norm(grads[None]["critic"]) > 1e-2
    assert norm(grads[1e-3]["critic"]) == pytest.approx(1e-3, rel=1e-3)
    # ... and the policy's gradient is exactly what it was without critic clipping.
    for a, b in zip(grads[None]["policy"], grads[1e-3]["policy"], strict=True):
        assert torch.equal(a, b)


def test_policy_clipping_does_not_touch_the_critic_gradient():
    grads = {}
    for clip in (0.0, 1e-3):
        t = make_trainer(critic_grad_clip=0.0, optim={"lr": 3e-3, "weight_decay": 0.0, "grad_clip": clip})
        grads[clip] = _grads_at_step(t)
        torch.manual_seed(3)
        t.step(prompts())
    assert float(torch.stack([g.norm() for g in grads[1e-3]["policy"]]).norm()) == pytest.approx(1e-3, rel=1e-3)
    for a, b in zip(grads[0.0]["critic"], grads[1e-3]["critic"], strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- lr schedule


def _expected_factor(i, kind, warmup, horizon, min_ratio):
    if i < warmup:
        return (i + 1) / warmup
    progress = min(1.0, (i - warmup) / (horizon - warmup))
    shape = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_schedule_warms_up_then_decays_for_policy_and_critic(kind):
    kw = dict(lr_schedule=kind, warmup_iterations=2, min_lr_ratio=0.1, critic_lr=1e-4, max_new_tokens=2,
              total_iterations=6)
    t = make_trainer(**kw)
    lrs = []
    for i in range(4):
        m = t.step(prompts())
        lrs.append((m["lr"], m["critic_lr"]))
        if i == 1:
            state = copy.deepcopy(t.state_dict())
    for i, (lr, clr) in enumerate(lrs):
        f = _expected_factor(i, kind, 2, 6, 0.1)
        assert lr == pytest.approx(3e-3 * f, rel=1e-12), i
        assert clr == pytest.approx(1e-4 * f, rel=1e-12), i
    assert lrs[0][0] < lrs[1][0] and lrs[3][0] < lrs[2][0]  # warmup up, decay down
    # The schedule position is part of the state: a resumed trainer continues at iteration 2.
    resumed = make_trainer(**kw)
    resumed.load_state_dict(state)
    assert resumed.step(prompts())["lr"] == pytest.approx(lrs[2][0], rel=1e-12)
    # Extending the run (a longer decay horizon) recomputes the lr from the new schedule.
    longer = make_trainer(**{**kw, "total_iterations": 12})
    longer.load_state_dict(state)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * _expected_factor(2, kind, 2, 12, 0.1))


def test_decaying_schedule_needs_a_horizon():
    with pytest.raises(ValueError, match="decay_iterations"):
        make_trainer(lr_schedule="linear")
    t = make_trainer(lr_schedule="linear", decay_iterations=4, max_new_tokens=2)
    assert [t.step(prompts(4))["lr"] for _ in range(2)] == pytest.approx([3e-3, 3e-3 * 0.75])


# --------------------------------------------------------------------------- reward normalisation


def test_running_moments_match_the_closed_form():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 1, 7)]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    allx = torch.cat(batches).double()
    assert rm.count == 13
    assert rm.mean == pytest.approx(float(allx.mean()), rel=1e-12)
    assert rm.std == pytest.approx(float(allx.std()), rel=1e-12)


def test_reward_norm_running_uses_every_rollout_so_far_and_is_saved():
    t = make_trainer(reward_norm="running", reward_mean=4.0, reward_std=2.0)
    raws = []
    for _ in range(2):
        t.step(prompts())
        raws.append(t.last_rollout.raw_scores.double())
    allx = torch.cat(raws)
    assert t.reward_mean == pytest.approx(float(allx.mean()), rel=1e-9)
    assert t.reward_std == pytest.approx(float(allx.std()), rel=1e-9)
    ro = t.last_rollout
    expected = (ro.raw_scores - t.reward_mean) / t.reward_std - (~ro.has_eos).float()
    torch.testing.assert_close(ro.scores, expected.float())
    # The critic stays on the initial scale; the statistics are part of the resumable state.
    assert (t.value_mean, t.value_std) == (4.0, 2.0)
    state = t.state_dict()["reward_norm"]
    fresh = make_trainer(reward_norm="running")
    fresh.load_reward_norm_state(json.loads(json.dumps(state)))
    assert (fresh.reward_mean, fresh.reward_std, fresh.reward_moments.count) == (t.reward_mean, t.reward_std, 16)


def test_reward_norm_policy_samples_is_the_mean_std_of_the_policys_scored_samples(monkeypatch):
    import alignline.rl.ppo as ppo_mod

    calls = []

    def fake_scores(rm, qr, attn, ctx, mask):
        # Score = 10 * call + row, so the expected statistics have a closed form.
        base = 10.0 * len(calls)
        calls.append(qr.shape[0])
        return base + torch.arange(qr.shape[0], dtype=torch.float32)

    t = make_trainer(reward_norm="policy_samples", forward_batch_size=4, reward_mean=100.0, reward_std=50.0)
    monkeypatch.setattr(ppo_mod, "sequence_scores", fake_scores)
    mean, std = t.calibrate_reward_norm(prompts(10))
    assert calls == [4, 4, 2]
    xs = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 20, 21], dtype=torch.float64)
    assert (mean, std) == (pytest.approx(float(xs.mean())), pytest.approx(float(xs.std())))
    assert (t.reward_mean, t.reward_std) == (mean, std)
    assert (t.value_mean, t.value_std) == (mean, std)  # the critic is read on the same scale
    s = t.normalise_scores(torch.tensor([mean + std]), torch.tensor([True]))
    assert float(s) == pytest.approx(1.0)


def test_reward_norm_reward_stage_reads_the_reward_eval(tmp_path):
    from alignline.evaluation import reward_normalisation

    rd = SimpleNamespace(eval={"reward_mean": 4.5, "reward_std": 1.5}, path=tmp_path)
    mean, std = reward_normalisation(rd)
    t = make_trainer(reward_mean=mean, reward_std=std)
    t.step(prompts())
    ro = t.last_rollout
    assert (t.reward_mean, t.reward_std) == (4.5, 1.5)  # nothing moves them in this mode
    torch.testing.assert_close(ro.scores, (ro.raw_scores - 4.5) / 1.5 - (~ro.has_eos).float())


# --------------------------------------------------------------------------- adaptive KL


def test_adaptive_kl_rises_from_beta_zero_when_kl_is_above_target():
    ctl = AdaptiveKLController(0.0, target=1.0, horizon=10, min_beta=0.01)
    ctl.update(0.5, 10)  # below target: free, stays 0
    assert ctl.value == 0.0
    ctl.update(5.0, 10)
    assert ctl.value == pytest.approx(0.01 * 1.2)
    ctl.update(5.0, 10)
    assert ctl.value == pytest.approx(0.01 * 1.2 * 1.2)  # the floor lifts, the update stays multiplicative
    big = AdaptiveKLController(0.1, target=1.0, horizon=10, min_beta=0.01)
    big.update(5.0, 10)
    assert big.value == pytest.approx(0.12)  # above the floor nothing changes
    with pytest.raises(ValueError, match="min_beta"):
        AdaptiveKLController(0.0, target=1.0, horizon=10, min_beta=0.0)


def test_trainer_adaptive_kl_from_beta_zero():
    t = make_trainer(kl=KLArgs(beta=0.0, adaptive=True, target=1e-6, horizon=8))
    torch.manual_seed(0)
    t.step(prompts())  # the policy moves off the reference
    t.step(prompts())
    assert t.kl_ctl.value > 0


# --------------------------------------------------------------------------- bf16 log-probs


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.logits)


def test_bf16_logprobs_are_fp32_logits_divided_by_temperature():
    from alignline.rl.rollout import response_logprobs

    g = torch.Generator().manual_seed(0)
    B, P, R, T = 2, 3, 5, 0.7
    logits = (torch.randn(B, P + R, V, generator=g) * 30).to(torch.bfloat16)
    qr = torch.randint(3, V, (B, P + R), generator=g)
    logp, ent = response_logprobs(_FixedLogits(logits), qr, torch.ones_like(qr), P, T, with_entropy=True)
    resp = qr[:, P:].unsqueeze(-1)
    pred = logits[:, P - 1 : -1]
    good = torch.log_softmax(pred.float() / T, -1)
    bad = torch.log_softmax((pred / T).float(), -1)  # division rounded in bf16
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, good.gather(-1, resp).squeeze(-1), atol=1e-6, rtol=0)
    assert (logp - bad.gather(-1, resp).squeeze(-1)).abs().max() > 1e-3
    torch.testing.assert_close(ent, -(good.exp() * good).sum(-1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- GRPO/RLOO reward


class _CharTok:
    """Messages -> 'u:text<eos>a:text<eos>'; one token per character."""

    pad_token_id, eos_token_id = PAD, EOS

    def apply_chat_template(self, msgs, chat_template=None, tokenize=False, add_generation_prompt=False):
        text = "".join(f"{m['role'][0]}:{m['content']}\x01" for m in msgs)
        return text + ("a:" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [EOS if ch == "\x01" else 3 + ord(ch) % (V - 3) for ch in text]}


def test_group_reward_scores_the_generated_tokens_and_penalises_missing_eos():
    from alignline.rl.rollout import left_pad, sequence_scores
    from stages.rlhf import RMReward

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_cfg(num_labels=1)).eval()
    tok = _CharTok()
    reward = RMReward(rm, tok, mean=0.5, std=2.0, missing_eos_penalty=1.0)
    prompt = [{"role": "user", "content": "1+2"}]
    done, cut = [5, 7, EOS], [5, 7, 9]  # the second hit max_completion_length
    got = reward(prompts=[prompt, prompt], completions=[[{"role": "assistant", "content": "x"}]] * 2,
                 completion_ids=[done, cut])
    p_ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True))["input_ids"]
    with torch.inference_mode():
        raw = []
        for c in (done, cut):
            ids, attn = left_pad([p_ids + c], PAD)
            raw.append(float(sequence_scores(rm, ids, attn, len(p_ids), torch.ones((1, len(c)), dtype=torch.long))))
    assert got[0] == pytest.approx((raw[0] - 0.5) / 2.0, abs=1e-6)
    assert got[1] == pytest.approx((raw[1] - 0.5) / 2.0 - 1.0, abs=1e-6)


# --------------------------------------------------------------------------- extending a run


def _cfg(**over):
    from alignline.config import load_config
    from stages.rlhf import Config

    REPO = Path(__file__).resolve().parent.parent
    return load_config(Config, REPO / "configs" / "rlhf" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def test_resume_keys_keep_state_and_other_keys_discard_it_naming_them(tmp_path, caplog):
    from alignline.artifacts import StageRun
    from stages.rlhf import RESUME_KEYS

    def open_run(cfg):
        return StageRun(tmp_path, "rlhf", cfg, resume_keys=RESUME_KEYS)

    run = open_run(_cfg(steps=2))
    run.metrics.log(1, loss=1.0)
    run.save_state(2, extra={"x": 1})
    run.finalize(eval={})
    # Extending a finished run: state kept, its metrics continue in staging.
    run = open_run(_cfg(steps=4, save_every=3, **{"logging.every_steps": 2, "eval.num_prompts": 10}))
    meta = run.load_state(restore_rng=False)
    assert meta is not None and meta["step"] == 2
    assert (run.staging / "metrics.jsonl").read_text().count('"step": 1') == 1
    # Any other key invalidates the state, and the log says which.
    with caplog.at_level(logging.WARNING, logger="alignline.artifacts"):
        run = open_run(_cfg(steps=4, **{"optim.lr": 1e-4, "ppo.vf_coef": 0.2}))
    assert run.latest_state() is None
    msg = " ".join(r.getMessage() for r in caplog.records)
    changed = msg.split("changed: ")[1].split(";")[0]
    assert changed == "optim.lr, ppo.vf_coef", msg  # save_every/eval/logging changed too, but may


# --------------------------------------------------------------------------- TensorBoard after resume


def _tb_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_events_are_purged_back_to_the_resumed_step(tmp_path):
    from alignline.training import MetricsLogger

    first = MetricsLogger(tmp_path)
    for s in range(1, 5):
        first.log(s, loss=float(s))
    first.close()
    # The interrupted run ran earlier: TensorBoard orders a dir's event files by name, which starts with
    # the creation second (and ends with a per-process counter that does not sort numerically).
    for f in (tmp_path / "tb").iterdir():
        parts = f.name.split(".")
        parts[3] = f"{int(parts[3]) - 100:010d}"
        f.rename(f.with_name(".".join(parts)))
    second = MetricsLogger(tmp_path)
    second.truncate_after(2)  # resumed from the state at step 2: steps 3 and 4 are redone
    for s in range(3, 6):
        second.log(s, loss=10.0 * s)
    second.close()
    assert _tb_steps(tmp_path / "tb", "loss") == [1, 2, 3, 4, 5]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0, 2.0, 30.0, 40.0, 50.0]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_extending_a_finished_ppo_run_equals_an_uninterrupted_one(tiny_chain, tmp_path):
    from safetensors.torch import load_file

    from alignline.config import load_config
    from stages import rlhf as ppo

    REPO = Path(__file__).resolve().parent.parent

    def run(run_dir, steps):
        cfg = load_config(ppo.Config, REPO / "configs" / "rlhf" / "tiny.yaml", [
            "logging.progress=false", f"steps={steps}", "save_every=2", "eval.num_prompts=8",
            "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=1", "ppo.lr_schedule=linear",
            "ppo.warmup_iterations=1", "ppo.decay_iterations=4", "ppo.critic_lr=3e-5"])
        return ppo.run(cfg, {"init": tiny_chain["sft"], "reward": tiny_chain["reward"], "data": tiny_chain["data"]},
                       run_dir)

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    extended = run(tmp_path / "b", 4)
    ev = json.loads((extended / "eval.json").read_text())
    assert ev["train"]["resumed_from"] == 2  # the first 2 iterations were not redone
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(extended / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (extended / "metrics.jsonl").read_text().splitlines()]
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["score"] for r in rows] == [r["score"] for r in rows_a]
    assert _tb_steps(extended / "tb", "score") == [1, 2, 3, 4]
