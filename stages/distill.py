"""Stage `distill`: knowledge distillation of a teacher into a smaller student (TRL DistillationTrainer).

    python -m stages.distill --config configs/distill/tiny.yaml --run-dir runs/tiny   # teacher runs/tiny/rlhf-ppo
    alignline stage distill --teacher runs/tiny/sft --set loss.divergence=reverse_kl --set loss.on_policy_fraction=1
    alignline stage distill --teacher /models/big --student /models/small --set student.lora.enabled=true
    alignline stage distill --set teacher_model=org/name --set student.model.hidden_size=256   # a hub teacher
    torchrun --nproc_per_node=2 -m stages.distill --config configs/distill/tiny.yaml --run-dir runs/tiny

Inputs: `--teacher` (any checkpoint alignline loads: a stage dir, an HF model dir; default the run's rlhf
output; `teacher_model` takes a hub id instead), `--student` (a stage or HF dir to start from; left out, a
fresh alignline decoder of shape `student.model` on the teacher's tokenizer, e.g. half the width), `--data`
(the data stage: its sft chats or RL prompts train, its sft/val chats and prompts/test.jsonl evaluate;
`data.train` takes a user file) and optionally `--reward` (RM scores of both models).

Teacher and student must share a tokenizer; a mismatch is refused before anything is written, naming both
vocabulary sizes. The loss (alignline/distill.py): forward KL, reverse KL or the generalised JSD of the
student's and teacher's softmax(logits / T) on the answer tokens; supervised (teacher-forced on the data's
answers), on-policy (the student samples, the teacher scores) or a per-batch mix (`on_policy_fraction`); and
the ground-truth SFT loss mixed in with `sft_weight` (1 = plain SFT on the same batches: the baseline).
LoRA or full student. Under torchrun `train.batch_size` is the global batch; rank 0 evaluates and writes.

Resume: Trainer checkpoints under `distill/state/trainer/`; re-running the same config continues from the
newest. eval.json compares student and teacher on the same held-out data, one row each: val loss on the sft
val chats' answers, gold accuracy on prompts/test.jsonl (where there is a verifier), RM score (with a reward
model), parameters and greedy generation tokens/s; and for the student, KL(student || teacher) along its
own samples, its loss on the teacher's greedy answers, and how often its answer equals the teacher's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.artifacts import StageRun, model_dir
from alignline.config import (
    ConfigError,
    InputError,
    LoggingConfig,
    LoraArgs,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    TrainerLoopConfig,
    check_trainer_ranks,
)
from alignline.stage_cli import MODEL_STAGES, InputSpec, stage_main

log = logging.getLogger("stages.distill")

INPUTS = [
    InputSpec("teacher", default="rlhf", required=False, allow_hf_dir=True, kinds=MODEL_STAGES,
              variants=True, help="teacher: a stage dir or HF model dir (default: the run's rlhf output)"),
    InputSpec("student", default=None, required=False, allow_hf_dir=True, kinds=MODEL_STAGES,
              help="student to start from (stage or HF dir); left out: a fresh decoder of shape student.model"),
    InputSpec("data", default="data", kinds=("data",),
              help="data stage (sft/{train,val}.jsonl, prompts/{train,test}.jsonl)"),
    InputSpec("reward", default="reward", required=False, kinds=("reward",),
              help="reward stage: RM scores of student and teacher; optional"),
]


class DistillTrainConfig(TrainerLoopConfig):
    """The shared Trainer loop keys, with max_length read as the answer length."""

    max_length: int = Field(32, gt=0, description=(
        "answer tokens per example: the data's answers are cut here and the student's samples stop here "
        "(TRL max_completion_length); prompts are kept whole"))


class LossConfig(StrictModel):
    """What the student is trained to match, and on which answers."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description=(
        "forward_kl = KL(teacher || student), mass-covering (classic KD); reverse_kl = KL(student || teacher), "
        "mode-seeking; jsd = the generalised Jensen-Shannon divergence with weight jsd_beta (TRL's beta)"))
    jsd_beta: float = Field(0.5, gt=0, lt=1, description=(
        "jsd only: the teacher's weight in the mixture m = (1 - beta) student + beta teacher"))
    temperature: float = Field(1.0, gt=0, description=(
        "both distributions are softmax(logits / T) in the divergence; also the student's sampling "
        "temperature on on-policy batches (TRL uses one for both). No T^2 factor, as in TRL"))
    on_policy_fraction: float = Field(0.0, ge=0, le=1, description=(
        "share of batches whose answers the student samples and the teacher scores (GKD's lambda); 0 = "
        "supervised, teacher-forced on the data's answers; 1 = fully on-policy (prompt-only data needs 1)"))
    sft_weight: float = Field(0.0, ge=0, le=1, description=(
        "loss = (1 - w) divergence + w cross-entropy on the data's answers; 1 = plain SFT on the same batches "
        "(the baseline a distilled student should beat)"))


class StudentConfig(StrictModel):
    model: ModelConfig = Field(ModelConfig(), description=(
        "shape of a fresh student when no --student is given (any alignline variant); vocabulary, special "
        "tokens and chat template come from the teacher"))
    lora: LoraArgs = Field(LoraArgs(), description=(
        "train LoRA adapters on a given --student (adapter/ plus the merged checkpoint/); a fresh student "
        "trains every weight"))


class DistillDataConfig(StrictModel):
    train: str = Field("sft", description=(
        "sft = the data stage's sft/train.jsonl chats; prompts = its prompts/train.jsonl (RL prompts, no answers: "
        "on-policy only); anything else = a chat or prompt file / hub dataset (alignline.data.loaders formats)"))
    kind: Literal["chats", "prompts"] = Field("chats", description="what a `train` file holds")


class EvalConfig(StrictModel):
    gold_prompts: int = Field(64, gt=0, description="first N of prompts/test.jsonl: gold accuracy, KL, agreement")
    val_chats: int = Field(256, gt=0, description="first N of sft/val.jsonl: val loss on their answers")
    max_new_tokens: int = Field(16, gt=0, description="greedy answer length cap in tokens")
    batch_size: int = Field(32, gt=0, description="prompts per generation / scoring batch")


class Config(StrictModel):
    """Config of the distill stage."""

    teacher_model: str | None = Field(None, description=(
        "a hub id (or local dir) for the teacher, e.g. org/name; set, it replaces the --teacher input"))
    teacher_revision: str | None = Field(None, description="hub branch/tag/commit of teacher_model")
    student: StudentConfig = Field(StudentConfig(), description="fresh student shape, or LoRA on a given one")
    loss: LossConfig = Field(LossConfig(), description="divergence, temperature, on-policy share, SFT mix")
    data: DistillDataConfig = Field(DistillDataConfig(), description="which prompts or chats train the student")
    train: DistillTrainConfig = Field(DistillTrainConfig(), description="Trainer loop: steps, batches, cadence")
    optim: OptimConfig = Field(OptimConfig(lr=1e-2, weight_decay=0.0), description="AdamW")
    schedule: ScheduleConfig = Field(ScheduleConfig(warmup_steps=10), description="lr warmup and decay")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")
    eval: EvalConfig = Field(EvalConfig(), description="student vs teacher on held-out data after training")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.train == "prompts" or (self.data.train != "sft" and self.data.kind == "prompts"):
            if self.loss.on_policy_fraction < 1 or self.loss.sft_weight > 0:
                raise ValueError("prompt-only training data has no answers to teacher-force or to train the SFT "
                                 "term on; set loss.on_policy_fraction=1 and loss.sft_weight=0, or train on chats")
        return self


def data_files(config: Config) -> dict[str, Path]:
    """Local files read from outside the run dir (fingerprinted into the reuse key): a training data file and
    a local teacher_model dir."""
    out: dict[str, Path] = {}
    if config.data.train not in ("sft", "prompts") and Path(config.data.train).expanduser().exists():
        out["data.train"] = Path(config.data.train).expanduser()
    if config.teacher_model and Path(config.teacher_model).expanduser().is_dir():
        out["teacher_model"] = Path(config.teacher_model).expanduser()
    return out


def check_world_size(config: Config, world_size: int) -> None:
    check_trainer_ranks(config.train, config.student.lora, world_size)


def preflight(config: Config, inputs: dict[str, Path]) -> None:
    """The pipeline's check before any stage runs: explicit teacher/student dirs from outside the run exist
    and have a chat tokenizer."""
    from alignline.models import load_chat_tokenizer

    for name in ("teacher", "student"):
        path = inputs.get(name)
        if path is None or (path / "manifest.json").exists():
            continue
        if not path.is_dir():
            raise InputError(f"distill {name} {path} is not a directory; give a stage dir or an HF model dir")
        load_chat_tokenizer(model_dir(path))


def training_conversations(config: Config, data_dir: Path) -> list[list[dict]]:
    """The chats (ending in the answer) or prompts the student trains on."""
    from alignline.data.loaders import DataValidationError, load_records
    from alignline.files import read_jsonl

    limit = config.train.max_train_examples
    if config.data.train == "sft":
        return [r["messages"] for r in read_jsonl(data_dir / "sft" / "train.jsonl", limit)]
    if config.data.train == "prompts":
        return [r["prompt"] for r in read_jsonl(data_dir / "prompts" / "train.jsonl", limit)]
    kind = "sft" if config.data.kind == "chats" else "prompts"
    try:
        records = load_records(config.data.train, kind=kind, limit=limit)
    except DataValidationError as exc:
        raise InputError(f"distill data.train {config.data.train}: {exc}") from exc
    return [r["messages"] if kind == "sft" else r["prompt"] for r in records]


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    """Run the stage, alone or as one of N torchrun ranks (rank 0 evaluates and writes the stage dir)."""
    from alignline.distributed import on_ranks, world_size

    check_world_size(config, world_size())
    return on_ranks(lambda dist: _run(config, inputs, run_dir, dist), config.train.device)


def _sources(config: Config, inputs: dict[str, Path]):
    """(teacher path, student path or None, stage inputs, external inputs): what the stage reads, checked."""
    from alignline.models import resolve_model

    stage_inputs = {"data": Path(inputs["data"])}
    if inputs.get("reward") is not None:
        stage_inputs["reward"] = Path(inputs["reward"])
    external: dict[str, Path] = {}
    if config.teacher_model:
        teacher = resolve_model(config.teacher_model, config.teacher_revision, flag="teacher_model")
        teacher_path = teacher.path
        if teacher.source == "stage":
            stage_inputs["teacher"] = teacher.stage_dir
        else:
            external["teacher"] = teacher_path
    elif inputs.get("teacher") is not None:
        given = Path(inputs["teacher"])
        teacher_path = model_dir(given)
        (stage_inputs if (given / "manifest.json").exists() else external)["teacher"] = given
    else:
        raise InputError("distill: no teacher; pass --teacher DIR (a stage or HF model dir; the run's rlhf output "
                         "by default) or --set teacher_model=ORG/NAME")
    student_path = None
    if inputs.get("student") is not None:
        given = Path(inputs["student"])
        student_path = model_dir(given)
        (stage_inputs if (given / "manifest.json").exists() else external)["student"] = given
    elif config.student.lora.enabled:
        raise ConfigError("student.lora.enabled=true needs a --student to adapt; a fresh student trains every weight "
                          "(leave student.lora.enabled false, or pass --student DIR)")
    return teacher_path, student_path, stage_inputs, external


def _run(config: Config, inputs: dict[str, Path], run_dir: str | Path, dist) -> Path:
    # Heavy imports here, not at the top: `alignline stage distill --help` answers without torch.
    from datasets import Dataset
    from trl import DistillationConfig

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
    from alignline.chat import encode_render
    from alignline.config import build_model
    from alignline.distill import DistillTrainer, check_shared_tokenizer, distill_examples, trl_beta
    from alignline.distributed import barrier, pick_device
    from alignline.files import read_jsonl
    from alignline.models import load_causal_lm, load_chat_tokenizer
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

    pick_device(config.train.device)  # device: cuda on a machine without one fails before the stage dir exists
    teacher_path, student_path, stage_inputs, external = _sources(config, inputs)
    data_dir = stage_inputs["data"]
    # Everything a user can get wrong is checked before the stage dir exists: tokenizers, then the data.
    tokenizer = load_chat_tokenizer(teacher_path)
    if tokenizer.pad_token_id is None:
        # Padding is masked everywhere here; a new pad token would add an embedding row to one model only.
        tokenizer.pad_token = tokenizer.eos_token
    t_vocab = _vocab_size(teacher_path)
    if student_path is not None:
        check_shared_tokenizer(tokenizer, load_chat_tokenizer(student_path), t_vocab, _vocab_size(student_path),
                               str(teacher_path), str(student_path))
    t = config.train
    train_rows = distill_examples(tokenizer, training_conversations(config, data_dir), t.max_length)
    if not train_rows:
        raise InputError(f"distill: no training examples in {config.data.train}")
    val_chats = [r["messages"] for r in read_jsonl(data_dir / "sft" / "val.jsonl", config.eval.val_chats)]
    val_rows = distill_examples(tokenizer, val_chats, t.max_length)
    if val_chats:  # the evaluation's answer masks need this template: fail now, not after training
        encode_render(tokenizer, val_chats[0], tokenizer.chat_template)

    run = StageRun(run_dir, "distill", config, inputs=stage_inputs, source=__file__, external_inputs=external,
                   data=data_files(config))
    seed_everything(t.seed)
    teacher = load_causal_lm(teacher_path)
    if student_path is not None:
        student = load_causal_lm(student_path)
    else:
        student = build_model(config.student.model, tokenizer, t_vocab)
    student.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if config.student.lora.enabled:
        student = attach_lora(student, config.student.lora, gradient_checkpointing=t.gradient_checkpointing)

    trainer_args = hf_trainer_args(
        output_dir=run.mark_state() / "trainer", optim=config.optim, schedule=config.schedule,
        logging=config.logging, seed=t.seed, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
        grad_accum=t.grad_accum, eval_every=t.eval_every if val_rows else None, save_every=t.save_every,
        device=t.device, precision=t.precision, gradient_checkpointing=t.gradient_checkpointing, parallel=t.parallel)
    # TRL's distillation default is checkpointing on, so it is always set here, under the name this transformers
    # knows (activation_checkpointing; the old name warns from 5.2x on).
    trainer_args.pop("gradient_checkpointing", None)
    ckpt_key = ("activation_checkpointing" if "activation_checkpointing" in DistillationConfig.__dataclass_fields__
                else "gradient_checkpointing")
    args = DistillationConfig(
        **trainer_args, **{ckpt_key: t.gradient_checkpointing},
        beta=trl_beta(config.loss.divergence, config.loss.jsd_beta), temperature=config.loss.temperature,
        max_completion_length=t.max_length, top_k=0, top_p=1.0, repetition_penalty=1.0,
    )
    resume, skip = trainer_resume_point(args.output_dir, run.metrics, "distill")
    trainer = DistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tokenizer,
        optimizers=(build_optimizer(student, config.optim), None), callbacks=[metrics_callback(run.metrics, skip)],
        on_policy_fraction=config.loss.on_policy_fraction, sft_weight=config.loss.sft_weight,
    )
    train_or_restore(trainer, resume, skip)

    trained = whole_model(trainer, t.parallel)
    if not run.is_main:  # rank 0 evaluates and writes the stage dir; the others wait for it, then leave
        barrier(dist)
        return run.path
    ckpt = run.staging / "checkpoint"
    if config.student.lora.enabled:
        trained.save_pretrained(str(run.staging / "adapter"))
        trained = merge_lora(trained)
    trained.generation_config.update(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    trained.save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))

    evaluation, samples = compare(trained, teacher, tokenizer, data_dir, val_chats, config.eval,
                                  run.input("reward") if "reward" in stage_inputs else None)
    evaluation.update(train_steps=trainer.state.global_step, train_examples=len(train_rows),
                      teacher_model=str(Path(teacher_path).resolve()), student_init=str(student_path) if student_path else "fresh",
                      loss=config.loss.model_dump(), lora=config.student.lora.enabled)
    s, te = evaluation["student"], evaluation["teacher"]
    headline = {f"student_{k}": s[k] for k in ("val_loss", "gold_accuracy", "rm_score") if k in s}
    headline |= {f"teacher_{k}": te[k] for k in ("val_loss", "gold_accuracy", "rm_score") if k in te}
    headline |= {k: evaluation[k] for k in ("kl_student_teacher", "teacher_answer_loss", "agreement",
                                            "param_ratio", "speedup")}
    extra = {"external_inputs": {k: str(Path(v).resolve()) for k, v in external.items()}} if external else {}
    out = run.finalize(eval=evaluation, headline=headline, samples=samples, extra_manifest=extra)
    barrier(dist)
    return out


def _vocab_size(path: Path) -> int:
    from transformers import AutoConfig

    import alignline.model  # noqa: F401

    return AutoConfig.from_pretrained(str(path)).get_text_config().vocab_size


def compare(student, teacher, tokenizer, data_dir: Path, val_chats: list[list[dict]], cfg: EvalConfig,
            reward=None) -> tuple[dict, list[dict]]:
    """Student and teacher on the same held-out data: (eval.json fields, one sample row per prompt)."""
    from alignline.chat import encode_render, prompt_ids
    from alignline.distill import masked_loss, timed_greedy
    from alignline.evaluation import (
        gold_scores,
        has_verifier,
        kl_to_reference,
        load_prompts,
        per_task_accuracy,
        reward_normalisation,
        score_responses,
    )
    from alignline.models import load_chat_tokenizer, load_classifier

    rows = load_prompts(data_dir, "test", cfg.gold_prompts)
    convs = [r["prompt"] for r in rows]
    prompts = prompt_ids(tokenizer, convs)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    val = [encode_render(tokenizer, c, tokenizer.chat_template) for c in val_chats]
    rm = rm_tok = None
    if reward is not None:
        rm_mean, rm_std = reward_normalisation(reward)
        rm, rm_tok = load_classifier(reward.checkpoint), load_chat_tokenizer(reward.checkpoint)
    out: dict = {"gold_prompts": len(rows), "val_chats": len(val)}
    answers: dict[str, list[list[int]]] = {}
    texts: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for name, model in (("student", student), ("teacher", teacher)):
        model.eval()
        ids, tps = timed_greedy(model, prompts, eos_token_id=eos, pad_token_id=pad,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        answers[name], texts[name] = ids, tokenizer.batch_decode(ids, skip_special_tokens=True)
        res = {"params": sum(p.numel() for p in model.parameters()), "gen_tokens_per_s": tps,
               "val_loss": masked_loss(model, val, pad, cfg.batch_size)}
        if has_verifier(rows):
            scores[name] = gold_scores(texts[name], rows)
            res.update(gold_accuracy=sum(scores[name]) / len(rows), per_task=per_task_accuracy(scores[name], rows))
        if rm is not None:
            finished = [bool(x) and x[-1] == eos for x in ids]
            raw = score_responses(rm, rm_tok, convs, texts[name], finished, cfg.batch_size)
            res["rm_score"] = sum((x - rm_mean) / rm_std for x in raw) / len(raw)
        out[name] = res
        log.info("distill: %s: %s", name, {k: v for k, v in res.items() if k != "per_task"})
    # How close the student is to the teacher: its loss on the teacher's greedy answers (teacher-forced), the
    # exact KL along its own samples, and how often the two greedy answers are the same.
    on_teacher = [(p + a, [0] * len(p) + [1] * len(a)) for p, a in zip(prompts, answers["teacher"], strict=True)]
    out["teacher_answer_loss"] = masked_loss(student, on_teacher, pad, cfg.batch_size)
    out["kl_student_teacher"] = kl_to_reference(student, teacher, prompts, eos_token_id=eos, pad_token_id=pad,
                                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    out["agreement"] = sum(a == b for a, b in zip(texts["student"], texts["teacher"], strict=True)) / len(rows)
    out["param_ratio"] = out["student"]["params"] / out["teacher"]["params"]
    out["speedup"] = out["student"]["gen_tokens_per_s"] / out["teacher"]["gen_tokens_per_s"]
    # `response` is the student's (the report card's samples and output-health columns read that key).
    samples = [{"prompt": r["prompt"][-1]["content"], **({"answer": r["answer"]} if "answer" in r else {}),
                "response": texts["student"][i], "teacher": texts["teacher"][i],
                **({"score": {n: scores[n][i] for n in scores}} if scores else {})} for i, r in enumerate(rows)]
    return out, samples


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("distill", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
