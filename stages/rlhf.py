"""Stage `rlhf`: align the SFT policy against the reward model with our PPO (default), or with
TRL's DPO / KTO / GRPO / RLOO in the same slot (`algorithm: ppo|dpo|kto|grpo|rloo`).

    alignline stage rlhf --config configs/rlhf/tiny.yaml --init RUN/sft --reward RUN/reward
    python -m stages.rlhf --config configs/rlhf/dpo_tiny.yaml --run-dir RUN      # DPO in the same slot
    torchrun --nproc_per_node=4 -m stages.rlhf --config configs/rlhf/1b.yaml --run-dir RUN

Inputs: `--init` (SFT stage: policy, reference, tokenizer), `--reward` (reward stage: reward
model, the value model's initialisation, and `reward_mean`/`reward_std` from its eval.json),
`--data` (data stage: prompts/, preference/, pretrain/; default: found through the SFT stage's
manifest inputs). Output `<run_dir>/rlhf-<algorithm>/` (rlhf-ppo/, rlhf-dpo/, rlhf-kto/, rlhf-grpo/,
rlhf-rloo/: `algorithm` is the config's `variant_key`, see `alignline.artifacts.stage_dir_name`),
so switching the algorithm in one run dir keeps the other's output, and each is cached and resumed
on its own. It follows the stage contract: checkpoint/ (merged policy + tokenizer), adapter/ (when
LoRA), state/ (resumable), metrics.jsonl, tb/, eval.json, samples.jsonl, manifest.json (`stage`
"rlhf", `variant` the algorithm). A plain `rlhf/` from an older alignline is moved to
`rlhf-<its algorithm>/` when the stage next runs.

eval.json compares the SFT and the trained policy on held-out prompts (prompts/test.jsonl):
RM score of greedy answers (normalised), KL to the reference (exact over the vocabulary along
sampled answers), win rate of the trained policy over SFT under the RM (with n and a 95% interval
in `estimates`), and, where the prompts have a verifier (gold answers: the built-in suite, or a
prompt file with an answer column), gold accuracy and `overoptimisation: true` when the RM score
rose while gold accuracy fell. Without a verifier those are absent (`verifier: "none"`), never 0.

Under torchrun (`nproc_per_node: N` in the pipeline), DPO, KTO, GRPO and RLOO run TRL's Trainer on N
ranks (DDP; `parallel: fsdp` for DPO): `<algorithm>.batch_size` is the global batch, 1/N per rank; rank
0 evaluates and writes the stage. PPO: every rank generates and scores
rollouts for its 1/N of each iteration's prompts (`ppo.rollout_batch_size` must split evenly, and
so must every micro-batch, `mini_batch_size / grad_accum_steps`), with its own sampling seed; the
scored rollouts are gathered, so reward normalisation, GAE, whitening, the adaptive KL controller
and every logged metric are those of the global batch. Policy and critic train through DDP
(`parallel: ddp`; fsdp is refused), each rank on its share of every micro-batch, so one optimizer
step equals one single-process step on the same global batch (alignline/rl/ppo.py). Rank 0 alone
writes state/, metrics.jsonl, tb/, and after training evaluates and saves the policy while the other
ranks wait at a barrier. A run resumes under torchrun like a single-process one: the sampling seeds
are a function of (seed, iteration, rank), so resuming with the same N continues the same run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from alignline.chat import conversation_ids, length_fit, prompt_ids, warn_if_cut
from alignline.config import (
    ConfigError,
    InputError,
    LoggingConfig,
    LoraArgs,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
)
from alignline.degeneration import output_stats
from alignline.files import read_jsonl
from alignline.rl.args import PPOArgs, PPOHyperparameters
from alignline.stage_cli import MODEL_STAGES, InputSpec, stage_main

# torch, the evaluation and the PPO trainer are imported where they run, so that
# `alignline stage rlhf --help` and config validation answer in well under a second.
if TYPE_CHECKING:
    import torch


log = logging.getLogger("alignline.stages.rlhf")

STAGE = "rlhf"


# --------------------------------------------------------------------------- config


class PromptsConfig(StrictModel):
    max_train: int | None = Field(None, gt=0, description="use at most this many training prompts")
    max_prompt_tokens: int = Field(128, gt=0, description="prompt length cap in tokens, chat template included")
    on_too_long: Literal["drop", "error"] = Field(
        "drop", description="a longer prompt: drop it (counted in eval.json length_fit, warned above 5%, shown "
        "in the report) or refuse the run naming it")


class PtxConfig(StrictModel):
    """PPO-ptx batches: packed blocks of the data stage's pretrain/train.jsonl."""

    batch_size: int = Field(4, gt=0, description="pretraining blocks per PPO-ptx batch")
    seq_len: int = Field(64, gt=1, description="tokens per pretraining block")


class EvalConfig(StrictModel):
    num_prompts: int = Field(64, gt=0, description="first N rows of prompts/test.jsonl")
    max_new_tokens: int = Field(16, gt=0, description="answer length cap in tokens (greedy and KL samples)")
    batch_size: int = Field(64, gt=0, description="prompts per generation and scoring batch")
    kl_samples: int = Field(1, gt=0, description="sampled answers per prompt for the KL estimate")


class DPOSection(StrictModel):
    """TRL DPOTrainer on preference/train.jsonl, reference = SFT."""

    beta: float = Field(0.1, gt=0, description="DPO's inverse temperature (strength of the implicit KL)")
    batch_size: int = Field(8, gt=0, description="preference pairs per optimizer step")
    max_length: int = Field(128, gt=8, description="prompt + answer tokens; longer pairs are cut")
    loss_type: str = Field("sigmoid", description="TRL DPO loss: sigmoid (DPO) | ipo | hinge | ...")


class KTOSection(StrictModel):
    """TRL KTOTrainer on unpaired labelled answers (data kto/train.jsonl, else the preference pairs
    unpaired: chosen good, rejected bad), reference = SFT."""

    beta: float = Field(0.1, gt=0, description="KTO's inverse temperature (strength of the implicit KL)")
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of the good answers")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of the bad answers")
    batch_size: int = Field(16, gt=1, description="labelled answers per optimizer step (> 1: KTO's KL term "
                            "pairs each prompt with another example's answer)")
    max_length: int = Field(128, gt=8, description="prompt + answer tokens; longer examples are cut")


class GroupSection(StrictModel):
    """TRL GRPOTrainer / RLOOTrainer with our reward model (normalised) as the reward function."""

    batch_size: int = Field(16, gt=0, description="completions per optimizer step (prompts x generations)")
    num_generations: int = Field(4, gt=1, description="completions sampled per prompt (the group)")
    max_completion_length: int = Field(16, gt=0, description="completion cap; longer ones are cut (no EOS)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    beta: float = Field(0.05, ge=0, description="KL coefficient against the SFT reference")
    gold_reward: bool = Field(False, description="add the gold scorer as a verifiable reward")
    gold_weight: float = Field(1.0, ge=0, description="weight of the gold reward")
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="subtracted from the normalised RM score of completions cut without EOS"
    )


ALGORITHMS = ("ppo", "dpo", "kto", "grpo", "rloo")


class RLHFConfig(StrictModel):
    """Config of the `rlhf` stage (configs/rlhf/*.yaml): the keys every algorithm has. The config is
    one of `PPOStageConfig`, `DPOStageConfig`, `GRPOStageConfig`, `RLOOStageConfig`, chosen by
    `algorithm` (a discriminated union: a DPO config carrying a `ppo:` section is an unknown key)."""

    # Each algorithm writes its own `rlhf-<algorithm>/` (alignline.artifacts.stage_dir_name), and its
    # value picks the config class (alignline.config: `variants`).
    variant_key: ClassVar[str] = "algorithm"
    variants: ClassVar[dict[str, type[StrictModel]]] = {}
    default_variant: ClassVar[str] = "ppo"

    algorithm: Literal["ppo", "dpo", "kto", "grpo", "rloo"] = Field(
        "ppo", description="ppo (ours) | dpo | kto | grpo | rloo (TRL); output dir rlhf-<algorithm>/")
    seed: int = Field(0, description="seeds models' init order, sampling and prompt order")
    steps: int = Field(30, gt=0, description="PPO iterations, or optimizer steps for dpo/kto/grpo/rloo")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when there is one")
    save_every: int = Field(10, gt=0, description="write resumable state every N steps")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun (nproc_per_node > 1): ddp = a full copy per rank, gradients averaged; "
        "fsdp = FSDP2 sharding (dpo only: PPO, KTO, GRPO and RLOO run ddp)")
    lora: LoraArgs = Field(LoraArgs(), description="train LoRA adapters on the policy (reference = adapters off)")
    prompts: PromptsConfig = Field(PromptsConfig(), description="the RL prompts (data stage prompts/train.jsonl)")
    eval: EvalConfig = Field(EvalConfig(), description="SFT vs trained policy on prompts/test.jsonl")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")


class PPOStageConfig(RLHFConfig):
    """`algorithm: ppo`: our PPO (alignline.rl.ppo)."""

    algorithm: Literal["ppo"] = Field("ppo", description="ppo: our PPO; output dir rlhf-ppo/")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun (nproc_per_node > 1): ddp wraps the PPO policy and critic in "
        "DistributedDataParallel. fsdp is not supported by this stage and is refused",
    )
    optim: OptimConfig = Field(
        PPOArgs.model_fields["optim"].default,
        description="policy AdamW (the critic takes its betas/eps/weight decay; ppo.critic_lr its lr)",
    )
    ppo: PPOHyperparameters = Field(PPOHyperparameters(), description="PPO hyperparameters")
    ptx: PtxConfig = Field(PtxConfig(), description="PPO-ptx batches (when ppo.ptx_coef > 0)")

    @field_validator("parallel")
    @classmethod
    def _no_fsdp(cls, v: str) -> str:
        if v == "fsdp":
            raise ValueError(
                "parallel: fsdp is not supported by the rlhf stage: PPO shards nothing; under torchrun its "
                "policy and critic are replicated and wrapped in DDP (FSDP2 would need lock-step generation "
                "across ranks and sharded checkpoints). Use parallel: ddp"
            )
        return v

    def ppo_args(self) -> PPOArgs:
        """What PPOTrainer takes: the `ppo:` section plus the stage's `optim:`."""
        return PPOArgs(**self.ppo.model_dump(), optim=self.optim)


# TRL's AdamW defaults (TrainingArguments), so DPO/GRPO/RLOO train as TRL would out of the box.
_TRL_ADAMW = dict(weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
_TRL_SCHEDULE = ScheduleConfig(kind="constant", warmup_steps=0)


class DPOStageConfig(RLHFConfig):
    """`algorithm: dpo`: TRL's DPOTrainer on the preference pairs."""

    algorithm: Literal["dpo"] = Field("dpo", description="dpo: TRL DPOTrainer; output dir rlhf-dpo/")
    optim: OptimConfig = Field(OptimConfig(lr=5e-4, **_TRL_ADAMW), description="AdamW (TRL Trainer)")
    schedule: ScheduleConfig = Field(_TRL_SCHEDULE, description="lr warmup and decay over `steps`")
    dpo: DPOSection = Field(DPOSection(), description="DPO hyperparameters")


class KTOStageConfig(RLHFConfig):
    """`algorithm: kto`: TRL's KTOTrainer on unpaired good/bad answers."""

    algorithm: Literal["kto"] = Field("kto", description="kto: TRL KTOTrainer; output dir rlhf-kto/")
    optim: OptimConfig = Field(OptimConfig(lr=5e-4, **_TRL_ADAMW), description="AdamW (TRL Trainer)")
    schedule: ScheduleConfig = Field(_TRL_SCHEDULE, description="lr warmup and decay over `steps`")
    kto: KTOSection = Field(KTOSection(), description="KTO hyperparameters")


class GRPOStageConfig(RLHFConfig):
    """`algorithm: grpo`: TRL's GRPOTrainer, rewarded by our reward model."""

    algorithm: Literal["grpo"] = Field("grpo", description="grpo: TRL GRPOTrainer; output dir rlhf-grpo/")
    optim: OptimConfig = Field(OptimConfig(lr=1e-3, **_TRL_ADAMW), description="AdamW (TRL Trainer)")
    schedule: ScheduleConfig = Field(_TRL_SCHEDULE, description="lr warmup and decay over `steps`")
    grpo: GroupSection = Field(GroupSection(), description="GRPO hyperparameters")


class RLOOStageConfig(RLHFConfig):
    """`algorithm: rloo`: TRL's RLOOTrainer, rewarded by our reward model."""

    algorithm: Literal["rloo"] = Field("rloo", description="rloo: TRL RLOOTrainer; output dir rlhf-rloo/")
    optim: OptimConfig = Field(OptimConfig(lr=1e-3, **_TRL_ADAMW), description="AdamW (TRL Trainer)")
    schedule: ScheduleConfig = Field(_TRL_SCHEDULE, description="lr warmup and decay over `steps`")
    rloo: GroupSection = Field(GroupSection(), description="RLOO hyperparameters")


RLHFConfig.variants.update(ppo=PPOStageConfig, dpo=DPOStageConfig, kto=KTOStageConfig, grpo=GRPOStageConfig,
                           rloo=RLOOStageConfig)
Config = RLHFConfig
AnyRLHFConfig = PPOStageConfig | DPOStageConfig | KTOStageConfig | GRPOStageConfig | RLOOStageConfig


def check_world_size(cfg: RLHFConfig, world_size: int) -> None:
    """ConfigError unless `cfg` can run on `world_size` torchrun ranks (called by `run` before any work,
    and by the pipeline before it launches torchrun)."""
    if world_size <= 1:
        return
    if cfg.algorithm == "ppo":
        cfg.ppo.check(world_size)
        return
    from alignline.config import split_batch

    split_batch(getattr(cfg, cfg.algorithm).batch_size, world_size, f"{cfg.algorithm}.batch_size")
    if cfg.parallel == "fsdp" and (cfg.algorithm != "dpo" or cfg.lora.enabled):
        raise ConfigError(f"parallel=fsdp is supported for algorithm=dpo without LoRA only (got algorithm="
                          f"{cfg.algorithm}, lora.enabled={cfg.lora.enabled}); use parallel=ddp")
    if cfg.parallel == "fsdp":
        from alignline.config import check_fsdp_device

        check_fsdp_device(cfg.device, "parallel")


def rank_seed(seed: int, step: int, rank: int, tag: str = "rollout") -> int:
    """A 63-bit seed for (run seed, PPO iteration, rank, purpose): torchrun ranks sample different
    rollouts, and a resumed run draws what an uninterrupted one would have."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# Keys that may change between a run and its resumption without discarding state/: how long to
# train, how often to save, log and evaluate. Anything else (lr, batch sizes, seed, ...) would make
# the resumed run a different experiment, so its state is discarded (the log names the keys).
RESUME_KEYS = ("steps", "save_every", "logging", "eval")

INPUTS = [
    InputSpec("init", default="sft", kinds=MODEL_STAGES, help="SFT stage dir (policy and reference)"),
    InputSpec("reward", default="reward", kinds=("reward",), help="reward stage dir (reward model, value init, normalisation)"),
    InputSpec("data", default="data", kinds=("data",), required=False,
              help="data stage dir (prompts, preference, pretrain); default: the SFT stage's data input"),
]


# --------------------------------------------------------------------------- inputs


def find_data_stage(start: Path, max_depth: int = 6) -> Path:
    """Walk manifest inputs from `start` back to the `data` stage that produced the suite."""
    from alignline.artifacts import load_stage

    frontier, seen = [Path(start)], set()
    for _ in range(max_depth):
        nxt = []
        for p in frontier:
            if p in seen:
                continue
            seen.add(p)
            sd = load_stage(p, verify=False)
            if sd.stage == "data":
                return p
            nxt += [Path(v["path"]) for v in sd.manifest.get("inputs", {}).values()]
        frontier = nxt
    raise FileNotFoundError(
        f"could not find the data stage among the inputs of {start}; pass --data RUN/data"
    )


def fit_prompts(tokenizer, rows: list[dict], cfg: PromptsConfig, source: Path, what: str
                ) -> tuple[list[dict], list[list[int]], dict]:
    """(rows, their chat-templated prompt ids, length fit) keeping the prompts of at most
    `max_prompt_tokens` tokens. A user's prompts vary in length: the longer ones are dropped and
    counted (`on_too_long: drop`) or refused (`error`); when none fits, that is an error."""
    ids = prompt_ids(tokenizer, [row["prompt"] for row in rows])
    fit = length_fit([len(x) for x in ids], cfg.max_prompt_tokens, "dropped", "prompts.max_prompt_tokens")
    over = [i for i, x in enumerate(ids) if len(x) > cfg.max_prompt_tokens]
    if over and (cfg.on_too_long == "error" or len(over) == len(rows)):
        raise InputError(
            f"{source}:{over[0] + 1}: prompt has {len(ids[over[0]])} tokens > prompts.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} ({len(over)} of {len(rows)} {what} are longer); raise prompts.max_prompt_tokens"
            + ("" if cfg.on_too_long == "drop" else " or set prompts.on_too_long=drop"))
    warn_if_cut(fit, f"rlhf {what}", "prompts.max_prompt_tokens")
    keep = [i for i, x in enumerate(ids) if len(x) <= cfg.max_prompt_tokens]
    return [rows[i] for i in keep], [ids[i] for i in keep], fit


def load_models(cfg: RLHFConfig, sft_ckpt: Path, reward_ckpt: Path, device: torch.device, need_value: bool):
    """(tokenizer, policy, ref or None, value or None, reward model), fp32, dropout off everywhere."""
    from transformers import AutoTokenizer

    from alignline.models import ensure_pad_token, load_causal_lm, load_classifier
    from alignline.rl.rollout import disable_dropout

    tok = AutoTokenizer.from_pretrained(str(sft_ckpt))
    policy = load_causal_lm(sft_ckpt, device=device)
    # PPO's masks need pad != eos; an init from the lora stage (a released model) may reuse eos.
    added = ensure_pad_token(tok, policy)
    if added:
        log.warning("rlhf: %s (the reward stage adds the same one, so the ids agree)", added)
    ref = None
    if cfg.lora.enabled:
        from alignline.peft_utils import attach_lora

        policy = attach_lora(policy, cfg.lora)
    else:
        ref = load_causal_lm(sft_ckpt, device=device)
        ensure_pad_token(tok, ref)  # grown like the policy when a pad token was added
        ref.requires_grad_(False)
        disable_dropout(ref)
    rm = load_classifier(reward_ckpt, device=device)
    if rm.get_input_embeddings().weight.shape[0] < len(tok):
        raise InputError(f"{reward_ckpt}: the reward model knows {rm.get_input_embeddings().weight.shape[0]} token "
                         f"ids, the policy's tokenizer {len(tok)}; train the reward stage from this SFT checkpoint")
    rm.requires_grad_(False)
    value = load_classifier(reward_ckpt, device=device) if need_value else None
    for m in (policy, rm, value):
        if m is not None:
            disable_dropout(m)
    return tok, policy, ref, value, rm


class PtxSampler:
    """Random fixed-length blocks of the tokenised pretraining corpus (PPO-ptx)."""

    def __init__(self, tokenizer, path: Path, batch_size: int, seq_len: int, seed: int):
        import torch

        rows = read_jsonl(path)
        ids: list[int] = []
        for r in rows:
            ids += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) < seq_len + 1:
            raise ValueError(f"{path}: only {len(ids)} tokens, fewer than ptx.seq_len={seq_len}")
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        import torch

        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.gen)
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])


def gold_verifier(tok, rows: list[dict]):
    """A PPO verifier for one rollout batch: 1.0 where the decoded response is the row's gold answer."""
    import torch

    from alignline.evaluation import gold_scores


    def verify(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:

        texts = tok.batch_decode([r[: int(m.sum())] for r, m in zip(responses, mask)], skip_special_tokens=True)
        return torch.tensor(gold_scores(texts, rows))

    return verify


def prompt_batch(n_prompts: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts for PPO iteration `step`: epoch-wise shuffles, a pure function of the
    step, so a resumed run sees the same prompts without storing a data position."""
    import torch

    out = []
    start = step * batch
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


# --------------------------------------------------------------------------- evaluation


def eval_prompts(cfg, tok, data_dir: Path) -> tuple[list[dict], dict]:
    """The first `eval.num_prompts` held-out prompts (prompts/test.jsonl) that fit
    prompts.max_prompt_tokens, and how many did not."""
    path = data_dir / "prompts" / "test.jsonl"
    rows, _, fit = fit_prompts(tok, read_jsonl(path, cfg.eval.num_prompts), cfg.prompts, path, "held-out prompts")
    return rows, fit


def evaluate_policies(cfg, tok, policy, ref, rm, rows, mean, std, temperature):
    """SFT vs trained policy on held-out prompts -> (eval dict, samples of the trained policy).

    `ref` is the frozen SFT model, or None when the policy is a PEFT model (then SFT = the policy
    with its adapters disabled)."""

    from contextlib import nullcontext

    from alignline.evaluation import (
        estimate,
        gold_scores,
        greedy_responses,
        has_verifier,
        kl_to_reference,
        overoptimised,
        per_task_accuracy,
        rm_scores,
        win_rate,
    )

    e = cfg.eval
    prompts = prompt_ids(tok, [r["prompt"] for r in rows])
    verified = has_verifier(rows)  # gold accuracy exists only where the prompts carry gold answers
    # rm_score means one thing in every eval.json: normalised with the reward stage's statistics.
    result: dict[str, Any] = {"num_prompts": len(rows), "verifier": "gold" if verified else "none",
                              "rm_normalisation": {"reward_mean": mean, "reward_std": std}, "estimates": {}}
    samples = []
    per_model: dict[str, torch.Tensor] = {}
    for name in ("sft", "policy"):
        model = ref if (name == "sft" and ref is not None) else policy
        ctx = policy.disable_adapter() if (name == "sft" and ref is None) else nullcontext()
        with ctx:
            responses = greedy_responses(model, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        raw = rm_scores(rm, [p + r for p, r in zip(prompts, responses, strict=True)], tok.pad_token_id, e.batch_size)
        scores = (raw - mean) / std
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        result[name] = {
            "rm_score": float(scores.mean()),
            "eos_rate": sum(int(len(x) > 0 and int(x[-1]) == tok.eos_token_id) for x in responses) / len(responses),
            "response_length": sum(len(x) for x in responses) / len(responses),
            "outputs": output_stats(texts),  # degeneration detectors (alignline.degeneration)
        }
        gold: list[float | None] = [None] * len(rows)
        if verified:
            gold = gold_scores(texts, rows)
            result[name]["gold_accuracy"] = sum(gold) / len(gold)
            result[name]["per_task"] = per_task_accuracy(gold, rows)
            result["estimates"][f"{name}_gold_accuracy"] = estimate(sum(gold), len(gold))
        per_model[name] = scores
        if name == "policy":
            samples = [
                {"prompt": r["prompt"][-1]["content"], "response": t, "task": r.get("task"), "rm_score": float(s),
                 **({"answer": r["answer"], "score": g} if verified else {})}
                for r, t, g, s in zip(rows, texts, gold, scores.tolist())
            ]
    result["kl_to_ref"] = kl_to_reference(policy, ref, prompts, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, max_new_tokens=e.max_new_tokens,
                                          batch_size=e.batch_size, temperature=temperature, samples=e.kl_samples)
    result["win_rate"] = win_rate(per_model["policy"], per_model["sft"])
    # The win rate's interval: a tie counts half a win, as in win_rate.
    result["estimates"]["win_rate"] = estimate(result["win_rate"] * len(rows), len(rows))
    result["rm_score_gain"] = result["policy"]["rm_score"] - result["sft"]["rm_score"]
    if verified:
        result["gold_accuracy_gain"] = result["policy"]["gold_accuracy"] - result["sft"]["gold_accuracy"]
        result["overoptimisation"] = overoptimised(result["rm_score_gain"], result["gold_accuracy_gain"])
    return result, samples


# --------------------------------------------------------------------------- outputs


def save_policy(policy, tok, out: Path, lora: bool) -> None:
    """checkpoint/ = merged HF model + tokenizer; adapter/ too when LoRA was trained."""
    if lora:
        policy.save_pretrained(str(out / "adapter"))
        import copy

        merged = copy.deepcopy(policy).merge_and_unload()
        merged.save_pretrained(str(out / "checkpoint"))
    else:
        policy.save_pretrained(str(out / "checkpoint"))
    tok.save_pretrained(str(out / "checkpoint"))


# --------------------------------------------------------------------------- PPO


def run_ppo(cfg: RLHFConfig, run, sft, reward, data_dir: Path, device, dist=None) -> tuple[dict | None, list[dict]]:
    """Train and (rank 0) evaluate -> (eval dict, samples); other torchrun ranks return (None, [])."""
    import torch
    from tqdm.auto import tqdm

    from alignline.distributed import DistInfo, broadcast_object
    from alignline.evaluation import has_verifier, reward_normalisation
    from alignline.rl.ppo import PPOTrainer
    from alignline.training import maybe_interrupt, seed_everything

    dist = dist if dist is not None else DistInfo()
    world, rank = dist.world_size, dist.rank

    seed_everything(cfg.seed)
    mean, std = reward_normalisation(reward)
    tok, policy, ref, value, rm = load_models(cfg, sft.checkpoint, reward.checkpoint, device, need_value=True)
    prompt_path = data_dir / "prompts" / "train.jsonl"
    rows, prompts, prompt_fit = fit_prompts(tok, read_jsonl(prompt_path, cfg.prompts.max_train), cfg.prompts,
                                            prompt_path, "training prompts")
    has_gold = has_verifier(rows)  # rollouts are scored against gold answers too (logged; verifier_weight)
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        ptx = PtxSampler(tok, data_dir / "pretrain" / "train.jsonl", cfg.ptx.batch_size, cfg.ptx.seq_len, cfg.seed)
    trainer = PPOTrainer(cfg.ppo_args(), policy, value, rm, ref_policy=ref, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, reward_mean=mean, reward_std=std, ptx_sampler=ptx, device=device,
                         total_iterations=cfg.steps, dist=dist)

    start = 0
    last: dict[str, float] = {}
    trained_s = 0.0  # training seconds of earlier (interrupted) processes of this run
    meta = run.load_state(trainer=trainer)  # the trainer's own state_dict, and the RNG streams
    if dist.enabled:  # every rank must resume from the state rank 0 chose (it owns state/)
        chosen = broadcast_object(meta["path"] if meta else None, dist)
        if (meta["path"] if meta else None) != chosen:
            raise RuntimeError(f"rank {rank} found resume state {meta and meta['path']} but rank 0 chose {chosen}")
    if meta is not None:
        start = int(meta["step"])
        if start > cfg.steps:
            raise ValueError(
                f"{run.state_dir} holds iteration {start} but steps={cfg.steps}; a run can be extended, not "
                f"shortened. Set steps >= {start}, or delete {run.state_dir} to start over"
            )
        # The last iteration's statistics and the training time: a re-run after a failed evaluation
        # trains nothing and still writes the eval.json the first run would have.
        last = dict(meta["extra"].get("last") or {})
        trained_s = float(meta["extra"].get("train_seconds", 0.0))
        # Under torchrun ptx draws are reseeded every iteration (and a torchrun state has no ptx_rng).
        if ptx is not None and not dist.enabled and "ptx_rng" in meta["extra"]:
            ptx.gen.set_state(torch.tensor(meta["extra"]["ptx_rng"], dtype=torch.uint8))
        run.metrics.truncate_after(start)  # StageRun.load_state logged "rlhf-ppo: resumed from step N"
    elif cfg.ppo.reward_norm == "policy_samples":
        n = min(cfg.ppo.reward_norm_prompts, len(prompts))
        idx = prompt_batch(len(prompts), n, 0, cfg.seed + 1)  # not the first iteration's batch
        if dist.enabled:  # each rank samples its share, with its own seed; the statistics are gathered
            torch.manual_seed(rank_seed(cfg.seed, -1, rank))
            idx = idx[rank::world]
        r_mean, r_std = trainer.calibrate_reward_norm([prompts[i] for i in idx])
        log.info("reward normalisation from %d SFT samples: mean %.4f std %.4f (reward stage: %.4f, %.4f)",
                 n, r_mean, r_std, mean, std)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="ppo",
               disable=not (cfg.logging.progress and dist.is_main))
    t0 = time.time()
    share = cfg.ppo.rollout_batch_size // world
    for step in bar:
        idx = prompt_batch(len(prompts), cfg.ppo.rollout_batch_size, step, cfg.seed)
        generator = None
        if dist.enabled:
            # This rank's slice of the global batch, its own sampling (and ptx) seed, and one minibatch
            # shuffle shared by all ranks; all pure functions of the iteration, so resume needs no RNG.
            idx = idx[rank * share : (rank + 1) * share]
            torch.manual_seed(rank_seed(cfg.seed, step, rank))
            generator = torch.Generator().manual_seed(rank_seed(cfg.seed, step, -1, "shuffle"))
            if ptx is not None:
                ptx.gen.manual_seed(rank_seed(cfg.seed, step, rank, "ptx"))
        verifier = gold_verifier(tok, [rows[i] for i in idx]) if has_gold else None
        last = trainer.step([prompts[i] for i in idx], generator=generator, verifier=verifier)
        if dist.is_main and (step + 1) % cfg.logging.every_steps == 0:
            run.metrics.log(step + 1, **last)
        post = dict(score=f"{last['score']:.3f}", kl=f"{last['kl']:.3f}", eos=f"{last['eos_rate']:.2f}")
        if "rollout_gold_accuracy" in last:
            post["gold"] = f"{last['rollout_gold_accuracy']:.2f}"
        bar.set_postfix(**post)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            extra = {"last": last, "train_seconds": trained_s + time.time() - t0}
            if ptx is not None and not dist.enabled:
                extra["ptx_rng"] = ptx.gen.get_state().tolist()
            run.save_state(step + 1, trainer=trainer, extra=extra)
        maybe_interrupt(step + 1)
    train_time = trained_s + time.time() - t0
    if not dist.is_main:  # rank 0 evaluates and writes the policy; the others wait in `run`
        return None, []

    # The final iteration's state is saved above, before evaluating: a failure (OOM, bug) from here on
    # costs a re-run the evaluation only, not the training.
    rows_test, eval_fit = eval_prompts(cfg, tok, data_dir)
    ev, samples = evaluate_policies(cfg, tok, policy, ref, rm, rows_test, mean, std, cfg.ppo.temperature)
    ev["length_fit"] = {"prompts": prompt_fit, "eval prompts": eval_fit}
    ev["train"] = {"steps": cfg.steps, "resumed_from": start, "seconds": round(train_time, 2),
                   "final": {k: last.get(k) for k in ("score", "kl", "eos_rate", "response_length", "beta")}}
    if dist.enabled:
        ev["train"]["world_size"] = world
    save_policy(policy, tok, run.staging, cfg.lora.enabled)
    return ev, samples


# --------------------------------------------------------------------------- TRL algorithms


class RMReward:
    """A GRPO/RLOO reward function: the reward model's score of prompt+completion, normalised with
    the reward stage's mean/std (the same scale PPO uses), minus `missing_eos_penalty` for completions
    cut at max_completion_length without EOS.

    The RM reads the templated prompt followed by the completion's generated token ids, exactly as
    PPO scores its rollouts. Re-templating prompt + completion text would close every completion with
    EOS, so a truncated one would be scored as a finished answer and escape the penalty."""

    def __init__(self, rm, tok, mean: float, std: float, missing_eos_penalty: float = 0.0):
        self.rm, self.tok, self.mean, self.std = rm, tok, mean, std
        self.missing_eos_penalty = float(missing_eos_penalty)
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        import torch

        from alignline.evaluation import rm_scores

        completion_ids = [list(c) for c in completion_ids]
        seqs = [p + c for p, c in zip(prompt_ids(self.tok, prompts), completion_ids, strict=True)]
        has_eos = torch.tensor([bool(c) and c[-1] == self.tok.eos_token_id for c in completion_ids])
        raw = rm_scores(self.rm, seqs, self.tok.pad_token_id, batch_size=len(seqs)).double()
        return ((raw - self.mean) / self.std - self.missing_eos_penalty * (~has_eos).double()).tolist()


def kto_rows(data_dir: Path) -> tuple[list[dict], str]:
    """(KTO examples {prompt, completion, label}, where they came from): the data stage's kto/train.jsonl
    (a user's unpaired labelled answers), else each preference pair unpaired into its chosen answer
    (good) and its rejected one (bad), as KTO's paper does with paired data."""
    path = data_dir / "kto" / "train.jsonl"
    if path.is_file():
        return read_jsonl(path), str(path)
    pairs = read_jsonl(data_dir / "preference" / "train.jsonl")
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pairs for side in ("chosen", "rejected")]
    return rows, f"{data_dir / 'preference' / 'train.jsonl'} (unpaired)"


def gold_reward(prompts, completions, answer, match, **kwargs) -> list[float]:
    """Verifiable reward: 1 when the completion is exactly the gold answer."""
    from alignline.evaluation import gold_scores

    rows = [{"answer": a, "match": m} for a, m in zip(answer, match, strict=True)]
    return gold_scores([c[-1]["content"] for c in completions], rows)


def run_trl(cfg: RLHFConfig, run, sft, reward, data_dir: Path, device) -> tuple[dict, list[dict]]:
    from datasets import Dataset

    from alignline.evaluation import reward_normalisation
    from alignline.training import (
        hf_trainer_args,
        metrics_callback,
        seed_everything,
        train_or_restore,
        trainer_resume_point,
        whole_model,
    )

    seed_everything(cfg.seed)
    mean, std = reward_normalisation(reward)
    algo = cfg.algorithm
    tok, policy, ref, _, rm = load_models(cfg, sft.checkpoint, reward.checkpoint, device, need_value=False)
    state_dir = run.mark_state()
    resume, start = trainer_resume_point(state_dir, run.metrics, run.name)
    callbacks = [metrics_callback(run.metrics, skip_through=start)]
    section = getattr(cfg, algo)
    fit = None
    common = hf_trainer_args(
        output_dir=state_dir, optim=cfg.optim, schedule=cfg.schedule, logging=cfg.logging, seed=cfg.seed,
        max_steps=cfg.steps, batch_size=section.batch_size, save_every=cfg.save_every, device=device.type,
        precision="fp32", parallel=cfg.parallel, batch_key=f"{algo}.batch_size")
    # Every step logged; no recomputation (tiny models: it costs more than the memory it saves).
    common.update(logging_steps=1, gradient_checkpointing=False)
    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        d = section
        rows = read_jsonl(data_dir / "preference" / "train.jsonl")
        # DPO keeps the first max_length tokens of prompt + answer; a pair whose prompt fills them
        # trains on nothing. Say how many, before training.
        chosen_ids = conversation_ids(tok, [r["prompt"] + r["chosen"] for r in rows])
        rejected_ids = conversation_ids(tok, [r["prompt"] + r["rejected"] for r in rows])
        fit = length_fit([max(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids, strict=True)],
                         d.max_length, "truncated", "dpo.max_length")
        fit["prompt_fills_max_length"] = sum(len(p) >= d.max_length for p in prompt_ids(tok, [r["prompt"] for r in rows]))
        warn_if_cut(fit, "dpo train pairs", "dpo.max_length")
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
        args = DPOConfig(beta=d.beta, max_length=d.max_length, loss_type=[d.loss_type], **common)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=callbacks)
    elif algo == "kto":
        from trl import KTOConfig, KTOTrainer

        k = section
        rows, source = kto_rows(data_dir)
        fit = length_fit([len(x) for x in conversation_ids(tok, [r["prompt"] + r["completion"] for r in rows])],
                         k.max_length, "truncated", "kto.max_length")
        fit["source"], fit["desirable"] = source, sum(bool(r["label"]) for r in rows)
        warn_if_cut(fit, "kto train examples", "kto.max_length")
        ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])}
                                for r in rows])
        args = KTOConfig(beta=k.beta, desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                         max_length=k.max_length, **common)
        trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=callbacks)
    else:
        g = section
        path = data_dir / "prompts" / "train.jsonl"
        rows, _, fit = fit_prompts(tok, read_jsonl(path, cfg.prompts.max_train), cfg.prompts, path, "training prompts")
        ds = Dataset.from_list([{"prompt": r["prompt"], **({"answer": r["answer"], "match": r.get("match", "exact")}
                                                            if g.gold_reward else {})} for r in rows])
        funcs: list = [RMReward(rm, tok, mean, std, g.missing_eos_penalty)]
        weights = [1.0]
        if g.gold_reward:
            funcs.append(gold_reward)
            weights.append(g.gold_weight)
        kw = dict(num_generations=g.num_generations,
                  max_completion_length=g.max_completion_length, temperature=g.temperature, beta=g.beta,
                  reward_weights=weights, **common)
        if algo == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=GRPOConfig(**kw), train_dataset=ds,
                                  processing_class=tok, callbacks=callbacks)
        else:
            from trl import RLOOConfig, RLOOTrainer

            trainer = RLOOTrainer(model=policy, reward_funcs=funcs, args=RLOOConfig(**kw), train_dataset=ds,
                                  processing_class=tok, callbacks=callbacks)
    t0 = time.time()
    train_or_restore(trainer, resume, start)
    train_time = time.time() - t0
    policy = whole_model(trainer, cfg.parallel)
    if policy is None:  # not rank 0 under torchrun: rank 0 evaluates and writes the policy
        return None, []
    from alignline.rl.rollout import disable_dropout

    disable_dropout(policy)
    if ref is None and not cfg.lora.enabled:
        raise RuntimeError("internal: no reference model for evaluation")
    rows_test, eval_fit = eval_prompts(cfg, tok, data_dir)
    temperature = 1.0 if algo in ("dpo", "kto") else section.temperature
    ev, samples = evaluate_policies(cfg, tok, policy, ref, rm, rows_test, mean, std, temperature)
    ev["train"] = {"steps": cfg.steps, "resumed_from": start, "seconds": round(train_time, 2)}
    ev["length_fit"] = {"train" if algo in ("dpo", "kto") else "prompts": fit, "eval prompts": eval_fit}
    save_policy(policy, tok, run.staging, cfg.lora.enabled)
    return ev, samples


# --------------------------------------------------------------------------- entry points


def check_verifier_needs(cfg: RLHFConfig, data_dir: Path) -> None:
    """A verifiable reward (ppo.verifier_weight, grpo/rloo gold_reward) needs gold answers on the
    training prompts; refused before the stage dir exists when they have none."""
    from alignline.evaluation import has_verifier

    section = getattr(cfg, cfg.algorithm)
    if cfg.algorithm == "ppo":
        key, wants = "ppo.verifier_weight", section.verifier_weight > 0
    else:
        key, wants = f"{cfg.algorithm}.gold_reward", bool(getattr(section, "gold_reward", False))
    if not wants:
        return
    path = data_dir / "prompts" / "train.jsonl"
    if not has_verifier(read_jsonl(path, cfg.prompts.max_train)):
        off = "ppo.verifier_weight=0" if cfg.algorithm == "ppo" else f"{key}=false"
        raise InputError(
            f"{key} needs a gold `answer` on every row of {path}; the built-in suite's prompts have one, and so "
            f"do prompt files with an answer column (data stage files.prompts). Set {off} for prompts "
            "without answers")



def run(cfg: RLHFConfig, inputs: dict[str, Path], run_dir: Path) -> Path:
    """Run the rlhf stage; returns `<run_dir>/rlhf-<cfg.algorithm>`."""
    from alignline.distributed import cleanup, init_distributed

    # Batch sizes against the number of ranks before anything is opened, loaded or joined.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.algorithm == "ppo":
        cfg.ppo.check()
    check_world_size(cfg, world)
    dist = init_distributed(cfg.device) if world > 1 else None
    try:
        return _run(cfg, inputs, run_dir, dist)
    finally:
        if dist is not None:
            cleanup(dist)


def _run(cfg: RLHFConfig, inputs: dict[str, Path], run_dir: Path, dist) -> Path:
    import torch

    from alignline.artifacts import StageRun
    from alignline.distributed import barrier, pick_device

    stage_inputs = {"init": inputs["init"], "reward": inputs["reward"]}
    if inputs.get("data"):
        data_dir = Path(inputs["data"])
        try:
            lineage = find_data_stage(Path(inputs["init"]))
        except FileNotFoundError:
            lineage = None  # e.g. an SFT dir made outside the pipeline: nothing to compare with
        if lineage is not None and lineage.resolve() != data_dir.resolve():
            log.warning("--data %s is not the data stage the SFT model was trained from (%s)", data_dir, lineage)
    else:
        data_dir = find_data_stage(Path(inputs["init"]))
    stage_inputs["data"] = data_dir
    check_verifier_needs(cfg, data_dir)
    pick_device(cfg.device)  # device: cuda on a machine without one fails before the stage dir exists
    run_ = StageRun(run_dir, STAGE, cfg, inputs=stage_inputs, source=__file__, resume_keys=RESUME_KEYS)
    sft, reward = run_.input("init"), run_.input("reward")
    t0 = time.time()
    if dist is not None:
        device = torch.device(dist.device)
        if cfg.algorithm == "ppo":
            ev, samples = run_ppo(cfg, run_, sft, reward, data_dir, device, dist)
        else:
            ev, samples = run_trl(cfg, run_, sft, reward, data_dir, device)
        if ev is None:  # not rank 0: wait until rank 0 has evaluated and finalized the stage
            barrier(dist)
            return run_.path
    else:
        device = torch.device(pick_device(cfg.device))
        fn = run_ppo if cfg.algorithm == "ppo" else run_trl
        ev, samples = fn(cfg, run_, sft, reward, data_dir, device)
    ev = {"algorithm": cfg.algorithm, **ev, "wall_time_s": round(time.time() - t0, 2)}
    headline = {
        "rm_score": ev["policy"]["rm_score"],
        "gold_accuracy": ev["policy"].get("gold_accuracy"),  # absent without a verifier
        "sft_rm_score": ev["sft"]["rm_score"],
        "sft_gold_accuracy": ev["sft"].get("gold_accuracy"),
        "win_rate": ev["win_rate"],
        "kl": ev["kl_to_ref"],
        "kl_to_ref": ev["kl_to_ref"],
        "overoptimisation": ev.get("overoptimisation"),
    }
    headline = {k: v for k, v in headline.items() if v is not None}
    out = run_.finalize(eval=ev, headline=headline, samples=samples)
    if dist is not None:
        barrier(dist)
    return out


def main(argv: Sequence[str] | None = None):
    return stage_main(STAGE, RLHFConfig, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
