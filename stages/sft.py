"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer (full fine-tune or LoRA).

    python -m stages.sft --config configs/sft/tiny.yaml --run-dir runs/tiny       # --init runs/tiny/pretrain
    alignline stage sft --config configs/sft/tiny.yaml --init runs/tiny/pretrain --set lora.enabled=true
    alignline stage sft --init /path/to/any/hf/causal-lm --data runs/tiny/data
    torchrun --nproc_per_node=8 -m stages.sft --config configs/sft/1b.yaml --run-dir runs/1b   # DDP, or
                                                      # --set train.parallel=fsdp (FSDP2, full fine-tune)

Inputs: `--init` (a pretrain/sft stage dir, or any HF causal LM dir with a chat-template tokenizer;
default `<run-dir>/pretrain`) and `--data` (its sft/{train,val}.jsonl in TRL's `messages` format).
Loss is on assistant tokens only (the chat template marks them with {% generation %}); packing is
optional. With `lora.enabled`, `adapter/` holds the PEFT adapter and `checkpoint/` the merged model.

Under torchrun `train.batch_size` is the global batch (1/N per rank; the same steps as one process);
every rank scores its share of the val chats, and rank 0 alone generates, saves and writes the stage.
Resume: the Trainer's checkpoints live under `sft/state/trainer/`; re-running with the same config
resumes from the newest one (`resume_from_checkpoint`). eval.json: val_loss and val_ppl on the
held-out chats (sft/val.jsonl, answers only), and greedy answers (chat template) to the first N
held-out prompts of prompts/test.jsonl, scored as gold_accuracy (with n and a 95% interval) where
the prompts have a verifier (the built-in suite; prompt files with answers), else `verifier: none`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import Field

from alignline.artifacts import StageRun, model_dir
from alignline.config import (
    InputError,
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

log = logging.getLogger("stages.sft")

INPUTS = [
    InputSpec("init", default="pretrain", allow_hf_dir=True, kinds=MODEL_STAGES,
              help="model to fine-tune: a stage dir or any HF causal LM dir"),
    InputSpec("data", default="data", kinds=("data",), help="data stage directory (sft/{train,val}.jsonl, prompts/test.jsonl)"),
]


class SFTTrainConfig(TrainerLoopConfig):
    """The shared Trainer loop keys (alignline.config.TrainerLoopConfig) plus SFT's own."""

    batch_size: int = Field(32, gt=0, description="per-device batch (conversations, or packed rows)")
    packing: bool = Field(False, description="pack conversations into rows of max_length tokens (TRL)")
    assistant_only_loss: bool = Field(
        True, description="loss on assistant tokens only ({% generation %} tags)"
    )
    max_train_examples: int | None = Field(None, ge=1, description="use the first N rows of sft/train.jsonl only")


class SFTEvalConfig(StrictModel):
    gold_prompts: int = Field(120, ge=0, description="first N of prompts/test.jsonl")
    max_new_tokens: int = Field(16, gt=0, description="greedy answer length cap in tokens")
    batch_size: int = Field(64, gt=0, description="prompts per generation batch")


class Config(StrictModel):
    """Config of the sft stage."""

    train: SFTTrainConfig = Field(
        SFTTrainConfig(), description="TRL SFTTrainer: steps, batches, length, cadence"
    )
    optim: OptimConfig = Field(OptimConfig(lr=1e-3, weight_decay=0.0), description="AdamW")
    schedule: ScheduleConfig = Field(ScheduleConfig(warmup_steps=10), description="lr warmup and decay")
    lora: LoraArgs = Field(LoraArgs(), description="train LoRA adapters; checkpoint/ gets the merged model")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")
    eval: SFTEvalConfig = Field(
        SFTEvalConfig(), description="gold accuracy on prompts/test.jsonl after training"
    )


def preflight(config: Config, inputs: dict[str, Path]) -> None:
    """The pipeline's check before any stage runs: an `init` from outside the run (a released model)
    exists and has a chat tokenizer (a missing pad token is fine: the stage adds one)."""
    from alignline.models import load_chat_tokenizer

    init = inputs.get("init")
    if init is None or (init / "manifest.json").exists():
        return
    if not init.is_dir():
        raise InputError(f"sft init {init} is not a directory; give a local HF model directory or a stage directory")
    load_chat_tokenizer(model_dir(init))


def check_world_size(config: Config, world_size: int) -> None:
    """ConfigError unless `config` runs on `world_size` torchrun ranks (checked by `run` before any work,
    and by the pipeline before it launches torchrun)."""
    check_trainer_ranks(config.train, config.lora, world_size)


def masked_examples(tokenizer, rows: list[dict]) -> list[dict]:
    """{"input_ids", "labels"} per chat, labels -100 outside the assistant turns
    (alignline.chat.encode_render: found by rendering, for templates without generation tags)."""
    from alignline.chat import encode_render

    out = []
    for r in rows:
        ids, mask = encode_render(tokenizer, r["messages"], tokenizer.chat_template)
        out.append({"input_ids": ids, "labels": [i if m else -100 for i, m in zip(ids, mask, strict=True)]})
    return out


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    """Run the stage, alone or as one of N torchrun ranks (rank 0 evaluates and writes the stage dir)."""
    from alignline.distributed import on_ranks, world_size

    check_world_size(config, world_size())
    return on_ranks(lambda dist: _run(config, inputs, run_dir, dist), config.train.device)


def _run(config: Config, inputs: dict[str, Path], run_dir: str | Path, dist) -> Path:
    # Heavy imports here, not at the top: `alignline stage sft --help` answers without torch.
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
    from alignline.chat import conversation_ids, has_generation_tags, length_fit, warn_if_cut
    from alignline.distributed import barrier, pick_device
    from alignline.evaluation import gold_eval, gold_summary, load_prompts
    from alignline.models import ensure_pad_token, load_causal_lm, load_chat_tokenizer
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
    stage_inputs = {"data": data_dir}
    external = not (init_path / "manifest.json").exists()
    if not external:
        stage_inputs["init"] = init_path
    pick_device(config.train.device)  # device: cuda on a machine without one fails before the stage dir exists
    # An HF model dir as init is not a stage: its content (not a manifest) goes into the reuse key.
    run = StageRun(run_dir, "sft", config, inputs=stage_inputs, source=__file__,
                   external_inputs={"init": init_path} if external else {})
    src = model_dir(init_path)
    tokenizer = load_chat_tokenizer(src)

    seed_everything(config.train.seed)
    model = load_causal_lm(src)
    # A released base often has no pad token, or pad = eos; PPO and the reward model need a distinct one.
    added = ensure_pad_token(tokenizer, model)
    if added:
        log.warning("sft: %s; it is saved with the checkpoint, so reward and rlhf use it", added)
    if config.lora.enabled:
        model = attach_lora(model, config.lora, gradient_checkpointing=config.train.gradient_checkpointing)

    train_rows = read_jsonl(data_dir / "sft" / "train.jsonl", config.train.max_train_examples)
    val_rows = read_jsonl(data_dir / "sft" / "val.jsonl")
    assistant_only = config.train.assistant_only_loss
    if assistant_only and not has_generation_tags(tokenizer.chat_template):
        # A released model's own template rarely marks the assistant's tokens with {% generation %},
        # which TRL needs for assistant-only loss; find them by rendering each turn's prefix (as the lora
        # stage does) and hand TRL the token ids with the labels already masked.
        train_ds, val_ds = (Dataset.from_list(masked_examples(tokenizer, rows)) for rows in (train_rows, val_rows))
        assistant_only = False  # the labels carry the mask
    else:
        train_ds = Dataset.from_list([{"messages": r["messages"]} for r in train_rows])
        val_ds = Dataset.from_list([{"messages": r["messages"]} for r in val_rows])

    t = config.train
    # Longer conversations are cut at max_length by the trainer: say how many, before training.
    fit = {name: length_fit([len(x) for x in conversation_ids(tokenizer, [r["messages"] for r in rows])],
                            t.max_length, "truncated")
           for name, rows in (("train", train_rows), ("val", val_rows))}
    for name, f in fit.items():
        warn_if_cut(f, f"sft {name}")
    args = SFTConfig(
        **hf_trainer_args(
            output_dir=run.mark_state() / "trainer", optim=config.optim, schedule=config.schedule,
            logging=config.logging, seed=t.seed, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
            grad_accum=t.grad_accum, eval_every=t.eval_every, save_every=t.save_every, device=t.device,
            precision=t.precision, gradient_checkpointing=t.gradient_checkpointing, parallel=t.parallel),
        max_length=t.max_length, packing=t.packing, assistant_only_loss=assistant_only,
        dataset_num_proc=None,
    )
    resume, skip = trainer_resume_point(args.output_dir, run.metrics, "sft")
    optimizer = build_optimizer(model, config.optim)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        optimizers=(optimizer, None), callbacks=[metrics_callback(run.metrics, skip)],
    )
    train_or_restore(trainer, resume, skip)
    val_loss = float(trainer.evaluate()["eval_loss"])  # every rank scores its share of the val chats

    trained = whole_model(trainer, t.parallel)
    if not run.is_main:  # rank 0 evaluates and writes the stage dir; the others wait for it, then leave
        barrier(dist)
        return run.path
    ckpt = run.staging / "checkpoint"
    if config.lora.enabled:
        trained.save_pretrained(str(run.staging / "adapter"))
        trained = merge_lora(trained)
    trained.generation_config.update(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    trained.save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))

    gold = None
    if config.eval.gold_prompts and (data_dir / "prompts" / "test.jsonl").is_file():
        rows = load_prompts(data_dir, "test", config.eval.gold_prompts)
        gold = gold_eval(trained, tokenizer, rows, config.eval.max_new_tokens, config.eval.batch_size)
    eval_out = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) else math.nan,  # on the held-out chats' answers
        "val_chats": len(val_rows),
        **gold_summary(gold),
        "train_steps": trainer.state.global_step,
        "lora": config.lora.enabled,
        "length_fit": fit,  # examples longer than train.max_length (truncated by the trainer)
    }
    extra = {"external_init": str(init_path.resolve())} if external else {}
    headline = {k: eval_out[k] for k in ("val_loss", "val_ppl", "gold_accuracy") if k in eval_out}
    out = run.finalize(eval=eval_out, headline=headline, samples=gold.samples if gold else [], extra_manifest=extra)
    barrier(dist)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("sft", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
