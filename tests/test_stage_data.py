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
def test_real_files_give_every_stage_held_out_data_of_their_own(tmp_path):
    """Every source is split on its own; the prompts come from the user's chats and pairs (no
    built-in arithmetic), held out on the same side as the chat they come from, and carry no
    gold answer, so nothing downstream can report a gold accuracy on them."""
    cfg = data.Config(size="tiny", source="files", files={
        "pretrain": [{"path": str(SHARED / "pretrain/tinyshakespeare.txt"), "text_unit": "paragraph"},
                     {"path": str(SHARED / "pretrain/c4_demo.jsonl")}],
        "sft": {"path": str(SHARED / "sft/alpaca_en_demo.json"), "format": "alpaca"},
        "preference": {"path": str(SHARED / "preference/dpo_en_demo.json"), "format": "sharegpt"},
        "val_fraction": 0.1,
    })
    out = data.run(cfg, {}, tmp_path)
    head = load_stage(out).eval
    pre_val = {r["text"] for r in read_jsonl(out / "pretrain/val.jsonl")}
    c4 = {r["text"] for r in read_jsonl(SHARED / "pretrain/c4_demo.jsonl")}
    # Per source: the small c4 file has its ~10% in val, not crowded out by 1 MB of Shakespeare.
    assert 15 <= len(pre_val & c4) <= 45, len(pre_val & c4)
    per = {s["path"].rsplit("/", 1)[-1]: s for s in head["files"]["pretrain"]["sources"]}
    assert per["c4_demo.jsonl"]["val"] == len(pre_val & c4)
    # The report's data row counts what was written, not the built-in suite's sizes.
    assert head["sizes"]["sft/train.jsonl"] + head["sizes"]["sft/val.jsonl"] == 999
    assert head["sizes"]["prompts/test.jsonl"] == len(read_jsonl(out / "prompts/test.jsonl"))
    prompts = read_jsonl(out / "prompts/train.jsonl") + read_jsonl(out / "prompts/test.jsonl")
    assert all("answer" not in r for r in prompts) and head["files"]["prompts"]["verifier"] == "none"
    assert not any("What is" in r["prompt"][-1]["content"] and "+" in r["prompt"][-1]["content"] for r in prompts)
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    test_prompts = {key(r["prompt"]) for r in read_jsonl(out / "prompts/test.jsonl")}
    train_prompts = {key(r["prompt"]) for r in read_jsonl(out / "prompts/train.jsonl")}
    sft_val = {key(r["messages"][:-1]) for r in read_jsonl(out / "sft/val.jsonl")}
    pref_val = {key(r["prompt"]) for r in read_jsonl(out / "preference/val.jsonl")}
    sft_train = {key(r["messages"][:-1]) for r in read_jsonl(out / "sft/train.jsonl")}
    assert sft_val | pref_val == test_prompts  # the held-out chats' and pairs' prompts, and only those
    assert not test_prompts & train_prompts and not sft_train & test_prompts  # nothing trained on is evaluated
    assert (out / "prompts/val.jsonl").read_bytes() == (out / "prompts/test.jsonl").read_bytes()


def test_the_split_is_by_content_so_appended_rows_move_nothing(tmp_path):
    rows = [{"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(200)]
    src = tmp_path / "chats.json"
    src.write_text(json.dumps(rows))
    cfg = data.Config(size="tiny", source="files", files={"sft": {"path": str(src), "format": "alpaca"},
                                                          "val_fraction": 0.2})
    a = read_jsonl(data.run(cfg, {}, tmp_path / "a") / "sft/val.jsonl")
    assert 25 <= len(a) <= 55  # ~20% of 200
    src.write_text(json.dumps(list(reversed(rows)) + [{"instruction": f"New {i}?", "output": "x"} for i in range(50)]))
    b = read_jsonl(data.run(cfg, {}, tmp_path / "b") / "sft/val.jsonl")
    old = {r["messages"][0]["content"] for r in b if r["messages"][0]["content"].startswith("Question")}
    assert old == {r["messages"][0]["content"] for r in a}  # reordered + appended: the same rows held out


def test_a_prompt_file_with_answers_and_a_user_scorer_is_a_verifier(tmp_path, monkeypatch):
    from alignline.config import InputError
    from alignline.data.loaders import DataValidationError
    from alignline.evaluation import gold_scores, has_verifier

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_scorer.py").write_text(
        "def contains(response, answer):\n    return float(answer.lower() in response.lower())\n")
    rows = [{"question": f"Name colour {i}.", "gold": c} for i, c in enumerate(["red", "blue", "green"] * 10)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    files = {"prompts": {"path": str(src), "format": "messages", "columns": {"prompt": "question", "answer": "gold"},
                         "default_match": "my_scorer:contains"},
             "val_fraction": 0.2}
    out = data.run(data.Config(size="tiny", source="files", files=files), {}, tmp_path / "run")
    test = read_jsonl(out / "prompts/test.jsonl")
    assert has_verifier(test) and load_stage(out).eval["files"]["prompts"]["verifier"] == "gold"
    assert test[0]["match"] == "my_scorer:contains"
    assert load_stage(out).headline["rows"].startswith("pretrain ")  # the built-in parts are counted too
    # The user's function scores, through the one gold path every stage uses.
    assert gold_scores([f"It is {test[0]['answer'].upper()}!", "no idea"], [test[0], test[0]]) == [1.0, 0.0]
    # The built-in suite's training data stays where the user gave no file of that kind.
    assert read_jsonl(out / "sft/train.jsonl")

    # A file where some prompts have an answer and some do not is refused, nothing written.
    src.write_text("\n".join(json.dumps(r if i % 2 else {"question": r["question"]}) for i, r in enumerate(rows)))
    with pytest.raises(InputError, match="15 of 30 prompts have a gold answer"):
        data.run(data.Config(size="tiny", source="files", files=files), {}, tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "data").exists()
    # A scorer that cannot be imported is one problem per line, before anything is written.
    src.write_text(json.dumps(rows[0]))
    with pytest.raises(DataValidationError, match="no_such_module:fn.*cannot be imported"):
        data.run(data.Config(size="tiny", source="files", files={
            **files, "prompts": {**files["prompts"], "default_match": "no_such_module:fn"}}), {}, tmp_path / "bad")
    assert not (tmp_path / "bad" / "data").exists()


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


def test_kto_files_are_split_and_feed_the_prompts(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 != 0} for i in range(60)]
    src = tmp_path / "kto.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = data.run(data.Config(size="tiny", source="files", files={"kto": {"path": str(src)}, "val_fraction": 0.2}),
                   {}, tmp_path / "run")
    train, val = read_jsonl(out / "kto/train.jsonl"), read_jsonl(out / "kto/val.jsonl")
    assert len(train) + len(val) == 60 and val and {type(r["label"]) for r in train} == {bool}
    held = {r["prompt"][-1]["content"] for r in val}
    assert held == {r["prompt"][-1]["content"] for r in read_jsonl(out / "prompts/test.jsonl")}
    assert f"kto {len(train)}/{len(val)}" in load_stage(out).headline["rows"]
