"""Stage `lora`: LoRA (or QLoRA) fine-tuning of a released causal LM on chat data.

    python -m stages.lora --base DIR_OR_HUB_ID --data FILE_OR_DATASET --run-dir RUN_DIR \
        [--config configs/lora/tiny.yaml] [--set train.max_steps=50 --set lora.r=8]
    alignline lora ...            (same options)
    flows/lora.py: lora_flow      (same job as a Prefect flow)
    torchrun --nproc_per_node=4 -m stages.lora --base ... --data ...   (DDP; train.batch_size is global)

The base is a local HF dir, a hub id (+ `base_revision`), or an alignline stage dir (its
checkpoint/ is used). Outputs go to `RUN_DIR/lora/` (the stage-directory contract):

    adapter/      PEFT adapter (PeftModel.from_pretrained(base, adapter/))
    checkpoint/   the merged model + tokenizer (with the chat template used in training), HF format;
                  a non-alignline base loads with plain AutoModelForCausalLM, and it is a valid
                  `--init` for the reward stage
    eval.json     held-out assistant-token loss before/after, sample generations before/after,
                  how the loss mask was computed, the merge check
    manifest.json base identity (path or hub id + revision, sha256 of the base weight files)

Chat template and loss mask (loss on assistant tokens only):
- template: the base tokenizer's own when it has one (`chat.template_source: auto`), otherwise
  `chat.template` (default: DEFAULT_CHAT_TEMPLATE, ChatML-style, using the base's eos token).
- mask: `generation` uses the template's `{% generation %}` tags (what TRL's assistant_only_loss
  uses); `render` finds each assistant turn by rendering the conversation up to the turn with
  and without it (works for any prefix-preserving template, e.g. released Llama/Qwen templates
  that have no tags); `auto` picks `generation` when the template has tags, else `render`.
  On a tagged template both give the same mask (tests/test_lora_inputs.py).
Only lora_A/lora_B train (r, alpha, dropout, rsLoRA, DoRA, targets per architecture: see
alignline/peft_utils.py); `train.gradient_checkpointing` trades compute for memory.
Every bad input (not a causal LM, no tokenizer, bad data, unknown target module, QLoRA without
CUDA) is reported before any weights load. Training uses TRL's SFTTrainer on our pre-tokenised,
pre-masked examples. Resume: Trainer checkpoints every `train.save_every` steps go to
`RUN_DIR/lora/state/trainer/`; running the same command again after a crash continues from the
latest one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignline.chat import CHATML_TEMPLATE, encode_conversations, resolve_mask_mode
from alignline.config import (
    InputError,
    LoggingConfig,
    LoraArgs,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    load_config,
    split_batch,
)
from alignline.data.loaders import Columns, DataValidationError, Format, LoaderConfig, load_records
from alignline.models import ModelSource, check_causal_lm, hash_weights, load_causal_lm, resolve_model
from alignline.stage_cli import ConfigFlag, flag_overrides, stage_main

log = logging.getLogger("alignline.stages.lora")

STAGE = "lora"

DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE  # alignline.chat: ChatML-style, the base's own eos ends every turn



# --------------------------------------------------------------------------- config


class LoraDataConfig(StrictModel):
    """Chat data, read and validated by alignline.data.loaders (TRL messages, Alpaca, ShareGPT; files or hub)."""

    train: str | None = Field(None, description="file, data stage dir, or hub dataset id; the CLI's --data sets it")
    val: str | None = Field(None, description="held-out file/id; default: hold out val_fraction of train")
    format: Format = Field("auto", description="auto | messages | alpaca | sharegpt | hh (see the loaders)")
    columns: Columns = Field(default_factory=Columns, description="source column names (loaders.Columns)")
    roles: dict[str, Literal["system", "user", "assistant"]] | None = Field(
        None, description="source role name -> system/user/assistant; None: the loaders' defaults"
    )
    hub_name: str | None = Field(None, description="dataset config name for a hub dataset")
    split: str = Field("train", description="hub dataset split read for `train`")
    val_split: str = Field(
        "validation", description="hub dataset split for `val` (a data stage dir as train gives its sft/val)"
    )
    max_records: int | None = Field(None, gt=0, description="read at most this many records per source")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out when there is no val")
    max_train_examples: int | None = Field(None, gt=0, description="use at most N training conversations")
    max_val_examples: int = Field(64, gt=0, description="use at most N held-out conversations")

    def loader(self, path: str, split: str) -> LoaderConfig:
        extra = {"roles": self.roles} if self.roles is not None else {}
        return LoaderConfig(path=path, kind="sft", format=self.format, columns=self.columns, hub_name=self.hub_name,
                            split=split, limit=self.max_records, **extra)


class ChatConfig(StrictModel):
    """Which chat template renders the data, and how the assistant-only loss mask is computed."""

    template_source: Literal["auto", "base", "config"] = Field(
        "auto", description="auto: the base's template if it has one, else `template`; base: require it"
    )
    template: str | None = Field(
        None, description="Jinja template text or a path to a .jinja file; None = DEFAULT_CHAT_TEMPLATE"
    )
    mask: Literal["auto", "generation", "render"] = Field(
        "auto", description="loss mask: generation tags | render (prefix rendering) | auto (tags if any)"
    )


class LoraTrainConfig(StrictModel):
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    save_every: int = Field(50, gt=0, description="Trainer checkpoint (resume point) every N steps")
    batch_size: int = Field(8, gt=0, description="conversations per batch over all ranks (global: under torchrun "
                            "each of N ranks takes batch_size/N)")
    grad_accum: int = Field(1, gt=0, description="batches accumulated per optimizer step")
    max_length: int = Field(1024, gt=8, description="tokens per example; longer conversations are cut")
    seed: int = Field(0, description="seeds the train/val split, adapter init and data order")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 otherwise"
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun (nproc_per_node > 1): ddp, a base and adapter copy per rank. fsdp is "
        "refused here: only the small adapters train, and the merge needs the whole base on one rank")

    @model_validator(mode="after")
    def _no_fsdp(self):
        if self.parallel == "fsdp":
            raise ValueError("train.parallel: fsdp is not supported by the lora stage (only the adapters train, and "
                             "the merge needs the whole base on one rank); use train.parallel: ddp")
        return self


class LoraEvalConfig(StrictModel):
    num_samples: int = Field(4, ge=0, description="held-out prompts generated before and after")
    max_new_tokens: int = Field(64, gt=0, description="sample generation length cap in tokens")
    batch_size: int = Field(8, gt=0, description="held-out examples per loss batch")
    merge_atol: float = Field(1e-3, gt=0, description="max |logit| gap adapter vs merged (fp32)")


class StageLoraArgs(LoraArgs):
    """The shared LoRA settings; in this stage LoRA is always on (enabled must stay true)."""

    enabled: bool = Field(True, description="always true here: the stage always trains LoRA")
    r: int = Field(16, gt=0, description="LoRA rank of the update matrices")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch input, in [0, 1)")

    @model_validator(mode="after")
    def _always_on(self):
        if not self.enabled:
            raise ValueError("lora.enabled is false, but the lora stage always trains LoRA; remove the key")
        return self


class LoraStageConfig(StrictModel):
    """Config of the `lora` stage (configs/lora/*.yaml)."""

    base: str | None = Field(None, description="local dir, alignline stage dir, or hub id; --base sets it")
    base_revision: str | None = Field(None, description="hub branch/tag/commit (hub ids only)")
    tokenizer: str | None = Field(None, description="tokenizer dir/id when the base has none")
    trust_remote_code: bool = Field(
        False, description="run the base's own modelling code (hub *.py); trusted bases only"
    )
    qlora: bool = Field(False, description="4-bit NF4 base (bitsandbytes, CUDA only)")
    data: LoraDataConfig = Field(LoraDataConfig(), description="training and held-out chat data")
    chat: ChatConfig = Field(ChatConfig(), description="chat template and assistant-only loss mask")
    lora: StageLoraArgs = Field(StageLoraArgs(), description="LoRA adapter settings (always on here)")
    train: LoraTrainConfig = Field(LoraTrainConfig(), description="TRL SFTTrainer: steps, batches, length")
    optim: OptimConfig = Field(OptimConfig(lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0),
                               description="AdamW of the adapter weights")
    schedule: ScheduleConfig = Field(ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.0),
                                     description="lr warmup, then decay over train.max_steps")
    eval: LoraEvalConfig = Field(
        LoraEvalConfig(), description="held-out loss and samples before/after, merge check"
    )
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")


def load_lora_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LoraStageConfig:
    return load_config(LoraStageConfig, path, overrides)


# --------------------------------------------------------------------------- base model


def load_base_tokenizer(cfg: LoraStageConfig, base: ModelSource):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or str(base.path)
    src_path = Path(src)
    if src_path.is_dir():
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((src_path / n).is_file() for n in names):
            raise InputError(
                f"no tokenizer in {src_path} (looked for {', '.join(names)}); copy the base's tokenizer files "
                "there or pass one with --set tokenizer=DIR"
            )
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer from {src} ({exc}); pass --set tokenizer=DIR") from exc
    if tok.eos_token is None:
        raise InputError(
            f"the tokenizer from {src} has no eos_token, so generations could never stop; set eos_token in its "
            "tokenizer_config.json"
        )
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing eos is harmless.
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- chat template + masks


def resolve_chat_template(cfg: ChatConfig, tokenizer, config_dir: Path | None = None) -> tuple[str, str]:
    """(template text, where it came from: 'base' | 'config' | 'default')."""
    base_template = tokenizer.chat_template
    if isinstance(base_template, dict):
        base_template = base_template.get("default")
    if cfg.template_source in ("auto", "base") and base_template:
        return base_template, "base"
    if cfg.template_source == "base":
        raise InputError(
            "chat.template_source is 'base' but the base tokenizer has no chat template; set "
            "chat.template_source=auto (uses chat.template or the built-in ChatML-style default)"
        )
    if cfg.template is None:
        return DEFAULT_CHAT_TEMPLATE, "default"
    text = cfg.template
    if "{" not in text:  # a path, not template text
        p = Path(text)
        if not p.is_absolute() and config_dir is not None and not p.exists():
            p = config_dir / p
        if not p.is_file():
            raise InputError(f"chat.template: {text!r} is neither Jinja text nor an existing .jinja file")
        text = p.read_text(encoding="utf-8")
    return text, "config"


# --------------------------------------------------------------------------- data


def _validate_conversation(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {j} must be {{'role': str, 'content': str}}, got {m!r:.120}")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"{where}: message {j} has role {m['role']!r}; use system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: no assistant message, so there is nothing to train on")
    return out


def load_conversations(cfg: LoraDataConfig, spec: str, split: str) -> list[list[dict]]:
    """Conversations (lists of {role, content}) from a file, a data stage dir, or a hub dataset, validated.

    A data stage dir (the built-in suite, `alignline stage data`) contributes `sft/<split>.jsonl`
    (split train -> train, anything else -> val). Everything goes through alignline.data.loaders.
    """
    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        from alignline.artifacts import load_stage

        sub = "train" if split == cfg.split else "val"
        loader = LoaderConfig(path=str(load_stage(p, expect="data").file(f"sft/{sub}.jsonl")), kind="sft",
                              format="messages", hub=False, limit=cfg.max_records)
    else:
        loader = cfg.loader(spec, split)
    try:
        records = load_records(loader)
    except DataValidationError as exc:
        raise InputError(f"chat data {spec}: {exc}") from exc
    out = []
    for i, r in enumerate(records):
        out.append(_validate_conversation(r.get("messages"), f"{spec} record {i}"))
    return out


def split_data(cfg: LoraDataConfig, seed: int) -> tuple[list, list]:
    if not cfg.train:
        raise InputError("no training data: pass --data FILE_OR_DATASET (or set data.train)")
    train = load_conversations(cfg, cfg.train, cfg.split)
    if cfg.val:
        val = load_conversations(cfg, cfg.val, cfg.val_split)
    elif Path(cfg.train).is_dir() and (Path(cfg.train) / "manifest.json").is_file():
        val = load_conversations(cfg, cfg.train, cfg.val_split)  # a data stage dir has its own held-out split
    else:
        if len(train) < 2:
            raise InputError(f"data {cfg.train}: {len(train)} conversation(s); need 2+ to hold one out")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = min(cfg.max_val_examples, max(1, round(len(train) * cfg.val_fraction)))
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    return train, val[: cfg.max_val_examples]


# --------------------------------------------------------------------------- evaluation


def heldout_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over assistant tokens (next-token, token-weighted)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            for b, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[b, :n] = torch.tensor(r["input_ids"])
                att[b, :n] = 1
                m = torch.tensor(r["assistant_masks"], dtype=torch.bool)
                lab[b, :n] = torch.where(m, ids[b, :n], torch.full_like(ids[b, :n], -100))
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            lab = lab.to(device)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((lab[:, 1:] != -100).sum())
    return total / max(count, 1)


def sample_prompts(val: list[list[dict]], n: int) -> list[dict]:
    """The first n held-out conversations cut before their last assistant turn."""
    out = []
    for messages in val[:n]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append({"messages": messages[:last], "reference": messages[last]["content"]})
    return out


def generate_samples(model, tokenizer, template, prompts, max_new_tokens) -> list[str]:
    """Greedy answers to the sample prompts; a turn ends at the tokenizer's eos or any eos the base's
    generation_config names (instruct bases often end turns with a token of their own)."""
    from alignline.evaluation import greedy_generate

    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
    return greedy_generate(model, tokenizer, [p["messages"] for p in prompts], max_new_tokens, batch_size=8,
                           chat_template=template, eos_token_id=[e for e in eos if e is not None])


def _logits(model, rows, pad_id):
    import torch

    device = next(model.parameters()).device
    r = rows[0]
    ids = torch.tensor([r["input_ids"]], device=device)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()


# --------------------------------------------------------------------------- the run


@dataclass
class Prepared:
    """Everything checked before any weights load."""

    cfg: LoraStageConfig
    base: ModelSource
    model_config: Any
    tokenizer: Any
    template: str
    template_from: str
    mask_mode: str
    train_rows: list
    val_rows: list
    val_conversations: list
    targets: list[str]
    fit: dict[str, dict]  # split -> length_fit (cut at train.max_length) + dropped (no answer token left)


def prepare(cfg: LoraStageConfig, config_dir: Path | None = None) -> Prepared:
    """Check every input (in order of cost) and tokenize the data; raises InputError on the first problem."""
    from alignline.peft_utils import QLoraUnavailableError, require_qlora_support, resolve_target_modules

    if cfg.qlora:
        try:
            require_qlora_support()  # before anything loads
        except QLoraUnavailableError as exc:
            raise InputError(str(exc)) from exc
    base = resolve_model(cfg.base, cfg.base_revision, cfg.trust_remote_code)
    model_config = check_causal_lm(base.path, cfg.trust_remote_code)
    tokenizer = load_base_tokenizer(cfg, base)
    template, template_from = resolve_chat_template(cfg.chat, tokenizer, config_dir)
    mask_mode = resolve_mask_mode(cfg.chat.mask, template, template_from)
    train, val = split_data(cfg.data, cfg.train.seed)
    train_rows, f_train = encode_conversations(tokenizer, train, template, mask_mode, cfg.train.max_length, "train")
    val_rows, f_val = encode_conversations(tokenizer, val, template, mask_mode, cfg.train.max_length, "val")
    # Targets are checked on a weightless (meta) model, so a typo costs no load time.
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.trust_remote_code)
    try:
        targets = resolve_target_modules(cfg.lora, skeleton)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    hash_weights(base)
    return Prepared(cfg, base, model_config, tokenizer, template, template_from, mask_mode, train_rows, val_rows,
                    val, targets, {"train": f_train, "val": f_val})


def _dtype(precision: str):
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(prep: Prepared, dtype, quantize: bool, local_rank: int = 0):
    """The base in `dtype` on this rank's device, or 4-bit NF4 on this rank's GPU for QLoRA."""
    from alignline.distributed import pick_device

    if not quantize:
        return load_causal_lm(prep.base.path, dtype=dtype, device=pick_device("auto", local_rank),
                              trust_remote_code=prep.cfg.trust_remote_code)
    from alignline.peft_utils import bnb_4bit_config

    return load_causal_lm(prep.base.path, dtype=dtype, trust_remote_code=prep.cfg.trust_remote_code,
                          quantization_config=bnb_4bit_config(compute_dtype=dtype), device_map={"": local_rank})


def train_adapter(prep: Prepared, peft_model, run, dtype) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from alignline.training import hf_trainer_args, metrics_callback, train_or_restore, trainer_resume_point

    t = prep.cfg.train
    ds = Dataset.from_list(prep.train_rows)
    # Trainer checkpoints (adapter, optimizer, scheduler, RNG) under the stage's state/: a killed run
    # continues from the latest one when the stage is started again.
    out_dir = run.mark_state() / "trainer"
    resume, skip = trainer_resume_point(out_dir, run.metrics, "lora")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    args = SFTConfig(
        **hf_trainer_args(output_dir=out_dir, optim=prep.cfg.optim, schedule=prep.cfg.schedule,
                          logging=prep.cfg.logging, seed=t.seed, max_steps=t.max_steps, batch_size=t.batch_size,
                          grad_accum=t.grad_accum, save_every=t.save_every, precision=precision),
        max_length=t.max_length,
        # TRL enables it on the PEFT model (and the input grads a frozen base needs)
        activation_checkpointing=t.gradient_checkpointing,
        packing=False,
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(
        model=peft_model, args=args, train_dataset=ds, processing_class=prep.tokenizer,
        callbacks=[metrics_callback(run.metrics, skip)],
    )
    result = train_or_restore(trainer, resume, skip)
    if result is None:  # restored from the final checkpoint: the mean of the logged training losses
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
                "steps": int(trainer.state.global_step)}
    return {"train_loss": float(result.training_loss), "steps": int(result.global_step)}


def check_world_size(config: LoraStageConfig, world_size: int) -> None:
    """ConfigError unless `config` runs on `world_size` torchrun ranks (checked by `run` before any work,
    and by the pipeline before it launches torchrun)."""
    split_batch(config.train.batch_size, world_size)


def run(config: LoraStageConfig, inputs: dict[str, Path] | None, run_dir: str | Path) -> Path:
    """Fine-tune `config.base` with LoRA on `config.data`; write `<run_dir>/lora/` and return its path.

    `inputs` may give "base" (a model or stage dir) and "data" (a file or data stage dir), which
    replace `config.base` / `config.data.train`. Relative paths (data, chat.template) are relative
    to the working directory, as everywhere in a config. Under torchrun every rank trains its share
    of each batch (DDP); rank 0 alone measures before/after, merges and writes the stage dir.
    """
    from alignline.distributed import on_ranks, world_size

    check_world_size(config, world_size())
    return on_ranks(lambda dist: _run(config, inputs, run_dir, dist))


def _run(config: LoraStageConfig, inputs: dict[str, Path] | None, run_dir: str | Path, dist) -> Path:
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training

    from alignline.artifacts import StageRun
    from alignline.distributed import barrier
    from alignline.peft_utils import attach_lora, merge_lora
    from alignline.training import seed_everything

    updates: dict[str, Any] = {}
    if inputs and inputs.get("base") is not None:
        updates["base"] = str(inputs["base"])
    if inputs and inputs.get("data") is not None:
        updates["data"] = config.data.model_copy(update={"train": str(inputs["data"])})
    cfg = config.model_copy(update=updates) if updates else config
    prep = prepare(cfg)
    # An alignline stage dir as base is recorded (and verified) as a stage input.
    stage_inputs = {"base": prep.base.stage_dir} if prep.base.stage_dir else {}
    stage = StageRun(run_dir, STAGE, cfg, inputs=stage_inputs, source=__file__, data=data_files(cfg))
    seed_everything(cfg.train.seed)
    dtype = _dtype(cfg.train.precision)
    tok = prep.tokenizer
    pad_id = tok.pad_token_id
    prompts = sample_prompts(prep.val_conversations, cfg.eval.num_samples)
    main = stage.is_main
    if main:
        print(f"[lora] base {prep.base.spec} ({prep.model_config.model_type}), template={prep.template_from}, "
              f"mask={prep.mask_mode}, targets={prep.targets}, train={len(prep.train_rows)} val={len(prep.val_rows)}")

    model = load_base_model(prep, dtype, quantize=cfg.qlora, local_rank=dist.local_rank)
    # Measured once, by rank 0 (the others go on to the Trainer, which waits for it).
    loss_before = heldout_loss(model, prep.val_rows, pad_id, cfg.eval.batch_size) if main else None
    gens_before = generate_samples(model, tok, prep.template, prompts, cfg.eval.max_new_tokens) if main else None
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    lora_args = cfg.lora.model_copy(update={"target_modules": prep.targets})
    peft_model = attach_lora(model, lora_args)
    peft_model.peft_config["default"].base_model_name_or_path = prep.base.hub_id or str(prep.base.path)
    peft_model.peft_config["default"].revision = prep.base.revision
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in peft_model.parameters())

    train_info = train_adapter(prep, peft_model, stage, dtype)
    if not main:  # rank 0 measures, merges and writes the stage dir; the others wait for it, then leave
        barrier(dist)
        return stage.path
    loss_after = heldout_loss(peft_model, prep.val_rows, pad_id, cfg.eval.batch_size)
    gens_after = generate_samples(peft_model, tok, prep.template, prompts, cfg.eval.max_new_tokens)

    tok.chat_template = prep.template  # downstream stages must render conversations as we trained
    adapter_dir = stage.staging / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    tok.save_pretrained(str(adapter_dir))

    # Merge. For QLoRA the 4-bit weights cannot hold the merged update, so the base is reloaded
    # unquantized (train.precision) and the saved adapter applied to it; the gap is then recorded only.
    ref_logits = _logits(peft_model, prep.val_rows, pad_id)
    if cfg.qlora:
        del peft_model, model
        torch.cuda.empty_cache()
        full = load_base_model(prep, dtype, quantize=False, local_rank=dist.local_rank)
        merged = merge_lora(PeftModel.from_pretrained(full, str(adapter_dir)))
    else:
        merged = merge_lora(peft_model)
    merged_gap = float((ref_logits - _logits(merged, prep.val_rows, pad_id)).abs().max())
    if not cfg.qlora and dtype == torch.float32 and merged_gap > cfg.eval.merge_atol:
        raise RuntimeError(
            f"the merged model's logits differ from the adapter model's by {merged_gap:.3g} > eval.merge_atol="
            f"{cfg.eval.merge_atol}; the merge is wrong, not saving a broken checkpoint"
        )
    ckpt = stage.staging / "checkpoint"
    merged.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    gen_cfg = merged.generation_config
    gen_cfg.pad_token_id = pad_id
    eos_ids = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    gen_cfg.eos_token_id = sorted({i for i in eos_ids if i is not None} | {tok.eos_token_id})
    gen_cfg.save_pretrained(str(ckpt))

    samples = [
        {"messages": p["messages"], "reference": p["reference"], "before": b, "after": a}
        for p, b, a in zip(prompts, gens_before, gens_after)
    ]
    evaluation = {
        "heldout_loss_before": loss_before,
        "heldout_loss_after": loss_after,
        "heldout_examples": len(prep.val_rows),
        "train_examples": len(prep.train_rows),
        "dropped_examples": {split: f["dropped"] for split, f in prep.fit.items()},
        "length_fit": prep.fit,  # examples cut at train.max_length (the report card's length table)
        **train_info,
        "trainable_params": n_train,
        "total_params": n_total,
        "target_modules": prep.targets,
        "chat_template_source": prep.template_from,
        "loss_mask": prep.mask_mode,
        "qlora": cfg.qlora,
        "dtype": str(dtype).removeprefix("torch."),
        "merge_max_abs_logit_diff": merged_gap,
        "base": prep.base.identity(),
        "samples": samples,
    }
    headline = {"heldout_loss_before": loss_before, "heldout_loss_after": loss_after}
    out = stage.finalize(eval=evaluation, headline=headline, samples=samples,
                         extra_manifest={"base": prep.base.identity()})
    print(f"[lora] held-out loss {loss_before:.4f} -> {loss_after:.4f}; wrote {out}")
    barrier(dist)
    return out


# --------------------------------------------------------------------------- command line


Config = LoraStageConfig
# base and data are config values (hub ids and plain files are allowed), so no stage-dir inputs.
INPUTS: list = []


def data_files(cfg: LoraStageConfig) -> dict[str, Path]:
    """Local files/dirs read from outside the run dir (fingerprinted into the reuse key): a local base
    model that is not a stage dir (a stage dir is an input), the train/val data, a template file."""
    out: dict[str, Path] = {}
    if cfg.base and Path(cfg.base).expanduser().is_dir() and not (Path(cfg.base).expanduser() / "manifest.json").is_file():
        out["base"] = Path(cfg.base).expanduser()
    for name in ("train", "val"):
        spec = getattr(cfg.data, name)
        if spec and Path(spec).exists():
            out[f"data.{name}"] = Path(spec)
    if cfg.chat.template and "\n" not in cfg.chat.template and len(cfg.chat.template) < 1000 \
            and Path(cfg.chat.template).is_file():
        out["chat.template"] = Path(cfg.chat.template)
    return out


# --base / --data set config keys (a hub id or a plain file is allowed, so they are not stage-dir inputs).
FLAGS = [
    ConfigFlag("base", "base", "base model: local HF dir, alignline stage dir, or hub id"),
    ConfigFlag("data", "data.train", "chat data: .json/.jsonl file, data stage dir, or hub dataset id"),
]


def build_config(config: str | Path | None, base: str | None, data: str | None, overrides: list[str]):
    """The config file (optional) with --base/--data applied as overrides, so they are validated too."""
    return load_lora_config(config, flag_overrides(FLAGS, {"base": base, "data": data}) + list(overrides or []))


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main(STAGE, Config, run, INPUTS, __doc__, argv, flags=FLAGS)


if __name__ == "__main__":
    main()

