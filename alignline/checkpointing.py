"""Training state: what a resumable run writes and reads back, on one process or many.

One `state/step_<N>/` directory holds

    model.safetensors   trainable weights (full, unsharded: FSDP2 shards are gathered first)
    optimizer.pt        optimizer state (full, likewise)
    scheduler.pt        lr schedule
    trainer.pt          a trainer's own `state_dict()` (e.g. alignline.rl.ppo.PPOTrainer: weights,
                        both optimizers, schedules, KL controller, reward statistics)
    rng.pt              torch / CUDA / numpy / python RNG streams
    meta.json           step, data position, extras, the reuse key it was written under

`write_state` builds it in a temp dir that is renamed into place, so a kill or a full disk leaves the
previous step whole; `read_state` loads it into live objects. Under FSDP2 both are collectives:
every rank calls them (only rank 0 writes files). `alignline.artifacts.StageRun.save_state` and
`load_state` are the stage-facing API on top of this module: they add the state/ directory's
bookkeeping (which step is latest, the reuse key, disk-full messages).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

from alignline.files import fsync_tree, read_json, remove_path, write_json


def unwrap(model):
    """The real module inside DDP / torch.compile wrappers (`.module` / `._orig_mod`)."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_tied(model, key: str) -> bool:
    """True when `key` is a weight tied to another (stored once, so absent from a state dict)."""
    m = unwrap(model)
    tied = getattr(m, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(key == k or key.endswith(k) for k in keys)


def _sharded(dist, parallel: str) -> bool:
    return dist is not None and dist.enabled and parallel == "fsdp"


def gather_states(model=None, optimizer=None, dist=None, parallel: str = "ddp") -> tuple[dict | None, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts. Under FSDP2 a collective: every rank
    calls it and gets the full dicts; only rank 0's are meant to be written."""
    if _sharded(dist, parallel):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts) if model is not None else None
        osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
        return msd, osd
    msd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if model is not None else None
    return msd, optimizer.state_dict() if optimizer is not None else None


def write_state(final: Path, *, model_state: dict | None = None, optimizer_state: dict | None = None,
                scheduler=None, trainer=None, meta: dict[str, Any]) -> None:
    """Write one step's state to `final` atomically (temp dir, fsync, rename). Rank 0 only."""
    import torch
    from safetensors.torch import save_file

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    remove_path(tmp)
    tmp.mkdir(parents=True)
    try:
        if model_state is not None:
            # clone() breaks storage sharing (tied embeddings) so safetensors accepts it.
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()},
                      str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if trainer is not None:
            torch.save(trainer.state_dict(), tmp / "trainer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "meta.json", meta)
        fsync_tree(tmp)
        remove_path(final)
        os.replace(tmp, final)
    finally:
        remove_path(tmp)


def read_state(path: Path, *, model=None, optimizer=None, scheduler=None, trainer=None, restore_rng: bool = True,
               map_location: str = "cpu", dist=None, parallel: str = "ddp") -> dict[str, Any]:
    """Load `path` (a state/step_<N>/ dir) into the given objects; returns its meta.json. Under FSDP2
    every rank calls it with its sharded `model` and `optimizer`. A weight file that does not fit
    the model is a ValueError naming the missing and unexpected keys."""
    import torch
    from safetensors.torch import load_file

    meta = read_json(path / "meta.json")
    weights, optim = path / "model.safetensors", path / "optimizer.pt"
    if _sharded(dist, parallel):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, load_file(str(weights)), options=opts)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, torch.load(optim, weights_only=True), options=opts)
    else:
        if model is not None and weights.is_file():
            missing, unexpected = unwrap(model).load_state_dict(load_file(str(weights), device=map_location),
                                                                strict=False)
            # Tied weights may be stored once; anything else missing means the state is wrong.
            real_missing = [k for k in missing if not is_tied(model, k)]
            if real_missing or unexpected:
                raise ValueError(f"{weights} does not fit the model: missing {real_missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        if optimizer is not None and optim.is_file():
            optimizer.load_state_dict(torch.load(optim, map_location=map_location, weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if trainer is not None:
        trainer.load_state_dict(torch.load(path / "trainer.pt", map_location=map_location, weights_only=True))
    if restore_rng and (path / "rng.pt").is_file():
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return meta


def rng_state() -> dict[str, Any]:
    """Every RNG stream a training step draws from, as tensors (torch.load(weights_only=True) reads it)."""
    import numpy as np
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": torch.tensor(py[0]),
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py[2] is None else py[2], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np_state[2]),
        "numpy_has_gauss": torch.tensor(np_state[3]),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    gauss = float(state["python_gauss"])
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()),
                     None if math.isnan(gauss) else gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
