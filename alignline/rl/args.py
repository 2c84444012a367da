"""PPO's arguments, importable without torch (so `alignline stage rlhf --help` starts fast).

`PPOHyperparameters` is the rlhf stage's `ppo:` section; `PPOArgs` adds the optimizer (the
stage's top-level `optim:`) and is what `alignline.rl.ppo.PPOTrainer` takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignline.config import ConfigError, OptimConfig, StrictModel


class KLArgs(StrictModel):
    """KL penalty in the reward: beta * (log p - log p_ref) per token."""

    beta: float = Field(0.05, ge=0, description="initial (or fixed) KL coefficient")
    estimator: Literal["k1", "k3"] = Field("k1", description="k1 = log ratio; k3 = (r-1) - log r, >= 0")
    adaptive: bool = Field(False, description="Ziegler et al. controller towards `target`")
    target: float = Field(6.0, gt=0, description="target KL per sequence (nats) for the adaptive controller")
    horizon: int = Field(10000, gt=0, description="adaptive controller horizon, in rollouts")
    min_beta: float = Field(
        0.01, ge=0,
        description="adaptive only: while the KL is above target, beta is raised to at least this before "
        "the multiplicative update, so a run can start from beta 0 (a plain multiplicative update keeps 0 "
        "at 0). No effect while beta >= min_beta",
    )


class PPOHyperparameters(StrictModel):
    """PPO hyperparameters without the optimizer: the `ppo:` section of configs/rlhf/*.yaml (the
    stage's learning rate is its top-level `optim:` section, as in every stage)."""

    rollout_batch_size: int = Field(32, gt=0, description="prompts sampled per PPO iteration")
    forward_batch_size: int = Field(64, gt=0, description="rows per generate/scoring forward (memory bound)")
    mini_batch_size: int = Field(8, gt=0, description="rollouts per optimizer step")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per minibatch")
    ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    max_new_tokens: int = Field(16, gt=0, description="response length cap; longer answers are cut (no EOS)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; also applied to log-probs")
    top_k: int = Field(0, ge=0, description="0 = off; anything else makes log-probs only approximate")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1.0 = off")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="value clip around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss in the summed loss")
    whiten_advantages: bool = Field(True, description="normalise advantages to mean 0, std 1 per rollout batch")
    whiten_rewards: bool = Field(False, description="scale per-token rewards to std 1 per rollout batch")
    kl: KLArgs = Field(KLArgs(), description="KL penalty against the reference policy")
    reward_clip: float | None = Field(None, gt=0, description="clip normalised scores to +-this; null = off")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of responses without EOS")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of the pretraining LM loss; 0 = off")
    verifier_weight: float = Field(
        0.0, ge=0,
        description="weight of a verifiable reward (the task's gold scorer, 0/1) added to the normalised RM "
        "score; 0 = RM only. With a verifier the rollout's gold accuracy is logged either way",
    )
    critic_lr: float | None = Field(
        None, gt=0,
        description="the critic's own learning rate (separate AdamW); null = optim.lr. A LoRA policy's lr "
        "is usually far too large for a fully trained critic",
    )
    critic_grad_clip: float | None = Field(
        None, ge=0,
        description="max grad norm of the critic, clipped separately from the policy's (optim.grad_clip); "
        "null = optim.grad_clip, 0 = off",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="lr schedule of policy and critic per PPO iteration, after warmup_iterations: constant, "
        "linear decay (TRL's default) or cosine decay, towards min_lr_ratio * lr at decay_iterations",
    )
    warmup_iterations: int = Field(0, ge=0, description="linear lr warmup over the first N iterations")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the decayed lr as a fraction of the peak")
    decay_iterations: int | None = Field(
        None, gt=0,
        description="iteration at which the decay ends; null = the stage's `steps` (then raising `steps` "
        "on resume stretches the rest of the decay)",
    )
    reward_norm: Literal["reward_stage", "policy_samples", "running"] = Field(
        "reward_stage",
        description="where the RM score's mean/std come from: reward_stage = the reward stage's eval.json "
        "(chosen answers of the validation pairs); policy_samples = the SFT policy's own samples on "
        "reward_norm_prompts training prompts, once before training (critic read on the same scale); "
        "running = running mean/std of every rollout so far, updated each iteration (OpenRLHF)",
    )
    reward_norm_prompts: int = Field(
        256, gt=0, description="policy_samples: how many training prompts are sampled for the statistics"
    )

    def check(self, world_size: int = 1) -> None:
        """Batch sizes that fit together, on `world_size` processes (torchrun ranks); ConfigError if not."""
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"ppo.rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                f"ppo.mini_batch_size={self.mini_batch_size}"
            )
        if self.mini_batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"ppo.mini_batch_size={self.mini_batch_size} must be a multiple of "
                f"ppo.grad_accum_steps={self.grad_accum_steps}"
            )
        if world_size > 1 and self.rollout_batch_size % world_size:
            raise ConfigError(
                f"ppo.rollout_batch_size={self.rollout_batch_size} does not split evenly over {world_size} "
                f"processes (torchrun --nproc_per_node / WORLD_SIZE={world_size}): each rank rolls out "
                f"rollout_batch_size / {world_size} prompts. Make it a multiple of {world_size}"
            )
        micro = self.mini_batch_size // self.grad_accum_steps
        if world_size > 1 and micro % world_size:
            raise ConfigError(
                f"a micro-batch of ppo.mini_batch_size / ppo.grad_accum_steps = {self.mini_batch_size} / "
                f"{self.grad_accum_steps} = {micro} rollouts does not split evenly over {world_size} processes "
                f"(WORLD_SIZE={world_size}): each rank trains on 1/{world_size} of every micro-batch. Make "
                f"mini_batch_size a multiple of grad_accum_steps x {world_size}"
            )


class PPOArgs(PPOHyperparameters):
    """Everything `PPOTrainer` takes: the hyperparameters plus the policy optimizer."""

    optim: OptimConfig = Field(
        OptimConfig(lr=3e-4, weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0),
        description="policy optimizer (AdamW); the critic uses the same betas/eps/weight decay",
    )
