"""Loaders: real formats map to the suite's record shapes; validation reports every problem with file:line.

    .venv/bin/pytest tests/test_loaders.py -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alignline.data.loaders import DataValidationError, LoaderConfig, load_records, load_suite_split
from alignline.data.tasks import suite_config, write_suite
from alignline.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _problems(*args, **kw) -> list[str]:
    with pytest.raises(DataValidationError) as info:
        load_records(*args, **kw)
    assert isinstance(info.value, ValueError)
    return [str(p) for p in info.value.problems]


# --------------------------------------------------------------------------- real data


@needs_shared
def test_alpaca_demo_maps_instruction_and_input():
    path = SHARED / "sft" / "alpaca_en_demo.json"
    raw = json.loads(path.read_text())
    recs = load_records(path, kind="sft")
    assert len(recs) == len(raw) == 999
    for r, src in zip(recs, raw):
        user = src["instruction"] + ("\n" + src["input"] if src["input"] else "")
        assert r["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": src["output"]}]
    assert any(src["input"] for src in raw)  # both branches exercised


@needs_shared
def test_sharegpt_preference_demo_maps_roles():
    path = SHARED / "preference" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())
    recs = load_records(path, kind="preference")
    assert len(recs) == 300
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for r, src in zip(recs, raw):
        assert r["prompt"] == [{"role": roles[m["from"]], "content": m["value"]} for m in src["conversations"]]
        assert r["prompt"][-1]["role"] == "user"
        assert r["chosen"] == [{"role": "assistant", "content": src["chosen"]["value"]}]
        assert r["rejected"] == [{"role": "assistant", "content": src["rejected"]["value"]}]
    assert any(r["prompt"][0]["role"] == "system" for r in recs)
    # The same file as SFT data trains on the chosen answer.
    sft = load_records(path, kind="sft")
    assert sft[0]["messages"][-1]["content"] == raw[0]["chosen"]["value"]


@needs_shared
def test_plain_text_sources():
    c4 = load_records(SHARED / "pretrain" / "c4_demo.jsonl", kind="pretrain")
    raw = [json.loads(line)["text"] for line in (SHARED / "pretrain" / "c4_demo.jsonl").open()]
    assert [r["text"] for r in c4] == raw
    wiki = load_records(SHARED / "pretrain" / "wiki_demo.txt", kind="pretrain", text_unit="line")
    assert len(wiki) == 30 and wiki[0]["text"].startswith("Anarchism")
    shakes = load_records(SHARED / "pretrain" / "tinyshakespeare.txt", kind="pretrain", text_unit="paragraph")
    assert shakes[0]["text"] == "First Citizen:\nBefore we proceed any further, hear me speak."
    whole = (SHARED / "pretrain" / "tinyshakespeare.txt").read_text()
    assert "".join(whole.split()) == "".join("".join(r["text"] for r in shakes).split())  # nothing lost


def test_hh_transcripts_to_messages(tmp_path):
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?"
    rows = [{"chosen": prompt + "\n\nAssistant: 4", "rejected": prompt + "\n\nAssistant: 5"}]
    recs = load_records(_jsonl(tmp_path / "hh.jsonl", rows), kind="preference", format="hh")
    assert recs == [{
        "prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }]
    sft = load_records(tmp_path / "hh.jsonl", kind="sft", format="hh")
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "4"} and len(sft[0]["messages"]) == 4


def test_parquet_and_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["What is 1+1?", "Say hi"], "a": ["2", "hi"]}), tmp_path / "d.parquet")
    cfg = LoaderConfig(path=str(tmp_path / "d.parquet"), kind="sft", format="alpaca",
                       columns={"instruction": "q", "output": "a"})
    assert load_records(cfg)[0]["messages"][1] == {"role": "assistant", "content": "2"}


def test_prompts_records_and_suite_round_trip(tmp_path):
    write_suite(tmp_path, suite_config("tiny"))
    for kind in ("sft", "preference", "prompts"):
        assert load_suite_split(tmp_path, kind, "test") == read_jsonl(tmp_path / kind / "test.jsonl")
    assert load_suite_split(tmp_path, "pretrain", "val") == read_jsonl(tmp_path / "pretrain" / "val.jsonl")


def test_hub_ids_go_through_datasets(monkeypatch):
    import datasets

    calls = {}

    def fake_load(path, name=None, split=None, streaming=False):
        calls.update(path=path, split=split, streaming=streaming)
        return [{"text": "a web page"}, {"text": ""}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = LoaderConfig(path="org/corpus", kind="pretrain", streaming=True)
    probs = _problems(cfg)
    assert calls == {"path": "org/corpus", "split": "train", "streaming": True}
    assert probs == ["hf:org/corpus[train]:2: field 'text' is empty"]


# --------------------------------------------------------------------------- validation, one case each


def test_invalid_json_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    (p,) = _problems(f, kind="pretrain")
    assert p.startswith(f"{f}:2: invalid JSON: ")


def test_invalid_json_in_array(tmp_path):
    f = _write(tmp_path / "d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": 1}\n]')
    (p,) = _problems(f, kind="sft")
    assert p.startswith(f"{f}:3: invalid JSON")


def test_missing_and_empty_fields(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": " ", "output": "b"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    assert _problems(f, kind="sft", format="alpaca") == [
        f"{f}:2: missing field 'output'", f"{f}:3: field 'instruction' is empty"]


def test_kto_labels_are_refused_not_ignored(tmp_path):
    """Unpaired good/bad labels (TRL's KTO `label`, LLaMA-Factory's `kto_tag`) read as SFT would train
    on the bad answers too: each labelled record is an error naming the line and the fix."""
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}],
             "label": True},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "go away"}],
             "kto_tag": False}]
    f = _jsonl(tmp_path / "kto.jsonl", rows)
    problems = _problems(f, kind="sft")
    assert [p.split(": ", 1)[0] for p in problems] == [f"{f}:1", f"{f}:2"]
    assert "`label` marks this answer good or bad" in problems[0] and "kto_tag=true records" in problems[1]
    # A `label` that is not a good/bad flag (e.g. a topic string) is left alone.
    ok = _jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "b", "label": "math"}])
    assert load_records(ok, kind="sft")[0]["messages"][1]["content"] == "b"


def test_kto_data_reads_both_layouts_and_needs_a_label(tmp_path):
    """kind=kto: TRL's prompt/completion/label and LLaMA-Factory's chat + kto_tag become
    {prompt, completion, label}; a record without a boolean label is an error naming its line."""
    trl = _jsonl(tmp_path / "trl.jsonl", [
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}],
         "label": True},
        {"prompt": "2+3?", "completion": "6", "label": False}])
    assert load_records(trl, kind="kto") == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}],
         "label": True},
        {"prompt": [{"role": "user", "content": "2+3?"}], "completion": [{"role": "assistant", "content": "6"}],
         "label": False}]
    lf = _jsonl(tmp_path / "lf.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "human", "value": "bye"}, {"from": "gpt", "value": "go away"}], "kto_tag": False}])
    (rec,) = load_records(lf, kind="kto")
    assert rec["completion"] == [{"role": "assistant", "content": "go away"}] and rec["label"] is False
    assert [m["content"] for m in rec["prompt"]] == ["hi", "hello", "bye"]  # the earlier turns are the prompt
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                          {"prompt": "a", "completion": "b", "label": "yes"}])
    assert _problems(bad, kind="kto") == [f"{bad}:2: a KTO record needs a boolean `label` (TRL layout) or `kto_tag` "
                                          "(LLaMA-Factory): true for a good answer, false for a bad one"]


def test_unknown_role(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    (p,) = _problems(f, kind="sft")
    assert p.startswith(f"{f}:1: unknown role 'robot'")
    # ...and a role mapping in config fixes it.
    cfg = LoaderConfig(path=str(f), kind="sft", roles={"human": "user", "robot": "assistant"})
    assert load_records(cfg)[0]["messages"][1] == {"role": "assistant", "content": "beep"}


def test_non_utf8_bytes(tmp_path):
    f = _write(tmp_path / "d.txt", b"fine line\nbad \xff\xfe line\nanother fine\n")
    assert _problems(f, kind="pretrain") == [f"{f}:2: not valid UTF-8 (byte 0xff at column 5); re-encode the file as UTF-8"]
    g = _write(tmp_path / "d.jsonl", b'{"text": "a"}\n{"text": "\xc3("}\n')
    assert _problems(g, kind="pretrain")[0].startswith(f"{g}:2: not valid UTF-8")


def test_empty_dataset(tmp_path):
    f = _write(tmp_path / "d.jsonl", "\n\n")
    assert _problems(f, kind="sft") == [f"{f}: dataset is empty (no records)"]
    g = _write(tmp_path / "d.json", "[]")
    assert _problems(g, kind="sft") == [f"{g}: dataset is empty (no records)"]


def test_chosen_identical_to_rejected(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "same"}],
           "rejected": [{"role": "assistant", "content": "same"}]}
    f = _jsonl(tmp_path / "d.jsonl", [row])
    (p,) = _problems(f, kind="preference")
    assert p.startswith(f"{f}:1: chosen is identical to rejected")


def test_too_long_prompts_dropped_with_warning(tmp_path):
    rows = [{"instruction": "short", "output": "x"}, {"instruction": "y" * 50, "output": "x"},
            {"instruction": "z" * 60, "output": "x"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 2 record"):
        recs = load_records(f, kind="sft", max_prompt_length=20, length_unit="chars")
    assert [r["messages"][0]["content"] for r in recs] == ["short"]


def test_too_long_prompts_error_when_configured(tmp_path):
    rows = [{"instruction": "short", "output": "x"}, {"instruction": "y" * 50, "output": "x"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    assert _problems(f, kind="sft", max_prompt_length=20, length_unit="chars", on_too_long="error") == [
        f"{f}:2: prompt is 50 chars long, over max_prompt_length=20"]


def test_too_long_in_tokens_needs_a_tokenizer(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a b c d", "output": "x"}])
    with pytest.raises(ValueError, match="no tokenizer"):
        load_records(f, kind="sft", max_prompt_length=2)

    class Tok:
        def encode(self, s, add_special_tokens=False):
            return s.split()

    assert _problems(f, Tok(), kind="sft", max_prompt_length=2, on_too_long="error") == [
        f"{f}:1: prompt is 4 tokens long, over max_prompt_length=2"]


def test_all_problems_reported_at_once(tmp_path):
    f = _write(tmp_path / "d.jsonl", "\n".join([
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
        '{"messages": [{"role": "user", "content": "hi"}',
        '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}',
        '{"messages": [{"role": "user", "content": "only a question"}]}',
    ]).encode() + b"\n\xff\n")
    probs = _problems(f, kind="sft")
    assert [p.split(":")[1] for p in probs] == ["2", "3", "4", "5", "6"]  # sorted by line
    with pytest.raises(DataValidationError, match="5 problem"):
        load_records(f, kind="sft")


def test_cli_validate_exits_nonzero_and_prepare_writes_nothing(tmp_path, capsys):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    # In-process (typer's runner, the script's main) keeps the test fast.
    from typer.testing import CliRunner

    from alignline_cli.main import app

    res = CliRunner().invoke(app, ["data", "validate", str(f), "--kind", "sft"])
    assert res.exit_code == 2 and f"{f}:2: missing field 'output'" in res.output
    ok = CliRunner().invoke(app, ["data", "validate", str(f), "--kind", "sft", "--set", "limit=1"])
    assert ok.exit_code == 0, ok.output
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path / "out"
    assert prepare.main([str(f), "--kind", "sft", "--out", str(out)]) == 1
    assert "missing field 'output'" in capsys.readouterr().err
    assert not out.exists()  # nothing written on failure
    good = _jsonl(tmp_path / "g.jsonl", rows[:1] * 3)
    assert prepare.main([str(good), "--kind", "sft", "--out", str(out)]) == 0
    assert len(read_jsonl(out / "sft" / "train.jsonl")) == 2 and len(read_jsonl(out / "sft" / "val.jsonl")) == 1
