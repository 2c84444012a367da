"""PPO across processes (torchrun / gloo on CPU): 2 ranks compute what 1 process computes.

    .venv/bin/pytest tests/test_ppo_distributed.py -q            # ~2-3 min on 2 CPU cores
    .venv/bin/pytest tests/test_ppo_distributed.py -q -m "not slow"  # the config errors, seconds

- One PPO iteration (`PPOTrainer.step`) on 2 gloo ranks, each given half of the same global prompt
  batch, leaves policy and critic weights, the adaptive KL coefficient, the running reward
  statistics and the logged metrics where one process leaves them (1e-5). Rollouts are made
  deterministic (a fixed response per prompt replaces sampling) so the comparison tests what
  distribution must get right: the gathered, re-padded rollout; reward normalisation, reward and
  advantage whitening and the KL controller over the global batch; the token-weighted loss and
  DDP-averaged gradients over micro-batches split across ranks. The settings are the ones where
  shortcuts show: temperature 0.7, reward mean/std 1.3/0.4, `reward_norm: running`, responses of
  different lengths (some cut without EOS), prompts of different lengths, 2 micro-batches per
  minibatch, 2 minibatches, 2 epochs, whitening on. Seen red (2026-11-29) with each of: advantages
  whitened per rank, the KL controller fed rank 0's KL only, per-rank loss means (no token weights),
  running reward statistics of the rank's own scores.
- The rlhf stage launched by the pipeline's torchrun command with 2 ranks (`nproc_per_node: 2`)
  writes one complete, loadable stage dir (one metrics log, one TensorBoard event file).
- A 2-rank run killed after iteration 3 resumes from its state at 2 and ends bit for bit where an
  uninterrupted 2-rank run ends (seen red with the sampling seed set once per process instead of
  per iteration).
- A rollout batch (or micro-batch) that does not split over the ranks, and `parallel: fsdp`, are
  user errors (exit code 2) before any work.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignline.rl.ppo import KLArgs, PPOArgs, PPOTrainer

REPO = Path(__file__).resolve().parent.parent
PAD, EOS, BOS, V = 0, 1, 2, 64
T_ROLL, MEAN, STD = 0.7, 1.3, 0.4
N_PROMPTS, MAX_NEW = 16, 6
KL_TARGET = 0.21  # the first rollout's KL per sequence is ~0.23: the controller's error (+0.09) is not clipped


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's `one_thread`)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- one iteration, 1 vs 2 ranks


def _cfg(**kw):
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=False, **kw)


def _args() -> PPOArgs:
    return PPOArgs(rollout_batch_size=N_PROMPTS, forward_batch_size=4, mini_batch_size=8, grad_accum_steps=2,
                   ppo_epochs=2, max_new_tokens=MAX_NEW, temperature=T_ROLL, gamma=0.95, lam=0.9, vf_coef=0.5,
                   whiten_advantages=True, whiten_rewards=True, reward_norm="running",
                   kl=KLArgs(beta=0.1, adaptive=True, target=KL_TARGET, horizon=16),
                   optim={"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0}, critic_grad_clip=0.5)


def _trainer(dist=None) -> PPOTrainer:
    torch.manual_seed(0)
    policy = LlamaForCausalLM(_cfg())
    rm = LlamaForSequenceClassification(_cfg(num_labels=1))
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference off the policy: the KL (and the controller's input) is not 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return PPOTrainer(_args(), policy, copy.deepcopy(rm), rm, ref_policy=ref, eos_id=EOS, pad_id=PAD,
                      reward_mean=MEAN, reward_std=STD, dist=dist)


def _prompts() -> list[list[int]]:
    """Distinct prompts of 3-7 tokens: each rank's half is left-padded to its own width."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_PROMPTS):
        n = 2 + (i * 5) % 5
        out.append([BOS, 3 + i] + torch.randint(3, V, (n,), generator=g).tolist())
    return out


def _fixed_generate(model, input_ids, attention_mask, *, max_new_tokens, eos_id, pad_id, **_):
    """A response per prompt that depends on the prompt only: 1..MAX_NEW tokens, ending in EOS or
    (some) cut at max_new_tokens without one; pad after EOS as HF generate writes it."""
    rows = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        real = [t for t, k in zip(ids, m, strict=True) if k]
        g = torch.Generator().manual_seed(sum(real) * 31 + len(real))
        cut = bool(torch.rand((), generator=g) < 0.3)  # no EOS within max_new_tokens
        n = max_new_tokens if cut else int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
        toks = torch.randint(3, V, (n,), generator=g).tolist()
        if not cut:
            toks[-1] = eos_id
        rows.append(toks + [pad_id] * (max_new_tokens - n))
    return torch.tensor(rows, dtype=torch.long, device=input_ids.device)


def _outcome(t: PPOTrainer, metrics: dict) -> dict:
    return {
        "policy": {n: p.detach().clone() for n, p in t.policy.named_parameters()},
        "critic": {n: p.detach().clone() for n, p in t.value_model.named_parameters()},
        "beta": t.kl_ctl.value,
        "reward_norm": t.reward_norm_state(),
        "metrics": metrics,
        "first": dict(t.first_minibatch_stats),
        "advantages": t.last_rollout.advantages.clone(),
        "mask": t.last_rollout.mask.clone(),
        "kl_seq": t.last_rollout.kl.sum(1),
    }


def _one_iteration(t: PPOTrainer, prompts: list[list[int]]) -> dict:
    import alignline.rl.ppo as ppo_mod

    real = ppo_mod.generate
    ppo_mod.generate = _fixed_generate
    try:
        metrics = t.step(prompts, generator=torch.Generator().manual_seed(7))
    finally:
        ppo_mod.generate = real
    return _outcome(t, metrics)


def _iteration_worker(rank: int, world: int, port: int, out: str) -> None:
    _join_group(rank, world, port)
    from alignline.distributed import cleanup, init_distributed

    dist = init_distributed("cpu")
    t = _trainer(dist)
    share = N_PROMPTS // world
    torch.manual_seed(100 + rank)  # ranks sample with different seeds (the fixed rollout ignores it)
    result = _one_iteration(t, _prompts()[rank * share : (rank + 1) * share])
    torch.save(result, Path(out) / f"rank{rank}.pt")
    cleanup(dist)


# Metrics that are statistics of the global batch or of the update (time-based ones excluded).
COMPARED = ("rlhf_reward", "score", "score_raw", "kl", "entropy", "explained_variance", "eos_rate",
            "response_length", "beta", "advantage_mean", "return_mean", "reward_mean", "reward_std",
            "policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean", "ratio_var", "vf_clipfrac",
            "policy_grad_norm", "critic_grad_norm")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_iteration_on_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    single = _one_iteration(_trainer(), _prompts())
    # The settings must make per-rank shortcuts wrong, or equality would prove nothing:
    mask, adv = single["mask"], single["advantages"]
    lengths = mask.sum(1)
    assert int(lengths.min()) < int(lengths.max()) and not bool(single["metrics"]["eos_rate"] == 1.0)
    half = N_PROMPTS // 2
    assert abs(float(lengths[:half].float().mean()) - float(lengths[half:].float().mean())) > 0.2
    from alignline.rl.core import masked_whiten

    per_rank = torch.cat([masked_whiten(adv[:half], mask[:half]), masked_whiten(adv[half:], mask[half:])])
    assert float((per_rank - masked_whiten(adv, mask)).abs().max()) > 1e-3  # whitening once more is ~identity
    kl_seq = single["kl_seq"]
    error = float(kl_seq.mean()) / KL_TARGET - 1
    assert 0.01 < error < 0.2 and single["beta"] == pytest.approx(0.1 * (1 + error), rel=1e-6)  # not clipped
    assert abs(float(kl_seq[:half].mean()) - float(kl_seq.mean())) > 0.01  # rank 0's own KL would differ

    mp.spawn(_iteration_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    init = _trainer()
    before = {"policy": dict(init.policy.named_parameters()), "critic": dict(init.value_model.named_parameters())}
    for key in ("policy", "critic"):
        moved = max(float((single[key][n] - p.detach()).abs().max()) for n, p in before[key].items())
        assert moved > 1e-3, f"the {key} barely moved; the comparison would be weak"
        for n, p in single[key].items():
            assert torch.equal(ranks[0][key][n], ranks[1][key][n]), f"{key}.{n}: ranks disagree"
            torch.testing.assert_close(ranks[0][key][n], p, atol=1e-5, rtol=0, msg=f"{key}.{n}")
    for r in ranks:
        assert r["beta"] == pytest.approx(single["beta"], abs=1e-7, rel=1e-6)
        rn, sn = r["reward_norm"], single["reward_norm"]
        assert rn["running"]["count"] == sn["running"]["count"] == N_PROMPTS
        for k in ("mean", "std"):
            assert rn[k] == pytest.approx(sn[k], abs=1e-6)
        for k in COMPARED:
            assert r["metrics"][k] == pytest.approx(single["metrics"][k], abs=1e-5, rel=1e-4), k
        for k, v in single["first"].items():
            assert r["first"][k] == pytest.approx(v, abs=1e-5, rel=1e-4), f"first minibatch {k}"


# --------------------------------------------------------------------------- the stage under torchrun

SHORT = ["steps=3", "save_every=2", "eval.num_prompts=4", "eval.max_new_tokens=4", "ppo.rollout_batch_size=8",
         "ppo.forward_batch_size=4", "ppo.mini_batch_size=4", "ppo.grad_accum_steps=2", "ppo.ppo_epochs=1",
         "ppo.max_new_tokens=4", "optim.lr=1e-3", "ppo.kl.adaptive=true", "ppo.kl.horizon=16",
         "logging.progress=false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The rlhf stage's inputs: a tiny random sft/reward/data trio (tests/test_ppo_stage.py), in a second."""
    from tests.test_ppo_stage import _tiny_trio

    trio = _tiny_trio(tmp_path_factory.mktemp("ppo_dist_chain"))
    return {"init": str(trio["sft"]), "reward": str(trio["reward"]), "data": str(trio["data"])}


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pipeline_launches_ppo_on_two_ranks_with_torchrun(inputs, tmp_path):
    """What the pipeline's stage task does for `nproc_per_node: 2` (flows/tasks.py `stage_task`: resolve
    the stage config, write it, build the torchrun command, launch it in its own process group), minus
    the Prefect server around it (its start alone takes ~40 s here)."""
    from transformers import AutoModelForCausalLM

    from alignline.artifacts import load_stage
    from alignline.launch import launch
    from flows.tasks import StageEntry, _write_config, resolve_stage, stage_command

    run_dir = tmp_path / "run"
    rs = resolve_stage("rlhf", StageEntry(config="configs/rlhf/tiny.yaml", set=SHORT, nproc_per_node=2))
    assert rs.nproc == 2
    cmd = stage_command(rs.module, _write_config(run_dir, "rlhf", rs.config_dict), run_dir, inputs, rs.nproc)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    lines: list[str] = []
    launch(cmd, on_line=lines.append, timeout=300, cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert sum("rlhf: wrote" in x for x in lines) == 1, lines[-20:]  # printed once, by rank 0

    stage = run_dir / "rlhf-ppo"
    sd = load_stage(stage, expect="rlhf")  # complete, and every file's hash verified
    assert sd.manifest["world_size"] == 2
    ev = json.loads((stage / "eval.json").read_text())
    assert ev["train"]["world_size"] == 2 and ev["algorithm"] == "ppo"
    rows = _rows(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: each step once
    assert {"kl", "score", "policy_loss", "value_loss", "explained_variance", "rollout_gold_accuracy",
            "policy_grad_norm"} <= set(rows[-1])
    assert len(list((stage / "tb").glob("events.out.tfevents.*"))) == 1
    assert len(_rows(stage / "samples.jsonl")) == ev["num_prompts"] == 4
    assert (stage / "state" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in (stage / "state").iterdir()) == ["latest", "state.json", "step_00000003"]
    assert not (stage / ".staging").exists()
    model = AutoModelForCausalLM.from_pretrained(str(stage / "checkpoint"))
    assert sum(p.numel() for p in model.parameters()) > 0


def _shared_port(rank: int, root: str, i: int) -> int:
    """A free port for group `i`, picked by rank 0 just before it joins and handed to the other rank in a
    file. Ports picked minutes ahead can be taken meanwhile by the gloo connections of the earlier runs
    (ephemeral ports), and a group whose rank 0 cannot bind waits for its store until the test times out."""
    path = Path(root, f"port-{i}")
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(_free_port()))
        tmp.replace(path)
    deadline = time.monotonic() + 120
    while not path.is_file():
        assert time.monotonic() < deadline, f"rank 0 never wrote {path}"
        time.sleep(0.05)
    return int(path.read_text())


def _resume_worker(rank: int, world: int, inputs: dict, root: str) -> None:
    """In one pair of processes (imports paid once): an uninterrupted 4-iteration run into a/, a run into
    b/ killed after iteration 3 (state saved at 2), and its resumption; each run joins a fresh group."""
    import faulthandler
    import sys

    from alignline.config import load_config
    from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt
    from stages import rlhf as ppo

    # This test has hung to its 400 s timeout twice in full-suite runs (never alone; the cause is not
    # known yet). If it hangs again, each rank prints where it is stuck before pytest's timeout.
    faulthandler.dump_traceback_later(330, exit=False, file=sys.stderr)
    cfg = load_config(ppo.Config, REPO / "configs/rlhf/tiny.yaml", [*SHORT, "steps=4", "logging.report_to=[]"])
    for i, (name, fail_after) in enumerate((("a", None), ("b", 3), ("b", None))):
        _join_group(rank, world, _shared_port(rank, root, i))
        os.environ.pop(FAIL_AFTER_ENV, None)
        if fail_after is not None:
            os.environ[FAIL_AFTER_ENV] = str(fail_after)
        try:
            ppo.run(cfg, {k: Path(v) for k, v in inputs.items()}, Path(root) / name)
        except SimulatedInterrupt:
            assert fail_after is not None
            Path(root, f"interrupted-{rank}").write_text(name)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rank_run_resumes_bitwise(inputs, tmp_path):
    import torch.multiprocessing as mp

    from tests.test_ppo_stage import _assert_same_weights

    mp.spawn(_resume_worker, args=(2, inputs, str(tmp_path)), nprocs=2, join=True)
    assert all((tmp_path / f"interrupted-{r}").read_text() == "b" for r in range(2))
    a, b = tmp_path / "a" / "rlhf-ppo", tmp_path / "b" / "rlhf-ppo"
    ev_a, ev_b = (json.loads((p / "eval.json").read_text()) for p in (a, b))
    assert ev_a["train"]["resumed_from"] == 0 and ev_b["train"]["resumed_from"] == 2
    assert ev_b["train"]["final"] == ev_a["train"]["final"]
    assert ev_a["train"]["final"]["beta"] != 0.05  # the adaptive controller moved (and was restored)
    assert [r["step"] for r in _rows(b / "metrics.jsonl")] == [1, 2, 3, 4]
    _assert_same_weights(a, b)


# --------------------------------------------------------------------------- config errors


def _fake_stage(path: Path, stage: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete", "files": {}}))
    return path


@pytest.mark.parametrize(("overrides", "expected"), [
    (["ppo.rollout_batch_size=6", "ppo.mini_batch_size=2", "ppo.grad_accum_steps=1"],
     ["ppo.rollout_batch_size=6", "does not split evenly over 4 processes", "multiple of 4"]),
    (["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.grad_accum_steps=4"],
     ["mini_batch_size / ppo.grad_accum_steps = 8 / 4 = 2", "over 4 processes"]),
])
def test_batch_that_does_not_split_over_ranks_is_a_user_error(tmp_path, monkeypatch, capsys, overrides, expected):
    """Under torchrun (WORLD_SIZE=4) the batch check runs before the process group is joined or any
    file is written: exit 2, one message, no traceback."""
    from stages import rlhf as ppo

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    run = tmp_path / "run"
    argv = ["--init", str(_fake_stage(run / "sft", "sft")), "--reward", str(_fake_stage(run / "reward", "reward")),
            "--data", str(_fake_stage(run / "data", "data")), "--run-dir", str(run)]
    for o in overrides:
        argv += ["--set", o]
    with pytest.raises(SystemExit) as exc:
        ppo.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    for piece in expected:
        assert piece in err, err
    assert not (run / "rlhf").exists() and not (run / "rlhf-ppo").exists()
    import torch.distributed as tdist

    assert not tdist.is_initialized()


def test_pipeline_refuses_a_batch_that_does_not_split_before_launching():
    from alignline.config import ConfigError
    from flows.tasks import StageEntry, resolve_stage

    entry = StageEntry(config="configs/rlhf/tiny.yaml", set=["ppo.rollout_batch_size=6", "ppo.mini_batch_size=2"],
                       nproc_per_node=4)
    with pytest.raises(ConfigError, match=r"stages\.rlhf on nproc_per_node=4 ranks: ppo\.rollout_batch_size=6"):
        resolve_stage("rlhf", entry)
    resolve_stage("rlhf", entry.model_copy(update={"nproc_per_node": 2}))  # 6 splits over 2


def test_fsdp_for_ppo_is_refused_and_trl_algorithms_check_their_batch():
    """PPO refuses fsdp; the TRL algorithms run under torchrun (tests/test_trainer_ranks.py) when their
    global batch splits over the ranks."""
    from alignline.config import ConfigError, load_config
    from stages import rlhf as ppo

    with pytest.raises(ConfigError, match="parallel: fsdp is not supported by the rlhf stage"):
        load_config(ppo.Config, REPO / "configs/rlhf/tiny.yaml", ["parallel=fsdp"])
    cfg = load_config(ppo.Config, REPO / "configs/rlhf/dpo_tiny.yaml", ["dpo.batch_size=6"])
    with pytest.raises(ConfigError, match="dpo.batch_size=6 must split evenly over the 4 torchrun ranks"):
        ppo.check_world_size(cfg, 4)
    ppo.check_world_size(cfg, 2)
    ppo.check_world_size(cfg, 1)


def test_rank_seeds_are_per_rank_per_iteration_and_reproducible():
    from stages.rlhf import rank_seed

    seeds = [rank_seed(0, step, rank) for step in range(3) for rank in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(0, 2, 1) == rank_seed(0, 2, 1)  # a resumed run draws what the first run drew
    assert rank_seed(1, 2, 1) != rank_seed(0, 2, 1) and rank_seed(0, 2, 1, "ptx") != rank_seed(0, 2, 1)
