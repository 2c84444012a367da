"""The data and tokenizer stages: deterministic built-in suite, real files through the loaders,
tokenizer training and reuse.

    .venv/bin/pytest tests/test_stage_data.py -q      # ~10 s
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignline.artifacts import load_stage
from alignline.config import load_config
from alignline.files import read_jsonl
from stages import data, tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def test_builtin_suite_is_deterministic_and_complete(tmp_path):
    a = data.run(data.Config(size="tiny"), {}, tmp_path / "a")
    b = data.run(data.Config(size="tiny"), {}, tmp_path / "b")
    ma, mb = load_stage(a, expect="data").manifest, load_stage(b).manifest
    assert ma["files"] == mb["files"]  # same seed -> byte-identical outputs
    for rel in ("pretrain/train.jsonl", "pretrain/val.jsonl", "sft/train.jsonl", "preference/val.jsonl",
                "prompts/test.jsonl", "suite.json"):
        assert rel in ma["files"], rel
    suite = json.loads((a / "suite.json").read_text())
    assert suite["sizes"]["prompts/test.jsonl"] == len(read_jsonl(a / "prompts/test.jsonl"))
    c = data.run(data.Config(size="tiny", suite={"seed": 1}), {}, tmp_path / "c")
    assert load_stage(c).manifest["files"]["sft/train.jsonl"] != ma["files"]["sft/train.jsonl"]


def test_suite_override_errors_name_the_key(tmp_path):
    from alignline.config import ConfigError

    bad = tmp_path / "d.yaml"
    bad.write_text("size: tiny\nsuite:\n  sede: 3\n")
    with pytest.raises(ConfigError, match="sede"):
        load_config(data.Config, bad)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present (CI clones have it beside the repo)")
def test_real_files_replace_training_data_but_keep_gold_prompts(tmp_path):
    cfg = data.Config(size="tiny", source="files", files={
        "pretrain": [{"path": str(SHARED / "pretrain/c4_demo.jsonl")}],
        "sft": {"path": str(SHARED / "sft/alpaca_en_demo.json"), "format": "alpaca"},
    })
    out = data.run(cfg, {}, tmp_path)
    pre = read_jsonl(out / "pretrain/train.jsonl") + read_jsonl(out / "pretrain/val.jsonl")
    assert len(pre) == 300 and all(r["text"] for r in pre)
    sft = read_jsonl(out / "sft/train.jsonl")
    assert sft[0]["messages"][0]["role"] == "user" and sft[0]["messages"][-1]["role"] == "assistant"
    assert (out / "prompts/test.jsonl").is_file() and (out / "preference/train.jsonl").is_file()


def test_tokenizer_trains_and_reuses(tmp_path):
    from alignline.tokenizer import load_tokenizer, tokenizer_hash

    d = data.run(data.Config(size="tiny"), {}, tmp_path / "run")
    t = tokenizer.run(tokenizer.Config(vocab_size=300), {"data": d}, tmp_path / "run")
    sd = load_stage(t, expect="tokenizer")
    tok = load_tokenizer(sd.checkpoint)
    assert len(tok) == 300 and sd.eval["tokenizer_sha256"] == tokenizer_hash(tok)
    text = read_jsonl(d / "pretrain/val.jsonl")[0]["text"]
    assert tok.decode(tok(text)["input_ids"]) == text
    r = tokenizer.run(tokenizer.Config(source="reuse", reuse_from=str(t)), {}, tmp_path / "reuse")
    assert load_stage(r).eval["tokenizer_sha256"] == sd.eval["tokenizer_sha256"]
