"""The Trainer stages (sft, reward, rlhf's dpo, lora, distill; kto/grpo/rloo run) under torchrun: 2 gloo
ranks on CPU train what one process trains, write one stage dir, and survive a kill -9 of one rank.

    .venv/bin/pytest tests/test_trainer_ranks.py -q              # ~6 min on 2 CPU cores (+ tiny_chain)
    .venv/bin/pytest tests/test_trainer_ranks.py -q -m "not slow" # the config checks, seconds

For each stage, the same config (global batch 8, 4 optimizer steps, a checkpoint every 2) runs
  - once as one process (`python -m stages.<x>`),
  - once as 2 torchrun ranks (`python -m torch.distributed.run --nproc_per_node=2 ...`, the command the
    pipeline builds for `nproc_per_node: 2`), each rank taking 4 of the 8 examples of a step,
  - once as 2 ranks that hold still after the step-2 checkpoint (ALIGNLINE_STALL_AFTER_STEP), where
    the test kill -9s rank 1: torchrun must end rank 0 and exit non-zero, leaving no process; the
    same command again resumes from step 2.
Asserted: every step's training loss equals the single process's (fp32, 1e-5), the final weights
too (1e-5); the 2-rank stage dir is complete and verified, with one manifest (world_size 2), each
metrics step once, one TensorBoard event file and one "wrote" line; the resumed run's Trainer
continues from step 2 ("training from step 2 to 4": a fresh restart would end with the same
weights, this run being deterministic) and ends with the uninterrupted 2-rank run's weights (1e-6).

FSDP (`train.parallel: fsdp`) goes through accelerate, which shards over CUDA devices only: on CPU
ranks it would train as DDP, so there it is refused before the stage starts. What runs on CPU is
the part that is ours, `whole_model`: FSDP2 shards of a model gathered into a whole, plain copy on
rank 0 (2 gloo ranks, torch's fully_shard). bench/gpu_check.py runs the real thing on 2 GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignline.launch import descendants, launch, torchrun_command
from tests.prefect_fixtures import prefect_harness  # noqa: F401,E402

REPO = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["logging.progress=false", "logging.every_steps=1"]
SFT_SET = [*COMMON, "train.max_steps=4", "train.batch_size=8", "train.save_every=2", "train.eval_every=100",
           "schedule.warmup_steps=1", "eval.gold_prompts=4", "eval.max_new_tokens=4"]
REWARD_SET = [*COMMON, "train.max_steps=4", "train.batch_size=8", "train.save_every=2", "train.eval_every=100",
              "schedule.warmup_steps=1", "onpolicy.enabled=false", "train.max_train_examples=64"]
DPO_SET = [*COMMON, "steps=4", "save_every=2", "dpo.batch_size=8", "eval.num_prompts=4", "eval.max_new_tokens=4"]
LORA_SET = [*COMMON, "train.max_steps=4", "train.batch_size=8", "train.save_every=2", "train.max_length=128",
            "lora.dropout=0.0", "schedule.warmup_steps=1", "eval.num_samples=2", "eval.max_new_tokens=4",
            "data.max_val_examples=8"]
# Teacher-forced (supervised) with the SFT term: both normalisers are global-batch token counts, so N ranks
# compute one process's loss. (On-policy batches sample per rank with their own seeds, by design.)
DISTILL_SET = [*COMMON, "train.max_steps=4", "train.batch_size=8", "train.save_every=2", "train.eval_every=100",
               "schedule.warmup_steps=1", "loss.sft_weight=0.3", "loss.divergence=jsd", "loss.temperature=1.5",
               "train.max_train_examples=64", "eval.gold_prompts=4", "eval.val_chats=8", "eval.max_new_tokens=4"]
STAGES = {  # name -> (module, config, overrides, output dir name)
    "sft": ("stages.sft", "configs/sft/tiny.yaml", SFT_SET, "sft"),
    "reward": ("stages.reward", "configs/reward/tiny.yaml", REWARD_SET, "reward"),
    "dpo": ("stages.rlhf", "configs/rlhf/dpo_tiny.yaml", DPO_SET, "rlhf-dpo"),
    "lora": ("stages.lora", "configs/lora/tiny.yaml", LORA_SET, "lora"),
    "distill": ("stages.distill", "configs/distill/tiny.yaml", DISTILL_SET, "distill"),
}


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory) -> dict[str, str]:
    from tests.lora_fixtures import build_base, conversations, write_jsonl

    root = tmp_path_factory.mktemp("lora_ranks")
    base = build_base("llama", root / "base")
    data = write_jsonl(root / "chats.jsonl", conversations(80))
    return {"base": str(base), "data": str(data)}


def _args(name: str, run_dir: Path, chain, lora_inputs) -> list[str]:
    module, config, sets, _ = STAGES[name]
    args = ["--config", str(REPO / config), "--run-dir", str(run_dir)]
    if name == "lora":
        args += ["--base", lora_inputs["base"], "--data", lora_inputs["data"]]
    elif name == "dpo":
        args += ["--init", str(chain.sft), "--reward", str(chain.reward), "--data", str(chain.data)]
    elif name == "distill":
        args += ["--teacher", str(chain.sft), "--data", str(chain.data)]
    else:
        args += ["--init", str(chain.pretrain if name == "sft" else chain.sft), "--data", str(chain.data)]
    for s in sets:
        args += ["--set", s]
    return args


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted((stage_dir / "checkpoint").glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {stage_dir / 'checkpoint'}"
    return out


def _assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, f"{a} vs {b}: weights differ by {worst:.3g} > {atol}"


def _losses(stage_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(stage_dir / "metrics.jsonl") if "loss" in r}


def _rank_pids(leader: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun (pid `leader`) started."""
    out = {}
    for pid in descendants(leader):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(STAGES))
def test_two_ranks_train_what_one_process_trains_and_survive_a_killed_rank(name, lora_inputs, tmp_path, request):
    from alignline.artifacts import MANIFEST, load_stage

    tiny_chain = None if name == "lora" else request.getfixturevalue("tiny_chain")  # lora brings its own base

    module, _, _, out_name = STAGES[name]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"

    launch([sys.executable, "-m", module, *_args(name, one, tiny_chain, lora_inputs)], cwd=REPO, env=ENV,
           timeout=300)
    lines: list[str] = []
    launch(torchrun_command(module, _args(name, two, tiny_chain, lora_inputs), 2), on_line=lines.append, cwd=REPO,
           env=ENV, timeout=300)

    # Same global batch, same steps: the losses and the weights of one process.
    a, b = one / out_name, two / out_name
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4], (la, lb)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), (step, la, lb)
    assert len(set(la.values())) > 1  # the model moved: a stuck loss would compare equal too
    _assert_close_weights(a, b, 1e-5)

    # One complete stage dir, written once.
    sd = load_stage(b, verify=True)
    assert sd.manifest["world_size"] == 2
    assert [p for p in two.rglob(MANIFEST)] == [b / MANIFEST]
    assert not (b / ".staging").exists()
    steps = [r["step"] for r in _rows(b / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer: each step once
    assert len(list((b / "tb").glob("events.out.tfevents.*"))) == 1
    done = f"{module.split('.')[-1]}: wrote"  # the stage CLI's last line, printed by rank 0 only
    assert sum(done in x for x in lines) == 1, [x for x in lines if "wrote" in x]
    assert any("training on 2 ranks with DDP" in x for x in lines)
    assert any("training from step 0 to 4" in x for x in lines)
    # kill -9 of one rank ends the group; the same command resumes.
    cmd = torchrun_command(module, _args(name, killed, tiny_chain, lora_inputs), 2)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, "ALIGNLINE_STALL_AFTER_STEP": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        trainer_dir = killed / out_name / "state" / ("" if name == "dpo" else "trainer")  # rlhf: state/ itself
        ckpt = trainer_dir / "checkpoint-2"
        deadline = time.monotonic() + 240
        while not (ckpt / "trainer_state.json").is_file() or len(list(ckpt.glob("rng_state_*.pth"))) < 2:
            assert proc.poll() is None, "the run ended before its step-2 checkpoint"
            assert time.monotonic() < deadline, "no step-2 checkpoint in time"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        rc = proc.wait(timeout=120)  # torchrun notices, ends rank 0 and fails
        assert rc != 0
        time.sleep(0.5)
        assert not descendants(proc.pid)
        for pid in ranks.values():
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (killed / out_name / MANIFEST).exists()
    lines = []
    launch(cmd, on_line=lines.append, cwd=REPO, env=ENV, timeout=300)
    assert any("resumed from step 2" in x for x in lines), lines[-30:]
    assert any("training from step 2 to 4" in x for x in lines), lines[-30:]  # the Trainer restored it
    _assert_close_weights(b, killed / out_name, 1e-6)
    assert [r["step"] for r in _rows(killed / out_name / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", ["kto", "grpo", "rloo"])
def test_the_other_trl_algorithms_run_on_two_ranks(algo, tiny_chain, tmp_path):
    """KTO, GRPO and RLOO go through the same Trainer path as DPO; on 2 ranks each trains under DDP and
    writes one complete stage dir. (GRPO/RLOO sample completions, so their losses are not compared
    with one process: each rank samples its own.)"""
    from alignline.artifacts import MANIFEST, load_stage

    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / f"configs/rlhf/{algo}_tiny.yaml"), "--run-dir", str(run_dir),
            "--init", str(tiny_chain.sft), "--reward", str(tiny_chain.reward), "--data", str(tiny_chain.data)]
    for item in (*COMMON, "steps=2", "save_every=2", f"{algo}.batch_size=8", "eval.num_prompts=4",
                 "eval.max_new_tokens=4"):
        args += ["--set", item]
    lines: list[str] = []
    launch(torchrun_command("stages.rlhf", args, 2), on_line=lines.append, cwd=REPO, env=ENV, timeout=400)
    out = run_dir / f"rlhf-{algo}"
    sd = load_stage(out, verify=True)
    assert sd.manifest["world_size"] == 2 and list(run_dir.rglob(MANIFEST)) == [out / MANIFEST]
    assert any("training on 2 ranks with DDP" in x for x in lines)
    assert [r["step"] for r in _rows(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sum("rlhf: wrote" in x for x in lines) == 1


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(("stage", "config", "sets", "expected"), [
    ("sft", "configs/sft/tiny.yaml", ["train.batch_size=6"], "train.batch_size=6 must split evenly over the 4"),
    ("reward", "configs/reward/tiny.yaml", ["train.batch_size=6"], "train.batch_size=6 must split evenly over"),
    ("rlhf", "configs/rlhf/dpo_tiny.yaml", ["dpo.batch_size=6"], "dpo.batch_size=6 must split evenly over"),
    ("lora", "configs/lora/tiny.yaml", ["train.batch_size=6"], "train.batch_size=6 must split evenly over"),
    ("sft", "configs/sft/tiny.yaml", ["train.parallel=fsdp", "lora.enabled=true"], "fsdp with lora.enabled"),
    ("sft", "configs/sft/tiny.yaml", ["train.parallel=fsdp"], "train.parallel=fsdp needs CUDA devices"),
    ("rlhf", "configs/rlhf/dpo_tiny.yaml", ["parallel=fsdp"], "parallel=fsdp needs CUDA devices"),
    ("rlhf", "configs/rlhf/grpo_tiny.yaml", ["parallel=fsdp"], "parallel=fsdp is supported for algorithm=dpo"),
])
def test_the_pipeline_refuses_a_config_that_cannot_run_on_its_ranks_before_launching(stage, config, sets, expected):
    from alignline.config import ConfigError
    from flows.tasks import StageEntry, resolve_stage

    entry = StageEntry(config=str(REPO / config), set=sets, nproc_per_node=4)
    with pytest.raises(ConfigError, match=rf"stages\.{stage} on nproc_per_node=4 ranks: ") as exc:
        resolve_stage(stage, entry)
    assert expected in str(exc.value)
    resolve_stage(stage, entry.model_copy(update={"nproc_per_node": 1}))  # fine on one process


def test_lora_refuses_fsdp_with_the_key_named():
    from alignline.config import ConfigError, load_config
    from stages import lora

    with pytest.raises(ConfigError, match="train.parallel: fsdp is not supported by the lora stage"):
        load_config(lora.Config, REPO / "configs/lora/tiny.yaml", ["train.parallel=fsdp"])


def test_a_batch_that_does_not_split_is_a_user_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """As one of 4 torchrun ranks (WORLD_SIZE=4), the sft stage refuses a global batch of 6 before it
    joins the process group or writes anything: exit 2, one message, no traceback."""
    import torch.distributed as tdist

    from stages import sft

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    run = tmp_path / "run"
    parents = {}
    for name, kind in (("init", "pretrain"), ("data", "data")):
        parents[name] = tmp_path / "parents" / kind
        parents[name].mkdir(parents=True)
        (parents[name] / "manifest.json").write_text(json.dumps({"stage": kind, "status": "complete", "files": {}}))
    with pytest.raises(SystemExit) as exc:
        sft.main(["--config", str(REPO / "configs/sft/tiny.yaml"), "--run-dir", str(run), "--init",
                  str(parents["init"]), "--data", str(parents["data"]), "--set", "train.batch_size=6"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1 and "multiple of 4" in err, err
    assert not run.exists()
    assert not tdist.is_initialized()


def test_per_rank_batch_and_fsdp_arguments_reach_the_trainer(tmp_path, monkeypatch):
    """`batch_size` is global: 2 ranks get half each; fsdp becomes accelerate's FSDP2 with full state dicts."""
    from alignline.config import LoggingConfig, OptimConfig, ScheduleConfig
    from alignline.training import hf_trainer_args

    kw = dict(output_dir=tmp_path, optim=OptimConfig(), schedule=ScheduleConfig(warmup_steps=0),
              logging=LoggingConfig(), seed=0, max_steps=4, batch_size=8, save_every=2, device="cpu")
    one = hf_trainer_args(**kw)
    assert one["per_device_train_batch_size"] == 8 and "fsdp" not in one and "ddp_backend" not in one
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = hf_trainer_args(**kw)
    assert ddp["per_device_train_batch_size"] == ddp["per_device_eval_batch_size"] == 4
    assert ddp["ddp_backend"] == "gloo" and "fsdp" not in ddp
    from alignline.config import ConfigError

    with pytest.raises(ConfigError, match="parallel=fsdp needs CUDA devices"):
        hf_trainer_args(**kw, parallel="fsdp")  # on CPU ranks accelerate would train DDP: refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("alignline.training.pick_device", lambda device: "cuda:0")
    fsdp = hf_trainer_args(**{**kw, "device": "cuda"}, parallel="fsdp")
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2 and fsdp["ddp_backend"] == "nccl"
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import types

    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from alignline.model import AlignlineConfig, AlignlineForCausalLM
    from alignline.training import whole_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = AlignlineConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
    model = AlignlineForCausalLM(cfg)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model).__name__.startswith("FSDP")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    accelerator = types.SimpleNamespace(get_state_dict=lambda m: get_model_state_dict(m, options=opts))
    trainer = types.SimpleNamespace(model=model, accelerator=accelerator,
                                    args=types.SimpleNamespace(process_index=rank, world_size=world))
    plain = whole_model(trainer, "fsdp")
    if rank == 0:
        assert type(plain) is AlignlineForCausalLM
        got = plain.state_dict()
        assert sorted(got) == sorted(reference)
        assert all(torch.equal(got[k], reference[k]) for k in reference)
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
        ids = torch.tensor([[1, 2, 3]])
        torch.save(plain(input_ids=ids).logits, out)
    else:
        assert plain is None
    tdist.destroy_process_group()


@pytest.mark.slow  # a few processes: make test, not the fast lane
@pytest.mark.timeout(300)
def test_whole_model_gathers_fsdp2_shards_into_a_plain_model_on_rank_0(tmp_path):
    import torch.multiprocessing as mp

    from alignline.launch import free_port

    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path / "logits.pt")), nprocs=2, join=True)
    assert torch.load(tmp_path / "logits.pt").shape == (1, 3, 64)


@pytest.mark.slow  # a few processes: make test, not the fast lane
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.timeout(300)
def test_a_user_error_on_torchrun_ranks_is_one_message_and_not_retried(tmp_path):
    """torchrun exits 1 whatever its ranks exit with; the stage task still sees the ranks' exit code 2
    (a user error: StageUserError, which the pipeline neither retries nor prints with a traceback) and
    keeps the stage's message, not torchrun's failure summary."""
    from prefect.logging import disable_run_logger

    from flows.tasks import StageEntry, StageUserError, resolve_stage, stage_task

    broken = tmp_path / "run" / "data"
    broken.mkdir(parents=True)  # no manifest.json: an incomplete data stage
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "manifest.json").write_text(json.dumps({"stage": "pretrain", "status": "complete",
                                                                "files": {}}))
    rs = resolve_stage("sft", StageEntry(config=str(REPO / "configs/sft/tiny.yaml"), nproc_per_node=2))
    with disable_run_logger(), pytest.raises(StageUserError) as exc:
        stage_task.fn(stage="sft", module=rs.module, config=rs.config_dict, run_dir=str(tmp_path / "run"),
                      inputs={"init": str(tmp_path / "pre"), "data": str(broken)}, nproc=2)
    msg = str(exc.value)
    assert "manifest.json is missing" in msg and str(broken) in msg
    assert "Traceback" not in msg and "torch.distributed" not in msg and "ChildFailedError" not in msg
    assert not (tmp_path / "run" / "sft").exists()
