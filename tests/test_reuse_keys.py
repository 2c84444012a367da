"""Never silently wrong: a stage is reused or resumed only under exactly the same reuse key.

    .venv/bin/pytest tests/test_reuse_keys.py -q

The key (alignline.artifacts.stage_key) is config + code version + every input's manifest hash (or
content, for a plain HF dir) + the fingerprint of every data file read from outside the run dir. The
flow's cache (flows.tasks.cache_check) and StageRun's state resume both compare it. The slow tests at
the end run the real SFT and reward stages: resuming from the final state changes nothing, and a
stage re-run downstream of a changed parent equals a fresh run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignline import artifacts
from alignline.artifacts import (
    StageRun,
    adopt_legacy_dir,
    default_stage_dir,
    fingerprint,
    key_changes,
    load_stage,
    stage_dir_name,
    stage_key,
    variant_dirs,
)
from alignline.config import ConfigError, StrictModel

SHARED_SFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "alpaca_en_demo.json"


class Cfg(StrictModel):
    lr: float = 1e-3


def _finish(run_dir: Path, stage: str, cfg, **kw) -> Path:
    run = StageRun(run_dir, stage, cfg, **kw)
    (run.staging / "out.txt").write_text(f"{stage} {cfg}")
    return run.finalize(eval={}, headline={})


def test_state_trained_on_an_old_parent_is_discarded(tmp_path, caplog):
    parent = _finish(tmp_path, "sft", Cfg())
    child = StageRun(tmp_path, "reward", Cfg(), inputs={"init": parent})
    child.save_state(6, extra={"x": 1})
    assert StageRun(tmp_path, "reward", Cfg(), inputs={"init": parent}).load_state() is not None  # same key

    _finish(tmp_path, "sft", Cfg(lr=5e-4))  # the parent re-runs: new manifest
    with caplog.at_level(logging.WARNING, logger="alignline.artifacts"):
        again = StageRun(tmp_path, "reward", Cfg(), inputs={"init": parent})
    assert again.load_state() is None and not again.state_dir.exists()
    assert "reward: input 'init' changed" in caplog.text


def test_changed_data_file_discards_state_and_is_named(tmp_path, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n')
    run = StageRun(tmp_path / "run", "data", Cfg(), data={"rows": rows})
    run.save_state(1)
    out = run.finalize(eval={}, headline={})
    key = load_stage(out).manifest["key"]
    assert key["data"]["rows"]["sha256"] == artifacts.sha256_file(rows) and key["data"]["rows"]["path"] == str(rows)

    with open(rows, "a") as fh:
        fh.write('{"a": 2}\n')
    with caplog.at_level(logging.WARNING, logger="alignline.artifacts"):
        again = StageRun(tmp_path / "run", "data", Cfg(), data={"rows": rows})
    assert again.load_state() is None
    assert f"data 'rows' changed: {rows} (content differs)" in caplog.text
    assert again.key["sha256"] != key["sha256"]


def test_key_ignores_paths_but_not_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    assert stage_key(Cfg(), data={"f": a})["sha256"] == stage_key(Cfg(), data={"f": b})["sha256"]
    b.write_text("diff")
    assert stage_key(Cfg(), data={"f": a})["sha256"] != stage_key(Cfg(), data={"f": b})["sha256"]


def test_large_files_use_size_mtime_and_a_sampled_hash(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(artifacts, "LARGE_FILE_BYTES", 1000)
    monkeypatch.setattr(artifacts, "_SAMPLE_BYTES", 16)
    big = tmp_path / "corpus.bin"
    big.write_bytes(bytes(range(256)) * 40)
    fp = fingerprint(big)
    assert set(fp) == {"bytes", "mtime_ns", "sampled_sha256"}
    os.utime(big, ns=(fp["mtime_ns"] + 10**9, fp["mtime_ns"] + 10**9))
    touched = fingerprint(big)
    assert touched != fp
    data = bytearray(big.read_bytes())
    data[0] ^= 1  # first sampled block
    big.write_bytes(bytes(data))
    os.utime(big, ns=(touched["mtime_ns"], touched["mtime_ns"]))
    assert fingerprint(big)["sampled_sha256"] != fp["sampled_sha256"]


def test_directory_changes_name_the_file(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    old = stage_key(Cfg(), inputs={"init": d})
    (d / "model.safetensors").write_bytes(b"y")
    assert key_changes(old, stage_key(Cfg(), inputs={"init": d})) == [
        f"input 'init' changed: {d}/model.safetensors changed"]


def test_flow_cache_sees_the_content_of_an_external_init(tmp_path):
    """Swapping (or editing) SFT's plain-HF-dir init invalidates the cached SFT stage."""
    from flows.tasks import cache_check
    from stages import sft

    a, b = tmp_path / "base_a", tmp_path / "base_b"
    for d, w in ((a, b"a"), (b, b"b")):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(w)
    cfg = sft.Config()
    _finish(tmp_path / "run", "sft", cfg, source=sft.__file__, external_inputs={"init": a})
    stage_dir = tmp_path / "run" / "sft"
    assert cache_check("stages.sft", cfg, {"init": str(a)}, stage_dir)[0]
    hit, why = cache_check("stages.sft", cfg, {"init": str(b)}, stage_dir)
    assert not hit and "input 'init' changed" in why
    (a / "model.safetensors").write_bytes(b"edited")
    hit, why = cache_check("stages.sft", cfg, {"init": str(a)}, stage_dir)
    assert not hit and f"{a}/model.safetensors changed" in why


def test_data_stage_fingerprints_its_source_files(tmp_path):
    from stages import data

    assert data.data_files(data.Config()) == {}  # the built-in suite reads nothing outside
    local = tmp_path / "sft.jsonl"
    local.write_text("")
    cfg = data.Config(source="files", files={"sft": {"path": str(local)},
                                              "preference": {"path": "org/hub-dataset", "hub": True}})
    assert data.data_files(cfg) == {"sft": local}  # a hub id has no local content to hash
    if SHARED_SFT.is_file():  # a real public dataset, read in place
        cfg = data.Config(source="files", files={"sft": {"path": str(SHARED_SFT)}})
        key = stage_key(cfg, data=data.data_files(cfg))
        assert key["data"]["sft"]["sha256"] == artifacts.sha256_file(SHARED_SFT)


# --------------------------------------------------------------------------- variants: one dir each


class AlgoCfg(StrictModel):
    """A config with variants, like the rlhf stage's (`algorithm` selects the output dir)."""

    variant_key: ClassVar[str] = "algorithm"
    algorithm: str = "ppo"
    lr: float = 1e-3


def test_the_rlhf_algorithm_names_the_output_dir():
    from stages import rlhf as ppo

    assert [stage_dir_name("rlhf", ppo.Config(algorithm=a)) for a in ("ppo", "dpo", "kto", "grpo", "rloo")] == [
        "rlhf-ppo", "rlhf-dpo", "rlhf-kto", "rlhf-grpo", "rlhf-rloo"]
    assert stage_dir_name("sft", Cfg()) == "sft" and stage_dir_name("evaluate") == "evaluate"  # no variants
    with pytest.raises(ConfigError, match="cannot name an output directory"):
        stage_dir_name("rlhf", AlgoCfg(algorithm="../x"))


def _stage_names(run_dir: Path) -> list[str]:
    """The stage dirs of a run dir; `.locks/` (alignline.locks) is bookkeeping, not a stage."""
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))


def test_variants_are_separate_stages_for_cache_and_resume(tmp_path):
    """Each variant has its own dir, manifest, key and state: running one never touches another."""
    ppo_dir = _finish(tmp_path, "rlhf", AlgoCfg())
    assert ppo_dir == tmp_path / "rlhf-ppo"
    dpo_run = StageRun(tmp_path, "rlhf", AlgoCfg(algorithm="dpo"))
    assert dpo_run.path == tmp_path / "rlhf-dpo" and dpo_run.name == "rlhf-dpo" and dpo_run.variant == "dpo"
    dpo_run.save_state(3)
    dpo_dir = dpo_run.finalize(eval={}, headline={})
    assert _stage_names(tmp_path) == ["rlhf-dpo", "rlhf-ppo"]
    for d, algo in ((ppo_dir, "ppo"), (dpo_dir, "dpo")):
        sd = load_stage(d, expect="rlhf")  # consumers still check the kind, "rlhf"
        assert sd.manifest["variant"] == algo
    assert [p.name for p in variant_dirs(tmp_path, "rlhf")] == ["rlhf-dpo", "rlhf-ppo"]
    dpo_manifest = (dpo_dir / "manifest.json").read_bytes()
    # PPO re-runs with another config: its own manifest goes, DPO's output and state stay.
    StageRun(tmp_path, "rlhf", AlgoCfg(lr=5e-4))
    assert not (ppo_dir / "manifest.json").exists()
    assert (dpo_dir / "manifest.json").read_bytes() == dpo_manifest
    assert StageRun(tmp_path, "rlhf", AlgoCfg(algorithm="dpo")).load_state()["step"] == 3


def _legacy(run_dir: Path, config: dict | None, finished: bool = True) -> Path:
    """An rlhf/ as an alignline before per-variant dirs wrote it."""
    d = run_dir / "rlhf"
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / "w.bin").write_text("weights")
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        (d / "manifest.json").write_text(json.dumps({"stage": "rlhf", "status": "complete", "files": {}}))
    return d


def test_pre_variant_dir_is_moved_to_its_algorithm(tmp_path, caplog):
    run_dir = tmp_path / "old"
    _legacy(run_dir, {"lr": 1e-3})  # before `algorithm` existed: PPO
    with caplog.at_level(logging.WARNING, logger="alignline.artifacts"):
        msg = adopt_legacy_dir(run_dir, "rlhf", AlgoCfg(algorithm="dpo"))
    assert msg.startswith(f"moved {run_dir / 'rlhf'} to {run_dir / 'rlhf-ppo'} (algorithm ppo)")
    assert not (run_dir / "rlhf").exists() and (run_dir / "rlhf-ppo" / "checkpoint" / "w.bin").read_text() == "weights"
    assert caplog.text.count("moved ") == 1
    assert adopt_legacy_dir(run_dir, "rlhf", AlgoCfg()) is None  # nothing left to do

    _legacy(run_dir, {"algorithm": "dpo", "lr": 1e-3})
    assert "to " + str(run_dir / "rlhf-dpo") in adopt_legacy_dir(run_dir, "rlhf", AlgoCfg())
    assert _stage_names(run_dir) == ["rlhf-dpo", "rlhf-ppo"]


def test_pre_variant_dir_is_never_lost(tmp_path, caplog):
    """Name taken, or variant unknown: the old dir stays where it is, and the log says so once."""
    run_dir = tmp_path / "old"
    _finish(run_dir, "rlhf", AlgoCfg())
    _legacy(run_dir, {"algorithm": "ppo"})
    with caplog.at_level(logging.WARNING, logger="alignline.artifacts"):
        first = adopt_legacy_dir(run_dir, "rlhf", AlgoCfg())
        again = adopt_legacy_dir(run_dir, "rlhf", AlgoCfg())
    assert first == again and "rlhf-ppo/ exists already" in first and "left in place and not used" in first
    assert caplog.text.count("exists already") == 1
    assert (run_dir / "rlhf" / "checkpoint" / "w.bin").is_file()

    crashed = tmp_path / "crashed"  # no config recorded at all: cannot tell which algorithm
    _legacy(crashed, None, finished=False)
    assert "cannot be read" in adopt_legacy_dir(crashed, "rlhf", AlgoCfg())
    assert (crashed / "rlhf").is_dir()
    # A StageRun of a variant adopts the old dir itself (the command line path, no flow).
    interrupted = tmp_path / "interrupted"
    _legacy(interrupted, {"algorithm": "dpo"}, finished=False)
    run = StageRun(interrupted, "rlhf", AlgoCfg(algorithm="dpo"))
    assert run.path == interrupted / "rlhf-dpo" and (run.path / "checkpoint" / "w.bin").is_file()


def test_command_line_default_input_finds_a_variant(tmp_path):
    """`alignline stage evaluate --run-dir R` without --rlhf: the only rlhf-* output, else the newest."""
    import os

    from alignline.stage_cli import InputSpec, resolve_inputs

    spec = [InputSpec("rlhf", default="rlhf", required=False)]
    assert resolve_inputs(spec, {}, tmp_path) == {}
    dpo = _finish(tmp_path, "rlhf", AlgoCfg(algorithm="dpo"))
    assert default_stage_dir(tmp_path, "rlhf") == dpo and resolve_inputs(spec, {}, tmp_path) == {"rlhf": dpo}
    ppo = _finish(tmp_path, "rlhf", AlgoCfg())
    os.utime(dpo / "manifest.json", ns=(1, 1))  # PPO finished last
    assert default_stage_dir(tmp_path, "rlhf") == ppo
    assert resolve_inputs(spec, {"rlhf": dpo}, tmp_path) == {"rlhf": dpo}  # the flag chooses


# --------------------------------------------------------------------------- real stages (slow)

FAST = ["train.max_steps=6", "train.save_every=3", "train.eval_every=6", "train.batch_size=8",
        "train.max_train_examples=64", "logging.progress=false", "logging.every_steps=1"]
# 64 examples / batch 8 = 8 steps an epoch: max_steps 6 ends mid-epoch, where HF Trainer overshot on resume.
SFT_FAST = [*FAST, "eval.gold_prompts=0"]
RM_FAST = [*FAST, "onpolicy.enabled=false"]


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> dict[str, Path]:
    """The built-in data + a trained tokenizer + a random tiny model saved as a plain HF dir (no pretraining:
    the resume and rerun checks need a model, not a good one)."""
    from alignline.tokenizer import load_tokenizer
    from stages.pretrain import Config as PretrainConfig
    from stages.pretrain import build_model
    from tests.conftest import run_stage

    root = tmp_path_factory.mktemp("reuse")
    run_stage("data", root)
    run_stage("tokenizer", root)
    tok = load_tokenizer(root / "tokenizer" / "checkpoint")
    out = {"data": root / "data"}
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = PretrainConfig().model.model_copy(update={"hidden_size": 32, "intermediate_size": 64,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "num_key_value_heads": 1})
        model = build_model(m, tok)
        d = root / f"init{seed}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[f"init{seed}"] = d
    return out


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_stage(stage_dir).checkpoint
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


def _steps(stage_dir: Path) -> int:
    ev = json.loads((stage_dir / "eval.json").read_text())
    return ev["train_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_rerun_from_final_state_trains_nothing_and_changes_nothing(tiny_init, tmp_path, stage, caplog):
    from tests.conftest import run_stage

    over = SFT_FAST if stage == "sft" else RM_FAST
    inputs = {"init": tiny_init["init0"], "data": tiny_init["data"]}
    first = run_stage(stage, tmp_path, over, inputs)
    before = _weights(first)
    assert _steps(first) == 6
    with caplog.at_level(logging.INFO):
        again = run_stage(stage, tmp_path, over, inputs)  # resumes from state/ at the final step
    assert f"{stage}: resumed from step 6" in caplog.text
    assert _steps(again) == 6  # not 7
    after = _weights(again)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tiny_init, tmp_path, monkeypatch):
    from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt
    from tests.conftest import run_stage

    inputs = {"init": tiny_init["init0"], "data": tiny_init["data"]}
    full = run_stage("reward", tmp_path / "a", RM_FAST, inputs)
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(SimulatedInterrupt):
        run_stage("reward", tmp_path / "b", RM_FAST, inputs)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = run_stage("reward", tmp_path / "b", RM_FAST, inputs)
    assert _steps(resumed) == 6
    _assert_same(full, resumed)


@pytest.mark.slow
def test_rerun_downstream_of_a_changed_parent_equals_a_fresh_run(tiny_init, tmp_path):
    """SFT's base model is swapped: SFT must retrain (not resume the state it trained on the old base),
    and reward, re-run in the same run dir, must not resume the state it trained on the old SFT. Both
    equal stages trained fresh in another run dir."""
    from tests.conftest import run_stage

    data = tiny_init["data"]
    rd = tmp_path / "run"
    sft = run_stage("sft", rd, SFT_FAST, {"init": tiny_init["init0"], "data": data})
    old_sft = _weights(sft)
    run_stage("reward", rd, RM_FAST, {"init": sft, "data": data})
    sft = run_stage("sft", rd, SFT_FAST, {"init": tiny_init["init1"], "data": data})  # new base model
    assert load_stage(sft).manifest["key"]["inputs"]["init"]["path"] == str(tiny_init["init1"])
    assert not all(torch.equal(old_sft[k], v) for k, v in _weights(sft).items())
    rerun = run_stage("reward", rd, RM_FAST, {"init": sft, "data": data})
    assert _steps(sft) == 6 and _steps(rerun) == 6

    fresh_dir = tmp_path / "fresh"
    fresh_sft = run_stage("sft", fresh_dir, SFT_FAST, {"init": tiny_init["init1"], "data": data})
    fresh = run_stage("reward", fresh_dir, RM_FAST, {"init": fresh_sft, "data": data})
    _assert_same(sft, fresh_sft)
    _assert_same(rerun, fresh)

def test_real_data_stage_reruns_when_its_file_gains_rows(tmp_path):
    """The nightly job: same config and code, rows appended to the SFT file -> the data stage re-runs."""
    from flows.tasks import cache_check
    from stages import data

    rows = tmp_path / "sft.jsonl"
    src = json.loads(SHARED_SFT.read_text())[:40] if SHARED_SFT.is_file() else [
        {"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    rows.write_text("".join(json.dumps(r) + "\n" for r in src[:30]))
    cfg = data.Config(source="files", size="tiny", files={"sft": {"path": str(rows), "format": "alpaca"}})
    out = data.run(cfg, {}, tmp_path / "run")
    assert cache_check("stages.data", cfg, {}, out)[0]
    info = load_stage(out).eval["files"]["sft"]
    assert info["train"] + info["val"] == 30 and info["val"] >= 1  # ~5% held out (by content hash), at least 1
    with open(rows, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in src[30:]))
    hit, why = cache_check("stages.data", cfg, {}, out)
    assert not hit and why == f"data 'sft' changed: {rows} (content differs)"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_oom_in_evaluation_after_training_reruns_the_evaluation_only(tiny_init, tmp_path, stage, monkeypatch, caplog):
    """Issue 15 §7 for the TRL stages: the Trainer saved the final step before the evaluation failed,
    so the re-run restores it (alignline.training.train_or_restore), trains nothing and only evaluates;
    its weights are the ones training ended with."""
    import alignline.evaluation
    import alignline.training
    from tests.conftest import run_stage

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated in the evaluation after training)")

    real_train = alignline.training.train_or_restore
    trained: list[int] = []

    def train_then_oom(trainer, resume, step):
        out = real_train(trainer, resume, step)
        trained.append(trainer.state.global_step)
        if stage == "sft":
            trainer.evaluate = oom  # the val-loss evaluation right after training
        return out

    monkeypatch.setattr(alignline.training, "train_or_restore", train_then_oom)
    if stage == "reward":
        # The reward stage imports it where it runs (its module stays torch-free for --help).
        monkeypatch.setattr(alignline.evaluation, "score_conversations", oom)
    over = SFT_FAST if stage == "sft" else RM_FAST
    inputs = {"init": tiny_init["init0"], "data": tiny_init["data"]}
    with pytest.raises(torch.OutOfMemoryError):
        run_stage(stage, tmp_path, over, inputs)
    assert trained == [6] and not (tmp_path / stage / "manifest.json").exists()
    ckpt = tmp_path / stage / "state" / "trainer" / "checkpoint-6"
    assert (ckpt / "trainer_state.json").is_file(), "the final step was saved before the evaluation"

    monkeypatch.undo()
    steps: list[int] = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))  # any training step shows
    with caplog.at_level(logging.INFO):
        out = run_stage(stage, tmp_path, over, inputs)
    assert steps == [], "the re-run trained again"
    assert f"{stage}: resumed from step 6" in caplog.text
    assert _steps(out) == 6
    ev = json.loads((out / "eval.json").read_text())
    assert (ev["val_loss"] > 0) if stage == "sft" else (0 <= ev["accuracy"] <= 1)
    saved = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    final = _weights(out)
    shared = [k for k in saved if k in final]
    assert shared and all(torch.equal(saved[k], final[k]) for k in shared)
