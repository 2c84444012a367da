"""Stage `reward`: a reward model trained on preference pairs with TRL's RewardTrainer.

    python -m stages.reward --config configs/reward/tiny.yaml --run-dir runs/tiny     # --init runs/tiny/sft
    alignline stage reward --config configs/reward/tiny.yaml --init runs/tiny/sft --set train.max_steps=50
    torchrun --nproc_per_node=8 -m stages.reward --config configs/reward/1b.yaml --run-dir runs/1b

Under torchrun `train.batch_size` is the global batch (1/N per rank); rank 0 samples the on-policy
pairs (handed to every rank), scores the val pairs and writes the stage.

The model is `AlignlineForSequenceClassification` (num_labels=1) initialised from the SFT
checkpoint with a fresh score head; for a non-alignline checkpoint, AutoModelForSequenceClassification.
Inputs: `--init` (sft stage dir or HF causal LM dir; default `<run-dir>/sft`) and `--data`
(preference/{train,val}.jsonl: prompt / chosen / rejected in conversational form).

With `onpolicy.enabled`, the init policy is sampled on prompts/train.jsonl first and each distinct
wrong sample (by the suite's gold scorer) is paired against the gold answer and added to the
training pairs (alignline/rl/policy_pairs.py): the RM then sees the mistakes PPO will exploit.

eval.json, on the held-out val pairs: `accuracy` (chosen scored above rejected; with `n_pairs` and a
95% interval in `estimates`), mean `margin`, and `reward_mean` / `reward_std` of the chosen
(reference) responses; PPO normalises with these. On-policy pairs need a verifier (gold answers on
the prompts); with a user's prompts that have none they are skipped, with a warning and
`onpolicy.skipped` in eval.json.
With on-policy pairs also `onpolicy_accuracy` (the same on pairs sampled from prompts/val.jsonl)
and `onpolicy` (sample accuracy and pair counts).
Resume: Trainer checkpoints under `reward/state/trainer/`, like sft.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import Field

from alignline.artifacts import StageRun, model_dir
from alignline.config import (
    LoggingConfig,
    LoraArgs,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    TrainerLoopConfig,
    check_trainer_ranks,
)
from alignline.files import read_jsonl
from alignline.stage_cli import MODEL_STAGES, InputSpec, stage_main

log = logging.getLogger("stages.reward")

INPUTS = [
    InputSpec("init", default="sft", allow_hf_dir=True, kinds=MODEL_STAGES, help="model to start from: sft stage dir or HF model dir"),
    InputSpec("data", default="data", kinds=("data",), help="data stage directory (preference/{train,val}.jsonl)"),
]


class RewardTrainConfig(TrainerLoopConfig):
    """The shared Trainer loop keys (alignline.config.TrainerLoopConfig) plus the reward model's own."""

    batch_size: int = Field(32, gt=0, description="per-device pairs per step")
    max_length: int = Field(
        256, gt=0, description="tokens per prompt + answer, in training and eval; longer are cut"
    )
    center_rewards_coefficient: float | None = Field(None, ge=0, description="push mean reward toward 0")
    max_train_examples: int | None = Field(
        None, ge=1, description="first N pairs of preference/train.jsonl only (on-policy pairs come on top)"
    )


class RewardEvalConfig(StrictModel):
    batch_size: int = Field(64, gt=0, description="conversations per scoring batch on the val pairs")


class OnPolicyConfig(StrictModel):
    """Extra pairs from the init policy's own samples: gold answer (chosen) vs each distinct wrong
    sample (rejected), labelled by the task suite's gold scorer (alignline/rl/policy_pairs.py).
    They teach the reward model the mistakes PPO would otherwise exploit."""

    enabled: bool = Field(False, description="add pairs from the init policy's samples to the training pairs")
    prompts: int = Field(1000, gt=0, description="first N rows of prompts/train.jsonl to sample")
    val_prompts: int = Field(120, ge=0, description="rows of prompts/val.jsonl for onpolicy_accuracy (0 = off)")
    samples_per_prompt: int = Field(4, gt=0, description="sampled answers per prompt")
    max_pairs_per_prompt: int = Field(
        2, gt=0, description="at most N distinct wrong samples paired per prompt"
    )
    temperature: float = Field(1.0, gt=0, description="use the temperature PPO samples at")
    max_new_tokens: int = Field(16, gt=0, description="sampled answer length cap in tokens")
    batch_size: int = Field(64, gt=0, description="sequences per generation batch")


class Config(StrictModel):
    """Config of the reward stage."""

    train: RewardTrainConfig = Field(
        RewardTrainConfig(), description="TRL RewardTrainer: steps, batches, length"
    )
    optim: OptimConfig = Field(OptimConfig(lr=1e-3, weight_decay=0.0), description="AdamW")
    schedule: ScheduleConfig = Field(ScheduleConfig(warmup_steps=10), description="lr warmup and decay")
    lora: LoraArgs = Field(LoraArgs(), description="train LoRA adapters; checkpoint/ gets the merged model")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")
    eval: RewardEvalConfig = Field(
        RewardEvalConfig(), description="pair accuracy and margin on the val pairs"
    )
    onpolicy: OnPolicyConfig = Field(
        OnPolicyConfig(), description="extra pairs from the init policy's samples"
    )


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    mean = sum(chosen) / n
    std = math.sqrt(sum((c - mean) ** 2 for c in chosen) / max(n - 1, 1))
    return {
        # A tie counts half (as in win_rate): a val pair the max_length cut made identical is scored
        # identically, and is a coin flip, not a miss (length_fit counts those pairs).
        "accuracy": (sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)) / n,
        "margin": sum(margins) / n,
        "reward_mean": mean,
        "reward_std": std,
        "rejected_mean": sum(rejected) / n,
        "n_pairs": n,
    }


def policy_pairs(config: Config, src: Path, tokenizer, data_dir: Path) -> tuple[list, list, dict]:
    """(train pairs, val pairs, stats) sampled from the init policy; see OnPolicyConfig.

    A pair needs a verifier to tell the right sample from the wrong one: prompts without gold answers
    (a user's own prompts) give no on-policy pairs. That is logged and recorded in eval.json
    (`onpolicy.skipped`), so the reward model trains on the user's preference pairs alone."""
    from alignline.distributed import pick_device
    from alignline.evaluation import has_verifier
    from alignline.models import ensure_pad_token, load_causal_lm
    from alignline.rl.policy_pairs import sample_policy_pairs

    o = config.onpolicy
    path = data_dir / "prompts" / "train.jsonl"
    if not has_verifier(read_jsonl(path, o.prompts)):
        why = (f"no verifier: {path} has no gold answers, so right and wrong samples cannot be told apart; "
               "the reward model trains on the preference pairs alone (set onpolicy.enabled=false to say so)")
        log.warning("on-policy pairs skipped: %s", why)
        return [], [], {"skipped": why}
    device = pick_device(config.train.device)
    policy = load_causal_lm(src, device=device)
    ensure_pad_token(tokenizer, policy)  # the tokenizer may have gained a pad token (run): grow to match
    kw = dict(samples_per_prompt=o.samples_per_prompt, max_pairs_per_prompt=o.max_pairs_per_prompt,
              temperature=o.temperature, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size,
              seed=config.train.seed, progress=config.logging.progress)
    train, stats = sample_policy_pairs(policy, tokenizer, read_jsonl(data_dir / "prompts" / "train.jsonl")[: o.prompts],
                                       **kw)
    val, val_stats = ([], {})
    if o.val_prompts:
        val, val_stats = sample_policy_pairs(
            policy, tokenizer, read_jsonl(data_dir / "prompts" / "val.jsonl")[: o.val_prompts], **kw)
    log.info("on-policy pairs: %d train (policy sample accuracy %.3f), %d val", len(train),
             stats["sample_accuracy"], len(val))
    return train, val, {"train": stats, "val": val_stats}


def check_world_size(config: Config, world_size: int) -> None:
    """ConfigError unless `config` runs on `world_size` torchrun ranks (checked by `run` before any work,
    and by the pipeline before it launches torchrun)."""
    check_trainer_ranks(config.train, config.lora, world_size)


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    """Run the stage, alone or as one of N torchrun ranks (rank 0 samples the on-policy pairs,
    evaluates and writes the stage dir)."""
    from alignline.distributed import on_ranks, world_size

    check_world_size(config, world_size())
    return on_ranks(lambda dist: _run(config, inputs, run_dir, dist), config.train.device)


def _run(config: Config, inputs: dict[str, Path], run_dir: str | Path, dist) -> Path:
    # Heavy imports here, not at the top: `alignline stage reward --help` answers without torch.
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
    from alignline.chat import conversation_ids, length_fit, warn_if_cut
    from alignline.distributed import barrier, broadcast_object, pick_device
    from alignline.evaluation import estimate, mean_estimate, score_conversations
    from alignline.models import ensure_pad_token, load_chat_tokenizer, load_classifier
    from alignline.peft_utils import attach_lora, merge_lora
    from alignline.training import (
        build_optimizer,
        hf_trainer_args,
        metrics_callback,
        seed_everything,
        train_or_restore,
        trainer_resume_point,
        whole_model,
    )

    init_path, data_dir = Path(inputs["init"]), Path(inputs["data"])
    external = not (init_path / "manifest.json").exists()
    stage_inputs = {"data": data_dir} | ({} if external else {"init": init_path})
    pick_device(config.train.device)  # device: cuda on a machine without one fails before the stage dir exists
    run = StageRun(run_dir, "reward", config, inputs=stage_inputs, source=__file__,
                   external_inputs={"init": init_path} if external else {})
    src = model_dir(init_path)
    tokenizer = load_chat_tokenizer(src)

    seed_everything(config.train.seed)
    # The causal-LM checkpoint has no score head: it is created fresh (the load warning says so).
    model = load_classifier(src, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    # The score is read at each sequence's last non-pad token: pad must differ from eos (a released
    # base may have none, or reuse eos).
    added = ensure_pad_token(tokenizer, model)
    if added:
        log.warning("reward: %s", added)
    if config.lora.enabled:
        model = attach_lora(model, config.lora, config.train.gradient_checkpointing, task_type="SEQ_CLS")

    t = config.train
    cap = t.max_train_examples
    train_rows = read_jsonl(data_dir / "preference" / "train.jsonl")[: cap or None]
    val_rows = read_jsonl(data_dir / "preference" / "val.jsonl")
    onpolicy_val, onpolicy_stats = [], None
    if config.onpolicy.enabled:
        # Sampled once, by rank 0, and handed to the others: every rank trains on the same pairs.
        pairs = policy_pairs(config, src, tokenizer, data_dir) if run.is_main else None
        extra, onpolicy_val, onpolicy_stats = broadcast_object(pairs, dist)
        train_rows = train_rows + extra  # the Trainer shuffles

    def ds(rows):
        return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                  for r in rows])

    # TRL drops a training pair whose chosen or rejected conversation is longer than max_length; the
    # evaluation scores the first max_length tokens. Say how many, and how many val pairs the cut
    # makes identical (a pair the RM cannot tell apart counts as a miss), before training.
    fit = {}
    for name, rows in (("train", train_rows), ("val", val_rows)):
        chosen_ids = conversation_ids(tokenizer, [r["prompt"] + r["chosen"] for r in rows])
        rejected_ids = conversation_ids(tokenizer, [r["prompt"] + r["rejected"] for r in rows])
        fit[name] = length_fit([max(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids, strict=True)],
                               t.max_length, "dropped" if name == "train" else "truncated")
        if name == "val":
            fit[name]["identical_after_truncation"] = sum(
                c[: t.max_length] == r[: t.max_length] for c, r in zip(chosen_ids, rejected_ids, strict=True))
        warn_if_cut(fit[name], f"reward {name} pairs")
    args = RewardConfig(**hf_trainer_args(
            output_dir=run.mark_state() / "trainer", optim=config.optim, schedule=config.schedule,
            logging=config.logging, seed=t.seed, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
            grad_accum=t.grad_accum, eval_every=t.eval_every, save_every=t.save_every, device=t.device,
            precision=t.precision, gradient_checkpointing=t.gradient_checkpointing, parallel=t.parallel),
                        max_length=t.max_length,
                        center_rewards_coefficient=t.center_rewards_coefficient)
    resume, skip = trainer_resume_point(args.output_dir, run.metrics, "reward")
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=ds(train_rows), eval_dataset=ds(val_rows),
        processing_class=tokenizer, optimizers=(build_optimizer(model, config.optim), None),
        callbacks=[metrics_callback(run.metrics, skip)],
    )
    train_or_restore(trainer, resume, skip)

    trained = whole_model(trainer, t.parallel)
    if not run.is_main:  # rank 0 evaluates and writes the stage dir; the others wait for it, then leave
        barrier(dist)
        return run.path
    if config.lora.enabled:
        trained.save_pretrained(str(run.staging / "adapter"))
        trained = merge_lora(trained)
    chosen = score_conversations(trained, tokenizer, [r["prompt"] + r["chosen"] for r in val_rows],
                                 config.eval.batch_size, t.max_length)
    rejected = score_conversations(trained, tokenizer, [r["prompt"] + r["rejected"] for r in val_rows],
                                   config.eval.batch_size, t.max_length)
    metrics = pair_metrics(chosen, rejected)
    # Held-out accuracy with its sample size and 95% interval: 15 pairs say much less than 1,500.
    metrics["estimates"] = {"accuracy": estimate(metrics["accuracy"] * metrics["n_pairs"], metrics["n_pairs"]),
                            "margin": mean_estimate([c - r for c, r in zip(chosen, rejected, strict=True)])}
    if onpolicy_stats is not None:
        metrics["onpolicy"] = onpolicy_stats
        if onpolicy_val:
            c = score_conversations(trained, tokenizer, [r["prompt"] + r["chosen"] for r in onpolicy_val],
                                    config.eval.batch_size, t.max_length)
            r = score_conversations(trained, tokenizer, [r["prompt"] + r["rejected"] for r in onpolicy_val],
                                    config.eval.batch_size, t.max_length)
            metrics["onpolicy_accuracy"] = pair_metrics(c, r)["accuracy"]
            metrics["estimates"]["onpolicy_accuracy"] = estimate(metrics["onpolicy_accuracy"] * len(c), len(c))
    metrics["train_steps"] = trainer.state.global_step
    metrics["length_fit"] = fit  # pairs longer than train.max_length (train: dropped by TRL; val: cut)
    ckpt = run.staging / "checkpoint"
    trained.save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))
    run.metrics.log(trainer.state.global_step, val_accuracy=metrics["accuracy"], val_margin=metrics["margin"])
    headline = {k: metrics[k] for k in ("accuracy", "margin", "n_pairs", "reward_mean", "reward_std",
                                        "onpolicy_accuracy") if k in metrics}
    extra = {"external_init": str(init_path.resolve())} if external else {}
    out = run.finalize(eval=metrics, headline=headline, extra_manifest=extra)
    barrier(dist)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("reward", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
