"""The stage-directory contract (alignline/artifacts.py): manifest, atomic finalize, checked loading, state.

    .venv/bin/pytest tests/test_artifacts.py -q      # ~5 s, no training
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignline.artifacts import (
    MANIFEST,
    StageError,
    StageRun,
    code_version,
    load_stage,
    model_dir,
    sha256_file,
)
from alignline.config import OptimConfig, ScheduleConfig, StrictModel
from alignline.training import build_optimizer, build_scheduler, lr_factor, param_groups


class Cfg(StrictModel):
    lr: float = 1e-3
    steps: int = 3


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def finished_stage(run_dir, stage="pretrain", cfg=None, inputs=None):
    run = StageRun(run_dir, stage, cfg or Cfg(), inputs=inputs or {})
    tiny_llama().save_pretrained(run.staging / "checkpoint")
    run.metrics.log(1, loss=2.0)
    return run.finalize(eval={"val_loss": 1.5}, headline={"val_loss": 1.5}, samples=[{"prompt": "p", "response": "r"}])


def test_finalize_writes_contract_and_manifest_last(tmp_path):
    out = finished_stage(tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint", "config.yaml", "metrics.jsonl", "eval.json", "samples.jsonl", "manifest.json", "tb"} <= names
    assert not (out / ".staging").exists()
    m = json.loads((out / MANIFEST).read_text())
    assert m["stage"] == "pretrain" and m["status"] == "complete"
    assert m["headline"] == {"val_loss": 1.5}
    assert len(m["code_version"]) == 64 and "torch" in m["versions"] and m["wall_time_s"] >= 0
    weights = out / "checkpoint" / "model.safetensors"
    assert m["files"]["checkpoint/model.safetensors"]["sha256"] == sha256_file(weights)
    # Every listed file is older than (or as old as) the manifest: the manifest was written last.
    mtime = (out / MANIFEST).stat().st_mtime_ns
    assert all((out / rel).stat().st_mtime_ns <= mtime for rel in m["files"])
    sd = load_stage(out, expect="pretrain")
    assert sd.eval["val_loss"] == 1.5 and sd.checkpoint == out / "checkpoint" and sd.config["lr"] == 1e-3


def test_corrupted_weights_are_refused_naming_the_file(tmp_path):
    out = finished_stage(tmp_path)
    weights = out / "checkpoint" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(blob))
    with pytest.raises(StageError, match=r"checkpoint/model\.safetensors: sha256 does not match"):
        load_stage(out)


def test_missing_or_truncated_file_is_refused(tmp_path):
    out = finished_stage(tmp_path)
    (out / "eval.json").write_text("{}")
    with pytest.raises(StageError, match=r"eval\.json: size"):
        load_stage(out)
    (out / "eval.json").unlink()
    with pytest.raises(StageError, match=r"eval\.json is listed in .*manifest\.json but missing"):
        load_stage(out)


def test_incomplete_dir_is_never_accepted_as_input(tmp_path):
    out = finished_stage(tmp_path)
    # Re-opening the stage for a new run removes the manifest first: the dir is now incomplete.
    StageRun(tmp_path, "pretrain", Cfg(steps=9))
    assert not (out / MANIFEST).exists()
    with pytest.raises(StageError, match=r"manifest\.json is missing: .* is incomplete"):
        load_stage(out)
    with pytest.raises(StageError, match="manifest.json is missing"):
        StageRun(tmp_path, "sft", Cfg(), inputs={"init": out})
    with pytest.raises(StageError, match="manifest.json is missing"):
        model_dir(out)
    with pytest.raises(StageError, match="does not exist"):
        load_stage(tmp_path / "nope", expect="data")


def test_bad_manifest_and_wrong_stage(tmp_path):
    out = finished_stage(tmp_path)
    with pytest.raises(StageError, match="this is a 'pretrain' stage, expected 'sft'"):
        load_stage(out, expect="sft")
    (out / MANIFEST).write_text('{"stage": "pretrain", "status": "running"')
    with pytest.raises(StageError, match=r"manifest\.json:1: not valid JSON"):
        load_stage(out)
    (out / MANIFEST).write_text('{"stage": "pretrain", "status": "running"}')
    with pytest.raises(StageError, match="status is 'running', not 'complete'"):
        load_stage(out)


def test_inputs_are_recorded_with_manifest_hash(tmp_path):
    parent = finished_stage(tmp_path, "data")
    child = finished_stage(tmp_path, "tokenizer", inputs={"data": parent})
    m = json.loads((child / MANIFEST).read_text())
    assert m["inputs"]["data"]["manifest_sha256"] == sha256_file(parent / MANIFEST)
    assert m["inputs"]["data"]["path"] == str(parent.resolve())


def test_state_roundtrip_restores_model_optimizer_scheduler_rng(tmp_path):
    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), 10)
    x = torch.randint(0, 40, (2, 6))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    run = StageRun(tmp_path, "pretrain", Cfg())
    run.save_state(2, model=model, optimizer=opt, scheduler=sched, data_position={"step": 2}, extra={"a": 1})
    expected_rand = torch.rand(3)

    run2 = StageRun(tmp_path, "pretrain", Cfg())
    model2 = tiny_llama(seed=1)
    opt2 = build_optimizer(model2, OptimConfig(lr=1e-2))
    sched2 = build_scheduler(opt2, ScheduleConfig(warmup_steps=2), 10)
    meta = run2.load_state(model=model2, optimizer=opt2, scheduler=sched2)
    assert meta["step"] == 2 and meta["data_position"] == {"step": 2} and meta["extra"] == {"a": 1}
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored to the saved point
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # One more identical step gives identical weights (optimizer moments were restored).
    for m, o in ((model, opt), (model2, opt2)):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_state_from_another_config_is_discarded(tmp_path, caplog):
    run = StageRun(tmp_path, "pretrain", Cfg())
    run.save_state(1, model=tiny_llama())
    assert run.latest_state() is not None
    with caplog.at_level("WARNING"):
        run2 = StageRun(tmp_path, "pretrain", Cfg(lr=5e-4))
    assert "config changed" in caplog.text
    assert run2.latest_state() is None and run2.load_state(model=tiny_llama()) is None


def test_optimizer_groups_skip_norms_biases_embeddings():
    model = tiny_llama()
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("proj.weight") for p in decay["params"])
    kept = {names[id(p)] for p in keep["params"]}
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert sum(p.numel() for g in (decay, keep) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_lr_schedule_closed_form():
    s = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1, kind="cosine")
    assert lr_factor(0, 110, s) == pytest.approx(0.1)
    assert lr_factor(9, 110, s) == pytest.approx(1.0)
    assert lr_factor(60, 110, s) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(110, 110, s) == pytest.approx(0.1)


def test_code_version_changes_with_source(tmp_path):
    f = tmp_path / "stage.py"
    f.write_text("A = 1\n")
    v1 = code_version(f)
    f.write_text("A = 2\n")
    assert code_version(f) != v1 and code_version(f) == code_version(f)
    # The same module imported from another folder (a copy, a moved checkout) is the same code.
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "stage.py").write_text("A = 2\n")
    assert code_version(tmp_path / "copy" / "stage.py") == code_version(f)


def test_files_writes_are_atomic_and_readers_name_the_line(tmp_path):
    """alignline.files: a write that fails half-way keeps the old file and leaves no temp file."""
    from alignline.files import read_json, read_jsonl, write_json, write_jsonl

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": "é"}])
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'

    def rows():
        yield {"a": 2}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    path.write_text('{"a": 1}\n{"b": \n', encoding="utf-8")
    with pytest.raises(StageError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl(path)
    write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert read_json(tmp_path / "x.json") == {"k": [1, 2]}
    with pytest.raises(StageError, match="does not exist"):
        read_json(tmp_path / "missing.json")
