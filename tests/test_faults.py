"""Faults and load (issue 15, section 7): concurrent writers, a full disk, a failure after training.

    .venv/bin/pytest tests/test_faults.py

- Locks (alignline.locks): a second pipeline, or a stage started by hand, on a run directory a
  pipeline holds is refused with one message naming the lock file and the holder (pid, host, start,
  command); two writers never share a stage dir; a killed holder leaves no lock behind; the
  pipeline's own subprocess and torchrun stages are not refused; `--wait` waits.
- A full disk during a state save (OSError ENOSPC injected into torch.save for one call): exit 2 with
  one message naming the path, the previous state intact and loadable, no temp files left, and a
  re-run resumes from it.
- A failure in the evaluation after training (a simulated OOM): the final state was saved before it,
  so a re-run evaluates without a single optimizer step (pretrain and the rlhf stage).

The real-process versions of these scenarios, with timings, are `bench/faults.py` (BENCHMARKS.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignline.artifacts import DiskFull, StageRun, load_stage
from alignline.config import StrictModel, load_config
from alignline.files import read_jsonl
from alignline.locks import TOKEN_ENV, LockHeld, lock_path, read_holder, run_lock

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    """This environment without a run-lock token (a process started by hand), PYTHONPATH at the repo."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


# Another process holding a run dir. It imports alignline.locks without the package's __init__ (which
# registers the model with transformers: seconds of torch import that these tests do not need).
HOLD = f"""
import sys, time, types
pkg = types.ModuleType("alignline")
pkg.__path__ = [{str(REPO / "alignline")!r}]
sys.modules["alignline"] = pkg
from alignline.locks import StageLock, run_lock
run_dir, stage = sys.argv[1], sys.argv[2]
if stage == "run":
    with run_lock(run_dir):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
else:
    lock = StageLock(run_dir, stage)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(run_dir: Path, what: str = "run", seconds: float = 120) -> subprocess.Popen:
    """Another process holding `run_dir` like a pipeline (`what="run"`) or a hand-run stage (a stage name)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), what, str(seconds)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- locks


@pytest.mark.slow  # spawns a holder process (about a second)
def test_a_second_pipeline_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path: Path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeld) as info, run_lock(run_dir):
            pass
        assert time.monotonic() - t0 < 2, "refused at once, not after a wait"
        msg = str(info.value)
        assert "\n" not in msg
        for piece in (str(lock_path(run_dir.resolve())), f"pid {holder.pid}", socket.gethostname(), "since",
                      "command:", "--wait"):
            assert piece in msg, f"{piece!r} not in {msg}"
        assert read_holder(lock_path(run_dir))["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the flock
        holder.wait()
    with run_lock(run_dir):  # free at once: a dead holder never blocks
        assert read_holder(lock_path(run_dir))["pid"] == os.getpid()
    assert read_holder(lock_path(run_dir)) == {}, "the holder details are cleared on release"


@pytest.mark.slow  # spawns a holder process (about a second)
def test_wait_waits_until_the_run_dir_is_free(tmp_path: Path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir, seconds=1.5)
    try:
        said: list[str] = []
        t0 = time.monotonic()
        with run_lock(run_dir, wait=True, on_wait=said.append):
            waited = time.monotonic() - t0
        assert holder.wait(timeout=10) == 0
        assert waited > 0.5, waited
        assert len(said) == 1 and f"pid {holder.pid}" in said[0], said
    finally:
        _stop(holder)


@pytest.mark.slow  # spawns a holder process (about a second)
def test_a_stage_run_by_hand_is_refused_in_a_run_dir_a_pipeline_holds(tmp_path: Path, capsys):
    from stages import data

    run_dir = tmp_path / "run"
    # Work in progress of the holder: the refused stage must not clean it up.
    (run_dir / "data" / ".staging").mkdir(parents=True)
    (run_dir / "data" / ".staging" / "in-progress").write_text("x")
    holder = _holder(run_dir)
    try:
        with pytest.raises(SystemExit) as info:
            data.main(["--config", str(REPO / "configs/data/tiny.yaml"), "--run-dir", str(run_dir), "--set",
                       "size=tiny"])
        err = capsys.readouterr().err
    finally:
        _stop(holder)
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: run directory"), err
    assert str(lock_path(run_dir.resolve())) in err and f"pid {holder.pid}" in err
    assert (run_dir / "data" / ".staging" / "in-progress").is_file()
    assert not (run_dir / "data" / "manifest.json").exists()


@pytest.mark.slow  # spawns a holder process (about a second)
def test_two_writers_never_share_a_stage_dir(tmp_path: Path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir, "pretrain")  # `python -m stages.pretrain --run-dir run` by hand
    try:
        with pytest.raises(LockHeld) as info:
            StageRun(run_dir, "pretrain", None)
        msg = str(info.value)
        assert f"stage directory {run_dir.resolve() / 'pretrain'}" in msg
        assert str(lock_path(run_dir.resolve(), "pretrain")) in msg and f"pid {holder.pid}" in msg
        assert not (run_dir / "pretrain").exists(), "the refused writer touched the stage dir"
        # Another stage of the same run dir may run meanwhile ...
        other = StageRun(run_dir, "sft", None)
        assert load_stage(other.finalize(), expect="sft")
        # ... but no pipeline starts while a stage runs: it names the stage's holder.
        with pytest.raises(LockHeld) as info, run_lock(run_dir):
            pass
        assert "in use by a stage run" in str(info.value) and f"pid {holder.pid}" in str(info.value)
    finally:
        _stop(holder)
    assert load_stage(StageRun(run_dir, "pretrain", None).finalize(), expect="pretrain")


def test_locks_are_reentrant_in_process_and_released_with_the_stage(tmp_path: Path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        token = os.environ[TOKEN_ENV]
        assert read_holder(lock_path(run_dir))["token"] == token
        with run_lock(run_dir):  # the CLI takes it, then the flow again
            pass
        crashed = StageRun(run_dir, "pretrain", None)  # an in-process stage that then fails ...
        rerun = StageRun(run_dir, "pretrain", None)  # ... and its retry in the same process
        rerun.finalize()
        del crashed
    assert TOKEN_ENV not in os.environ
    for name in ("run", "pretrain"):  # nothing of this process holds them any more
        fd = os.open(lock_path(run_dir, name), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


@pytest.mark.slow
def test_the_pipelines_own_stage_processes_are_not_refused(tmp_path: Path):
    """A pipeline launches stages as `python -m` subprocesses and under torchrun (flows/tasks.py): they
    inherit the run lock's token, so its own stages run; the same command from another shell is refused."""
    from alignline.launch import LaunchError, launch, torchrun_command
    from tests.prefect_fixtures import make_fake_stages

    pkg = make_fake_stages(tmp_path / "src")
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "fake.yaml").write_text("steps: 2\n")
    args = ["--config", str(tmp_path / "fake.yaml"), "--run-dir", str(run_dir)]
    with run_lock(run_dir):
        launch([sys.executable, "-m", f"{pkg}.data", *args], env=env, timeout=120)
        launch(torchrun_command(f"{pkg}.tokenizer", args, nproc=2), env=env, timeout=180)
        assert load_stage(run_dir / "data") and load_stage(run_dir / "tokenizer")
        by_hand = {**env, TOKEN_ENV: "not-the-token"}
        with pytest.raises(LaunchError) as info:
            launch([sys.executable, "-m", f"{pkg}.pretrain", *args], env=by_hand, timeout=120)
        assert info.value.returncode == 2 and "is in use" in "\n".join(info.value.tail)
        assert not (run_dir / "pretrain").exists()


# --------------------------------------------------------------------------- two pipelines, real processes


def _fake_pipeline_cmd(tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    from tests.prefect_fixtures import fake_pipeline_overrides, make_fake_stages

    pkg = make_fake_stages(tmp_path / "src")
    (tmp_path / "pipeline.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "alignline_cli", "pipeline", "--config", str(tmp_path / "pipeline.yaml"),
           "--to", "tokenizer", *extra]
    for s in fake_pipeline_overrides(pkg, run_dir) + ["data.steps=3", "tokenizer.steps=3"]:
        cmd += ["--set", s]
    return cmd


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_pipelines_at_once_one_is_refused_and_neither_corrupts_the_other(tmp_path: Path):
    run_dir = tmp_path / "run"
    hold = tmp_path / "hold"  # the first pipeline's stages wait while it exists
    hold.write_text("")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path / "src"), str(REPO)]), FAKE_HOLD_FILE=str(hold))
    first = subprocess.Popen(_fake_pipeline_cmd(tmp_path, run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if read_holder(lock_path(run_dir)).get("pid") == first.pid and (run_dir / "data.calls").exists():
                break
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[0]
        t0 = time.monotonic()
        second = subprocess.run(_fake_pipeline_cmd(tmp_path, run_dir), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        refused_in = time.monotonic() - t0
        hold.unlink()
        out, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert second.stderr.count("error:") == 1 and second.stderr.strip().startswith("error: run directory")
    assert f"pid {first.pid}" in second.stderr and "alignline_cli pipeline" in second.stderr
    assert refused_in < 30, f"refused after {refused_in:.1f}s: it must not start Prefect first"
    assert first.returncode == 0, out
    for stage in ("data", "tokenizer"):
        load_stage(run_dir / stage, expect=stage)  # verified: every file's sha256 matches its manifest
        calls = (run_dir / f"{stage}.calls").read_text().split()
        assert calls == ["0"], f"{stage} ran {len(calls)} times"


# --------------------------------------------------------------------------- disk full


class _Toy(StrictModel):
    lr: float = 0.1


def _toy_state(run: StageRun, step: int, model: torch.nn.Module, opt) -> None:
    run.save_state(step, model=model, optimizer=opt, data_position={"step": step})


def test_a_state_save_that_hits_a_full_disk_keeps_the_previous_state(tmp_path: Path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    run = StageRun(tmp_path / "run", "toy", _Toy())
    _toy_state(run, 1, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    real_save = torch.save

    def full(obj, f, *a, **k):  # model.safetensors is already in the temp dir when this fails
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(DiskFull) as info:
        _toy_state(run, 2, model, opt)
    msg = str(info.value)
    assert "no space left on device" in msg and str(run.state_dir / "step_00000002") in msg
    assert "step 1" in msg and "resume" in msg
    assert sorted(p.name for p in run.state_dir.iterdir()) == ["latest", "state.json", "step_00000001"]
    assert (run.state_dir / "latest").read_text() == "step_00000001"

    # torch.save's own report of a failed write has no errno; on a file system with no space left it
    # is a full disk too. Anything else stays the error it is.
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(DiskFull):
        _toy_state(run, 2, model, opt)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        _toy_state(run, 2, model, opt)
    assert sorted(p.name for p in run.state_dir.iterdir()) == ["latest", "state.json", "step_00000001"]

    monkeypatch.setattr(torch, "save", real_save)
    meta = StageRun(tmp_path / "run", "toy", _Toy()).load_state(model=model, optimizer=opt)
    assert meta is not None and meta["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), k


def test_temp_files_of_a_killed_save_are_removed_on_resume(tmp_path: Path):
    model = torch.nn.Linear(2, 2)
    run = StageRun(tmp_path / "run", "toy", _Toy())
    run.save_state(1, model=model)
    (run.state_dir / ".step_00000002.tmp-999").mkdir()  # a save killed half-way (kill -9)
    (run.state_dir / ".step_00000002.tmp-999" / "model.safetensors").write_bytes(b"half")
    (run.state_dir / ".latest.tmp").write_text("step_000")
    again = StageRun(tmp_path / "run", "toy", _Toy())
    assert sorted(p.name for p in again.state_dir.iterdir()) == ["latest", "state.json", "step_00000001"]


def test_an_incomplete_trainer_checkpoint_is_removed_not_resumed(tmp_path: Path):
    from alignline.training import MetricsLogger, trainer_resume_point

    out = tmp_path / "trainer"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "model.safetensors").write_bytes(b"cut short by a full disk")
    resume, step = trainer_resume_point(out, MetricsLogger(None), "sft")
    assert (resume, step) == (str(out / "checkpoint-4"), 4)
    assert not (out / "checkpoint-8").exists()


# --------------------------------------------------------------------------- real stages

# A very small pretrain run (as in tests/test_pretrain.py): a few seconds per call.
SMALL = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "train.seq_len=32", "train.batch_size=8",
    "train.micro_batch_size=4", "train.max_steps=6", "train.save_every=2", "train.eval_every=3",
    "train.eval_batches=2", "eval.gold_prompts=4", "eval.max_new_tokens=4", "logging.every_steps=1",
    "logging.progress=false", "logging.report_to=[]", "schedule.warmup_steps=2", "train.device=cpu",
]


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory):
    from stages import data, tokenizer

    root = tmp_path_factory.mktemp("fault_inputs")
    data.run(data.Config(size="tiny"), {}, root)
    tokenizer.run(tokenizer.Config(vocab_size=300), {"data": root / "data"}, root)
    return root


def _pretrain_argv(inputs: Path, run_dir: Path) -> list[str]:
    argv = ["--config", str(REPO / "configs/pretrain/tiny.yaml"), "--run-dir", str(run_dir), "--data",
            str(inputs / "data"), "--tokenizer", str(inputs / "tokenizer")]
    for s in SMALL:
        argv += ["--set", s]
    return argv


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.slow
def test_full_disk_during_a_pretrain_save_exits_2_and_a_rerun_resumes(pretrain_inputs, tmp_path, monkeypatch,
                                                                        capsys, caplog, one_thread):
    from stages import pretrain

    run_dir = tmp_path / "run"
    real_save = torch.save
    saves = {"optimizer": 0}

    def full_on_second_optimizer_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            saves["optimizer"] += 1
            if saves["optimizer"] == 2:  # the state of step 4; step 2's is on disk
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_on_second_optimizer_save)
    with pytest.raises(SystemExit) as info:
        pretrain.main(_pretrain_argv(pretrain_inputs, run_dir))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), err
    assert str(run_dir / "pretrain" / "state" / "step_00000004") in err and "step 2" in err
    state = run_dir / "pretrain" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["latest", "state.json", "step_00000002"]
    assert not list((run_dir / "pretrain").rglob("*.tmp*")), "half-written files left behind"
    assert not (run_dir / "pretrain" / "manifest.json").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    steps = _count_calls(monkeypatch, torch.optim.AdamW, "step")
    with caplog.at_level(logging.INFO, logger="alignline.artifacts"):
        out = pretrain.main(_pretrain_argv(pretrain_inputs, run_dir))
    assert "pretrain: resumed from step 2" in caplog.text
    assert len(steps) == 4, "steps 3-6 trained again, 1-2 came from the state"
    load_stage(out, expect="pretrain")
    losses = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_oom_in_pretrain_evaluation_reruns_the_evaluation_only(pretrain_inputs, tmp_path, monkeypatch, caplog,
                                                               one_thread):
    import alignline.evaluation
    from stages import pretrain

    # save_every=4 does not divide max_steps=6: only the save of the final step before evaluating has step 6.
    cfg = load_config(pretrain.Config, REPO / "configs/pretrain/tiny.yaml", [*SMALL, "train.save_every=4"])
    inputs = {"data": pretrain_inputs / "data", "tokenizer": pretrain_inputs / "tokenizer"}
    real_eval = alignline.evaluation.gold_eval

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated in the evaluation after training)")

    monkeypatch.setattr(alignline.evaluation, "gold_eval", oom)
    first = _count_calls(monkeypatch, torch.optim.AdamW, "step")
    with pytest.raises(torch.OutOfMemoryError):
        pretrain.run(cfg, inputs, tmp_path / "run")
    assert len(first) == 6
    assert (tmp_path / "run/pretrain/state/latest").read_text() == "step_00000006"

    monkeypatch.setattr(alignline.evaluation, "gold_eval", real_eval)
    again = _count_calls(monkeypatch, torch.optim.AdamW, "step")
    with caplog.at_level(logging.INFO, logger="alignline.artifacts"):
        out = pretrain.run(cfg, inputs, tmp_path / "run")
    assert len(again) == 0, "the re-run trained again"
    assert "pretrain: resumed from step 6" in caplog.text
    ev = json.loads((out / "eval.json").read_text())
    assert ev["gold_accuracy"] is not None and ev["val_loss"] > 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_oom_in_rlhf_evaluation_reruns_the_evaluation_only(tmp_path, monkeypatch, caplog, one_thread):
    from alignline.rl.ppo import PPOTrainer
    from stages import rlhf as ppo
    from tests.test_ppo_stage import _tiny_trio

    trio = _tiny_trio(tmp_path / "chain")
    cfg = load_config(ppo.Config, REPO / "configs/rlhf/tiny.yaml", [
        "steps=3", "save_every=2", "eval.num_prompts=4", "eval.max_new_tokens=4", "ppo.rollout_batch_size=8",
        "ppo.forward_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=4",
        "logging.progress=false", "logging.report_to=[]"])
    inputs = {"init": trio["sft"], "reward": trio["reward"], "data": trio["data"]}
    real_eval = ppo.evaluate_policies

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated in the evaluation after training)")

    monkeypatch.setattr(ppo, "evaluate_policies", oom)
    first = _count_calls(monkeypatch, PPOTrainer, "step")
    with pytest.raises(torch.OutOfMemoryError):
        ppo.run(cfg, inputs, tmp_path / "run")
    assert len(first) == 3
    assert (tmp_path / "run/rlhf-ppo/state/latest").read_text() == "step_00000003"

    monkeypatch.setattr(ppo, "evaluate_policies", real_eval)
    again = _count_calls(monkeypatch, PPOTrainer, "step")
    with caplog.at_level(logging.INFO, logger="alignline.artifacts"):
        out = ppo.run(cfg, inputs, tmp_path / "run")
    assert len(again) == 0, "the re-run trained again"
    assert "rlhf-ppo: resumed from step 3" in caplog.text
    ev = json.loads((out / "eval.json").read_text())
    assert ev["train"]["resumed_from"] == 3
    assert ev["train"]["final"]["score"] is not None, "the last iteration's statistics come from the state"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
