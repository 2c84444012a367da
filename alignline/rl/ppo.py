"""Our PPO for RLHF (TRL dropped its PPOTrainer in 1.13): rollout, scoring, GAE, clipped
policy/value updates, adaptive KL, optional PPO-ptx, and a resumable state.

    trainer = PPOTrainer(args, policy, value_model, reward_model, ref_policy=ref,
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for step in range(n):
        metrics = trainer.step(prompt_token_lists)   # one PPO iteration

Models: `policy` is a causal LM (possibly a PEFT model: then `ref_policy=None` and the
reference is the same model with adapters disabled, no second copy); `value_model` and
`reward_model` are *ForSequenceClassification models (num_labels=1), the value model usually
a copy of the reward model. All four run with dropout disabled (`disable_dropout`) at rollout
and at training time, so on the first minibatch of the first epoch the ratio is 1.

Per iteration the rollout costs one `generate` plus exactly one forward each for policy
(log-probs + entropy), reference, values and reward, all under `torch.inference_mode`.

Across processes (`dist=init_distributed()` under torchrun, N ranks): every rank calls `step` with
its own share of the iteration's prompts (rollout_batch_size / N) and samples with its own RNG.
The scored rollouts (a few tensors of B x (prompt + response) entries) are then all-gathered, so
every rank holds the global batch in the single-process layout and the reward normalisation
(`reward_norm: running`), GAE, reward/advantage whitening, the adaptive KL controller's statistic
and the logged rollout metrics are computed over the global batch, as one process would. For the
updates every rank shares one minibatch permutation and takes every N-th row of each micro-batch;
policy and critic run their training forwards through DDP, which averages gradients.

A minibatch's loss is the token mean over all its response tokens: each micro-batch (each rank's
piece of one) is weighted by its share of the minibatch's tokens, so the update does not depend on
how the minibatch is split, over micro-batches or ranks. Micro-batches are therefore cut by length
(short answers together) and trimmed to their own longest prompt and response, and the LM head
runs on real response tokens only (`response_logprobs` with a mask). The update's metrics are
all-reduced. Generation, scoring and saving use the unwrapped models.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignline.config import ScheduleConfig
from alignline.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    wrap_model,
)
from alignline.rl.args import KLArgs, PPOArgs, PPOHyperparameters  # noqa: F401 - re-exported
from alignline.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    compute_rewards,
    explained_variance,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from alignline.rl.rollout import (
    PolicyForward,
    TokenValues,
    disable_dropout,
    generate,
    left_pad,
    response_logprobs,
    sequence_scores,
    token_values,
    truncate_after_eos,
)
from alignline.training import build_optimizer, build_scheduler


@dataclass
class Rollout:
    """One batch of scored rollouts; per-token tensors are [B, R]."""

    query_response: torch.Tensor
    attention_mask: torch.Tensor
    context_len: int
    mask: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    verified: torch.Tensor | None = None  # [B] verifier reward (gold 0/1) when a verifier was given
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    generation_s: float = 0.0  # wall time of sampling alone (the rest of the rollout phase is scoring)

    @property
    def responses(self) -> torch.Tensor:
        return self.query_response[:, self.context_len :]


Verifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class PPOTrainer:
    """PPO over token-level rewards for a causal LM policy and a sequence-classification critic."""

    def __init__(
        self,
        args: PPOArgs,
        policy,
        value_model,
        reward_model,
        *,
        eos_id: int,
        pad_id: int,
        ref_policy=None,
        reward_mean: float = 0.0,
        reward_std: float = 1.0,
        ptx_sampler: Callable[[], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        total_iterations: int | None = None,
        dist: DistInfo | None = None,
    ):
        """`total_iterations`: the run's PPO iterations, the decay horizon of a linear/cosine lr
        schedule when `args.decay_iterations` is null. `dist`: this process's place among torchrun
        ranks (`alignline.distributed.init_distributed()`); None = one process."""
        self.dist = dist if dist is not None else DistInfo()
        args.check(self.dist.world_size)
        if ref_policy is None and not hasattr(policy, "disable_adapter"):
            raise ValueError(
                "ref_policy is None but the policy is not a PEFT model; pass a frozen copy of the SFT "
                "model as ref_policy (or train LoRA so the reference is the base with adapters off)"
            )
        if args.ptx_coef > 0 and ptx_sampler is None:
            raise ValueError("ppo.ptx_coef > 0 needs a ptx_sampler returning pretraining token batches")
        if reward_std <= 0 or not math.isfinite(reward_std):
            raise ValueError(f"reward_std must be a positive number (got {reward_std}); check the reward eval.json")
        self.args, self.device = args, torch.device(device)
        self.policy, self.value_model, self.reward_model, self.ref_policy = (
            policy,
            value_model,
            reward_model,
            ref_policy,
        )
        for m in (policy, value_model, reward_model, ref_policy):
            if m is not None:
                disable_dropout(m)
        for m in (reward_model, ref_policy):
            if m is not None:
                m.requires_grad_(False)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        # Scores are normalised with reward_mean/std, and the critic's raw (RM-unit) outputs with the
        # same statistics (`calibrate_reward_norm` moves both), except under reward_norm=running: the
        # critic then stays on the initial ones, or its outputs would shift under it every iteration.
        self.reward_mean, self.reward_std = float(reward_mean), float(reward_std)
        self.value_norm: tuple[float, float] | None = (
            (self.reward_mean, self.reward_std) if args.reward_norm == "running" else None
        )
        self.reward_moments = RunningMoments()
        self.ptx_sampler = ptx_sampler
        # Training forwards go through DDP under torchrun (gradients averaged over ranks); rollout,
        # scoring, generate() and state dicts use the unwrapped models. One process: no wrapper.
        self.policy_fwd = wrap_model(PolicyForward(policy), self.dist, "ddp")
        self.critic_fwd = wrap_model(TokenValues(value_model), self.dist, "ddp")
        self.policy_params = [p for p in policy.parameters() if p.requires_grad]
        self.critic_params = [p for p in value_model.parameters() if p.requires_grad]
        self.params = self.policy_params + self.critic_params
        # Separate AdamWs (library decay groups: none on norms/embeddings): the critic is usually a full
        # model while the policy may be LoRA, so each gets its own lr, clipping and schedule.
        self.optimizer = build_optimizer(policy, args.optim)
        critic_optim = args.optim.model_copy(update={"lr": self.critic_lr})
        self.critic_optimizer = build_optimizer(value_model, critic_optim)
        if args.lr_schedule != "constant" and args.decay_iterations is None and total_iterations is None:
            raise ValueError(f"ppo.lr_schedule={args.lr_schedule} decays over ppo.decay_iterations or the run's "
                             "total iterations; pass total_iterations or set ppo.decay_iterations")
        sched = ScheduleConfig(kind=args.lr_schedule, warmup_steps=args.warmup_iterations,
                               min_lr_ratio=args.min_lr_ratio)
        horizon = args.decay_iterations or total_iterations or 1
        self.scheduler = build_scheduler(self.optimizer, sched, horizon, "ppo.warmup_iterations")
        self.critic_scheduler = build_scheduler(self.critic_optimizer, sched, horizon, None)
        k = args.kl
        self.kl_ctl = (
            AdaptiveKLController(k.beta, k.target, k.horizon, k.min_beta) if k.adaptive
            else FixedKLController(k.beta)
        )
        self.step_count = 0

    @property
    def value_mean(self) -> float:
        return self.value_norm[0] if self.value_norm is not None else self.reward_mean

    @property
    def value_std(self) -> float:
        return self.value_norm[1] if self.value_norm is not None else self.reward_std

    @property
    def critic_lr(self) -> float:
        return self.args.critic_lr if self.args.critic_lr is not None else self.args.optim.lr

    @property
    def critic_grad_clip(self) -> float:
        a = self.args
        return a.critic_grad_clip if a.critic_grad_clip is not None else a.optim.grad_clip

    # ------------------------------------------------------------------ rollout

    def _ref_logprobs(self, qr, attn, ctx, mask):
        if self.ref_policy is not None:
            return response_logprobs(self.ref_policy, qr, attn, ctx, self.args.temperature, mask=mask)
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, qr, attn, ctx, self.args.temperature, mask=mask)

    def _values(self, qr, attn, ctx, train: bool = False):
        """Per-token values on the normalised reward scale. The critic starts as a copy of the reward
        model, so its raw outputs are in RM units (tiny default: mean ~4.5, std ~1.9); read through the
        same (x - mean) / std as the scores, it starts near the right scale instead of several nats
        off, which would swamp the advantages (and, with value clipping, take ~15 iterations to fix).
        `train`: through the (DDP-wrapped) training forward."""
        raw = self.critic_fwd(qr, attn, ctx) if train else token_values(self.value_model, qr, attn, ctx)
        return (raw - self.value_mean) / self.value_std

    def normalise_scores(self, raw: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """RM score -> (score - mean) / std with the current statistics (`reward_norm`), clip, EOS
        penalty."""
        s = (raw - self.reward_mean) / self.reward_std
        if self.args.reward_clip is not None:
            s = s.clamp(-self.args.reward_clip, self.args.reward_clip)
        return s - self.args.missing_eos_penalty * (~has_eos).to(s.dtype)

    def rollout(self, prompts: list[list[int]], verifier: Verifier | None = None) -> Rollout:
        """Sample responses to `prompts` (token lists) and score them; no autograd anywhere.

        `verifier(responses [B, R], mask [B, R]) -> [B]` scores each response against its prompt's
        known answer (row i of the batch is prompt i); its score, times `verifier_weight`, is added
        to the normalised RM score."""
        with torch.inference_mode():
            ro = self._rollout(prompts)
            if verifier is not None:
                v = torch.as_tensor(verifier(ro.responses, ro.mask), dtype=ro.scores.dtype, device=ro.scores.device)
                if v.shape != ro.scores.shape:
                    raise ValueError(f"verifier returned shape {tuple(v.shape)}; expected one score per "
                                     f"response {tuple(ro.scores.shape)}")
                ro.verified = v
                ro.scores = ro.scores + self.args.verifier_weight * v
        # Inference-mode tensors cannot be saved for backward; copies made outside it can.
        for f in ("query_response", "attention_mask", "mask", "has_eos", "logprobs", "ref_logprobs"):
            setattr(ro, f, getattr(ro, f).clone())
        for f in ("entropy", "values", "raw_scores", "scores", "verified"):
            if getattr(ro, f) is not None:
                setattr(ro, f, getattr(ro, f).clone())
        return ro

    def _sample(self, prompts: list[list[int]]):
        """Generate and cut at EOS: (query_response, attention_mask, context_len, mask, has_eos)."""
        a = self.args
        ids, attn = left_pad(prompts, self.pad_id, self.device)
        P = ids.shape[1]
        responses = []
        for sl in _chunks(len(prompts), a.forward_batch_size):
            responses.append(
                generate(
                    self.policy,
                    ids[sl],
                    attn[sl],
                    max_new_tokens=a.max_new_tokens,
                    temperature=a.temperature,
                    top_k=a.top_k,
                    top_p=a.top_p,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                )
            )
        R = max(r.shape[1] for r in responses)
        resp = torch.full((len(prompts), R), self.pad_id, dtype=torch.long, device=self.device)
        for sl, r in zip(_chunks(len(prompts), a.forward_batch_size), responses):
            resp[sl, : r.shape[1]] = r
        resp, mask, has_eos = truncate_after_eos(resp, self.eos_id, self.pad_id)
        R = int(mask.sum(1).max())  # drop columns that are padding in every row
        resp, mask = resp[:, :R], mask[:, :R]
        return torch.cat([ids, resp], 1), torch.cat([attn, mask], 1), P, mask, has_eos

    def _rollout(self, prompts: list[list[int]]) -> Rollout:
        a = self.args
        t0 = time.perf_counter()
        qr, full_attn, P, mask, has_eos = self._sample(prompts)
        generation_s = time.perf_counter() - t0
        out = {k: [] for k in ("logp", "ent", "ref", "val", "raw")}
        for sl in _chunks(len(prompts), a.forward_batch_size):
            q, m = qr[sl], full_attn[sl]
            logp, ent = response_logprobs(self.policy, q, m, P, a.temperature, with_entropy=True, mask=mask[sl])
            out["logp"].append(logp)
            out["ent"].append(ent)
            out["ref"].append(self._ref_logprobs(q, m, P, mask[sl]))
            out["val"].append(self._values(q, m, P))
            out["raw"].append(sequence_scores(self.reward_model, q, m, P, mask[sl]))
        cat = {k: torch.cat(v) for k, v in out.items()}
        raw = cat["raw"]
        if a.reward_norm == "running":
            # This batch is included before normalising it, as OpenRLHF does; the first batch then
            # normalises itself instead of using arbitrary initial statistics. Under torchrun: every
            # rank's scores (the global batch), so all ranks keep the same statistics.
            self.reward_moments.update(all_gather_cat(raw, self.dist))
            if self.reward_moments.count > 1 and self.reward_moments.std > 0:
                self.reward_mean, self.reward_std = self.reward_moments.mean, self.reward_moments.std
        return Rollout(
            query_response=qr,
            attention_mask=full_attn,
            context_len=P,
            mask=mask,
            has_eos=has_eos,
            logprobs=cat["logp"],
            ref_logprobs=cat["ref"],
            entropy=cat["ent"],
            values=cat["val"],
            raw_scores=raw,
            scores=self.normalise_scores(raw, has_eos),
            generation_s=generation_s,
        )

    @torch.inference_mode()
    def calibrate_reward_norm(self, prompts: list[list[int]]) -> tuple[float, float]:
        """reward_norm=policy_samples: sample one response per prompt from the current (SFT) policy,
        score it with the RM, and use the mean/std (unbiased) of those scores for the scores and the
        critic from now on. Returns (mean, std). Call once, before the first `step`; under torchrun
        every rank calls it with its own share of the prompts, and all get the global statistics."""
        raws = []
        for sl in _chunks(len(prompts), self.args.forward_batch_size):
            qr, attn, P, mask, _ = self._sample(prompts[sl])
            raws.append(sequence_scores(self.reward_model, qr, attn, P, mask).double())
        raw = all_gather_cat(torch.cat(raws), self.dist).cpu()  # every rank's samples under torchrun
        if raw.numel() < 2:
            raise ValueError("ppo.reward_norm=policy_samples needs at least 2 prompts (ppo.reward_norm_prompts)")
        mean, std = float(raw.mean()), float(raw.std())
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"the RM gave the same score ({mean}) to all {raw.numel()} policy samples; "
                             "cannot normalise with std 0 (use ppo.reward_norm=reward_stage)")
        self.reward_mean, self.reward_std = mean, std
        return mean, std

    def reward_norm_state(self) -> dict:
        """The normalisation statistics (JSON-serialisable), restored by `load_reward_norm_state`."""
        return {"mean": self.reward_mean, "std": self.reward_std,
                "value_norm": list(self.value_norm) if self.value_norm is not None else None,
                "running": self.reward_moments.state_dict()}

    def load_reward_norm_state(self, state: dict) -> None:
        self.reward_mean, self.reward_std = float(state["mean"]), float(state["std"])
        vn = state["value_norm"]
        self.value_norm = (float(vn[0]), float(vn[1])) if vn is not None else None
        self.reward_moments.load_state_dict(state["running"])

    def gather_rollout(self, ro: Rollout) -> Rollout:
        """Every rank's scored rollout concatenated in rank order, re-padded to the widest prompt (left)
        and response (right), which is the layout one process would have made of the global batch.
        Call before `compute_advantages`. With one process `ro` comes back as is."""
        if not self.dist.enabled:
            return ro
        if ro.advantages is not None:
            raise ValueError("gather_rollout takes a scored rollout before compute_advantages")
        d = self.dist
        P, R = ro.context_len, ro.mask.shape[1]
        P_all, R_all = all_reduce_max(P, d), all_reduce_max(R, d)

        def both(t: torch.Tensor, value: int) -> torch.Tensor:  # [b, P + R] -> [b, P_all + R_all]
            return torch.cat([F.pad(t[:, :P], (P_all - P, 0), value=value),
                              F.pad(t[:, P:], (0, R_all - R), value=value)], 1)

        def right(t: torch.Tensor) -> torch.Tensor:  # [b, R] -> [b, R_all], zeros where masked
            return F.pad(t, (0, R_all - R), value=0)

        def g(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else all_gather_cat(t, d)

        return Rollout(
            query_response=g(both(ro.query_response, self.pad_id)),
            attention_mask=g(both(ro.attention_mask, 0)),
            context_len=P_all,
            mask=g(right(ro.mask)),
            has_eos=g(ro.has_eos),
            logprobs=g(right(ro.logprobs)),
            ref_logprobs=g(right(ro.ref_logprobs)),
            entropy=g(right(ro.entropy)),
            values=g(right(ro.values)),
            raw_scores=g(ro.raw_scores),
            scores=g(ro.scores),
            verified=g(ro.verified),
            generation_s=all_reduce_max(ro.generation_s, d),  # the slowest rank's sampling holds all back
        )

    def compute_advantages(self, ro: Rollout) -> Rollout:
        a = self.args
        rewards, kl = compute_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, self.kl_ctl.value, a.kl.estimator
        )
        if a.whiten_rewards:
            rewards = masked_whiten(rewards, ro.mask, shift_mean=False)
        adv, ret = compute_gae(rewards, ro.values, ro.mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = masked_whiten(adv, ro.mask)
        ro.rewards, ro.kl, ro.advantages, ro.returns = rewards, kl, adv, ret
        return ro

    # ------------------------------------------------------------------ optimisation

    def _micro_loss(self, ro: Rollout, idx: torch.Tensor):
        """Token-mean losses and statistics of the rollouts `idx`, and their response-token count."""
        a = self.args
        qr, attn, mask = ro.query_response[idx], ro.attention_mask[idx], ro.mask[idx]
        # Trim to these rows: drop the prompt columns that are left padding in all of them and the response
        # columns past the longest response. Positions come from the mask, so the values are the same.
        P = ro.context_len
        lead = P - int(attn[:, :P].sum(1).max())
        R = int(mask.sum(1).max())
        qr, attn, mask = qr[:, lead : P + R], attn[:, lead : P + R], mask[:, :R]
        logp = self.policy_fwd(qr, attn, P - lead, a.temperature, mask)
        values = self._values(qr, attn, P - lead, train=True)
        pg, pstats = policy_loss(logp, ro.logprobs[idx, :R], ro.advantages[idx, :R], mask, a.clip_range)
        vf, vstats = value_loss(values, ro.values[idx, :R], ro.returns[idx, :R], mask, a.clip_range_value)
        loss = pg + a.vf_coef * vf
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(), **pstats, **vstats}
        if a.ptx_coef > 0:
            ptx = self.ptx_loss(self.ptx_sampler())
            loss = loss + a.ptx_coef * ptx
            stats["ptx_loss"] = ptx.detach()
        return loss, stats, int(mask.sum())

    def ptx_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the policy on a pretraining batch [b, L] (PPO-ptx)."""
        tokens = tokens.to(self.device)
        logits = self.policy_fwd(input_ids=tokens, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def _no_sync(self, skip: bool) -> contextlib.ExitStack:
        """DDP's no_sync on policy and critic while `skip` (micro-batches before the last of a minibatch:
        gradients pile up locally and are all-reduced once, on the last backward)."""
        stack = contextlib.ExitStack()
        if skip:
            for m in (self.policy_fwd, self.critic_fwd):
                if hasattr(m, "no_sync"):
                    stack.enter_context(m.no_sync())
        return stack

    @staticmethod
    def _weighted_stats(stats: dict[str, torch.Tensor], w: float) -> dict[str, float]:
        """One micro-batch piece's statistics (token means over its rows) as its part of the token means
        over the whole minibatch: w = its share of the minibatch's response tokens. ratio_var carries
        the weighted second moment of the ratio until `_minibatch_stats` subtracts the squared mean."""
        out = {k: float(v) * w for k, v in stats.items()}
        if "ratio_var" in stats:
            out["ratio_var"] = (float(stats["ratio_var"]) + float(stats["ratio_mean"]) ** 2) * w
        return out

    def _global_micro_stats(self, rows: list[dict[str, float]]) -> list[dict[str, float]]:
        """Sum every rank's weighted micro-batch rows, row by row (one all-reduce for the whole update)."""
        if not self.dist.enabled or not rows:
            return rows
        keys = list(rows[0])
        t = torch.tensor([[r[k] for k in keys] for r in rows], dtype=torch.float64, device=self.device)
        return [dict(zip(keys, row, strict=True)) for row in all_reduce_sum(t, self.dist).tolist()]

    @staticmethod
    def _minibatch_stats(rows: list[dict[str, float]]) -> dict[str, float]:
        """A minibatch's token-mean statistics: the sum of its weighted micro-batch rows, with ratio_var
        turned back into a variance (E[r^2] - mean^2, never below 0)."""
        out: dict[str, float] = {}
        for row in rows:
            for k, v in row.items():
                out[k] = out.get(k, 0.0) + v
        if "ratio_var" in out:
            out["ratio_var"] = max(out["ratio_var"] - out["ratio_mean"] ** 2, 0.0)
        return out

    def optimize(self, ro: Rollout, generator: torch.Generator | None = None) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled minibatches over `ro`; one optimizer step per minibatch.

        The loss of a minibatch is the token mean over all its response tokens, however it is split:
        each micro-batch's token-mean loss is weighted by its share of the minibatch's tokens, so k
        accumulated micro-batches give the update of one batch. That frees the split: a minibatch is
        cut into micro-batches of similar lengths (sorted by response, then prompt, length, as verl's
        dynamic batching does), so each is trimmed to little padding.

        Under torchrun `ro` is the gathered global batch and `generator` must be in the same state on
        every rank (None: rank 0 draws a seed and broadcasts it); each rank trains on every N-th row of
        each micro-batch with the same token-share weights (times N: DDP averages the gradients)."""
        a = self.args
        B, P = ro.query_response.shape[0], ro.context_len
        micro = a.mini_batch_size // a.grad_accum_steps
        world, rank = self.dist.world_size, self.dist.rank
        if self.dist.enabled and generator is None:
            seed = broadcast_object(int(torch.randint(0, 2**62, (1,))), self.dist)
            generator = torch.Generator().manual_seed(seed)
        resp_len = ro.mask.sum(1)
        length_key = resp_len * (P + 1) + ro.attention_mask[:, :P].sum(1)
        micro_stats: list[dict[str, float]] = []
        norms: list[dict[str, float]] = []
        tokens = 0
        self.first_minibatch_stats: dict[str, float] | None = None
        for _epoch in range(a.ppo_epochs):
            perm = torch.randperm(B, generator=generator)
            for mb_start in range(0, B, a.mini_batch_size):
                mb = perm[mb_start : mb_start + a.mini_batch_size]
                mb = mb[torch.argsort(length_key[mb], stable=True)]
                mb_tokens = float(resp_len[mb].sum())
                self.optimizer.zero_grad(set_to_none=True)
                self.critic_optimizer.zero_grad(set_to_none=True)
                for j in range(a.grad_accum_steps):
                    # Every N-th row: the ranks' pieces of a sorted micro-batch have similar lengths.
                    mine = mb[j * micro : (j + 1) * micro][rank::world]
                    w = float(resp_len[mine].sum()) / mb_tokens
                    with self._no_sync(j < a.grad_accum_steps - 1):
                        loss, stats, ntok = self._micro_loss(ro, mine)
                        (loss * (w * world)).backward()
                    micro_stats.append(self._weighted_stats(stats, w))
                    tokens += ntok
                # Each model is clipped on its own norm: a large critic gradient (typical early on, when
                # the value head is off) must not shrink the policy's step, nor the reverse. Under DDP the
                # gradients are already averaged here, so every rank clips and steps alike.
                mb_norms = {}
                for name, params, clip in (("policy_grad_norm", self.policy_params, a.optim.grad_clip),
                                           ("critic_grad_norm", self.critic_params, self.critic_grad_clip)):
                    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
                    mb_norms[name] = float(norm)
                norms.append(mb_norms)
                self.optimizer.step()
                self.critic_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        micro_stats = self._global_micro_stats(micro_stats)
        sums: dict[str, float] = {}
        for m, mb_norms in enumerate(norms):
            mb_stats = self._minibatch_stats(micro_stats[m * a.grad_accum_steps : (m + 1) * a.grad_accum_steps])
            mb_stats.update(mb_norms)
            if self.first_minibatch_stats is None:
                self.first_minibatch_stats = dict(mb_stats)
            for k, v in mb_stats.items():
                sums[k] = sums.get(k, 0.0) + v
        out = {k: v / len(norms) for k, v in sums.items()}
        if self.dist.enabled:
            tokens = int(all_reduce_sum(torch.tensor(tokens, device=self.device), self.dist))
        out["_train_tokens"] = tokens
        return out

    # ------------------------------------------------------------------ one iteration

    def step(
        self, prompts: list[list[int]], generator: torch.Generator | None = None, verifier: Verifier | None = None
    ) -> dict[str, float]:
        """Rollout + scoring + PPO epochs on `prompts`; returns the step's metrics (see `rollout` for
        `verifier`). Under torchrun `prompts` are this rank's share of the iteration's batch and the
        metrics are those of the global batch (the same on every rank)."""
        t0 = time.perf_counter()
        ro = self.gather_rollout(self.rollout(prompts, verifier))
        self.compute_advantages(ro)
        t1 = time.perf_counter()
        opt = self.optimize(ro, generator)
        t2 = time.perf_counter()
        m = ro.mask
        lengths = m.sum(1).float()
        kl_seq = ro.kl.sum(1)
        beta = self.kl_ctl.value
        self.kl_ctl.update(float(kl_seq.mean()), len(kl_seq))
        lr, critic_lr = self.optimizer.param_groups[0]["lr"], self.critic_optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.critic_scheduler.step()
        self.step_count += 1
        train_tokens = opt.pop("_train_tokens")
        metrics = {
            "rlhf_reward": float(ro.rewards.sum(1).mean()),
            "score": float(ro.scores.mean()),
            "score_raw": float(ro.raw_scores.mean()),
            "kl": float(kl_seq.mean()),
            "entropy": float(masked_mean(ro.entropy, m)),
            "explained_variance": explained_variance(ro.values, ro.returns, m),
            "eos_rate": float(ro.has_eos.float().mean()),
            "response_length": float(lengths.mean()),
            "beta": beta,
            "advantage_mean": float(masked_mean(ro.advantages, m)),
            "return_mean": float(masked_mean(ro.returns, m)),
            # Time split as NeMo-RL and verl report it: sampling, scoring (policy/reference log-probs,
            # values, rewards, advantages) and training; rollout = sampling + scoring.
            "rollout_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9),
            "generation_tokens_per_s": float(lengths.sum()) / max(ro.generation_s, 1e-9),
            "train_tokens_per_s": train_tokens / max(t2 - t1, 1e-9),
            "rollout_s": t1 - t0,
            "generation_s": ro.generation_s,
            "scoring_s": t1 - t0 - ro.generation_s,
            "train_s": t2 - t1,
            "lr": lr,
            "critic_lr": critic_lr,
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
            **opt,
        }
        if ro.verified is not None:
            metrics["score_rm"] = float(self.normalise_scores(ro.raw_scores, ro.has_eos).mean())
            # The true objective on the policy's own samples: the first place reward hacking shows.
            metrics["rollout_gold_accuracy"] = float(ro.verified.mean())
        self.last_rollout = ro
        return metrics

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit: trainable weights, optimizers, lr schedules, KL,
        reward normalisation, step."""
        trainable = {
            "policy": {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad},
            "value_model": {
                n: p.detach().clone() for n, p in self.value_model.named_parameters() if p.requires_grad
            },
        }
        return {
            "weights": trainable,
            **self.optim_state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_norm": self.reward_norm_state(),
            "step": self.step_count,
        }

    def optim_state_dict(self) -> dict:
        """Both optimizers and both lr schedules (torch.load(weights_only=True) can read it back)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "critic_scheduler": self.critic_scheduler.state_dict(),
        }

    def load_optim_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        # The optimizers restored the lr of the saved schedule; recompute it from this run's schedule,
        # which differs when a run is extended (a decay over `steps` stretched to the new count).
        for opt, sched in ((self.optimizer, self.scheduler), (self.critic_optimizer, self.critic_scheduler)):
            for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * fn(sched.last_epoch)

    def load_state_dict(self, state: dict) -> None:
        for key, model in (("policy", self.policy), ("value_model", self.value_model)):
            params = dict(model.named_parameters())
            saved = state["weights"][key]
            missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
            if missing:
                raise ValueError(
                    f"resume state has no weights for {key} parameters {missing[:3]}...; it was written by "
                    "a different model/LoRA setup. Delete the stage's state/ dir to start over."
                )
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
        self.load_optim_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.load_reward_norm_state(state["reward_norm"])
        self.step_count = int(state["step"])
