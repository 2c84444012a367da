"""Process-group helpers so the same training loop runs alone or under `torchrun --nproc_per_node=N`.

    dist_info = init_distributed()          # reads RANK/WORLD_SIZE/LOCAL_RANK set by torchrun
    out = on_ranks(lambda dist_info: ..., device)   # the same, joined and left around one call
    model = wrap_model(model, dist_info, mode="ddp")   # or "fsdp" (FSDP2 fully_shard), "none"
    loss = all_reduce_mean(loss, dist_info)
    rows = all_gather_cat(local_rows, dist_info)   # every rank's rows, in rank order
    cleanup(dist_info)

Backend: NCCL on CUDA, gloo on CPU (the CPU tests run two gloo processes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> str:
    """The one device picker of every stage and tool: "auto" = this rank's GPU when CUDA is visible,
    else "cpu"; "cuda" = this rank's GPU, a ConfigError when there is none (never a silent CPU run)."""
    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from alignline.config import ConfigError

        raise ConfigError(f"device {requested!r} was asked for but CUDA is not available; set device: auto or cpu")
    if requested == "cuda":
        return f"cuda:{local_rank}"
    return requested


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        if dev.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def world_size() -> int:
    """The number of ranks torchrun started (WORLD_SIZE), 1 without torchrun; known before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def on_ranks(fn, device: str = "auto"):
    """`fn(dist)` inside the process group (joined when torchrun started several ranks, left at the
    end, on errors too). Stages join before their StageRun opens, so its barrier holds the other
    ranks until rank 0 has prepared the stage dir."""
    info = init_distributed(device)
    try:
        return fn(info)
    finally:
        cleanup(info)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise sum over ranks (a detached copy; the input is left alone)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_cat(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's `value` concatenated along dim 0 in rank order (the same result on every rank).

    Ranks may hold different numbers of rows; all other dims must match. bool tensors are carried as
    uint8 (gloo cannot reduce or gather bool). With one process `value` comes back unchanged.
    """
    if not info.enabled:
        return value
    flag = value.dtype == torch.bool
    t = value.detach().to(torch.uint8) if flag else value.detach()
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    most = max(counts)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t)
    out = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return out.bool() if flag else out


def all_reduce_max(value: int | float, info: DistInfo) -> int | float:
    """The largest of a Python number over ranks (e.g. a padded width every rank must agree on)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=info.device if info.device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp") -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every decoder layer, then the root) for models that don't fit.

    With one process nothing is wrapped, so a 1-process run equals plain training.
    """
    if not info.enabled or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if info.device.startswith("cuda") else None
        return DDP(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", model), "layers", None)
        if layers is None:
            raise RuntimeError("fsdp needs a model with .model.layers (HF decoder layout)")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}; use ddp, fsdp or none")
