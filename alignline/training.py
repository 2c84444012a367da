"""Training helpers shared by the stages: optimizer groups, LR schedule, metrics logging, seeding.

    opt = build_optimizer(model, cfg.optim)                 # AdamW, no decay on norms/biases/embeddings
    sched = build_scheduler(opt, cfg.schedule, total_steps)  # warmup then cosine (LambdaLR)
    logger = MetricsLogger(stage_dir, report_to=["tensorboard"])
    logger.log(step, loss=..., lr=...)                       # metrics.jsonl + tb/ (+ W&B/MLflow)
    seed_everything(0)
    resume, step = trainer_resume_point(out_dir, logger, "sft")   # HF Trainer: latest checkpoint, metrics trimmed
    train_or_restore(trainer, resume, step)                 # never a step past max_steps on resume
    model = whole_model(trainer, "fsdp")   # rank 0: the trained model, FSDP shards gathered; others: None
    maybe_interrupt(step)   # test hook: raises after ALIGNLINE_FAIL_AFTER_STEP steps

No Prefect, no stages: this is library code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignline.config import LoggingConfig, OptimConfig, ScheduleConfig, split_batch
from alignline.distributed import pick_device

FAIL_AFTER_ENV = "ALIGNLINE_FAIL_AFTER_STEP"
log = logging.getLogger("alignline.training")


class SimulatedInterrupt(RuntimeError):
    """Raised by `maybe_interrupt` to simulate a crash (tests of resumption)."""


def maybe_interrupt(step: int) -> None:
    """Raise SimulatedInterrupt once `step` reaches $ALIGNLINE_FAIL_AFTER_STEP (when set)."""
    raw = os.environ.get(FAIL_AFTER_ENV)
    if raw and step >= int(raw):
        raise SimulatedInterrupt(f"simulated interrupt after step {step} ({FAIL_AFTER_ENV}={raw})")


STALL_AFTER_ENV = "ALIGNLINE_STALL_AFTER_STEP"


def maybe_stall(step: int) -> None:
    """Sleep (until killed) once `step` reaches $ALIGNLINE_STALL_AFTER_STEP: a test hook that holds a
    run still after a checkpoint so a test can kill -9 one of its ranks."""
    raw = os.environ.get(STALL_AFTER_ENV)
    if raw and step >= int(raw):
        log.warning("stalling after step %d (%s=%s) until killed", step, STALL_AFTER_ENV, raw)
        while True:
            time.sleep(60)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- optimizer


def _no_decay_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()
        is_emb = isinstance(module, nn.Embedding)
        for name, p in module.named_parameters(recurse=False):
            if is_norm or is_emb or name == "bias" or p.ndim < 2:
                ids.add(id(p))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay; norms, biases and embeddings (and weights tied to them) don't."""
    no_decay = _no_decay_param_ids(model)
    decay, keep = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields tied tensors once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (keep if id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def warn_if_warmup_fills_the_run(warmup_steps: int, total_steps: int, what: str = "schedule.warmup_steps") -> bool:
    """Log a warning when the warmup is as long as the run (the lr never reaches its setting); True then."""
    if total_steps > 0 and warmup_steps >= total_steps:
        log.warning("%s=%d >= the run's %d steps: the learning rate is still warming up when training ends and "
                    "never reaches its setting (optim.lr); lower %s", what, warmup_steps, total_steps, what)
        return True
    return False


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    warmup_key: str | None = "schedule.warmup_steps"):
    """Warmup then decay (LambdaLR); `warmup_key` names the config key in the warning a too-long
    warmup gets (None: no warning, e.g. a second optimizer on the same schedule)."""
    if warmup_key:
        warn_if_warmup_fills_the_run(cfg.warmup_steps, total_steps, warmup_key)

    # A plain closure: LambdaLR then stores nothing for it in state_dict, so the state file stays
    # loadable with weights_only=True.
    def fn(step: int) -> float:
        return lr_factor(step, total_steps, cfg)

    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


# --------------------------------------------------------------------------- throughput


_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from the GPU name; None on CPU (MFU is then not logged)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, val in _PEAK_BF16_FLOPS.items():
        if key in name:
            return val
    return None


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


# --------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Per-step metrics to `metrics.jsonl` and TensorBoard (`tb/`), plus W&B / MLflow when asked.

    `out_dir=None` makes a no-op logger (non-zero ranks). `report_to` entries other than
    "tensorboard" need their package installed; a missing one is an error, not a silent skip.
    """

    def __init__(self, out_dir: str | Path | None, report_to: list[str] | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.report_to = list(report_to or ["tensorboard"])
        self._tb = None
        self._wandb = None
        self._mlflow = None
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        # TensorBoard is always written (cheap, local), whatever report_to says.
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
        if "wandb" in self.report_to:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.report_to contains 'wandb' but wandb is not installed; "
                                   "pip install 'alignline[wandb]' or remove it from logging.report_to") from None
            self._wandb = wandb.init(name=run_name, config=config, reinit=True)
        if "mlflow" in self.report_to:
            try:
                import mlflow
            except ImportError:
                raise RuntimeError("logging.report_to contains 'mlflow' but mlflow is not installed; "
                                   "pip install 'alignline[mlflow]' or remove it from logging.report_to") from None
            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name)
            if config:
                mlflow.log_dict(config, "config.json")

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step` (a resumed run rewrites them), in metrics.jsonl and tb/."""
        if self.out_dir is None:
            return
        if self._tb is not None:
            # A new event file starting with a purge marker: TensorBoard drops the earlier files'
            # events at steps >= step + 1, so a resumed run's steps are shown once, not twice.
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=step + 1)
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")

    def log(self, step: int, **values: Any) -> None:
        if self.out_dir is None:
            return
        clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in values.items() if v is not None}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)
                if self._mlflow is not None:
                    self._mlflow.log_metric(k.replace("/", "_"), v, step=step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None




# --------------------------------------------------------------------------- HF Trainer glue


def trainer_resume_point(output_dir: str | Path, metrics: MetricsLogger, stage: str = "stage"
                         ) -> tuple[str | None, int]:
    """Where a HF Trainer run under `output_dir` continues: (the newest complete `checkpoint-<step>`
    dir, for `train_or_restore` / `trainer.train(resume_from_checkpoint=...)`, and its step), or
    (None, 0) on a fresh start; logs the one "<stage>: resumed from step N" line.

    Metrics logged after that step are dropped from `metrics`: the resumed Trainer logs them again.
    Pass the step to `metrics_callback(..., skip_through=step)`.
    """
    root = Path(output_dir)
    cands = []
    for p in root.glob("checkpoint-*") if root.is_dir() else ():
        suffix = p.name.split("-", 1)[1]
        # trainer_state.json is written last by Trainer._save_checkpoint, so it marks a complete save.
        if suffix.isdigit() and (p / "trainer_state.json").is_file():
            cands.append((int(suffix), p))
        elif suffix.isdigit() and os.environ.get("RANK", "0") == "0":
            # A save cut short (disk full, kill): never resumed from, and not left lying around.
            log.warning("%s: removing the incomplete checkpoint %s (no trainer_state.json)", stage, p)
            shutil.rmtree(p, ignore_errors=True)
    if not cands:
        return None, 0
    step, ckpt = max(cands)
    metrics.truncate_after(step)
    log.info("%s: resumed from step %d (%s)", stage, step, ckpt)
    return str(ckpt), step


def train_or_restore(trainer, resume: str | None, resume_step: int):
    """`trainer.train(resume_from_checkpoint=resume)`, except when `resume` already is the final step.

    HF Trainer (5.x) enters its epoch loop before it checks `max_steps`, so resuming from the final
    checkpoint trains one more step (7 for max_steps 6) and moves the weights. Then the checkpoint's
    weights and TrainerState are loaded instead: a rerun ends where the uninterrupted run ended.
    Returns `trainer.train`'s TrainOutput, or None when restored.
    """
    from transformers.trainer_callback import TrainerState

    max_steps = trainer.args.max_steps
    if trainer.args.world_size > 1 and trainer.args.process_index == 0:
        log.info("training on %d ranks with %s", trainer.args.world_size,
                 "FSDP2 (parameters, gradients and optimizer state sharded)" if trainer.is_fsdp_enabled else "DDP")
    if resume is None or max_steps <= 0 or resume_step < max_steps:
        try:
            return trainer.train(resume_from_checkpoint=resume)
        except Exception as exc:
            out = Path(trainer.args.output_dir)
            from alignline.artifacts import DiskFull, is_disk_full

            if not is_disk_full(exc, out):
                raise
            # The Trainer writes checkpoint-<step>/ in place; one cut short is not a checkpoint.
            done = []
            ckpts = [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
            for p in sorted(ckpts, key=lambda p: int(p.name.split("-", 1)[1])):
                if (p / "trainer_state.json").is_file():
                    done.append(p.name)
                else:
                    shutil.rmtree(p, ignore_errors=True)
            kept = (f"the last complete checkpoint {out / done[-1]} is intact; free space and re-run the same "
                    "command to resume from it") if done else "free space and re-run the same command"
            raise DiskFull(f"no space left on device while training into {out} ({type(exc).__name__}: {exc}); "
                           f"{kept}", out) from exc
    # The Trainer's own loader (handles full models, sharded weights and PEFT adapters alike).
    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    return None


def metrics_callback(logger: MetricsLogger, skip_through: int = 0):
    """A transformers TrainerCallback that forwards the Trainer's logs to `logger` (jsonl + tb).

    HF names are mapped to ours: loss, lr (learning_rate), grad_norm, val_loss (eval_loss), ...
    Records with step <= `skip_through` are dropped (already logged before a resume).
    """
    from transformers import TrainerCallback

    rename = {"learning_rate": "lr", "eval_loss": "val_loss"}

    class _Forward(TrainerCallback):
        last: tuple[float, float] | None = None  # (time, num_tokens) at the previous training log

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or state.global_step <= skip_through:
                return
            vals = {rename.get(k, k): v for k, v in logs.items() if isinstance(v, int | float)}
            # TRL logs the cumulative `num_tokens`; its rate is the throughput.
            if "loss" in vals and "num_tokens" in vals:
                now = time.perf_counter()
                if self.last is not None and now > self.last[0]:
                    vals["tokens_per_s"] = (vals["num_tokens"] - self.last[1]) / (now - self.last[0])
                self.last = (now, vals["num_tokens"])
            if "loss" in vals and torch.cuda.is_available():
                vals["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(state.global_step, **vals)

        def on_train_begin(self, args, state, control, **kwargs):
            # After the Trainer restored a checkpoint: the step it really continues from.
            if state.is_world_process_zero:
                log.info("training from step %d to %d", state.global_step, state.max_steps)

        def on_save(self, args, state, control, **kwargs):
            # Test hooks: simulate a crash, or hold still to be killed, right after a checkpoint was written.
            maybe_interrupt(state.global_step)
            maybe_stall(state.global_step)

    return _Forward()


def whole_model(trainer, parallel: str = "ddp"):
    """The trained model, whole and unwrapped, on rank 0; None on the other ranks.

    Under FSDP (`parallel` "fsdp" with several ranks) the shards are gathered first, a collective, so
    every rank calls this; rank 0 gets a plain copy of the model (its own class, the gathered
    weights), which evaluation and `save_pretrained` use like a single-process model."""
    main = trainer.args.process_index == 0
    if not (parallel == "fsdp" and trainer.args.world_size > 1):
        return trainer.model if main else None
    from torch.distributed.fsdp import FSDPModule

    sharded = trainer.model
    state = trainer.accelerator.get_state_dict(sharded)  # full tensors, on rank 0 only
    if not main:
        return None
    # fully_shard swaps the class for FSDP<cls>; the first non-FSDP class in its MRO is the model's own.
    cls = next(c for c in type(sharded).__mro__ if not issubclass(c, FSDPModule))
    plain = cls._from_config(sharded.config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathering the FSDP shards: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    plain.tie_weights()
    plain.generation_config = sharded.generation_config
    return plain.eval()


def hf_schedule(s: ScheduleConfig) -> tuple[str, dict]:
    """Our ScheduleConfig as HF Trainer's lr_scheduler_type + kwargs."""
    if s.kind == "constant":
        return "constant_with_warmup", {}
    if s.kind == "linear":
        return "linear", {}
    return "cosine_with_min_lr", {"min_lr_rate": s.min_lr_ratio}


def hf_trainer_args(
    *, output_dir: str | Path, optim: OptimConfig, schedule: ScheduleConfig, logging: LoggingConfig,
    seed: int, max_steps: int, batch_size: int, save_every: int, device: str = "auto",
    precision: str = "auto", epochs: float = 1, grad_accum: int = 1, eval_every: int | None = None,
    gradient_checkpointing: bool = False, parallel: str = "ddp", batch_key: str = "train.batch_size",
) -> dict:
    """The TrainingArguments fields of every TRL-based stage (sft, reward, rlhf's dpo/kto/grpo/rloo, lora),
    from our shared sections: `optim:` (AdamW), `schedule:` (warmup + decay) and `logging:`.

    `batch_size` is the global batch, as in pretrain and PPO: under torchrun each of the N ranks
    (WORLD_SIZE) takes batch_size / N, so a run computes the same steps on any number of ranks
    (`split_batch`; `batch_key` names the key in its error). `parallel`: under torchrun, "ddp" (the
    Trainer's DistributedDataParallel) or "fsdp" (accelerate's FSDP2, one shard group per decoder
    layer, the model's `_no_split_modules`). `report_to` is always "none": metrics reach jsonl,
    TensorBoard, W&B and MLflow through the stage's MetricsLogger (`metrics_callback`), once.
    `precision`: auto = bf16 off the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = split_batch(batch_size, world, batch_key)
    sched, sched_kwargs = hf_schedule(schedule)
    warn_if_warmup_fills_the_run(schedule.warmup_steps, max_steps)
    use_cpu = pick_device(device) == "cpu"
    bf16 = precision == "bf16" or (precision == "auto" and not use_cpu)
    # Passed only when on: the name is deprecated in recent transformers (activation_checkpointing),
    # but older 5.x releases know only this one.
    ckpt = {"gradient_checkpointing": True} if gradient_checkpointing else {}
    evals = {"eval_strategy": "steps", "eval_steps": eval_every} if eval_every else {"eval_strategy": "no"}
    ranks = {}
    if world > 1:
        # gloo between CPU ranks (the CI tests), NCCL between GPUs; the losses of a step are averaged
        # over every rank's tokens, not per rank, so N ranks train what one process would.
        ranks = {"ddp_backend": "gloo" if use_cpu else "nccl", "average_tokens_across_devices": True}
        if parallel == "fsdp":
            from alignline.config import check_fsdp_device

            check_fsdp_device("cpu" if use_cpu else "cuda", "parallel")  # the stages check this before they start
            ranks.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                                 "state_dict_type": "FULL_STATE_DICT"})
    return dict(
        **ckpt, **evals, **ranks,
        output_dir=str(output_dir),
        seed=seed, data_seed=seed,
        num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        learning_rate=optim.lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip if optim.grad_clip > 0 else 1e9,
        lr_scheduler_type=sched, lr_scheduler_kwargs=sched_kwargs, warmup_steps=schedule.warmup_steps,
        logging_steps=logging.every_steps,
        save_strategy="steps", save_steps=save_every, save_total_limit=1,
        report_to="none", disable_tqdm=not logging.progress,
        use_cpu=use_cpu, bf16=bf16, fp16=precision == "fp16", dataloader_num_workers=0,
    )
