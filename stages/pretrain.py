"""Stage `pretrain`: next-token pretraining of the alignline decoder with our own loop.

    python -m stages.pretrain --config configs/pretrain/tiny.yaml --run-dir runs/tiny
    alignline stage pretrain --config configs/pretrain/small.yaml --set train.max_steps=2000
    torchrun --nproc_per_node=4 -m stages.pretrain --config configs/pretrain/1b.yaml --run-dir runs/1b

Inputs: `--data` (data stage; pretrain/{train,val}.jsonl, prompts/test.jsonl) and `--tokenizer`.
The loop (nanoGPT / torchtitan spirit): AdamW with decoupled weight decay (none on norms, biases,
embeddings), linear warmup then cosine, gradient accumulation to a fixed global batch, global-norm
clipping, bf16 autocast on CUDA, optional torch.compile, DDP or FSDP2 (`train.parallel`) under
torchrun. Logged per step: loss, lr, grad_norm, tokens/s, MFU (GPU); periodically val loss/ppl.

Data: documents are tokenized once into memory-mapped shards (alignline.data.shards, cached under
`<run_dir>/cache/shards/`), joined with `<|eos|>` and cut into seq_len+1 blocks; a BlockSampler
visits them in a seeded permutation per epoch. Its position is saved with the training state, so
a resumed run sees exactly the batches an uninterrupted run would. Under DDP each rank takes its
slice of the same global batch, so N processes compute the same loss as one.

Resume: state is saved every `train.save_every` steps and before the final evaluation under
`pretrain/state/`; re-running with the same config continues from it (bit-exact on CPU).
eval.json: val_loss, val_ppl, initial_val_loss, tokens_seen, gold_accuracy (+ per task).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from alignline.artifacts import StageRun
from alignline.config import (
    ConfigError,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    build_model,
    split_batch,
)
from alignline.stage_cli import InputSpec, stage_main

# torch is imported where it runs, so `alignline stage pretrain --help` and config checks answer fast.
if TYPE_CHECKING:
    import torch

log = logging.getLogger("stages.pretrain")

INPUTS = [
    InputSpec("data", default="data", kinds=("data",), help="data stage directory"),
    InputSpec("tokenizer", default="tokenizer", help="tokenizer stage directory (or any dir with tokenizer files)"),
]


class TrainConfig(StrictModel):
    seed: int = Field(0, description="seeds model init and the per-epoch batch order")
    max_steps: int = Field(300, gt=0, description="optimizer steps")
    batch_size: int = Field(32, gt=0, description="global batch in sequences per optimizer step")
    micro_batch_size: int = Field(32, gt=0, description="sequences per forward/backward per process")
    seq_len: int = Field(128, gt=1, description="tokens per training sequence (and val window)")
    eval_every: int = Field(100, gt=0, description="val loss every N steps (and at the end)")
    eval_batches: int = Field(8, gt=0, description="val batches of micro_batch_size sequences")
    save_every: int = Field(100, gt=0, description="resumable state every N steps (and at the end)")
    device: str = Field("auto", description="auto | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA")
    compile: bool = Field(False, description="run the forward through torch.compile")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: DDP, or FSDP2 fully_shard")
    max_shard_size: str = Field("2GB", description="save_pretrained shard size")
    peak_tflops: float | None = Field(None, gt=0, description="for MFU; None = from the GPU name")


class EvalConfig(StrictModel):
    gold_prompts: int = Field(120, ge=0, description="first N of prompts/test.jsonl for gold accuracy/samples")
    max_new_tokens: int = Field(16, gt=0, description="greedy answer length cap in tokens")
    batch_size: int = Field(64, gt=0, description="prompts per generation batch")
    prompt_format: Literal["chat", "qa"] = Field(
        "chat", description="chat = the chat template; qa = the corpus's 'Q: ... A:' (what a base model knows)")


class Config(StrictModel):
    """Config of the pretrain stage."""

    model: ModelConfig = Field(ModelConfig(), description="decoder architecture and shape")
    train: TrainConfig = Field(TrainConfig(), description="training loop: steps, batches, eval/save cadence")
    optim: OptimConfig = Field(OptimConfig(), description="AdamW")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="lr warmup and decay over train.max_steps")
    logging: LoggingConfig = Field(LoggingConfig(), description="metrics.jsonl, TensorBoard, progress bar")
    eval: EvalConfig = Field(EvalConfig(), description="gold accuracy on prompts/test.jsonl after training")


# --------------------------------------------------------------------------- model and data


def read_texts(path: Path) -> list[str]:
    """The `text` fields of a {"text": ...} JSONL file."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                rec = json.loads(line)
                if "text" not in rec:
                    raise ValueError(f"{path}:{i}: pretraining records need a 'text' field; got {sorted(rec)}")
                texts.append(rec["text"])
    if not texts:
        raise ValueError(f"{path} has no documents; check the data stage output")
    return texts


def tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """Documents as one token stream, each followed by <|eos|> (used for the small val set)."""
    import torch

    ids: list[int] = []
    for i in range(0, len(texts), 2048):
        for row in tokenizer(texts[i:i + 2048], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def val_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """Up to `n` non-overlapping windows of seq_len+1 tokens from the start of the val stream."""
    import torch

    count = min(n, (len(stream) - 1) // seq_len)
    if count == 0:
        raise ValueError(f"the val stream has {len(stream)} tokens, fewer than seq_len+1={seq_len + 1}")
    idx = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx].long()


def lm_loss(model, tokens: torch.Tensor, autocast, moe_config=None):
    """Next-token cross-entropy of (B, T+1) windows. With `moe_config` (the model's config): (cross-entropy +
    the weighted MoE router losses, those router losses (None when dense), router logits)."""
    import torch.nn.functional as F

    routed = getattr(moe_config, "num_experts", 0) > 0  # ask for the router logits whatever the config says
    with autocast():
        out = model(input_ids=tokens[:, :-1], **({"output_router_logits": True} if routed else {}))
    loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1))
    if moe_config is None:
        return loss
    from alignline.model.modeling import moe_aux_loss

    router_logits = getattr(out, "router_logits", None)
    aux = moe_aux_loss(moe_config, router_logits) if router_logits else None
    return (loss if aux is None else loss + aux.float()), aux, router_logits


def evaluate_loss(model, windows: torch.Tensor, micro: int, device, autocast) -> float:
    import torch

    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), micro):
            b = windows[i:i + micro].to(device)
            total += float(lm_loss(model, b, autocast)) * len(b)
            n += len(b)
    model.train(was)
    return total / n


def expert_utilisation(router_logits, top_k: int) -> dict[str, float]:
    """Per MoE layer: the busiest expert's share of the assignments over the fair share (1 = even load), and
    the fraction of experts receiving under half their fair share (0 = none starved)."""
    from alignline.model.modeling import expert_load

    out = {}
    for i, logits in enumerate(router_logits):
        load = expert_load(logits.detach(), top_k)  # (E,) sums to 1
        fair = 1.0 / load.numel()
        out[f"moe_max_load_l{i}"] = float(load.max() / fair)
        out[f"moe_starved_l{i}"] = float((load < fair / 2).float().mean())
    return out


# --------------------------------------------------------------------------- the stage


def check_world_size(config: Config, world_size: int) -> None:
    """ConfigError unless the global batch splits over `world_size` torchrun ranks and then into
    micro-batches (checked by `run` before any work, and by the pipeline before it launches torchrun)."""
    tc = config.train
    per_rank = split_batch(tc.batch_size, world_size)
    if per_rank % min(tc.micro_batch_size, per_rank):
        raise ConfigError(f"train.batch_size={tc.batch_size} gives {per_rank} rows per rank on {world_size} ranks, "
                          f"which does not split into micro-batches of train.micro_batch_size={tc.micro_batch_size}; "
                          "make the per-rank share a multiple of train.micro_batch_size")


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    import torch
    from tqdm.auto import tqdm

    from alignline.checkpointing import gather_states
    from alignline.data.shards import BlockSampler, PackedBlocks, build_shards
    from alignline.distributed import (
        all_reduce_mean,
        barrier,
        cleanup,
        init_distributed,
        world_size,
        wrap_model,
    )
    from alignline.evaluation import gold_eval, gold_summary, load_prompts
    from alignline.model.modeling import parameter_counts
    from alignline.tokenizer import load_tokenizer
    from alignline.training import (
        build_optimizer,
        build_scheduler,
        flops_per_token,
        maybe_interrupt,
        peak_flops,
        seed_everything,
    )

    tc = config.train
    check_world_size(config, world_size())
    dist = init_distributed(tc.device)
    device = torch.device(dist.device)
    run = StageRun(run_dir, "pretrain", config, inputs={"data": inputs["data"], "tokenizer": inputs["tokenizer"]},
                   source=__file__)
    data_dir, tok_dir = Path(inputs["data"]), Path(inputs["tokenizer"])
    tokenizer = load_tokenizer(tok_dir)

    per_rank = tc.batch_size // dist.world_size
    micro = min(tc.micro_batch_size, per_rank)
    accum = per_rank // micro
    if tc.seq_len > config.model.max_position_embeddings:
        raise ValueError(f"train.seq_len={tc.seq_len} exceeds model.max_position_embeddings="
                         f"{config.model.max_position_embeddings}")

    # Training tokens live in memory-mapped shards cached per (corpus, tokenizer) under <run_dir>/cache;
    # rank 0 builds them first so the other ranks only open the finished cache entry.
    cache = Path(run_dir) / "cache" / "shards"
    texts = read_texts(data_dir / "pretrain" / "train.jsonl")
    if run.is_main:
        shards = build_shards(texts, tokenizer, cache, progress=config.logging.progress)
    barrier(dist)
    if not run.is_main:
        shards = build_shards(texts, tokenizer, cache)
    del texts
    blocks = PackedBlocks(shards, tc.seq_len)
    sampler = BlockSampler(len(blocks), tc.batch_size, seed=tc.seed, rank=dist.rank, world_size=dist.world_size)
    val = val_windows(tokenize_stream(read_texts(data_dir / "pretrain" / "val.jsonl"), tokenizer), tc.seq_len,
                      tc.eval_batches * micro)
    log.info("pretrain: %d train tokens (%d blocks), %d val windows, accum=%d, world=%d", shards.n_tokens,
             len(blocks), len(val), accum, dist.world_size)

    seed_everything(tc.seed)
    model = build_model(config.model, tokenizer).to(device)
    n_params, n_active = parameter_counts(model)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fsdp = dist.enabled and tc.parallel == "fsdp"
    # FSDP2 shards the parameters in place, so its optimizer is built on the wrapped model; DDP's on
    # the plain one. Training state is saved and loaded full (unsharded) either way.
    wrapped = wrap_model(model, dist, tc.parallel) if fsdp else None
    opt = build_optimizer(wrapped if fsdp else model, config.optim)
    sched = build_scheduler(opt, config.schedule, tc.max_steps)
    meta = run.load_state(model=wrapped if fsdp else model, optimizer=opt, scheduler=sched, dist=dist,
                          parallel=tc.parallel)
    if not fsdp:
        wrapped = wrap_model(model, dist, tc.parallel)
    fwd = torch.compile(wrapped) if tc.compile else wrapped

    start = 0
    initial_val = None
    if meta is not None:
        start = int(meta["step"])
        initial_val = meta["extra"].get("initial_val_loss")
        sampler.load_state_dict(meta["data_position"]["sampler"])
        if run.is_main:
            run.metrics.truncate_after(start)
    if initial_val is None:
        initial_val = evaluate_loss(fwd, val, micro, device, autocast)
        if run.is_main:
            run.metrics.log(0, val_loss=initial_val, val_ppl=math.exp(initial_val))

    fpt = flops_per_token(n_active, config.model.num_hidden_layers, config.model.hidden_size, tc.seq_len)
    peak = peak_flops(tc.peak_tflops)
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = tqdm(total=tc.max_steps, initial=start, desc="pretrain", disable=not (run.is_main and config.logging.progress))
    val_loss = None
    wrapped.train()
    for step in range(start, tc.max_steps):
        t0 = time.perf_counter()
        mine = blocks.batch(sampler.next_batch()).long()  # this rank's slice of the global batch
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for k in range(accum):
            mb = mine[k * micro:(k + 1) * micro].to(device, non_blocking=True)
            # Gradients sync only on the last micro batch (DDP); FSDP2 reduces on every backward.
            sync = k == accum - 1 or not hasattr(fwd, "no_sync")
            ctx = contextlib.nullcontext() if sync else fwd.no_sync()
            with ctx:
                loss, aux, router_logits = lm_loss(fwd, mb, autocast, moe_config=model.config)
                loss = loss / accum
                loss.backward()
            loss_sum += loss.detach()
            if aux is not None:
                aux_sum += aux.detach().float() / accum
        if config.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), float("inf"))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_loss = float(all_reduce_mean(loss_sum, dist))
        done = step + 1
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        rec = {"loss": train_loss, "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(
            grad_norm, "full_tensor") else grad_norm), "tokens_per_s": tps,
            "tokens_seen": done * tokens_per_step}
        if peak:
            rec["mfu"] = fpt * tps / (peak * dist.world_size)
        if router_logits:  # MoE: the router losses (inside `loss`) and how evenly each layer spreads its tokens
            rec["moe_aux_loss"] = float(all_reduce_mean(aux_sum, dist))
            rec.update(expert_utilisation(router_logits, config.model.num_experts_per_tok))
        if device.type == "cuda":  # rank 0's peak; the ranks are alike under DDP and FSDP
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if done % tc.save_every == 0 or done == tc.max_steps:
            run.save_state(done, model=wrapped, optimizer=opt, scheduler=sched, dist=dist, parallel=tc.parallel,
                           data_position={"step": done, "sampler": sampler.state_dict()},
                           extra={"initial_val_loss": initial_val})
        if done % tc.eval_every == 0 or done == tc.max_steps:
            val_loss = evaluate_loss(fwd, val, micro, device, autocast)
            rec.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
        if run.is_main and (done % config.logging.every_steps == 0 or "val_loss" in rec):
            run.metrics.log(done, **rec)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
        maybe_interrupt(done)
    bar.close()
    if val_loss is None:  # resumed after the last step: nothing trained in this process
        val_loss = evaluate_loss(fwd, val, micro, device, autocast)

    # Everything below is rank 0: gather weights, evaluate, write the checkpoint.
    sd = gather_states(wrapped, None, dist, tc.parallel)[0] if fsdp else None  # a collective under FSDP
    out = run.path
    if run.is_main:
        final = model
        if fsdp:
            seed_everything(tc.seed)
            final = build_model(config.model, tokenizer)
            final.load_state_dict(sd, strict=False)
        final = final.to(device).eval()
        rows = load_prompts(data_dir, "test", config.eval.gold_prompts) if config.eval.gold_prompts else []
        gold = gold_eval(final, tokenizer, rows, config.eval.max_new_tokens, config.eval.batch_size,
                         config.eval.prompt_format) if rows else None
        ckpt = run.staging / "checkpoint"
        final.generation_config.update(do_sample=False, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        final.save_pretrained(ckpt, max_shard_size=tc.max_shard_size)
        tokenizer.save_pretrained(ckpt)
        eval_out = {
            "val_loss": val_loss, "val_ppl": math.exp(val_loss), "initial_val_loss": initial_val,
            "tokens_seen": tc.max_steps * tokens_per_step, "n_params": n_params, "n_active_params": n_active,
            **gold_summary(gold),
        }
        headline = {k: eval_out[k] for k in ("val_loss", "val_ppl", "initial_val_loss", "gold_accuracy")
                    if k in eval_out}
        out = run.finalize(eval=eval_out, headline=headline, samples=gold.samples if gold else [])
    barrier(dist)
    cleanup(dist)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("pretrain", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
