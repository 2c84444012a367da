"""PPO math for RLHF: masked statistics, log-probabilities, KL estimators, per-token rewards,
GAE, the clipped policy and value losses, and KL coefficient controllers.

Everything here is a pure function of tensors (no models), so each piece is unit-tested
against a closed form or a plain Python reference in tests/test_rl_core.py:

    from alignline.rl.core import compute_gae, policy_loss
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)

Shapes: per-token tensors are [batch, response_len]; `mask` is 1 on real response tokens
(up to and including the first EOS) and 0 after it. Masked positions never influence a
loss, an advantage or a statistic: they are zeroed or excluded before use, not after.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3"]


# --------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # `where` instead of `x * mask` so a NaN/inf at a masked position cannot leak through.
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    n = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over real tokens (1 = perfect critic)."""
    var_ret = masked_var(returns, mask, unbiased=False)
    if var_ret.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_ret)


# --------------------------------------------------------------------------- distributions


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits); logits [..., V], tokens [...]."""
    # log_softmax once then gather: cheaper than cross-entropy with reduction="none" on CPU
    # and exact in fp32.
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = q / p (unbiased, always >= 0, lower variance; Schulman 2020).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


# --------------------------------------------------------------------------- rewards


def compute_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t on every real token, plus the sequence score on the last one.

    Returns (rewards, kl) both [B, T] and zero at masked positions. `scores` [B] must already be
    normalised/clipped/penalised by the caller.
    """
    kl = torch.where(mask.bool(), kl_estimate(logp, ref_logp, kl_estimator), torch.zeros_like(logp))
    rewards = -beta * kl
    lengths = mask.long().sum(1)
    if (lengths == 0).any():
        raise ValueError("a response has no real token (mask all zero); every response must keep >= 1 token")
    last = lengths - 1  # the mask is a prefix, so the last real token sits at length - 1
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


# --------------------------------------------------------------------------- GAE


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; the episode ends after
    the last real token (V after it is 0). Returns (advantages, returns = A + V), zero where masked.
    """
    m = mask.to(values.dtype)
    # Zeroing masked rewards/values makes the bootstrap after the last real token exactly 0
    # and makes masked positions irrelevant whatever they hold.
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    v = torch.where(mask.bool(), values, torch.zeros_like(values))
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


# --------------------------------------------------------------------------- losses


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, averaged over real tokens. Returns (loss, detached stats)."""
    keep = mask.bool()
    log_ratio = torch.where(keep, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    adv = torch.where(keep, advantages, torch.zeros_like(advantages))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(old || new): exactly 0 when ratio == 1, never negative.
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), averaged over real tokens."""
    keep = mask.bool()
    zero = torch.zeros_like(values)
    v = torch.where(keep, values, zero)
    v_old = torch.where(keep, old_values, zero)
    ret = torch.where(keep, returns, zero)
    v_clipped = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


# --------------------------------------------------------------------------- running statistics


class RunningMoments:
    """Mean and (unbiased) std of every value seen so far, merged batch by batch (Chan et al. 1979),
    as OpenRLHF normalises rewards. Python floats in double precision: state is JSON-serialisable."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


# --------------------------------------------------------------------------- KL control


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + K_beta * e), e = clip(KL/target - 1, -0.2, 0.2),
    K_beta = n_steps / horizon. Pushes the observed KL towards `target`.

    The update is multiplicative, so a beta of 0 would stay 0 forever (TRL's and OpenRLHF's
    controllers have this trap). When the KL is above target, beta is first raised to `min_beta`
    and then scaled: a run may start free (`beta=0`) and the controller takes over once the
    policy drifts past the target. Below target beta shrinks as usual, under `min_beta` too."""

    def __init__(self, beta: float, target: float, horizon: int, min_beta: float = 0.0):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        if beta < 0 or min_beta < 0:
            raise ValueError(f"adaptive KL needs beta >= 0 and min_beta >= 0 (got {beta}, {min_beta})")
        if beta == 0 and min_beta == 0:
            raise ValueError("adaptive KL from beta 0 needs min_beta > 0, or beta could never rise")
        self.value, self.target, self.horizon = float(beta), float(target), int(horizon)
        self.min_beta = float(min_beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"KL is {current_kl}; the policy has diverged (lower the lr or raise beta)")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        if error > 0:
            self.value = max(self.value, self.min_beta)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
