"""Pretraining loop: resume reproduces an uninterrupted run bit-exactly, and 2-process gloo DDP
(and FSDP2 fully_shard) computes the same losses and weights as one process with the same global batch.

    .venv/bin/pytest tests/test_pretrain.py -q       # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignline.artifacts import load_stage
from alignline.config import load_config
from alignline.files import read_jsonl
from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt

REPO = Path(__file__).resolve().parent.parent

# A very small model and run so that each pretrain call takes a few seconds.
SMALL = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "train.seq_len=32", "train.batch_size=8",
    "train.micro_batch_size=4", "train.max_steps=6", "train.save_every=2", "train.eval_every=3",
    "train.eval_batches=2", "eval.gold_prompts=4", "eval.max_new_tokens=4", "logging.every_steps=1",
    "logging.progress=false", "schedule.warmup_steps=2", "train.device=cpu",
]


def _config(extra=()):
    from stages.pretrain import Config

    return load_config(Config, REPO / "configs/pretrain/tiny.yaml", [*SMALL, *extra])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from stages import data, tokenizer

    root = tmp_path_factory.mktemp("pretrain_inputs")
    data.run(data.Config(size="tiny"), {}, root)
    tokenizer.run(tokenizer.Config(vocab_size=300), {"data": root / "data"}, root)
    return {"data": root / "data", "tokenizer": root / "tokenizer"}


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_stage(stage_dir).checkpoint
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(stage_dir / "metrics.jsonl") if "loss" in r]


def test_resume_equals_uninterrupted(inputs, tmp_path, monkeypatch):
    from stages.pretrain import run

    full = run(_config(), inputs, tmp_path / "a")

    monkeypatch.setenv(FAIL_AFTER_ENV, "3")  # crash after step 3; the last state is from step 2
    with pytest.raises(SimulatedInterrupt):
        run(_config(), inputs, tmp_path / "b")
    assert not (tmp_path / "b" / "pretrain" / "manifest.json").exists()
    assert (tmp_path / "b" / "pretrain" / "state" / "step_00000002").is_dir()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = run(_config(), inputs, tmp_path / "b")

    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _losses(full) == _losses(resumed)  # the log is continuous too (step 3 rewritten, not doubled)
    ea = json.loads((full / "eval.json").read_text())
    eb = json.loads((resumed / "eval.json").read_text())
    assert ea["val_loss"] == eb["val_loss"] and ea["initial_val_loss"] == eb["initial_val_loss"]


def test_changed_config_starts_fresh(inputs, tmp_path, monkeypatch):
    from stages.pretrain import run

    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(SimulatedInterrupt):
        run(_config(), inputs, tmp_path)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    out = run(_config(["optim.lr=1e-3"]), inputs, tmp_path)  # another config: state discarded
    steps = [s for s, _ in _losses(out)]
    assert steps == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, overrides: list[str], inputs: dict, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from stages.pretrain import run

    run(_config(overrides), {k: Path(v) for k, v in inputs.items()}, Path(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_run_matches_single_process(inputs, tmp_path, parallel):
    import torch.multiprocessing as mp

    from stages.pretrain import run

    extra = ["eval.gold_prompts=0", f"train.parallel={parallel}"]
    single = run(_config(extra), inputs, tmp_path / "single")
    mp.spawn(_ddp_worker, args=(2, _free_port(), extra, {k: str(v) for k, v in inputs.items()},
                                str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = tmp_path / "ddp" / "pretrain"
    assert json.loads((ddp / "manifest.json").read_text())["world_size"] == 2
    ls, ld = _losses(single), _losses(ddp)
    assert [s for s, _ in ls] == [s for s, _ in ld]
    for (_, a), (_, b) in zip(ls, ld, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    ws, wd = _weights(single), _weights(ddp)
    for k in ws:
        torch.testing.assert_close(ws[k], wd[k], atol=1e-5, rtol=1e-4)


def test_moe_pretrain_adds_and_logs_the_router_loss(inputs, tmp_path):
    """The load-balancing loss is part of the trained loss (same init and batch: the step-1 loss moves by
    exactly the logged aux), expert load is logged per layer, and eval.json counts active parameters."""
    from stages.pretrain import run

    moe = ["model.num_experts=4", "model.num_experts_per_tok=2", "train.max_steps=2", "train.eval_every=2"]
    first = {}
    for coef in ("0.0", "1.0"):
        out = run(_config([*moe, f"model.router_aux_loss_coef={coef}"]), inputs, tmp_path / coef)
        first[coef] = next(r for r in read_jsonl(out / "metrics.jsonl") if r["step"] == 1)
    assert first["0.0"]["moe_aux_loss"] == 0.0
    aux = first["1.0"]["moe_aux_loss"]
    assert aux > 1.0  # Mixtral's balance loss is >= top_k-ish; k=2 here
    assert first["1.0"]["loss"] == pytest.approx(first["0.0"]["loss"] + aux, rel=1e-5)
    assert {"moe_max_load_l0", "moe_max_load_l1", "moe_starved_l0"} <= set(first["1.0"])
    assert first["1.0"]["moe_max_load_l0"] >= 1.0
    ev = json.loads((out / "eval.json").read_text())
    # 2 of 4 experts active: each layer's idle experts are 2 x (3 x 32 x 64) weights
    assert ev["n_params"] - ev["n_active_params"] == 2 * 2 * 3 * 32 * 64


def test_architecture_switches_are_validated_before_work():
    from alignline.config import ConfigError

    assert _config(["model.norm=deepnorm"]).model.norm == "deepnorm"
    with pytest.raises(ConfigError, match="model.norm"):
        _config(["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="norm_position"):
        _config(["model.norm=deepnorm", "model.norm_position=pre"])
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=3 is invalid"):
        _config(["model.num_experts=2", "model.num_experts_per_tok=3"])
    with pytest.raises(ConfigError, match="arch=llama is the LLaMA recipe only; position='alibi'"):
        _config(["model.arch=llama", "model.position=alibi"])
